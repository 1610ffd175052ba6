"""The cluster end to end: stage exactness, real node processes on loopback, discovery, refusals.

Nodes are started once per module (``local_nodes`` in conftest) and re-planned
between tests, so the whole file stays within a few minutes on two cores.
"""

import uuid

import grpc
import mlx.core as mx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from conftest import TINY, build_tiny
from turbocluster.proto import turbo_pb2 as pb
from turbocluster.proto import turbo_pb2_grpc as pb_grpc
from turbocluster.runtime.transport import discovery
from turbocluster.runtime.model import loader
from turbocluster.runtime.cache.factory import make_caches
from turbocluster.runtime.model import shard as stage
from turbocluster.runtime.transport import wire
from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.transport.client import MD_PROTOCOL, NodeClient
from turbocluster.runtime.cluster.plan import NodeSpec, make_plan

SPLITS = {
    "qwen3": [[(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 4), (4, 5)]],
    "gemma3_text": [[(0, 7)], [(0, 4), (4, 7)], [(0, 2), (2, 3), (3, 7)]],
}


def pipeline_logits(parts, prompt, steps):
    """Logits of each generated position, running shards in turn as the nodes do (greedy)."""
    caches = [make_caches(p) for p in parts]

    def run(x):
        for p, c in zip(parts, caches):
            x = stage.forward(p, x, c)
        return x

    run(mx.array([prompt[:-1]]))  # prefill, as mlx_lm.generate_step does it
    token, out = prompt[-1], []
    for _ in range(steps):
        logits = run(mx.array([[token]]))[:, -1, :]
        out.append(logits)
        token = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1).item()
    return out


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("split", [0, 1, 2])
def test_stage_shards_reproduce_the_whole_model_bit_for_bit(kind, split):
    model = build_tiny(kind)
    prompt = [5, 17, 300, 41, 9, 1000, 77, 12, 3, 8, 600, 2]  # longer than gemma's window of 8
    steps = 12
    parts = [stage.shard(model, a, b) for a, b in SPLITS[kind][split]]
    ours = pipeline_logits(parts, prompt, steps)
    ref_caches = make_prompt_cache(model)
    # whole-model logits with the model's own __call__, same prefill split as generate_step
    model(mx.array([prompt[:-1]]), cache=ref_caches)
    token = prompt[-1]
    for i in range(steps):
        ref = model(mx.array([[token]]), cache=ref_caches)[:, -1, :]
        assert ours[i].dtype == ref.dtype
        assert mx.array_equal(ours[i], ref).item(), f"{kind} split {SPLITS[kind][split]} differs at step {i}"
        token = mx.argmax(ref - mx.logsumexp(ref, keepdims=True), axis=-1).item()


def test_gemma_shard_picks_sliding_layers_by_global_index():
    model = build_tiny("gemma3_text")
    part = stage.shard(model, 3, 7)  # global layers 3..6: 5 is global, the rest slide
    assert stage.sliding_windows(part) == [8, 8, None, 8]
    kinds = [type(c).__name__ for c in make_caches(part)]
    assert kinds == ["RotatingKVCache", "RotatingKVCache", "KVCache", "RotatingKVCache"]


# --------------------------------------------------------------------------- real nodes

PROMPT = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 16
TURBO3 = {"k_bits": 3, "v_bits": 3}


def reference_tokens(model, prompt_ids, max_tokens, eos, cache=None):
    """Greedy tokens from mlx-lm in one process (stops at EOS like stream_generate)."""
    out = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens, prompt_cache=cache):
        out.append(token)
        if token in eos:
            break
    return out


@pytest.fixture(scope="module")
def bundled():
    """The bundled model in this process, its chat-templated prompt and fp16 greedy reference."""
    model, tok = loader.load()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    eos = set(tok.eos_token_ids)
    return model, tok, ids, reference_tokens(model, ids, MAX_TOKENS, eos)


def cluster_over(nodes, k, model=None):
    return Cluster.connect(model, nodes=[n.address for n in nodes[:k]])


def run_cluster(nodes, k, ids, model=None, cache=None, max_tokens=MAX_TOKENS):
    with cluster_over(nodes, k, model) as cluster:
        cluster.load(cluster.plan(context=len(ids) + max_tokens, cache=cache))
        assert [a.layers for a in cluster.plan_.assignments] and len(cluster.plan_.assignments) == k
        return list(cluster.generate_tokens(ids, max_tokens=max_tokens, cache=cache)), cluster.stats


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_identical_to_mlx_lm_across_nodes(local_nodes, bundled, k):
    _, tok, ids, ref = bundled
    ours, stats = run_cluster(local_nodes, k, ids)
    assert ours == ref, f"{k} nodes: {tok.decode(ours)!r} != mlx-lm {tok.decode(ref)!r}"
    assert all(len(step) == k for step in stats.hops)  # one hop per node per token


@pytest.mark.parametrize("cache", [TURBO3, {"k_bits": 5, "v_bits": 3, "key_mean": True}], ids=["turbo3", "k5v3-key-mean"])
def test_greedy_turbo_identical_to_mlx_lm_with_the_same_cache(local_nodes, bundled, cache):
    from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

    model, tok, ids, _ = bundled
    n = 40  # past EOS: long enough that compressed keys and values change the text
    ref = reference_tokens(model, ids, n, set(), make_turbo_cache(model, **cache))
    assert ref != reference_tokens(model, ids, n, set())  # so the nodes must really use TurboQuant
    plain = {k: v for k, v in cache.items() if k != "key_mean"}
    if plain != cache:  # and really subtract the key mean
        assert ref != reference_tokens(model, ids, n, set(), make_turbo_cache(model, **plain))
    with cluster_over(local_nodes, 2) as cluster:
        cluster.load(cluster.plan(context=len(ids) + n, cache=cache))
        ours = list(cluster.generate_tokens(ids, max_tokens=n, cache=cache, stop_at_eos=False))
    assert ours == ref


@pytest.mark.parametrize("kind", list(TINY))
def test_greedy_identical_on_tiny_random_models(local_nodes, tiny_model_dirs, kind):
    path = tiny_model_dirs[kind]
    model, tok = loader.load(path)
    ids = [5, 17, 300, 41, 9, 1000, 77, 12, 3, 8, 600, 2]  # longer than gemma's sliding window
    ref = reference_tokens(model, ids, MAX_TOKENS, set())
    for k in (2, 3):
        ours, _ = run_cluster(local_nodes, k, ids, model=path)
        assert ours[: len(ref)] == ref, f"{kind} over {k} nodes"


def test_long_prompt_streams_hidden_state_in_chunks_and_stays_exact(local_nodes, tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    model, _ = loader.load(path)
    ids = [(i * 7919) % 40000 + 10 for i in range(1100)]
    assert 1100 * TINY["qwen3"]["hidden_size"] * 2 > wire.CHUNK_BYTES  # bfloat16 hidden state
    ref = reference_tokens(model, ids, 4, set())
    ours, _ = run_cluster(local_nodes, 2, ids, model=path, max_tokens=4)
    assert ours == ref


def test_text_streams_and_stops_at_a_stop_string(local_nodes, bundled):
    _, tok, ids, ref = bundled
    full = tok.decode(ref)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    with cluster_over(local_nodes, 2) as cluster:
        cluster.load(cluster.plan(context=256))
        pieces = list(cluster.generate(PROMPT, max_tokens=MAX_TOKENS, stop=[stop]))
        assert "".join(pieces) == full[: full.index(stop)]
        assert cluster.clients[0].sessions() == []  # sessions dropped when generation ends
        # seeded sampling on the last node is reproducible per session
        sample = lambda: list(cluster.generate_tokens(ids, max_tokens=8, temperature=0.9, top_p=0.95, seed=7))  # noqa: E731
        assert sample() == sample()


def test_bad_inputs_get_the_right_status_and_the_node_keeps_serving(local_nodes, bundled):
    with cluster_over(local_nodes, 2) as cluster:
        cluster.load(cluster.plan(context=256))
        first, last = cluster.clients
        last.create_session("s", 8)
        first.create_session("s", 8, next_address=last.address)

        def status(call):
            with pytest.raises(grpc.RpcError) as e:
                call()
            return e.value.code(), e.value.details()

        assert status(lambda: first.forward("nope", tokens=[1]))[0] == grpc.StatusCode.NOT_FOUND
        code, msg = status(lambda: first.forward("s", tokens=[49152]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of vocabulary" in msg
        code, msg = status(lambda: last.forward("s", hidden=mx.zeros((1, 2, 7), mx.float16)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape [1, L, 576]" in msg
        code, msg = status(lambda: last.forward("s", hidden=mx.zeros((1, 2, 576), mx.int32)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "float" in msg
        t, raw = wire.to_proto(mx.zeros((1, 2, 576), mx.float16), with_data=False)
        code, msg = status(lambda: last.forward_tensor("s", t, raw[:-2]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg
        code, msg = status(lambda: first.forward("s", tokens=[1] * 9, want=pb.NONE))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        assert status(lambda: first.create_session("s", 8))[0] == grpc.StatusCode.ALREADY_EXISTS
        first.forward("s", tokens=[1, 2, 3, 4, 5], want=pb.NONE)
        assert first.trim("s", 2).offset == 3 and last.trim("s", 2).offset == 3
        assert status(lambda: first.trim("s", 4))[0] == grpc.StatusCode.INVALID_ARGUMENT
        first.drop("s"), last.drop("s")
        assert status(lambda: first.drop("s"))[0] == grpc.StatusCode.NOT_FOUND
        # still serving, and still right
        health = health_pb2_grpc.HealthStub(first.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="turbocluster.v1.Node")).status == 1
        _, _, ids, ref = bundled
        assert list(cluster.generate_tokens(ids, max_tokens=MAX_TOKENS)) == ref


def test_wrong_model_identity_and_protocol_are_refused_before_anything_else(local_nodes, bundled):
    with cluster_over(local_nodes, 1) as cluster:
        cluster.load(cluster.plan(context=64))
        address = cluster.clients[0].address
    with pytest.raises(grpc.RpcError) as e:
        NodeClient(address, "0" * 64)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "model mismatch" in e.value.details()

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.NodeStub(channel)
    hello = pb.HandshakeRequest(protocol_version=wire.PROTOCOL_VERSION, format_version=1)
    with pytest.raises(grpc.RpcError) as e:
        stub.Handshake(hello, metadata=((MD_PROTOCOL, "999"),))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "protocol version mismatch" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetInfo(pb.InfoRequest(), metadata=((MD_PROTOCOL, str(wire.PROTOCOL_VERSION)),))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Handshake first" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # garbage body: refused by the gate, never parsed
        channel.unary_unary("/turbocluster.v1.Node/Forward")(b"\xff\xff\xff", metadata=((MD_PROTOCOL, "1"),))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    channel.close()


def test_session_that_would_not_fit_the_budget_is_refused():
    servicer = NodeServicer(name="small", memory_budget=80 << 20)
    server, port = make_server(servicer)
    try:
        client = NodeClient(f"127.0.0.1:{port}", loader.describe()["identity"], will_load=True)
        with pytest.raises(grpc.RpcError) as e:
            client.load(None, 0, 30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.load(None, 0, 10)
        with pytest.raises(grpc.RpcError) as e:
            client.create_session("s", 200_000)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV" in e.value.details()
        assert client.create_session("s", 256).kv_bytes_reserved > 0
        client.close()
    finally:
        server.stop(0)
        servicer.close()


def test_zeroconf_finds_two_local_nodes_and_the_plan_covers_every_layer():
    tag = uuid.uuid4().hex[:6]
    names = [f"test-{tag}-{i}" for i in range(2)]
    nodes = start_local_nodes(2, advertise=True, names=names)
    try:
        found = [f for f in discovery.browse(2.0, interfaces=["127.0.0.1"]) if f.name in names]
        assert sorted(f.name for f in found) == names
        assert {f.address for f in found} == {n.address for n in nodes}
        assert all(f.properties["protocol"] == str(wire.PROTOCOL_VERSION) for f in found)
        desc = loader.describe()
        specs = [NodeSpec(f.name, f.address, int(f.properties["memory"])) for f in found]
        plan = make_plan(specs, desc, context=1024)
        assert [i for a in plan.assignments for i in range(a.start, a.end)] == list(range(desc["num_layers"]))
    finally:
        stop_local_nodes(nodes)
    left = [f for f in discovery.browse(1.0, interfaces=["127.0.0.1"]) if f.name in names]
    assert left == []  # withdrawn on SIGTERM


def test_discover_says_what_to_do_when_nobody_answers(monkeypatch):
    monkeypatch.setattr(discovery, "browse", lambda *a, **k: [])
    with pytest.raises(discovery.DiscoveryError, match="--nodes host:port"):
        discovery.discover(0.1)


def test_node_with_a_cluster_secret_refuses_calls_without_it():
    servicer = NodeServicer(name="locked", secret="s" * 32)
    server, port = make_server(servicer)
    identity = loader.describe()["identity"]
    try:
        with pytest.raises(grpc.RpcError) as e:
            NodeClient(f"127.0.0.1:{port}", identity, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            NodeClient(f"127.0.0.1:{port}", identity, timeout=5, secret="t" * 32)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client = NodeClient(f"127.0.0.1:{port}", identity, secret="s" * 32, will_load=True)
        assert client.info().name == "locked"
        client.close()
    finally:
        server.stop(0)
        servicer.close()
