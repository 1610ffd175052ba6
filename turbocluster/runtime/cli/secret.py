"""``turbo-node secret``: make the cluster secret file, and print how to copy it to the other machines."""

import logging
import os
import shlex
from pathlib import Path

from ..transport import auth

log = logging.getLogger(__name__)


def add_command(subparsers) -> None:
    """Adds ``secret`` to turbo-node's subcommands."""
    p = subparsers.add_parser("secret", help="create the cluster secret file (0600) and print a join command for other machines")
    p.add_argument("--secret-file", default=None, help=f"where to write it (default ${auth.ENV_SECRET_FILE} or {auth.default_secret_path()})")
    p.add_argument("--force", action="store_true", help="replace an existing secret (every node must get the new one)")


def target(path=None) -> Path:
    """The file ``turbo-node secret`` writes: ``path``, $TURBO_SECRET_FILE, else the default."""
    return Path(path or os.environ.get(auth.ENV_SECRET_FILE) or auth.default_secret_path())


def run(args) -> int:
    """Create (or with --force replace) the secret file; print the command that installs it elsewhere."""
    if os.environ.get(auth.ENV_SECRET):
        raise SystemExit(f"turbo-node secret: ${auth.ENV_SECRET} is set and overrides any file; unset it to make the file")
    path = target(args.secret_file)
    if path.exists() and args.force:
        path.unlink()
    existed = path.exists()
    try:
        secret = auth.load_or_create_secret(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"turbo-node secret: {e}") from None
    print(f"{'using the existing' if existed else 'created'} cluster secret {path} (mode 0600)")
    quoted = _for_other_machines(path)
    print("on each other machine of the cluster, run:")
    print(f"  mkdir -p -m 700 $(dirname {quoted}) && (umask 077; echo {secret} > {quoted})")
    return 0


def _for_other_machines(path: Path) -> str:
    """``path`` for a shell on another machine: under the home folder as ``~/...`` (user names differ)."""
    try:
        return "~/" + shlex.quote(str(path.resolve().relative_to(Path.home().resolve())))
    except ValueError:
        return shlex.quote(str(path))
