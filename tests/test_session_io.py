import hashlib
import os

import mlx.core as mx
import msgpack
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import ChunkedKVCache, KVCache, QuantizedKVCache, RotatingKVCache

from turbocluster.kernels.turboquant import FORMAT_VERSION
from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.sessions.container import (
    MAGIC,
    SessionFormatError,
    load_snapshot,
    pack_session,
    save_snapshot,
    session_chunks,
    session_from_chunks,
    unpack_session,
)

LAYERS = 2
PROMPT = [3, 17, 42, 5, 99, 7, 64, 11, 23, 8, 1, 50]
MODEL_ID = "test/tiny-llama@random-0"


def tiny_model():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=LAYERS,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        vocab_size=128,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


MAKERS = {
    "KVCache": lambda: KVCache(),
    "RotatingKVCache": lambda: RotatingKVCache(max_size=8, keep=2),
    "QuantizedKVCache": lambda: QuantizedKVCache(group_size=64, bits=4),
}


def prefill(model, make, tokens=PROMPT):
    caches = [make() for _ in range(LAYERS)]
    logits = model(mx.array([tokens]), cache=caches)
    mx.eval(logits, [c.state for c in caches])
    return caches, logits


def meta_for(tokens=PROMPT, **extra):
    return {"model": MODEL_ID, "layers": (0, LAYERS), "num_tokens": len(tokens),
            "token_ids": list(tokens), "cache_config": {"kv": "test"}, **extra}


def continue_greedy(model, caches, logits, steps=6):
    """Feed one token at a time (then a 3-token chunk) and collect every logit row."""
    out = []
    token = mx.argmax(logits[:, -1], axis=-1)
    for _ in range(steps):
        logits = model(token[:, None], cache=caches)
        out.append(logits)
        token = mx.argmax(logits[:, -1], axis=-1)
    out.append(model(mx.array([[4, 9, 2]]), cache=caches))
    mx.eval(out)
    return out


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_restored_caches_continue_with_identical_logits(model, kind):
    caches, logits = prefill(model, MAKERS[kind])
    data = pack_session(caches, meta_for())
    restored, meta = unpack_session(data, expect={"model": MODEL_ID, "layers": (0, LAYERS)})
    assert [type(c).__name__ for c in restored] == [kind] * LAYERS
    assert meta["num_tokens"] == len(PROMPT) and meta["token_ids"] == PROMPT
    assert meta["layers"] == (0, LAYERS) and meta["format_version"] == FORMAT_VERSION
    want = continue_greedy(model, caches, logits)
    got = continue_greedy(model, restored, logits)
    for a, b in zip(want, got):
        assert mx.array_equal(a, b).item()


def test_packed_quantized_kv_travels_as_words_not_floats(model):
    caches, _ = prefill(model, MAKERS["QuantizedKVCache"])
    body = msgpack.unpackb(pack_session(caches, meta_for())[session_io.HEADER_BYTES:])
    words = body["caches"][0]["state"][0][0]
    assert words["dtype"] == 4  # uint32: the packed form, not re-expanded
    assert words["shape"][2] == len(PROMPT)  # the preallocated tail is not sent


TURBO_CONFIGS = {
    "packed": {},
    "float-phase": {"quantized_start": 64},
    "crosses-threshold": {"quantized_start": 14},  # compresses during the continuation
    "k3v2-key-mean": {"k_bits": 3, "v_bits": 2, "key_mean": True},
}


@pytest.mark.parametrize("config", sorted(TURBO_CONFIGS))
def test_turbo_cache_round_trip(model, config):
    turbo = pytest.importorskip(
        "turbocluster.runtime.cache.turbo_cache", reason="TurboQuantKVCache is not written yet"
    )
    caches, logits = prefill(model, lambda: turbo.TurboQuantKVCache(**TURBO_CONFIGS[config]))
    data = pack_session(caches, meta_for())
    restored, _ = unpack_session(data)
    assert all(type(c) is turbo.TurboQuantKVCache for c in restored)
    assert [c.meta_state for c in restored] == [c.meta_state for c in caches]
    if caches[0].compressed:
        k_packed = msgpack.unpackb(data[session_io.HEADER_BYTES:])["caches"][0]["state"][0]
        assert k_packed["dtype"] == 4 and k_packed["shape"][2] == len(PROMPT)  # packed words travel
    want = continue_greedy(model, caches, logits)
    got = continue_greedy(model, restored, logits)
    for a, b in zip(want, got):
        assert mx.array_equal(a, b).item()


def test_chunked_cache_round_trip():
    caches = []
    for seed in range(LAYERS):
        c = ChunkedKVCache(chunk_size=4)
        k = mx.random.normal((1, 2, 6, 16), key=mx.random.key(seed))
        c.update_and_fetch(k, 2 * k)
        c.maybe_trim_front()
        caches.append(c)
    restored, _ = unpack_session(pack_session(caches, meta_for(tokens=list(range(6)))))
    for a, b in zip(caches, restored):
        assert (a.offset, a.start_position, a.chunk_size) == (b.offset, b.start_position, b.chunk_size)
        for x, y in zip(a.keys_and_values(), b.keys_and_values()):
            assert mx.array_equal(x, y).item()


def test_empty_caches_round_trip():
    restored, meta = unpack_session(pack_session([KVCache(), KVCache()], meta_for(tokens=[])))
    assert all(c.empty() for c in restored) and meta["num_tokens"] == 0


@pytest.fixture(scope="module")
def container(model):
    caches, _ = prefill(model, MAKERS["KVCache"])
    return pack_session(caches, meta_for())


def rehash(body):
    """A container whose checksum is right but whose body says ``body``."""
    raw = msgpack.packb(body, use_bin_type=True)
    return MAGIC + hashlib.sha256(raw).digest() + raw


def body_of(container):
    return msgpack.unpackb(container[session_io.HEADER_BYTES:])


def field_of(data, expect=None):
    with pytest.raises(SessionFormatError) as e:
        unpack_session(data, expect)
    return e.value.field


def test_flipped_bit_is_caught_by_the_checksum(container):
    for pos in (len(MAGIC) + 3, len(container) // 2, len(container) - 1):
        bad = bytearray(container)
        bad[pos] ^= 0x10
        assert field_of(bytes(bad)) == "sha256"


def test_truncated_or_extended_container_is_refused(container):
    assert field_of(container[:-1]) == "sha256"
    assert field_of(container + b"\0") == "sha256"
    assert field_of(container[:10]) == "magic"
    assert field_of(b"") == "magic"


def test_truncated_stream_is_refused(container):
    chunks = list(session_chunks(container, size=4096))
    assert len(chunks) > 2
    caches, _ = session_from_chunks(iter(chunks), len(container))
    assert len(caches) == LAYERS
    with pytest.raises(SessionFormatError, match="stream announced") as e:
        session_from_chunks(iter(chunks[:-1]), len(container))
    assert e.value.field == "stream"
    index, piece, crc = chunks[1]
    with pytest.raises(SessionFormatError, match="checksum"):
        session_from_chunks([chunks[0], (index, piece[:-1] + b"x", crc)] + chunks[2:], len(container))


def test_wrong_versions_are_named(container):
    for key in ("format_version", "container_version"):
        body = body_of(container)
        body["meta"][key] += 1
        assert field_of(rehash(body)) == f"meta.{key}"


def test_expectations_name_the_field_expected_and_found(container):
    with pytest.raises(SessionFormatError) as e:
        unpack_session(container, expect={"model": "other/model"})
    assert e.value.field == "meta.model"
    assert "other/model" in str(e.value) and MODEL_ID in str(e.value)
    assert field_of(container, {"layers": (2, 4)}) == "meta.layers"
    assert field_of(container, {"format_version": FORMAT_VERSION + 1}) == "meta.format_version"


def test_unknown_class_name_is_never_built(container):
    for name in ("os.system", "CacheList", "ArraysCache", "__import__"):
        body = body_of(container)
        body["caches"][1]["class"] = name
        assert field_of(rehash(body)) == "caches[1].class"


def test_inconsistent_shapes_are_refused_before_building(container):
    body = body_of(container)
    values = body["caches"][0]["state"][1]
    values["shape"][2] -= 1  # values one position shorter than keys
    values["data"] = values["data"][: len(values["data"]) * values["shape"][2] // (values["shape"][2] + 1)]
    assert field_of(rehash(body)) == "caches[0].state"

    body = body_of(container)
    body["caches"][0]["state"][1]["data"] = body["caches"][0]["state"][1]["data"][:-2]
    assert field_of(rehash(body)) == "caches[0].state[1]"

    body = body_of(container)
    body["caches"][1]["state"][2] += 1  # offset past the cached positions
    assert field_of(rehash(body)) == "caches[1].state"

    body = body_of(container)
    body["meta"]["num_tokens"] -= 1
    body["meta"]["token_ids"].pop()
    assert field_of(rehash(body)) == "caches[0].offset"

    body = body_of(container)
    body["caches"].pop()
    assert field_of(rehash(body)) == "caches"

    for shape in ([0, 2**31, 1, 1], [0, 2**40, 2**40, 1], [1, False, 2, 3]):
        body = body_of(container)
        body["caches"][0]["state"][0].update(shape=shape, data=b"")  # empty, yet beyond numpy or mlx
        assert field_of(rehash(body)) == "caches[0].state[0]"


def test_pack_refuses_caches_that_disagree_with_meta(model):
    caches, _ = prefill(model, MAKERS["KVCache"])
    with pytest.raises(SessionFormatError) as e:
        pack_session(caches, meta_for(tokens=PROMPT[:-1]))
    assert e.value.field == "caches[0].offset"
    with pytest.raises(SessionFormatError) as e:
        pack_session(caches[:1], meta_for())
    assert e.value.field == "caches"
    with pytest.raises(SessionFormatError) as e:
        pack_session(caches, {**meta_for(), "layers": (3, 1)})
    assert e.value.field == "meta.layers"


def test_snapshot_round_trip(tmp_path, model):
    caches, logits = prefill(model, MAKERS["RotatingKVCache"])
    path = tmp_path / "session.tcs"
    save_snapshot(path, caches, meta_for(session_id="abc"))
    restored, meta = load_snapshot(path, expect={"model": MODEL_ID})
    assert meta["session_id"] == "abc"
    assert os.listdir(tmp_path) == ["session.tcs"]
    for a, b in zip(continue_greedy(model, caches, logits), continue_greedy(model, restored, logits)):
        assert mx.array_equal(a, b).item()


def test_failed_save_and_load_leave_nothing_behind(tmp_path, model):
    caches, _ = prefill(model, MAKERS["KVCache"])
    path = tmp_path / "session.tcs"
    save_snapshot(path, caches, meta_for())
    good = path.read_bytes()
    with pytest.raises(SessionFormatError):
        save_snapshot(path, caches, meta_for(tokens=PROMPT[:3]))
    with pytest.raises(SessionFormatError):
        save_snapshot(path, caches, meta_for(bad=object()))
    assert os.listdir(tmp_path) == ["session.tcs"] and path.read_bytes() == good

    before = [mx.array(c.keys) for c in caches]
    path.write_bytes(good[:-5])
    with pytest.raises(SessionFormatError):
        load_snapshot(path)
    path.write_bytes(good)
    with pytest.raises(SessionFormatError, match="meta.layers"):
        load_snapshot(path, expect={"layers": (0, 1)})
    assert all(mx.array_equal(a, c.keys).item() for a, c in zip(before, caches))
    assert os.listdir(tmp_path) == ["session.tcs"]


def test_malformed_turbo_state_is_refused(model):
    turbo = pytest.importorskip("turbocluster.runtime.cache.turbo_cache", reason="TurboQuantKVCache is not written yet")
    caches, _ = prefill(model, lambda: turbo.TurboQuantKVCache(k_bits=4, v_bits=3))
    good = body_of(pack_session(caches, meta_for()))

    def refused(edit):
        body = body_of(rehash(good))
        edit(body["caches"][1]["state"])
        return field_of(rehash(body))

    def bits(state):
        state[8][0] = "9"  # k_bits outside the supported set

    def mixed(state):
        state[4] = state[0]  # float keys next to packed ones

    def words(state):
        state[0]["shape"][3] += 1  # words that match no head dim
        state[0]["data"] += b"\0" * 4 * state[0]["shape"][0] * state[0]["shape"][1] * state[0]["shape"][2]

    def scales(state):
        state[1]["dtype"] = 1  # float32 scales: right size for half the positions
        state[1]["shape"][2] //= 2

    def mean(state):
        state[6] = []  # a key mean that is not an array (found by scripts/fuzz.py)

    assert refused(bits) == "caches[1].state[8]"
    assert refused(mean) == "caches[1].state[6]"
    assert refused(mixed) == "caches[1].state"
    assert refused(words) == "caches[1].state"
    assert refused(scales) == "caches[1].state"
