"""The session-moving calls on a node (ImportSession, ExportSession, PushSession, RerouteSession), client side."""

from ...kernels.format import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ..transport import wire
from ..transport.streams import Replayable
from . import container as session_io
from .container import SessionFormatError
from .transfer import chunks, receive

TRANSFER_TIMEOUT = 300.0  # seconds for one export, import or push: a long context over a slow link


def send(client, header, data, chunk_bytes=wire.CHUNK_BYTES, pieces=None):
    """ImportSession on ``client``: ``header`` (a SessionHeader), then ``data`` in chunks. Returns SessionInfo.

    The chunk messages are made from ``data`` as they are sent (twice with a cluster secret:
    once for the credential's digest), so the sender holds ``data`` and about one chunk;
    ``pieces`` (``(index, bytes, crc32)``, read once) replaces ``data``'s chunks.
    """
    def messages():
        yield pb.SessionChunk(header=header)
        for index, piece, crc in pieces or chunks(data, chunk_bytes):
            yield pb.SessionChunk(chunk=pb.Chunk(index=index, data=piece, crc32=crc))

    stream = messages() if pieces is not None else Replayable(messages)
    return client.stub.ImportSession(stream, metadata=client.metadata, timeout=TRANSFER_TIMEOUT)


def fetch(client, session_id, layers=None, keep_prefill=False, holder=""):
    """ExportSession from ``client``: ``(header, container bytes)``, every chunk checked."""
    a, b = layers or (0, 0)
    request = pb.ExportSessionRequest(session_id=session_id, layer_start=a, layer_end=b, keep_prefill=keep_prefill, holder=holder)
    stream = client.stub.ExportSession(request, metadata=client._md(request), timeout=TRANSFER_TIMEOUT)
    first = next(stream, None)
    if first is None or not first.HasField("header"):
        stream.cancel()
        raise SessionFormatError("stream", f"node {client.address} began its export without a header")
    header = first.header
    data = receive(((m.chunk.index, m.chunk.data, m.chunk.crc32) for m in stream), int(header.total_bytes))
    return header, data


def push(client, session_id, layers, target_address, next_address, target_session_id="", stage=False, from_token=0, holder=""):
    """PushSession on ``client``: its ``layers`` of the session go straight to ``target_address``.

    ``stage``: the target checks and holds the copy without serving it;
    ``from_token``: send only the positions from there on and commit the staged copy.
    """
    request = pb.PushSessionRequest(
        session_id=session_id, layer_start=layers[0], layer_end=layers[1], target_address=target_address,
        next_address=next_address, target_session_id=target_session_id, stage=stage, from_token=from_token,
        holder=holder,
    )
    return client._unary(client.stub.PushSession, request, TRANSFER_TIMEOUT)


def reroute(client, session_id, next_address, holder=""):
    request = pb.RerouteSessionRequest(session_id=session_id, next_address=next_address, holder=holder)
    return client._unary(client.stub.RerouteSession, request)


def header_for(meta, total, session_id="", next_address=""):
    """The SessionHeader announcing a container built here (a restore or a merged relay)."""
    return pb.SessionHeader(
        total_bytes=total, session_id=session_id or meta.get("session_id", ""), next_address=next_address,
        model_identity=meta["model"], layer_start=meta["layers"][0], layer_end=meta["layers"][1],
        num_tokens=meta["num_tokens"], format_version=FORMAT_VERSION, container_version=session_io.CONTAINER_VERSION,
    )
