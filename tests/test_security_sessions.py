"""A real session on a loopback node with a secret: nobody without the secret can read or change it.

The issue's attack: list the sessions, export one and rebuild its prompt from
the KV. Here a node on 127.0.0.1 (where no secret is required) is given one,
holds a real session of a tiny model, and every session RPC made without a
credential (but with a sniffed handshake token) is refused UNAUTHENTICATED
with its reason, while the session stays as it was.
"""

import grpc
import pytest

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.proto import turbo_pb2_grpc as pb_grpc
from turbocluster.runtime.model import loader
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.transport import auth, errors
from turbocluster.runtime.transport.client import NodeClient

SECRET = "f" * 8 + "0123456789abcdef" * 3
PROMPT = [17, 4242, 99, 1234, 7, 7, 31337, 5]  # stands in for a prompt holding a PIN


@pytest.fixture(scope="module")
def node(tiny_model_dirs):
    model = tiny_model_dirs["qwen3"]
    servicer = NodeServicer(name="vault", secret=SECRET)
    server, port = make_server(servicer)
    client = NodeClient(f"127.0.0.1:{port}", loader.describe(model)["identity"], secret=SECRET, will_load=True)
    client.load(model, 0, 5)
    client.create_session("victim", max_context=32)
    client.forward("victim", tokens=PROMPT)
    try:
        yield client, port
    finally:
        client.close()
        server.stop(0)
        servicer.close()


def _offset(client):
    return {s.session_id: s.offset for s in client.sessions()}.get("victim")


def _refusal(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), errors.reason_of(e.value)


def test_the_operator_can_export_the_session(node):
    client, _ = node
    header, data = calls.fetch(client, "victim")
    assert header.total_bytes == len(data) > 0
    assert _offset(client) == len(PROMPT)


def test_session_rpcs_without_a_credential_are_refused_on_loopback(node):
    client, port = node
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.NodeStub(ch)
        md = client.metadata  # protocol, a live handshake token and compat hash: all but the credential
        attacks = {
            "ListSessions": lambda: stub.ListSessions(pb.ListSessionsRequest(), metadata=md, timeout=5),
            "ExportSession": lambda: next(stub.ExportSession(pb.ExportSessionRequest(session_id="victim"), metadata=md, timeout=5)),
            "ImportSession": lambda: stub.ImportSession(iter([pb.SessionChunk(header=pb.SessionHeader())]), metadata=md, timeout=5),
            "Forward": lambda: stub.Forward(_step(), metadata=md, timeout=5),
            "DropSession": lambda: stub.DropSession(pb.DropSessionRequest(session_id="victim"), metadata=md, timeout=5),
            "Trim": lambda: stub.Trim(pb.TrimRequest(session_id="victim", count=1), metadata=md, timeout=5),
        }
        for name, attack in attacks.items():
            assert _refusal(attack) == (grpc.StatusCode.UNAUTHENTICATED, auth.REASON_MISSING), name
    assert _offset(client) == len(PROMPT)  # untouched: not dropped, trimmed or stepped


def test_a_credential_for_another_session_does_not_export_this_one(node):
    client, port = node
    mine = pb.ExportSessionRequest(session_id="mine")
    cred = auth.make_credential(SECRET, "/turbocluster.v1.Node/ExportSession", target=client.node_id, body=auth.body_digest(mine))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.NodeStub(ch)
        theirs = pb.ExportSessionRequest(session_id="victim")
        code, reason = _refusal(lambda: next(stub.ExportSession(theirs, metadata=client.metadata + ((auth.HEADER, cred),), timeout=5)))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, auth.REASON_BODY)


def _step():
    request = pb.ForwardRequest(session_id="victim", want=pb.TOKEN)
    request.tokens.ids.extend([1])
    return request


def test_a_streamed_import_is_bound_to_all_its_messages(node):
    """ImportSession's chunks are the KV: a credential for one container does not install another."""
    client, port = node
    header, data = calls.fetch(client, "victim")
    header.session_id = "copy"
    assert calls.send(client, header, data).offset == len(PROMPT)  # the operator's import works
    client.drop("copy")

    method = "/turbocluster.v1.Node/ImportSession"
    honest = [pb.SessionChunk(header=header), pb.SessionChunk(chunk=pb.Chunk(index=0, data=b"honest", crc32=0))]
    forged = list(calls_messages(header, data))  # a real container, but not the one the credential covers
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.NodeStub(ch)
        for body in (auth.stream_digest(honest), auth.STREAM_BODY):
            cred = auth.make_credential(SECRET, method, target=client.node_id, body=body)
            md = client.metadata + ((auth.HEADER, cred),)
            assert _refusal(lambda: stub.ImportSession(iter(forged), metadata=md, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED, auth.REASON_BODY)
    assert "copy" not in {s.session_id for s in client.sessions()}


def calls_messages(header, data):
    from turbocluster.runtime.sessions.transfer import chunks

    yield pb.SessionChunk(header=header)
    for index, piece, crc in chunks(data):
        yield pb.SessionChunk(chunk=pb.Chunk(index=index, data=piece, crc32=crc))


def test_a_hidden_state_over_chunk_bytes_crosses_an_authenticated_pipeline(tiny_model_dirs, node, monkeypatch):
    """Node to node, ForwardStream carries a credential over all its chunks; the step equals the one-node step."""
    from turbocluster.runtime.transport import wire

    monkeypatch.setattr(wire, "CHUNK_BYTES", 16 << 10)  # so a short prompt's hidden state goes by ForwardStream
    streamed, proto_chunks = [], wire.proto_chunks
    monkeypatch.setattr(wire, "proto_chunks", lambda raw, *a: streamed.append(len(raw)) or proto_chunks(raw, *a))
    model = tiny_model_dirs["qwen3"]
    identity = loader.describe(model)["identity"]
    prompt = [(i * 37) % 4000 + 3 for i in range(64)]
    servers, clients = [], []
    try:
        for name in ("stage-a", "stage-b"):
            servicer = NodeServicer(name=name, secret=SECRET)
            server, port = make_server(servicer)
            servers.append((server, servicer))
            clients.append(NodeClient(f"127.0.0.1:{port}", identity, secret=SECRET, will_load=True))
        a, b = clients
        a.load(model, 0, 2)
        b.load(model, 2, 5)
        b.create_session("long", max_context=80)
        a.create_session("long", max_context=80, next_address=b.address)
        split = a.forward("long", tokens=prompt).token
        assert streamed and streamed[0] > wire.CHUNK_BYTES  # it did go by ForwardStream
        whole, _ = node
        whole.create_session("long", max_context=80)
        assert split == whole.forward("long", tokens=prompt).token
        whole.drop("long")
    finally:
        for c in clients:
            c.close()
        for server, servicer in servers:
            server.stop(0)
            servicer.close()
