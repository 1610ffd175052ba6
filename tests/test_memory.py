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

from turbocluster.kernels.format import FORMAT_VERSION
from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.cluster.cluster import start_local_nodes, stop_local_nodes
from turbocluster.runtime.model import loader
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.transport import wire
from turbocluster.runtime.transport.client import NodeClient
from turbocluster.runtime.transport.errors import REASON_TOO_LARGE, reason_of

BUDGET = 160 << 20  # weights of the tiny qwen3 (~60 MiB) plus ~100 MiB of KV
MARGIN = 48 << 20  # what a refused import may add to the node's RSS


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    pytest.skip("no VmRSS in /proc (not Linux)")


@pytest.fixture(scope="module")
def node(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    desc = loader.describe(path)
    [local] = start_local_nodes(1, memory_budget=BUDGET)
    client = NodeClient(local.address, desc["identity"], will_load=True)
    try:
        client.load(path, 0, desc["num_layers"])
        yield local, client, desc
    finally:
        client.close()
        stop_local_nodes([local])


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
    before, sent = _rss(local.proc.pid), []
    err = _refused(lambda: calls.send(client, _header(desc, 1 << 30), None, pieces=_junk_chunks(1024, sent)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert len(sent) < 64, f"the node read {len(sent)} MiB of a body it had refused by its header"
    assert _rss(local.proc.pid) - before < MARGIN
    assert _still_serves(client, desc) is not None


def test_a_body_longer_than_declared_is_refused_mid_stream(node):
    local, client, desc = node
    before, sent = _rss(local.proc.pid), []
    # 2 MiB declared (fits the budget), 256 MiB sent: the node must stop counting at 2 MiB
    err = _refused(lambda: calls.send(client, _header(desc, 2 << 20, "liar"), None, pieces=_junk_chunks(256, sent)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert len(sent) < 128, f"the client sent {len(sent)} MiB before the node refused"
    assert _rss(local.proc.pid) - before < MARGIN
    assert _still_serves(client, desc) is not None
    assert {s.session_id for s in client.sessions()} & {"liar", "big"} == set()


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
