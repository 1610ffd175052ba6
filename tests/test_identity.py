"""A model's identity is read from metadata or a cached digest, not by hashing every weight byte each call."""

import hashlib
import json
import os
import subprocess
import sys

from turbocluster.runtime.model import identity


def digest_in_fresh_process(path, env=None):
    """file_digest as a new CLI call would compute it (no in-process memory)."""
    code = "import sys; from turbocluster.runtime.model import identity; print(identity.file_digest(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return out.stdout.strip()


def test_a_weight_file_is_hashed_once_and_its_digest_cached_beside_it(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(os.urandom(1 << 20))
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest_in_fresh_process(weights) == truth
    cached = json.loads((tmp_path / f".model.gguf{identity.SUFFIX}").read_text())
    assert cached["sha256"] == truth and cached["size"] == 1 << 20

    # new bytes under the old size and mtime: a fresh process answers from the cache, so it did not read them
    st = weights.stat()
    weights.write_bytes(os.urandom(1 << 20))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digest_in_fresh_process(weights) == truth
    # a changed mtime (what replacing a file does) makes it read the bytes again
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert digest_in_fresh_process(weights) == hashlib.sha256(weights.read_bytes()).hexdigest() != truth


def test_a_folder_that_cannot_hold_the_digest_caches_it_in_the_user_cache(tmp_path):
    models, cache = tmp_path / "models", tmp_path / "xdg"
    models.mkdir()
    weights = models / "model.gguf"
    weights.write_bytes(os.urandom(4096))
    (models / f".model.gguf{identity.SUFFIX}").mkdir()  # injected fault: the file beside cannot be written
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest_in_fresh_process(weights, {"XDG_CACHE_HOME": str(cache)}) == truth
    written = list((cache / "turbo-cluster" / "digests").glob(f"*{identity.SUFFIX}"))
    assert len(written) == 1 and json.loads(written[0].read_text())["sha256"] == truth
    assert sorted(p.name for p in models.iterdir()) == [f".model.gguf{identity.SUFFIX}", "model.gguf"]  # no temp left


def test_a_hub_download_is_identified_by_its_blob_name_without_reading_it(tmp_path):
    """The Hugging Face cache stores large files as blobs/<sha256 of content>; snapshots link to them."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    content = os.urandom(8192)
    blob = repo / "blobs" / hashlib.sha256(b"the content the hub hashed").hexdigest()  # not this content's hash:
    blob.write_bytes(content)  # a digest equal to the name shows the name was used and the bytes were not read
    config = repo / "blobs" / ("ab" * 20)  # small files are named by their git sha1 (40 hex): hashed as usual
    config.write_text('{"model_type": "llama"}')
    snap = repo / "snapshots" / "0123abcd"
    (snap / "model.safetensors").symlink_to(blob)
    (snap / "config.json").symlink_to(config)
    assert identity.file_digest(snap / "model.safetensors") == blob.name
    assert identity.file_digest(snap / "config.json") == hashlib.sha256(config.read_bytes()).hexdigest()
    expected = hashlib.sha256()
    for name, digest in (("config.json", hashlib.sha256(config.read_bytes()).hexdigest()), ("model.safetensors", blob.name)):
        expected.update(f"{name}\0{digest}\0".encode())
    assert identity.identity(snap) == expected.hexdigest()
