"""The repetition-penalty history travels with a moved session's last stage.

Three in-process nodes on loopback hold the tiny qwen3: ``a`` layers 0:2, ``b`` and ``c`` 2:5.
A greedy session with a repetition penalty generates on a -> b; mid-generation its last stage
moves from b to c (whole, or pre-copied with its tail following), and the tokens must be those
of the same session left where it was: the penalty looks at the ids generated before the move.
"""

import pytest

from turbocluster.runtime.model import loader
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.sessions import transfer as kv
from turbocluster.runtime.transport.client import NodeClient

PROMPT = [11, 402, 9, 77, 1203, 5, 64, 19]
PENALTY = dict(repetition_penalty=3.0, repetition_context_size=64)  # greedy (temperature 0)
BEFORE, AFTER = 6, 10  # tokens generated before and after the move


@pytest.fixture(scope="module")
def nodes(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    identity = loader.describe(path)["identity"]
    servicers, servers, clients = [], [], []
    for name, (start, end) in (("a", (0, 2)), ("b", (2, 5)), ("c", (2, 5))):
        servicer = NodeServicer(name=name, session_ttl=0)
        server, port = make_server(servicer)
        client = NodeClient(f"127.0.0.1:{port}", identity, will_load=True)
        client.load(path, start, end)
        servicers.append(servicer)
        servers.append(server)
        clients.append(client)
    yield clients
    for client in clients:
        client.close()
    for server, servicer in zip(servers, servicers):
        server.stop(0)
        servicer.close()


def _open(a, b, sid, **sampling):
    b.create_session(sid, 256, **sampling)
    a.create_session(sid, 256, next_address=b.address, **sampling)


def _generate(a, sid, n, fed):
    out = []
    for _ in range(n):
        out.append(a.forward(sid, fed).token)
        fed = [out[-1]]
    return out


def _reference(nodes, sid, **sampling):
    a, b, _ = nodes
    _open(a, b, sid, **sampling)
    tokens = _generate(a, sid, BEFORE + AFTER, PROMPT)
    a.drop(sid)
    b.drop(sid)
    return tokens


@pytest.mark.parametrize("how", ["whole", "pre-copied"])
def test_greedy_tokens_with_a_repetition_penalty_survive_moving_the_last_stage(nodes, how):
    a, b, c = nodes
    ref = _reference(nodes, f"ref-{how}", **PENALTY)
    assert ref != _reference(nodes, f"plain-{how}"), "the penalty must change these tokens, or the test shows nothing"
    sid = f"mv-{how}"
    _open(a, b, sid, **PENALTY)
    if how == "whole":
        tokens = _generate(a, sid, BEFORE, PROMPT)
        calls.push(b, sid, (0, 0), c.address, "")
    else:  # staged early, then the positions generated since follow (what cluster migrate does)
        tokens = _generate(a, sid, BEFORE // 2, PROMPT)
        staged = calls.push(b, sid, (0, 0), c.address, "", stage=True).session.offset
        tokens += _generate(a, sid, BEFORE - BEFORE // 2, [tokens[-1]])
        calls.push(b, sid, (0, 0), c.address, "", from_token=staged)
    calls.reroute(a, sid, c.address)
    b.drop(sid)
    tokens += _generate(a, sid, AFTER, [tokens[-1]])
    a.drop(sid)
    c.drop(sid)
    assert tokens == ref


def test_the_last_stages_container_carries_its_history(nodes):
    """Exported meta holds the ids the penalty looks at; a container claiming more than its look-back is refused."""
    a, b, _ = nodes
    _open(a, b, "meta", **PENALTY)
    tokens = _generate(a, "meta", 3, PROMPT)
    header, data = calls.fetch(b, "meta")
    a.drop("meta")
    b.drop("meta")
    caches, meta = session_io.unpack_session(data)
    assert meta["history"] == PROMPT + tokens[:2]  # every input id so far (the last token is not yet fed)
    meta = {k: v for k, v in meta.items() if k not in ("container_version", "format_version")}
    meta["history"] = list(range(PENALTY["repetition_context_size"] + 1))
    bad = session_io.pack_session(caches, meta)
    with pytest.raises(session_io.SessionFormatError) as e:
        kv.import_session(bad, {"layers": (2, 5)}, lambda n, c: 0)
    assert e.value.field == "meta.history"
