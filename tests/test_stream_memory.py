"""With a cluster secret, a streamed request is digested and sent without holding all its messages.

The credential names the digest of every message of a stream, so it is made before the
first one leaves; the sender makes the chunk messages once for the digest and again to
send them (``transport.streams.Replayable``), holding the container and about one chunk, not
every chunk message besides the container. Measured on this (the sending) process's peak
resident memory while it imports a real ~64 MiB session into a real node process with a
secret. Resident memory, not tracemalloc: protobuf (upb) keeps message bytes outside
Python's allocator, where tracemalloc does not see them.
"""

import mlx.core as mx
import pytest
from conftest import rss, tiny_node

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.sessions import calls

SECRET = "c0ffee" * 4 + "0123456789abcdef" * 2
POSITIONS = 6400  # ~64 MiB of float32 KV for the 5 layers of the tiny qwen3
MAX_EXTRA = 0.3  # the send may add this much of the container's size to the sender's peak


def _reset_peak():
    """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here: {e}")


@pytest.fixture(scope="module")
def node(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    with tiny_node(path, secret=SECRET) as (_, client, desc):
        client.load(path, 0, desc["num_layers"])
        yield client, desc["identity"]


def _container(identity, positions):
    """A real container of a 5-layer session of the tiny qwen3 holding ``positions`` (random KV, as a
    prefill would leave it; packing it here is what a node's export does, minus minutes of prefill)."""
    from mlx_lm.models.cache import KVCache

    from turbocluster.runtime.model.sampling import check
    from turbocluster.runtime.sessions import transfer
    from turbocluster.runtime.sessions.store import Session

    caches = []
    for _ in range(5):
        c = KVCache()
        c.update_and_fetch(*(mx.random.normal((1, 4, positions, 64)).astype(mx.float32) for _ in range(2)))
        caches.append(c)
    session = Session("src", positions, caches, sampling=check({}), rng_state=mx.random.key(0))
    return bytes(transfer.export_session(session, identity, (0, 5)))


def test_an_authenticated_import_holds_the_container_and_one_chunk_not_every_chunk(node):
    client, identity = node
    data = _container(identity, POSITIONS)
    assert len(data) > 48 << 20
    header = calls.header_for({"model": identity, "layers": (0, 5), "num_tokens": POSITIONS}, len(data), "copy")
    _reset_peak()
    before = rss("self", "VmRSS")
    info = calls.send(client, header, data)
    extra = rss("self", "VmHWM") - before
    print(f"container {len(data) >> 20} MiB; sending it added {extra / (1 << 20):.1f} MiB to the sender's peak RSS")
    assert info.offset == POSITIONS  # the node checked the lazily made stream against its credential
    assert extra < MAX_EXTRA * len(data), f"sending a {len(data) >> 20} MiB container held {extra >> 20} MiB more"
    client.drop("copy")


def test_an_authenticated_hidden_state_stream_reaches_the_step(node):
    """ForwardStream (a hidden state over CHUNK_BYTES) under a secret: made twice, its digest matches,
    so the node's step sees it (and refuses it for what it is: hidden states for the first node)."""
    import grpc

    client, _ = node
    client.create_session("h", 2048)
    hidden = mx.random.normal((1, 1100, 512)).astype(mx.float32)  # 2.2 MiB: streamed in chunks
    with pytest.raises(grpc.RpcError) as e:
        client.forward("h", hidden=hidden, want=pb.TOKEN)
    client.drop("h")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()  # not UNAUTHENTICATED
