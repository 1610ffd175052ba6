"""Decoders of untrusted bytes either return a valid object or raise their documented error.

Bounded for the test suite; ``scripts/fuzz.py`` runs the same properties for
longer (it sets TURBO_FUZZ_EXAMPLES before importing this module).
"""

import hashlib
import importlib
import importlib.util
import math
import os

import mlx.core as mx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.transport import wire
from turbocluster.runtime.sessions.container import SessionFormatError, pack_session, unpack_session

EXAMPLES = int(os.environ.get("TURBO_FUZZ_EXAMPLES", "200"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def filled(cache, tokens):
    mx.random.seed(tokens)
    k = mx.random.normal((1, 2, tokens, 64)).astype(mx.float16)
    cache.update_and_fetch(k, -k)
    return cache


def makers():
    yield KVCache
    yield lambda: RotatingKVCache(max_size=4, keep=1)
    yield lambda: QuantizedKVCache(64, 4)
    if importlib.util.find_spec(session_io.TURBO_MODULE):
        turbo = importlib.import_module(session_io.TURBO_MODULE)
        yield lambda: turbo.TurboQuantKVCache(4, 3, key_mean=True)
        yield lambda: turbo.TurboQuantKVCache(quantized_start=16)


def make_containers():
    """Small valid containers, one per cache class (and TurboQuant phase)."""
    out = []
    for make in makers():
        caches = [filled(make(), 6), filled(make(), 6)]
        meta = {"model": "fuzz/model", "layers": (4, 6), "num_tokens": 6, "token_ids": list(range(6))}
        out.append(pack_session(caches, meta))
    return out


CONTAINERS = make_containers()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=24),
)
plain = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def check_session(data, expect=None):
    """The property: a valid session, or SessionFormatError naming a field."""
    try:
        caches, meta = unpack_session(data, expect)
    except SessionFormatError as e:
        assert e.field and str(e).startswith(e.field)
        return None
    start, end = meta["layers"]
    assert len(caches) == end - start
    for c in caches:
        assert type(c).__name__ in session_io.ALLOWED_CLASSES
        assert getattr(c, "offset", meta["num_tokens"]) == meta["num_tokens"]
    return caches, meta


def rehash(body):
    raw = msgpack.packb(body, use_bin_type=True)
    return session_io.MAGIC + hashlib.sha256(raw).digest() + raw


# -- wire ---------------------------------------------------------------------------


def test_tensor_from_bytes_refuses_bool_dims():
    with pytest.raises(wire.WireError):
        wire.tensor_from_bytes(1, [False], b"")


@pytest.mark.parametrize("shape", [[0, 2**31], [0, 2**61]])
def test_tensor_from_bytes_refuses_absurd_empty_shapes(shape):
    with pytest.raises(wire.WireError):
        wire.tensor_from_bytes(1, shape, b"")


@fuzz
@given(
    code=st.one_of(st.integers(-3, 12), scalars.filter(lambda x: not isinstance(x, float) or x == x)),
    shape=st.lists(
        st.one_of(st.integers(-2, 6), st.integers(-(2**70), 2**70), scalars),
        max_size=10,
    ),
    data=st.binary(max_size=300),
)
def test_tensor_from_bytes_returns_the_shape_or_raises_wire_error(code, shape, data):
    try:
        a = wire.tensor_from_bytes(code, shape, data)
    except wire.WireError:
        return
    assert a.shape == tuple(shape) and a.dtype == wire.DTYPES[code][0]


@fuzz
@given(code=st.sampled_from(sorted(wire.DTYPES)), shape=st.lists(st.integers(0, 5), max_size=4), extra=st.integers(-3, 3), seed=st.binary(min_size=1, max_size=8))
def test_tensor_from_bytes_checks_the_byte_count(code, shape, extra, seed):
    need = math.prod(shape) * wire.DTYPES[code][1].itemsize
    data = (seed * (need + 3))[: max(0, need + extra)]
    try:
        a = wire.tensor_from_bytes(code, shape, data)
    except wire.WireError:
        assert len(data) != need
        return
    assert len(data) == need and a.shape == tuple(shape)
    assert wire.tensor_to_bytes(a)[2] == data


@fuzz
@given(
    data=st.binary(max_size=200),
    size=st.integers(1, 64),
    edits=st.lists(st.tuples(st.sampled_from(["drop", "swap", "flip", "crc", "index", "dup"]), st.integers(0, 1000)), max_size=3),
    announce=st.one_of(st.none(), st.integers(-1, 3)),
)
def test_join_chunks_returns_the_data_or_raises_wire_error(data, size, edits, announce):
    chunks = list(wire.split_chunks(data, size))
    for op, n in edits:
        i = n % len(chunks)
        index, piece, crc = chunks[i]
        if op == "drop":
            del chunks[i]
        elif op == "swap":
            j = (i + 1) % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "flip" and piece:
            b = bytearray(piece)
            b[n % len(b)] ^= 1 << (n % 8)
            chunks[i] = (index, bytes(b), crc)
        elif op == "crc":
            chunks[i] = (index, piece, crc ^ (n + 1))
        elif op == "index":
            chunks[i] = (index + n + 1, piece, crc)
        elif op == "dup":
            chunks.insert(i, chunks[i])
        if not chunks:
            break
    total = None if announce is None else len(data) + announce
    joined = b"".join(piece for _, piece, _ in chunks)
    valid = (
        all(index == i for i, (index, _, _) in enumerate(chunks))
        and all(wire.checksum(piece) == crc for _, piece, crc in chunks)
        and total in (None, len(joined))
    )
    try:
        out = wire.join_chunks(chunks, total)
    except wire.WireError:
        assert not valid
        return
    # Accepted exactly when in order, intact and of the announced size; unedited, that is the data.
    assert valid and out == joined
    assert out == data or edits or announce


@fuzz
@given(st.lists(st.tuples(st.integers(-2, 4), st.binary(max_size=20), st.integers(0, 2**32 - 1)), max_size=6))
def test_join_chunks_on_random_chunks(chunks):
    try:
        wire.join_chunks(chunks)
    except wire.WireError:
        pass


# -- session containers ------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=400))
def test_random_bytes_are_refused(data):
    assert check_session(data) is None
    assert check_session(session_io.MAGIC + data) is None


@fuzz
@given(body=st.binary(max_size=400))
def test_random_body_with_a_valid_checksum_is_refused(body):
    assert check_session(session_io.MAGIC + hashlib.sha256(body).digest() + body) is None


@fuzz
@given(doc=plain)
def test_random_msgpack_document_is_refused(doc):
    assert check_session(rehash(doc)) is None
    assert check_session(rehash({"meta": doc, "caches": doc})) is None


@fuzz
@given(
    which=st.integers(0, len(CONTAINERS) - 1),
    op=st.sampled_from(["flip", "truncate", "extend", "splice"]),
    pos=st.integers(0, 2**31),
    junk=st.binary(min_size=1, max_size=16),
)
def test_mutated_container_is_always_refused(which, op, pos, junk):
    data = bytearray(CONTAINERS[which])
    i = pos % len(data)
    if op == "flip":
        data[i] ^= 1 << (pos % 8)
    elif op == "truncate":
        del data[i:]
    elif op == "extend":
        data += junk
    else:
        data[i:i] = junk
    assert check_session(bytes(data)) is None


def _at(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def paths(x, prefix=()):
    """Every path into a decoded msgpack document."""
    yield prefix
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


@fuzz
@given(
    which=st.integers(0, len(CONTAINERS) - 1),
    pick=st.integers(0, 2**31),
    op=st.sampled_from(["nudge", "nudge", "set", "delete", "add"]),
    value=plain,
    delta=st.integers(-3, 3),
)
def test_structurally_mutated_container_is_valid_or_refused(which, pick, op, value, delta):
    """Checksum recomputed, so only the structural checks stand between the bytes and a cache."""
    body = msgpack.unpackb(CONTAINERS[which][session_io.HEADER_BYTES:])
    all_paths = list(paths(body))
    if op == "nudge":  # near-valid numbers: shapes, offsets, bits, dtype codes
        all_paths = [p for p in all_paths if p and type(_at(body, p)) is int] or all_paths
    path = all_paths[pick % len(all_paths)]
    if not path:
        body = value
    else:
        parent = _at(body, path[:-1])
        if op == "nudge":
            old = parent[path[-1]]
            parent[path[-1]] = old + delta if type(old) is int else value
        elif op == "set":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.insert(path[-1], value)
        else:
            parent[f"x{pick % 7}"] = value
    check_session(rehash(body), expect={"model": "fuzz/model"})


@fuzz
@given(which=st.integers(0, len(CONTAINERS) - 1), size=st.integers(1, 4096), drop=st.integers(0, 2**31), announce=st.integers(-2, 2))
def test_streamed_container_is_complete_or_refused(which, size, drop, announce):
    data = CONTAINERS[which]
    chunks = list(session_io.session_chunks(data, size))
    if len(chunks) > 1 and drop % 3 == 0:
        del chunks[drop % len(chunks)]
    try:
        caches, _ = session_io.session_from_chunks(iter(chunks), len(data) + announce)
    except SessionFormatError:
        return
    assert len(caches) == 2 and announce == 0


def tensor_paths(doc):
    return [p for p in paths(doc) if isinstance(_at(doc, p), dict) and "data" in _at(doc, p)]


@fuzz
@given(
    which=st.integers(0, len(CONTAINERS) - 1),
    pick=st.integers(0, 2**31),
    code=st.integers(-1, 9),
    shape=st.lists(st.one_of(st.integers(0, 4), st.integers(-(2**63), 2**64 - 1), st.booleans()), max_size=9),
    data=st.binary(max_size=64),
)
def test_random_tensor_in_container_is_valid_or_refused(which, pick, code, shape, data):
    """No wire.py exclusions here: the container decoder must guard every tensor itself."""
    body = msgpack.unpackb(CONTAINERS[which][session_io.HEADER_BYTES:])
    targets = tensor_paths(body)
    _at(body, targets[pick % len(targets)]).update(dtype=code, shape=shape, data=data)
    check_session(rehash(body))
