"""One node's step contract on real loopback servers: position checks, idempotent retries,
session locks, non-finite refusals, and sampling through mlx-lm's own samplers."""

import time

import grpc
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.model import loader
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.transport import errors, wire
from turbocluster.runtime.transport.client import NodeClient

SPLIT = 2  # qwen3 tiny: 5 layers, node a holds 0:2, node b 2:5
PROMPT = [11, 402, 9, 77, 1203, 5, 64, 19]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dirs):
    """Two in-process nodes on loopback holding the tiny qwen3 model; ``(a, b, servicers)``."""
    path = tiny_model_dirs["qwen3"]
    identity = loader.describe(path)["identity"]
    servicers, servers, clients = [], [], []
    for name, (start, end) in (("a", (0, SPLIT)), ("b", (SPLIT, 5))):
        servicer = NodeServicer(name=name, session_ttl=0)
        server, port = make_server(servicer)
        client = NodeClient(f"127.0.0.1:{port}", identity, will_load=True)
        client.load(path, start, end)
        servicers.append(servicer)
        servers.append(server)
        clients.append(client)
    yield clients[0], clients[1], servicers
    for c in clients:
        c.close()
    for server, servicer in zip(servers, servicers):
        server.stop(0)
        servicer.close()


def open_session(a, b, sid, **sampling):
    b.create_session(sid, 256, **sampling)
    a.create_session(sid, 256, next_address=b.address, **sampling)


def offsets(a, b, sid):
    return [next(s.offset for s in c.sessions() if s.session_id == sid) for c in (a, b)]


def refused(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), errors.reason_of(e.value)


def drop(a, b, sid):
    for c in (a, b):
        c.drop(sid)


def test_a_step_expecting_another_position_is_refused_and_applied_nowhere(pipeline):
    a, b, _ = pipeline
    open_session(a, b, "pos")
    a.forward("pos", PROMPT, want=pb.NONE, expected_position=0)
    assert offsets(a, b, "pos") == [8, 8]
    code, reason = refused(lambda: a.forward("pos", [5], expected_position=0))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, errors.REASON_POSITION)
    assert offsets(a, b, "pos") == [8, 8]
    # the stages disagree (b lost a position): a applies, b refuses, a undoes its part
    b.trim("pos", 1)
    code, reason = refused(lambda: a.forward("pos", [5], expected_position=8))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, errors.REASON_POSITION)
    assert offsets(a, b, "pos") == [8, 7]
    a.trim("pos", 1)
    assert a.forward("pos", [5], expected_position=7).offset == 8
    assert offsets(a, b, "pos") == [8, 8]
    drop(a, b, "pos")


def test_a_retried_step_is_not_applied_twice(pipeline):
    a, b, _ = pipeline
    seeded = dict(temperature=1.0, seed=3)
    open_session(a, b, "once", **seeded)
    open_session(a, b, "twice", **seeded)
    got = {"once": [], "twice": []}
    for sid in got:
        a.forward(sid, PROMPT, want=pb.NONE, expected_position=0, step_id="p")
    token = {sid: 1 for sid in got}
    for i in range(4):
        for sid in got:
            position = 8 + i
            first = a.forward(sid, [token[sid]], expected_position=position, step_id=f"d{i}")
            if sid == "twice":  # the reply was "lost": the same step again, twice
                for _ in range(2):
                    again = a.forward(sid, [token[sid]], expected_position=position, step_id=f"d{i}")
                    assert (again.token, again.offset) == (first.token, first.offset)
            token[sid] = first.token
            got[sid].append(first.token)
            assert offsets(a, b, sid) == [position + 1] * 2
    # retries neither moved the caches nor drew from the sampler's random state
    assert got["twice"] == got["once"]
    drop(a, b, "once")
    drop(a, b, "twice")


def test_a_lock_refuses_others_until_unlocked_or_expired(pipeline):
    a, b, _ = pipeline
    open_session(a, b, "lk")
    a.forward("lk", PROMPT, want=pb.NONE)
    for c in (a, b):
        assert c.lock_session("lk", "mig-1", 30).holder == "mig-1"
    locked = (grpc.StatusCode.ABORTED, errors.REASON_LOCKED)
    assert refused(lambda: a.forward("lk", [3])) == locked
    assert refused(lambda: a.trim("lk", 1)) == locked
    assert refused(lambda: calls.fetch(a, "lk")) == locked
    assert refused(lambda: a.lock_session("lk", "mig-2", 30)) == locked
    assert refused(lambda: a.unlock_session("lk", "mig-2")) == locked
    assert refused(lambda: a.drop("lk")) == locked
    assert refused(lambda: calls.reroute(a, "lk", "")) == locked
    assert offsets(a, b, "lk") == [8, 8]
    assert a.sessions()[0].next_address == b.address  # neither dropped nor repointed
    assert calls.reroute(a, "lk", b.address, holder="mig-1").next_address == b.address
    assert a.forward("lk", [3], holder="mig-1").offset == 9  # the holder's own step runs
    for c in (a, b):
        c.unlock_session("lk", "mig-1")
    assert a.forward("lk", [4]).offset == 10
    # only b locked: a's part of the step is undone, so the stages still agree
    b.lock_session("lk", "mig-3", 0.5)
    assert refused(lambda: a.forward("lk", [4])) == locked
    assert offsets(a, b, "lk") == [10, 10]
    time.sleep(0.6)  # the lock lapses by itself
    assert a.forward("lk", [4], expected_position=10).offset == 11
    assert offsets(a, b, "lk") == [11, 11]
    drop(a, b, "lk")


def test_a_migrations_drop_leaves_a_pointer_and_a_drop_frees_a_staged_copy(pipeline):
    a, b, servicers = pipeline
    open_session(a, b, "mv")
    a.forward("mv", PROMPT, want=pb.NONE)
    header, data = calls.fetch(a, "mv")
    a.lock_session("mv", "mig-9", 30)
    assert refused(lambda: a.drop("mv", moved_to="10.0.0.9:7070")) == (grpc.StatusCode.ABORTED, errors.REASON_LOCKED)
    reply = a.drop("mv", holder="mig-9", moved_to="10.0.0.9:7070")
    assert reply.bytes_freed > 0 and reply.next_address == b.address  # the chain to follow
    with pytest.raises(grpc.RpcError) as e:
        a.forward("mv", [3])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and errors.moved_to(e.value) == "10.0.0.9:7070"
    # a staged (pre-copied, uncommitted) copy is freed by DropSession too, not only by its 600 s expiry
    header.stage = True
    calls.send(a, header, data)
    assert not a.sessions() and servicers[0].migration_staged.sessions
    assert a.drop("mv").bytes_freed > 0 and not servicers[0].migration_staged.sessions
    assert refused(lambda: a.drop("mv"))[0] == grpc.StatusCode.NOT_FOUND
    b.drop("mv")


def test_node_metrics_count_what_it_served(pipeline):
    import re
    import urllib.request

    from turbocluster.runtime.node.metrics import serve_http

    a, b, servicers = pipeline
    open_session(a, b, "met")
    a.forward("met", PROMPT, want=pb.NONE)
    a.forward("met", [3])
    refused(lambda: a.forward("nope", [3]))
    text = a.metrics()
    name = servicers[0].name

    def value(pattern):
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else None

    assert value(rf'^turbo_node_positions_total\{{node="{name}"\}} (\S+)') >= len(PROMPT) + 1
    assert value(rf'^turbo_node_rpcs_total\{{code="NOT_FOUND",method="Forward",node="{name}"\}} (\S+)') >= 1
    assert value(rf'^turbo_node_sessions\{{node="{name}"\}} (\S+)') >= 1
    assert value(rf'^turbo_node_kv_bytes_reserved\{{node="{name}"\}} (\S+)') > 0
    http = serve_http(servicers[0].metrics, servicers[0], 0)  # loopback only
    try:
        assert http.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{http.server_address[1]}/metrics") as r:
            assert "turbo_node_steps_total" in r.read().decode()
    finally:
        http.shutdown()
    drop(a, b, "met")


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden_states_are_refused(pipeline, dtype, bad):
    a, b, servicers = pipeline
    b.create_session("nf", 64)
    hidden = servicers[1].desc["hidden_size"]
    h = np.zeros((1, 2, hidden), dtype=np.float32)
    h[0, 1, 5] = bad
    code, reason = refused(lambda: b.forward("nf", hidden=mx.array(h).astype(dtype)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, errors.REASON_NON_FINITE)
    h[0, 1, 5] = 1e4 if dtype != mx.float16 else 6e4  # large but finite passes
    assert b.forward("nf", hidden=mx.array(h).astype(dtype), want=pb.HIDDEN).offset == 2
    b.drop("nf")


PARAMS = [
    dict(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, repetition_penalty=1.5, repetition_context_size=6),
    dict(temperature=1.3, presence_penalty=0.8, frequency_penalty=0.4, penalty_context_size=10),
    dict(temperature=0.0, repetition_penalty=2.0),
]


@pytest.mark.parametrize("params", PARAMS)
def test_sampled_tokens_equal_mlx_lm_samplers_on_the_same_logits(pipeline, params):
    """Teacher-forced twin sessions: one returns logits, the other samples them on the node."""
    a, b, _ = pipeline
    seed, steps = 1234, 12
    open_session(a, b, "tok", seed=seed, **params)
    open_session(a, b, "lg", seed=seed, **params)
    node_tokens, logits = [], []
    for i in range(steps):
        ids = PROMPT if i == 0 else [node_tokens[-1]]
        node_tokens.append(a.forward("tok", ids).token)
        reply = a.forward("lg", ids, want=pb.LOGITS)
        logits.append(wire.from_proto(reply.logits, reply.logits.data)[None])
    drop(a, b, "tok")
    drop(a, b, "lg")

    mx.random.seed(seed)  # what mlx_lm.generate_step does with the same arguments
    sampler = make_sampler(
        temp=params["temperature"], top_p=params.get("top_p", 0.0), min_p=params.get("min_p", 0.0), top_k=params.get("top_k", 0)
    )
    processors = make_logits_processors(
        repetition_penalty=params.get("repetition_penalty"),
        repetition_context_size=params.get("repetition_context_size", 20),
        presence_penalty=params.get("presence_penalty"),
        presence_context_size=params.get("penalty_context_size", 20),
        frequency_penalty=params.get("frequency_penalty"),
        frequency_context_size=params.get("penalty_context_size", 20),
    )
    assert processors, "the parameters must exercise mlx-lm's logits processors"
    fed, ref = [], []
    for i, lg in enumerate(logits):
        fed += PROMPT if i == 0 else [ref[-1]]
        tokens = mx.array(fed)
        for proc in processors:
            lg = proc(tokens, lg)
        ref.append(int(sampler(lg - mx.logsumexp(lg, axis=-1, keepdims=True)).item()))
    assert node_tokens == ref
    assert len(set(ref)) > 1 or params["temperature"] == 0


def test_bad_sampling_and_lock_arguments_are_refused(pipeline):
    a, b, _ = pipeline
    code, _ = refused(lambda: b.create_session("bad", 16, temperature=1.0, min_p=2.0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = refused(lambda: b.create_session("bad", 16, temperature=float("nan")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    b.create_session("ok", 16)
    assert refused(lambda: b.lock_session("ok", "", 5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(lambda: b.lock_session("ok", "m", 0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(lambda: b.lock_session("missing", "m", 5))[0] == grpc.StatusCode.NOT_FOUND
    b.drop("ok")


def test_sampler_settings_and_random_state_move_with_a_session(pipeline):
    """A copy pushed node to node samples what the original samples: top_k, min_p and the key travel."""
    a, b, _ = pipeline
    open_session(a, b, "src", temperature=1.5, top_k=3, min_p=0.1, seed=99)
    a.forward("src", PROMPT, want=pb.NONE)
    calls.push(b, "src", (0, 0), b.address, "", target_session_id="copy")
    calls.push(a, "src", (0, 0), a.address, b.address, target_session_id="copy")
    tokens = {"src": [], "copy": []}
    fed = 7
    for _ in range(10):
        for sid in tokens:
            tokens[sid].append(a.forward(sid, [fed]).token)
        fed = tokens["src"][-1]
    assert tokens["src"] == tokens["copy"] and len(set(tokens["src"])) > 1
    drop(a, b, "src")
    drop(a, b, "copy")


def test_a_push_to_a_target_that_restarted_handshakes_again(tiny_model_dirs):
    """The source node caches its connection to a push target; after the target restarts (same port, new
    process state) that connection's handshake is stale. The push must dial again, not fail with
    'call Handshake first' until the source restarts (issue 10)."""
    path = tiny_model_dirs["qwen3"]
    identity = loader.describe(path)["identity"]

    def start(port=0):
        servicer = NodeServicer(name=f"n{port}", session_ttl=0)
        server, port = make_server(servicer, port=port)
        client = NodeClient(f"127.0.0.1:{port}", identity, will_load=True)
        client.load(path, 0, 5)
        return servicer, server, client

    src, target = start(), start()
    port = int(target[2].address.rsplit(":", 1)[1])
    try:
        s = src[2]
        s.create_session("moving", 64)
        s.forward("moving", PROMPT, want=pb.NONE)
        calls.push(s, "moving", (0, 5), target[2].address, "")
        assert [x.offset for x in target[2].sessions() if x.session_id == "moving"] == [len(PROMPT)]
        for part in target[2], target[1]:  # the target restarts on the same port
            part.close() if isinstance(part, NodeClient) else part.stop(0)
        target[0].close()
        target = start(port)
        reply = calls.push(s, "moving", (0, 5), target[2].address, "")
        assert reply.session.offset == len(PROMPT)
        assert [x.offset for x in target[2].sessions() if x.session_id == "moving"] == [len(PROMPT)]
    finally:
        for servicer, server, client in (src, target):
            client.close()
            server.stop(0)
            servicer.close()
