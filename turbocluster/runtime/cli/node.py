"""``turbo-node``: serve a share of a model's layers (also ``python -m turbocluster.runtime.cli.node``).

    turbo-node serve [--host H] [--port P] [--model M --layers S:E] [--memory-budget 8G] [--name N]

Wrong input is refused with one line saying what to do, before the server starts.
"""

import argparse
import errno
import os
import re
import socket
import sys
from typing import Optional

from . import output
from .output import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# Subcommands owned by other modules: name -> (add(subparsers), run(args) -> int). E.g. `turbo-node secret`.
COMMANDS = {}
from .secret import add_command as _add_secret, run as _run_secret  # noqa: E402  (turbo-node secret)

COMMANDS["secret"] = (_add_secret, _run_secret)


def version() -> str:
    from ... import __version__

    return f"%(prog)s {__version__}"


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512m"``, ``"1073741824"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a byte count like 8G, 512M or 1073741824, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_layers(text: str) -> tuple:
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected layers as START:END with START < END, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def tls_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    p.add_argument("--tls-cert", default=None, help="PEM certificate this node serves with" if server
                   else "PEM client certificate to present to nodes (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: " + (
        "require client certificates it signed (mTLS), and trust it when calling the next node" if server
        else "trust node certificates it signed"))


def tls(args, server: bool = False) -> Optional[dict]:
    """``{"cert", "key", "ca"}`` from the --tls-* options, or None when none is given."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if not (cert or key or ca):
        return None
    if (cert is None) != (key is None):
        raise UsageError(f"give both --tls-cert and --tls-key, got cert={cert!r} key={key!r}")
    if server and cert is None:
        raise UsageError("serving TLS needs --tls-cert and --tls-key")
    for path in (cert, key, ca):
        if path and not os.path.exists(path):
            raise UsageError(f"TLS file {path} not found")
    return {"cert": cert, "key": key, "ca": ca}


def secret_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret-file", default=None, help="cluster secret file (created 0600 if missing); "
                   "$TURBO_CLUSTER_SECRET also sets it. Without either, calls are not authenticated")


def secret(args) -> Optional[str]:
    """The cluster secret from $TURBO_CLUSTER_SECRET or --secret-file, else None (no auth)."""
    from ..transport import auth

    try:
        return auth.find_secret(args.secret_file)  # also $TURBO_SECRET_FILE and the default file when present
    except (ValueError, OSError) as e:
        raise UsageError(f"{e}; make one with: python -c 'import secrets; print(secrets.token_hex(32))'") from None


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port another process listens on (gRPC would share it silently with SO_REUSEPORT)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the port with TIME_WAIT left is fine
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use (another turbo-node?); pick another with {flag}") from None
            raise UsageError(f"cannot bind {host}:{port}: {e.strerror}; check --host and {flag}") from None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model(model: Optional[str]) -> None:
    """Refuse, before anything starts, a model that is neither a local model nor a plausible hub id."""
    if model is None:
        return
    path = os.path.expanduser(model)
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or os.path.exists(path)
    if looks_local:
        if not os.path.exists(path):
            raise UsageError(f"model {model}: no such file or directory; give an mlx-lm model directory "
                             "(with config.json), a .gguf file, or a hub id like mlx-community/Qwen3-0.6B-4bit")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"model {model}: the directory has no config.json; give an mlx-lm model directory or a .gguf file")
        if not os.path.isdir(path) and not model.endswith(".gguf"):
            raise UsageError(f"model {model}: a model file must be a .gguf; for an mlx-lm model give its directory")
    elif not _HUB_ID.fullmatch(model):
        raise UsageError(f"model {model!r} is neither a local path nor a hub id like mlx-community/Qwen3-0.6B-4bit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbo-node", description="Serve a share of a model's layers over gRPC.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve layers until SIGINT/SIGTERM")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default all interfaces)")
    serve.add_argument("--port", type=int, default=7070, help="port to bind; 0 picks a free one")
    serve.add_argument("--model", default=None, help="model path or hub id to load at start, with --layers "
                       "(default: the bundled model)")
    serve.add_argument("--layers", type=parse_layers, default=None, help="layers START:END to load at start; "
                       "without it the node waits for a coordinator's LoadLayers")
    serve.add_argument("--memory-budget", type=parse_bytes, default=None, help="bytes for weights + KV (e.g. 12G)")
    serve.add_argument("--name", default=None, help="name to advertise (default: host name)")
    serve.add_argument("--no-advertise", action="store_true", help="do not advertise with zeroconf")
    secret_arg(serve)
    tls_args(serve, server=True)
    serve.add_argument("--session-ttl", type=float, default=1800.0, metavar="SECONDS",
                       help="free a session idle for this long (default 1800; 0 = never)")
    serve.add_argument("--models-dir", default=None, help="LoadLayers may open only models under this folder "
                       "(symlinks resolved; hub ids refused)")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="also serve Prometheus /metrics over HTTP on 127.0.0.1:PORT (loopback only; "
                       "remote collectors use the authenticated GetMetrics RPC or `turbo-cluster serve`'s /metrics)")
    serve.add_argument("--faults", default=None, help="inject faults for testing, e.g. drop:7,delay:5:0.2,corrupt:11 "
                       "(also $TURBO_FAULTS; see turbocluster/runtime/transport/faults.py)")
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def serve(args) -> int:
    from ..transport import faults

    if args.model is not None and args.layers is None:
        raise UsageError(f"--model {args.model} needs --layers START:END to load at start "
                         "(or leave out both: a coordinator's plan loads the node)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.session_ttl < 0:
        raise UsageError(f"--session-ttl must be >= 0 seconds, got {args.session_ttl:g}")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be 1..65535, got {args.metrics_port}")
    try:
        injected = faults.parse(args.faults if args.faults is not None else os.environ.get(faults.ENV, ""))
    except ValueError as e:
        raise UsageError(f"--faults: {e}") from None
    check_model(args.model)
    key, transport = secret(args), tls(args, server=True)
    check_port_free(args.host, args.port)
    if args.metrics_port is not None:
        check_port_free("127.0.0.1", args.metrics_port, "--metrics-port")
    from ..node.server import serve as run

    run(args.host, args.port, args.model, args.layers, args.memory_budget, args.name, not args.no_advertise, key,
        session_ttl=args.session_ttl, tls=transport, faults=injected, models_dir=args.models_dir,
        metrics_port=args.metrics_port)
    return 0


def node_main(argv=None) -> int:
    """``turbo-node``: wrong input is one line on stderr (exit 2), never a traceback."""
    args = parser().parse_args(argv)
    output.setup_logging()
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command][1](args)
        return serve(args)
    except UsageError as e:
        return output.fail("turbo-node", e)


if __name__ == "__main__":
    sys.exit(node_main())
