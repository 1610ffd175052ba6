"""LoadLayers is budgeted: layers whose weights (beside the KV already reserved) pass the node's
memory budget are refused before a weight is read, and the node keeps serving smaller loads.

A real node process on loopback with a 100 MiB budget and the tiny qwen3 (141 MiB of float32
weights on CPU, 100 MiB of them the tied embedding held by the first and last stage).
"""

import grpc
import pytest
from conftest import rss, tiny_node

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.cluster.plan import NodeSpec, PlanError, make_plan
from turbocluster.runtime.model import loader
from turbocluster.runtime.transport.errors import REASON_TOO_LARGE, reason_of

BUDGET = 100 << 20
READ_MARGIN = 32 << 20  # what a refused load may add to the node's peak RSS (reading the weights adds >= 70 MiB)


@pytest.fixture(scope="module")
def node(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    with tiny_node(path, memory_budget=BUDGET) as (local, client, desc):
        yield local, client, path, desc


def _refused(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def _serves_hidden(client, sid):
    client.create_session(sid, 16)
    reply = client.forward(sid, hidden=_hidden(), want=pb.HIDDEN)
    client.drop(sid)
    return reply.offset


def _hidden():
    import mlx.core as mx

    return mx.zeros((1, 3, 512), dtype=mx.float32)


def test_layers_heavier_than_the_budget_are_refused_before_reading_and_a_smaller_load_works(node):
    local, client, path, desc = node
    need = loader.weights_bytes(desc, 0, desc["num_layers"])
    assert need > BUDGET, "the whole tiny model must pass this node's budget"
    empty = rss(local.proc.pid)
    err = _refused(lambda: client.load(path, 0, desc["num_layers"]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert str(need) in err.details() and str(BUDGET) in err.details()
    assert rss(local.proc.pid, "VmHWM") - empty < READ_MARGIN, "the node read the weights of a load it refused"
    info = client.info()
    assert info.load_state == pb.EMPTY and info.weights_bytes == 0
    # the plan refuses the same node for the same layers
    with pytest.raises(PlanError):
        make_plan([NodeSpec("small", local.address, info.memory_budget_bytes)], desc, context=16)

    info = client.load(path, 1, 4)  # three middle layers: ~27 MiB
    assert (info.layer_start, info.layer_end) == (1, 4)
    assert info.weights_bytes == loader.weights_bytes(desc, 1, 4)
    assert _serves_hidden(client, "small-load") == 3


def test_a_load_that_fits_alone_but_not_beside_the_reserved_kv_is_refused(node):
    local, client, path, desc = node
    if client.info().layer_end != 4:
        client.load(path, 1, 4)
    heavier = loader.weights_bytes(desc, 1, 5)  # one layer more, and the head
    per_pos = client.create_session("probe", 1024).kv_bytes_reserved / 1024
    client.drop("probe")
    n = int((BUDGET - heavier) / per_pos) + 1024  # its KV beside 1:5's weights passes the budget
    reserved = client.create_session("big", n).kv_bytes_reserved
    assert heavier <= BUDGET < heavier + reserved
    err = _refused(lambda: client.load(path, 1, 5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert reason_of(err) == REASON_TOO_LARGE
    assert str(reserved) in err.details()
    assert [s.session_id for s in client.sessions()] == ["big"]  # nothing was touched
    client.drop("big")
    info = client.load(path, 1, 5)
    assert (info.layer_start, info.layer_end, info.is_last) == (1, 5, True)


LOAD_MARGIN = 24 << 20  # what loading may hold beyond the weights it keeps, at its peak


def test_loading_peaks_near_the_weights_it_keeps(tiny_model_dirs):
    """A node loading the whole tiny qwen3 (bfloat16 on disk, float32 on CPU) into a 160 MiB budget
    peaks within a fixed margin of the weights: tensors are converted one at a time (not every one
    in both dtypes at once) and no tokenizer is loaded on a node."""
    path = tiny_model_dirs["qwen3"]
    with tiny_node(path, memory_budget=160 << 20) as (local, client, desc):
        empty = rss(local.proc.pid)
        info = client.load(path, 0, desc["num_layers"])
        peak = rss(local.proc.pid, "VmHWM") - empty
        print(f"weights {info.weights_bytes >> 20} MiB, load peak {peak >> 20} MiB over the empty node")
        assert info.weights_bytes == loader.weights_bytes(desc, 0, desc["num_layers"])
        assert peak <= info.weights_bytes + LOAD_MARGIN
