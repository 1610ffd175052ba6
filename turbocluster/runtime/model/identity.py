"""A model's identity: which weights these are, known without reading every weight byte each call.

Nodes and the coordinator compare identities in the handshake, so two
fine-tunes of one architecture never pass as the same model. The identity is
the sha256 of a GGUF file, or of a model directory's ``config.json`` and
weight files' digests. A file's digest comes from, in order:

1. this process's memory, keyed by (resolved path, size, mtime);
2. the Hugging Face cache's own metadata: a hub download is a symlink to
   ``blobs/<sha256 of the content>`` (large files are stored by content hash),
   so the name is the digest;
3. a digest file cached beside the weights, ``.<name>.turbo-digest`` (JSON:
   size, mtime_ns, sha256), or, where that folder is not writable, the same
   under ``$XDG_CACHE_HOME/turbo-cluster/digests/``;
4. reading the file (then 3 is written, so the next process skips the read).

Like make and rsync, a cached digest is trusted while the file's size and
mtime are unchanged; replacing a file's bytes always changes its mtime.
"""

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SUFFIX = ".turbo-digest"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_memory: dict[tuple, str] = {}


def identity(path: str | os.PathLike) -> str:
    """sha256 identity of a GGUF file, or of a directory's config.json and ``model*.safetensors``."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("model*.safetensors"))]:
        h.update(f"{file.name}\0{file_digest(file)}\0".encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read at most once per (size, mtime) across processes."""
    path = Path(path)
    real = path.resolve()
    st = os.stat(real)
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _memory:
        return _memory[key]
    digest = _hub_blob_digest(real) or _read_cached(path, real, st) or _hash(real, path, st)
    _memory[key] = digest
    return digest


def _hub_blob_digest(real: Path) -> str | None:
    """The Hugging Face cache names large-file blobs by their sha256: use the name."""
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name
    return None


def _cache_files(path: Path, real: Path) -> list[Path]:
    """Where a digest of ``path`` (resolving to ``real``) may be cached: beside it, then in the user's cache folder."""
    beside = path.parent / f".{path.name}{SUFFIX}"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turbo-cluster" / "digests"
    keyed = hashlib.sha256(str(real).encode()).hexdigest()[:32]
    return [beside, base / f"{keyed}{SUFFIX}"]


def _read_cached(path: Path, real: Path, st: os.stat_result) -> str | None:
    for file in _cache_files(path, real):
        try:
            entry = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])):
            return entry["sha256"]
    return None


def _hash(real: Path, path: Path, st: os.stat_result) -> str:
    logger.info("hashing %s (%.1f MiB) once to identify the model", path, st.st_size / 2**20)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    entry = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    for file in _cache_files(path, real):
        if _write_atomic(file, entry):
            break
    return digest


def _write_atomic(file: Path, text: str) -> bool:
    """Write ``text`` to ``file`` by rename, so a concurrent reader sees all of it or none; False if not writable."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
        return True
    except OSError as e:
        logger.debug("cannot cache a digest at %s: %s", file, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False
