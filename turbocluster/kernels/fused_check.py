"""Self-check verdicts of the GPU kernels, cached on disk once per machine.

A GPU kernel is trusted only after it matched the plain-``mx`` reference on
this machine. Compiling and checking every variant costs tens of seconds, so
each verdict is stored in ``~/.cache/turbocluster/selfcheck.json`` under a key
made of the MLX version, the device's name, the backend, the variant's name
and a hash of the kernel source: a new MLX, another GPU or an edited kernel
is checked again, anything else is read back in microseconds.
``TURBOCLUSTER_SELFCHECK_DIR`` moves the file (tests use a temporary folder).
"""

import hashlib
import json
import logging
import os
import tempfile
from typing import Callable

import mlx.core as mx

logger = logging.getLogger(__name__)

_memory = {}  # key -> verdict, this process


def cache_path() -> str:
    base = os.environ.get("TURBOCLUSTER_SELFCHECK_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "turbocluster")
    return os.path.join(base, "selfcheck.json")


def device_name() -> str:
    try:
        return str(mx.device_info().get("device_name", "unknown"))
    except Exception:  # older MLX or no device info: still a stable key
        return "unknown"


def key(backend: str, name: str, source: str) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"mlx-{mx.__version__}|{device_name()}|{backend}|{name}|{digest}"


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(k: str, ok: bool, reason: str) -> None:
    path = cache_path()
    data = _load()
    data[k] = {"ok": ok, "reason": reason}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".selfcheck-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: parallel node processes never read half a file
    except OSError as e:  # a read-only home only costs a re-check next time
        logger.debug("could not store self-check verdict: %s", e)


def verdict(backend: str, name: str, source: str, check: Callable[[], None]) -> bool:
    """True when the kernel variant passed ``check`` (which raises on a mismatch) on this machine.

    The first call per machine runs ``check`` and stores the result; later
    calls, in any process, read it back. A failure is logged as a warning once
    per process and the caller falls back to the reference.
    """
    k = key(backend, name, source)
    if k in _memory:
        return _memory[k]
    stored = _load().get(k)
    if isinstance(stored, dict) and "ok" in stored:
        ok, reason = bool(stored["ok"]), str(stored.get("reason", ""))
    else:
        try:
            check()
            ok, reason = True, ""
        except Exception as e:  # a compile error or a mismatch: never use a wrong fast path
            ok, reason = False, f"{type(e).__name__}: {e}"
        _store(k, ok, reason)
    if not ok:
        logger.warning("TurboQuant %s kernel %r disabled, using the reference path: %s", backend, name, reason)
    _memory[k] = ok
    return ok
