"""Inbound sessions are bounded by the node's memory budget (issue 10, memory).

A real node process on loopback with a tiny model and a small budget is sent
session imports that are too large by their declared size, and ones whose body
lies about its size. Each is refused with RESOURCE_EXHAUSTED and the
``too-large`` reason before the node buffers it; the node's resident memory
stays within a fixed margin, and it keeps serving. ``restore`` of a device
file is refused without reading it.
"""

import os

import grpc
import mlx.core as mx
import pytest
from conftest import rss, tiny_node

from turbocluster.kernels.format import FORMAT_VERSION
from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.transport import wire
from turbocluster.runtime.transport.errors import REASON_TOO_LARGE, reason_of

BUDGET = 160 << 20  # weights of the tiny qwen3 (~60 MiB) plus ~100 MiB of KV
MARGIN = 48 << 20  # what a refused import may add to the node's RSS
# Over the whole module the node also holds memory its budget does not count yet (MLX's freed-buffer
# cache, capped at 1/16 of the budget, step activations, gRPC buffers): seen 198-208 MiB over the empty
# process against a 160 MiB budget on the 2-core box. Counting it is open work (issue 10's note).
MODULE_MARGIN = 64 << 20
STEP = 256  # positions per prefill step (a step's activations are not counted against the budget)


@pytest.fixture(scope="module")
def node(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    with tiny_node(path, memory_budget=BUDGET) as (local, client, desc):
        empty = rss(local.proc.pid)  # the process before any weights or KV
        client.load(path, 0, desc["num_layers"])
        loaded = rss(local.proc.pid, "VmHWM")  # loading's own peak: file dtype and float32 copies at once
        yield local, client, desc
        peak = rss(local.proc.pid, "VmHWM")
        print(f"node RSS: empty {empty >> 20} MiB, peak after load {loaded >> 20} MiB, peak after the module {peak >> 20} MiB")
        # every import and stream above, refused or not, kept the node within its budget + a fixed margin
        assert peak - empty <= max(loaded - empty, BUDGET) + MODULE_MARGIN, f"node peak RSS {(peak - empty) >> 20} MiB over its empty process"


def _header(desc, total_bytes, session_id="big"):
    return pb.SessionHeader(
        total_bytes=total_bytes, session_id=session_id, model_identity=desc["identity"], layer_start=0,
        layer_end=desc["num_layers"], num_tokens=1, format_version=FORMAT_VERSION,
        container_version=session_io.CONTAINER_VERSION,
    )


def _junk_chunks(n, sent):
    piece = os.urandom(wire.CHUNK_BYTES)
    for i in range(n):
        sent.append(i)
        yield i, piece, wire.checksum(piece)


def _refused(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def _still_serves(client, desc):
    sid = f"after-{os.urandom(4).hex()}"
    client.create_session(sid, 16)
    reply = client.forward(sid, tokens=[1, 2, 3])
    client.drop(sid)
    return reply


def test_declared_oversize_is_refused_before_the_body(node):
    local, client, desc = node
    before, sent = rss(local.proc.pid), []
    err = _refused(lambda: calls.send(client, _header(desc, 1 << 30), None, pieces=_junk_chunks(1024, sent)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert len(sent) < 64, f"the node read {len(sent)} MiB of a body it had refused by its header"
    assert rss(local.proc.pid) - before < MARGIN
    assert _still_serves(client, desc) is not None


def test_a_body_longer_than_declared_is_refused_mid_stream(node):
    local, client, desc = node
    before, sent = rss(local.proc.pid), []
    # 2 MiB declared (fits the budget), 256 MiB sent: the node must stop counting at 2 MiB
    err = _refused(lambda: calls.send(client, _header(desc, 2 << 20, "liar"), None, pieces=_junk_chunks(256, sent)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert len(sent) < 128, f"the client sent {len(sent)} MiB before the node refused"
    assert rss(local.proc.pid) - before < MARGIN
    assert _still_serves(client, desc) is not None
    assert {s.session_id for s in client.sessions()} & {"liar", "big"} == set()


def _stream(client, session_id, declared, n, sent):
    """A ForwardStream of ``n`` 1 MiB chunks declaring ``declared`` bytes, counting what left the client."""
    header = pb.ForwardRequest(session_id=session_id, want=pb.HIDDEN)
    header.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, 64]))

    def messages():
        yield pb.ForwardChunk(header=header, payload_bytes=declared)
        for i, piece, crc in _junk_chunks(n, sent):
            yield pb.ForwardChunk(chunk=pb.Chunk(index=i, data=piece, crc32=crc))

    return client.stub.ForwardStream(messages(), metadata=client.metadata, timeout=60)


@pytest.mark.parametrize("case", ["no-such-session", "declared-oversize", "lying-body"])
def test_a_hidden_state_stream_is_bounded_before_it_is_buffered(node, case):
    """A stream for no session is refused at its first message; one declaring more than the budget,
    or sending more than it declared, is refused with RESOURCE_EXHAUSTED before the node buffers it."""
    local, client, desc = node
    sid = f"stream-{os.urandom(4).hex()}"
    if case != "no-such-session":
        client.create_session(sid, 16)
    declared = {"no-such-session": 2 << 20, "declared-oversize": 1 << 30, "lying-body": 2 << 20}[case]
    before, sent = rss(local.proc.pid), []
    err = _refused(lambda: _stream(client, sid, declared, 512, sent))
    if case == "no-such-session":
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    else:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert reason_of(err) == REASON_TOO_LARGE
    assert len(sent) < 64, f"the client sent {len(sent)} MiB of a 512 MiB stream before the node refused it"
    assert rss(local.proc.pid) - before < MARGIN
    if case != "no-such-session":
        client.drop(sid)
    assert _still_serves(client, desc) is not None


def test_staged_copies_count_against_the_budget(node):
    """A staged (pre-copied) session holds memory like a live one: with a session and one staged
    copy on the node, a second copy that would fit beside the session alone is refused."""
    local, client, desc = node
    info = client.info()
    free = info.memory_budget_bytes - info.memory_used_bytes
    per_pos = 2 * desc["num_kv_heads"] * desc["head_dim"] * 4 * desc["num_layers"]  # float32 K and V on CPU
    # the longest session whose container (3x while parsed) still fits beside its own reservation
    n = max(k for k in range(16, free // per_pos) if session_io_inbound(k * per_pos + (64 << 10)) <= free - -(-k // 256) * 256 * per_pos)
    client.create_session("src", n)
    try:
        for at in range(0, n, STEP):  # short steps: a step's attention scores are not what this test counts
            client.forward("src", tokens=[1 + (at + i) % 1000 for i in range(min(STEP, n - at))], want=pb.HIDDEN)
        header, data = calls.fetch(client, "src")
        reserved = client.info().memory_used_bytes - info.memory_used_bytes
        need = session_io_inbound(len(data))
        assert need <= free - reserved < need + len(data), "a copy fits beside the session alone, not beside a copy too"
        staged = pb.SessionHeader()
        staged.CopyFrom(header)
        staged.session_id, staged.stage = "copy-1", True
        calls.send(client, staged, data)
        staged.session_id = "copy-2"
        err = _refused(lambda: calls.send(client, staged, data))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert reason_of(err) == REASON_TOO_LARGE
    finally:
        client.drop("src")
    installed = pb.SessionHeader()
    installed.CopyFrom(header)
    installed.session_id = "copy-1"  # a whole copy under the staged id replaces it: live, so it can be dropped
    calls.send(client, installed, data)
    client.drop("copy-1")
    assert _still_serves(client, desc) is not None


def session_io_inbound(nbytes):
    from turbocluster.runtime.sessions.store import INBOUND_FACTOR

    return INBOUND_FACTOR * nbytes


def test_restore_of_a_device_is_refused_without_reading(tmp_path):
    with pytest.raises(session_io.SessionFormatError) as e:
        session_io.load_snapshot("/dev/zero")
    assert e.value.code == "TOO_LARGE"
    big = tmp_path / "big.tcsess"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    with pytest.raises(session_io.SessionFormatError) as e:
        session_io.load_snapshot(big, max_bytes=1 << 20)
    assert e.value.code == "TOO_LARGE"


@pytest.fixture(scope="module")
def float_model():
    from conftest import build_tiny

    model = build_tiny("qwen3")
    model.set_dtype(mx.float32)  # what a CPU node runs
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("setting,fill", [
    ({"k_bits": 4, "v_bits": 4, "fp16_layers": 1}, 300),
    ({"k_bits": 3, "v_bits": 3, "quantized_start": 200}, 200),  # still in its float phase: float32 buffers
    ({}, 300),
])
def test_the_reservation_covers_what_a_session_fills(float_model, setting, fill):
    """kv_bytes at float32 activations bounds the bytes real caches hold once filled to max_context."""
    from conftest import TINY

    from turbocluster.runtime.cache.config import kv_bytes
    from turbocluster.runtime.cache.factory import make_caches

    model, cfg = float_model, TINY["qwen3"]
    caches = make_caches(model, setting)
    mx.eval(model.model(mx.array([list(range(1, fill + 1))]), cache=caches))  # the layers only: no head needed
    filled = sum(c.nbytes for c in caches)
    n = cfg["num_hidden_layers"]
    reserved = kv_bytes(n, cfg["num_key_value_heads"], cfg["head_dim"], fill, setting, itemsize=4, layers=(0, n), total_layers=n)
    assert filled <= reserved, f"{setting}: filled {filled} bytes, reserved {reserved}"
    assert reserved <= 2 * filled  # and not wildly over


def test_the_plan_reserves_what_the_nodes_reserve():
    """plan.kv_bytes counts fp16_layers against the whole model and the activations' itemsize (4 on CPU)."""
    from turbocluster.runtime.cache.config import kv_bytes
    from turbocluster.runtime.cluster.plan import NodeSpec, make_plan
    from turbocluster.runtime.model.loader import use_float32

    n, heads, dim, ctx = 30, 3, 64, 1000
    desc = {"name": "toy", "identity": "ab" * 32, "num_layers": n, "num_kv_heads": heads, "head_dim": dim,
            "layer_bytes": [1 << 20] * n, "embed_bytes": 1 << 20, "head_bytes": 1 << 20}
    item = 4 if use_float32() else 2
    specs = [NodeSpec(f"n{i}", f"10.0.0.{i}:7070", 1 << 32) for i in range(3)]
    setting = {"k_bits": 4, "v_bits": 4, "fp16_layers": 2, "quantized_start": 100}
    plan = make_plan(specs, desc, context=ctx, cache=setting)
    float_layer = kv_bytes(1, heads, dim, ctx, {}, item)
    quant_layer = kv_bytes(1, heads, dim, ctx, setting, item, (5, 6), n)
    assert float_layer == heads * 1024 * 2 * dim * item
    first, middle, last = (a.kv_bytes for a in plan.assignments)
    assert first == last == 2 * float_layer + 8 * quant_layer  # layers 0, 1 and 28, 29 stay float
    assert middle == 10 * quant_layer  # none of layers 10..19 is one of the model's fp16_layers
    assert quant_layer > heads * (256 + 1024 // 2) * 2  # the quantized_start float buffers are counted too
