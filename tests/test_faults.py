"""Injected faults, malformed messages, limits, authentication and TLS against real nodes.

Faulty nodes drop, delay or corrupt every k-th call (faults.py, switched on by
``--faults``); every session must still finish with the fault-free greedy tokens.
"""

import re
import shutil
import subprocess
import time
import uuid

import grpc
import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.transport import discovery
from turbocluster.runtime.cluster import failover
from turbocluster.runtime.transport import faults
from turbocluster.runtime.model import loader
from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.transport.client import MD_CRC, NodeClient

PROMPT = "Name three colours."
MAX_TOKENS = 8
SECRET = "fault-test-secret-" + "7" * 16
SPEC = "drop:7,delay:5:0.2,corrupt:11"
METHODS = pb.DESCRIPTOR.services_by_name["Node"].methods


@pytest.fixture(scope="module")
def bundled():
    model, tok = loader.load()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ref = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS)]
    return model, ids, ref


def status_of(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_fault_spec_parses_and_refuses_nonsense():
    assert faults.parse(SPEC) == [faults.Fault("drop", 7), faults.Fault("delay", 5, 0.2), faults.Fault("corrupt", 11)]
    assert faults.parse("") == []
    for bad in ("drop", "drop:0", "delay:3", "explode:2", "corrupt:x"):
        with pytest.raises(ValueError, match="fault"):
            faults.parse(bad)


@pytest.fixture(scope="module")
def faulty():
    """Two authenticated nodes that drop, delay and corrupt calls."""
    nodes = start_local_nodes(2, secret=SECRET, args=["--faults", SPEC])
    yield nodes
    stop_local_nodes(nodes)


def test_every_session_completes_with_faults_every_kth_call(faulty, bundled):
    _, ids, ref = bundled
    with Cluster.connect(nodes=[n.address for n in faulty], secret=SECRET) as cluster:
        cluster.load(cluster.plan(context=128))
        with pytest.warns(failover.FailoverWarning):
            # warm up at the default deadline: fresh nodes compile MLX kernels for seconds on their first prompt
            list(cluster.generate_tokens(ids, max_tokens=2, stop_at_eos=False))
            failover.configure(cluster, step_timeout_s=5.0, backoff_s=0.02)
            for _ in range(3):
                assert list(cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)) == ref
        assert failover.state(cluster).events == []  # transient faults: retried in place, no re-plan
    logs = "".join(open(n.log_path).read() for n in faulty)
    for kind in faults.KINDS:
        assert f"fault injected: {kind}" in logs


def test_unauthenticated_calls_to_every_rpc_are_refused(faulty):
    channel = grpc.insecure_channel(faulty[0].address)
    try:
        for m in METHODS:
            call = _raw(channel, m)
            code, details = status_of(lambda: call(b"", ()))
            assert code == grpc.StatusCode.UNAUTHENTICATED, m.name
            assert "turbo-auth" in details
    finally:
        channel.close()
    with pytest.raises(grpc.RpcError) as e:
        NodeClient(faulty[0].address, loader.describe()["identity"], timeout=5, secret="wrong-secret-" + "0" * 16)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _raw(channel, method):
    """A bytes-in call of ``method`` whatever its streaming shape: ``call(body, metadata)``."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming and method.server_streaming:
        c = channel.stream_stream(path)
        return lambda body, md: list(c(iter([body]), metadata=md, timeout=10))
    if method.client_streaming:
        c = channel.stream_unary(path)
        return lambda body, md: c(iter([body]), metadata=md, timeout=10)
    if method.server_streaming:
        c = channel.unary_stream(path)
        return lambda body, md: list(c(body, metadata=md, timeout=10))
    c = channel.unary_unary(path)
    return lambda body, md: c(body, metadata=md, timeout=10)


# --------------------------------------------------------------------------- one clean node in this process


@pytest.fixture(scope="module")
def node(bundled):
    """A node in this process holding the whole bundled model; ``(servicer, client)``."""
    servicer = NodeServicer(name="inproc", session_ttl=3600)
    server, port = make_server(servicer)
    client = NodeClient(f"127.0.0.1:{port}", loader.describe()["identity"], will_load=True)
    client.load(None, 0, 30)
    yield servicer, client
    client.close()
    server.stop(0)
    servicer.close()


def test_malformed_bodies_of_every_rpc_get_invalid_argument_or_data_loss(node, bundled):
    servicer, client = node
    for m in METHODS:
        call = _raw(client.channel, m)
        code, details = status_of(lambda: call(b"\xff\xff\xff\x0f", client.metadata))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (m.name, code, details)
        if not (m.client_streaming or m.server_streaming):
            body = pb.InfoRequest().SerializeToString()
            code, details = status_of(lambda: call(b"\x08\x01" + body, client.metadata + ((MD_CRC, "12345"),)))
            assert code == grpc.StatusCode.DATA_LOSS and "crc32" in details, m.name
    # well-formed messages with values out of bounds
    sid = uuid.uuid4().hex
    client.create_session(sid, 64)
    bad = [
        (lambda: client.create_session("x" * 300, 8), "at most 256"),
        (lambda: client.create_session("n", 8, next_address="not an address"), "host:port"),
        (lambda: client.create_session("n", 0), "max_context"),
        (lambda: client.create_session("n", 8, cache={"k_bits": 3}), "both"),
        (lambda: client.create_session("n", 8, temperature=float("nan")), "temperature"),
        (lambda: client.forward(sid, tokens=[1], want=99), "want"),
        (lambda: client.forward(sid, tokens=[], want=pb.NONE), "1.."),
        (lambda: client.forward(sid, tokens=[2**32 - 1]), "vocabulary"),
        (lambda: client.forward(sid, hidden=mx.zeros((1, 1, 576), mx.float16)), "token ids"),
        (lambda: client.trim(sid, 5), "cannot trim"),
    ]
    for call, words in bad:
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
    code, _ = status_of(lambda: client.forward(sid, tokens=[1] * 65, want=pb.NONE))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    code, _ = status_of(lambda: client.create_session("huge", (1 << 20) + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # the node still serves, and serves right
    _, ids, ref = bundled
    client.drop(sid)
    client.create_session(sid, 64)
    client.forward(sid, tokens=ids[:-1], want=pb.NONE)
    assert client.forward(sid, tokens=ids[-1:]).token == ref[0]
    client.drop(sid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sid=st.sampled_from(["fuzz", "", "nope", "\x00" * 3]),
    ids=st.lists(st.integers(0, 2**32 - 1), max_size=12),
    want=st.integers(0, 2**31 - 1) | st.sampled_from([0, 1, 2, 3, 4]),
    hidden=st.none() | st.tuples(st.integers(0, 9), st.lists(st.integers(0, 2**40), max_size=4), st.binary(max_size=64)),
)
def test_fuzzed_forward_requests_get_a_status_and_never_break_the_node(node, sid, ids, want, hidden):
    servicer, client = node
    if "fuzz" not in {s.session_id for s in servicer.sessions.list()}:
        client.create_session("fuzz", 4096)
    request = pb.ForwardRequest(session_id=sid, want=want)
    if hidden is not None:
        dtype, shape, data = hidden
        request.hidden.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=data))
    elif ids:
        request.tokens.ids.extend(ids)
    try:
        reply = client.stub.Forward(request, metadata=client.metadata, timeout=30)
        assert reply.offset > 0
    except grpc.RpcError as e:
        assert e.code() in (
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), (e.code(), e.details())
    assert client.info().load_state == pb.READY


def test_idle_sessions_expire_with_a_message_saying_so(node):
    servicer, client = node
    client.create_session("idle", 16)
    servicer.sessions.ttl = 0.2
    try:
        deadline = time.monotonic() + 10
        while "idle" in {s.session_id for s in client.sessions()} and time.monotonic() < deadline:
            time.sleep(0.1)
        code, details = status_of(lambda: client.forward("idle", tokens=[1]))
        assert code == grpc.StatusCode.NOT_FOUND and "expired" in details
    finally:
        servicer.sessions.ttl = 3600


# --------------------------------------------------------------------------- TLS, discovery


def _certs(tmp):
    """A CA and a server + client certificate for 127.0.0.1, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed (and the cryptography package is not a dependency)")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=turbo-test-ca")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", "san.ext")
    return {k: str(tmp / f"{k}.pem") for k in ("ca", "server", "client")} | {
        "server_key": str(tmp / "server.key"), "client_key": str(tmp / "client.key")}


def test_mutual_tls_pipeline_generates_and_refuses_plaintext_and_certless_clients(tmp_path, bundled):
    c = _certs(tmp_path)
    _, ids, ref = bundled
    server_args = ["--tls-cert", c["server"], "--tls-key", c["server_key"], "--tls-ca", c["ca"]]
    nodes = start_local_nodes(2, args=server_args)
    tls = {"ca": c["ca"], "cert": c["client"], "key": c["client_key"]}
    try:
        # the nodes present the server certificate to each other too; any CA-signed cert is a client cert here
        with Cluster.connect(nodes=[n.address for n in nodes], tls=tls) as cluster:
            cluster.load(cluster.plan(context=128))
            assert list(cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)) == ref
        identity = loader.describe()["identity"]
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
            NodeClient(nodes[0].address, identity, timeout=3)
        with pytest.raises(grpc.RpcError):  # TLS without a client certificate: mTLS refuses it
            NodeClient(nodes[0].address, identity, timeout=3, tls={"ca": c["ca"]})
    finally:
        stop_local_nodes(nodes)


def test_zeroconf_txt_records_carry_no_secret():
    names = [f"txt-{uuid.uuid4().hex[:6]}"]
    nodes = start_local_nodes(1, advertise=True, names=names, secret=SECRET)
    try:
        [found] = [f for f in discovery.browse(2.0, interfaces=["127.0.0.1"]) if f.name == names[0]]
        text = " ".join(f"{k}={v}" for k, v in found.properties.items())
        assert found.properties["node_id"] and SECRET not in text and SECRET[:8] not in text
        assert not re.search(r"secret|token|auth", text, re.IGNORECASE)
    finally:
        stop_local_nodes(nodes)
