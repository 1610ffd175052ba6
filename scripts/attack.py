"""Security probes against nodes started on loopback: each attack must be refused.

    python scripts/attack.py [--json]

Starts two nodes sharing a cluster secret (one with --models-dir), a rogue node
with no secret and one with another secret, then tries what an attacker on the
network would: calls without or with stolen credentials, a tampered body, a
replay on the same and on another node, a rogue node answering a coordinator,
model paths outside the models directory; then, against a real node process
with a memory budget, session imports and hidden-state streams that are too
large or lie about their size, and ``restore /dev/zero``. Prints each probe and whether it held
(was refused); ``--json`` prints ``{"probes": [{"name", "refused", "held", "code", "detail"}]}``.
"""

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbocluster.proto import turbo_pb2 as pb  # noqa: E402
from turbocluster.proto import turbo_pb2_grpc as pb_grpc  # noqa: E402
from turbocluster.runtime.node import server  # noqa: E402
from turbocluster.runtime.node.servicer import NodeServicer  # noqa: E402
from turbocluster.runtime.transport import auth, errors, wire  # noqa: E402
from turbocluster.runtime.transport.client import MD_COMPAT, MD_PROTOCOL, MD_TOKEN, NodeClient, NodeNotAuthenticated  # noqa: E402

IDENTITY = "attack-probe-model"
SERVICE = f"/{pb.DESCRIPTOR.services_by_name['Node'].full_name}/"


class Lab:
    """Nodes on loopback for the probes: ``a`` and ``b`` share ``secret``; ``rogue`` has none, ``other`` another."""

    def __init__(self, models_dir=None):
        self.secret = secrets.token_hex(32)
        self.tmp = tempfile.TemporaryDirectory(prefix="turbo-attack-")
        self.models_dir = models_dir or os.path.join(self.tmp.name, "models")
        os.makedirs(self.models_dir, exist_ok=True)
        outside = Path(self.tmp.name) / "outside-secret.txt"
        outside.write_text("not a model\n")
        self.outside = str(outside)
        link = Path(self.models_dir) / "escape"
        if not link.exists():
            link.symlink_to(self.tmp.name)
        self._running = []
        self.a = self._start(self.secret)
        self.b = self._start(self.secret)
        self.rogue = self._start(None)
        self.other = self._start(secrets.token_hex(32))

    def _start(self, secret):
        servicer = NodeServicer(name="probe", memory_budget=1 << 30, secret=secret, session_ttl=0)
        servicer.models_dir = self.models_dir
        srv, port = server.make_server(servicer, "127.0.0.1", 0)
        self._running.append((srv, servicer))
        return servicer, f"127.0.0.1:{port}"

    def client(self, node, secret=None):
        return NodeClient(node[1], IDENTITY, secret=secret or self.secret, timeout=5)

    def close(self):
        for srv, servicer in self._running:
            srv.stop(None).wait()
            servicer.close()
        self.tmp.cleanup()


def _raw(address):
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.NodeStub(channel)


def _status(fn):
    """``(refused, code name, detail)`` of calling ``fn``."""
    try:
        fn()
    except grpc.RpcError as e:
        reason = errors.reason_of(e)
        return True, e.code().name, f"{e.details()}" + (f" [{reason}]" if reason else "")
    except errors.ClusterError as e:
        return True, errors.status_name(e), str(e)
    return False, "OK", "accepted"


def _session_md(client):
    return ((MD_PROTOCOL, str(wire.PROTOCOL_VERSION)), (MD_TOKEN, client.token), (MD_COMPAT, client.compat))


def probe_no_credential(lab):
    channel, stub = _raw(lab.a[1])
    with channel:
        return _status(lambda: stub.ListSessions(pb.ListSessionsRequest(), metadata=((MD_PROTOCOL, str(wire.PROTOCOL_VERSION)),), timeout=5))


def probe_no_credential_handshake(lab):
    channel, stub = _raw(lab.a[1])
    req = pb.HandshakeRequest(protocol_version=wire.PROTOCOL_VERSION, model_identity=IDENTITY, compat_hash=wire.compat_hash(IDENTITY))
    with channel:
        return _status(lambda: stub.Handshake(req, metadata=((MD_PROTOCOL, str(wire.PROTOCOL_VERSION)),), timeout=5))


def probe_wrong_secret(lab):
    return _status(lambda: lab.client(lab.a, secret=secrets.token_hex(32)).close())


def _stolen(lab, request, method, node=None, now=None):
    """A credential as a coordinator made it for ``request`` to ``node`` (default a), as if captured on the wire."""
    node = node or lab.a
    return auth.make_credential(lab.secret, SERVICE + method, now=now, target=node[0].node_id, body=auth.body_digest(request))


def probe_body_tampering(lab):
    c = lab.client(lab.a)
    cred = _stolen(lab, pb.DropSessionRequest(session_id="mine"), "DropSession")
    channel, stub = _raw(lab.a[1])
    with channel:
        other = pb.DropSessionRequest(session_id="someone-elses")
        return _status(lambda: stub.DropSession(other, metadata=_session_md(c) + ((auth.HEADER, cred),), timeout=5))


def probe_replay_same_node(lab):
    c = lab.client(lab.a)
    cred = _stolen(lab, pb.InfoRequest(), "GetInfo")
    channel, stub = _raw(lab.a[1])
    with channel:
        md = _session_md(c) + ((auth.HEADER, cred),)
        first = _status(lambda: stub.GetInfo(pb.InfoRequest(), metadata=md, timeout=5))
        if first[0]:
            return False, first[1], f"the genuine call was refused, so the probe proves nothing: {first[2]}"
        return _status(lambda: stub.GetInfo(pb.InfoRequest(), metadata=md, timeout=5))


def probe_replay_other_node(lab):
    cb = lab.client(lab.b)
    cred = _stolen(lab, pb.InfoRequest(), "GetInfo", node=lab.a)  # made for node a, replayed on node b
    channel, stub = _raw(lab.b[1])
    with channel:
        return _status(lambda: stub.GetInfo(pb.InfoRequest(), metadata=_session_md(cb) + ((auth.HEADER, cred),), timeout=5))


def probe_stale_credential(lab):
    c = lab.client(lab.a)
    cred = _stolen(lab, pb.InfoRequest(), "GetInfo", now=time.time() - 120)
    channel, stub = _raw(lab.a[1])
    with channel:
        return _status(lambda: stub.GetInfo(pb.InfoRequest(), metadata=_session_md(c) + ((auth.HEADER, cred),), timeout=5))


def probe_rogue_node_no_secret(lab):
    return _status(lambda: lab.client(lab.rogue).close())


def probe_rogue_node_other_secret(lab):
    return _status(lambda: lab.client(lab.other).close())


def _load(lab, model):
    c = lab.client(lab.a)
    try:
        return _status(lambda: c.load(model, 0, 1))
    finally:
        c.close()


def probe_model_path_traversal(lab):
    return _load(lab, "../outside-secret.txt")


def probe_model_absolute_path(lab):
    return _load(lab, lab.outside)


def probe_model_symlink_escape(lab):
    return _load(lab, "escape/outside-secret.txt")


def probe_model_hub_id(lab):
    return _load(lab, "mlx-community/some-model")


def probe_model_exists_leak(lab):
    """A missing path and an existing forbidden one must answer alike (code and text, but for the name)."""
    missing = _load(lab, "../no-such-file")
    present = _load(lab, "../outside-secret.txt")
    same = missing[1] == present[1] == "INVALID_ARGUMENT" and missing[2].replace("no-such-file", "X") == present[2].replace("outside-secret.txt", "X")
    return same, present[1], f"missing: {missing[2]!r} / existing: {present[2]!r}"


def probe_exposed_without_secret(lab):
    try:
        server.serve("0.0.0.0", 0, secret=None, advertise=False)
    except SystemExit as e:
        return True, "EXIT", str(e)
    return False, "OK", "served on 0.0.0.0 without a secret"


# --------------------------------------------------------------------------- memory (a real node process)

MEMORY_BUDGET = 384 << 20  # the bundled model's weights (~110 MiB as float32) plus KV
MEMORY_MARGIN = 64 << 20  # what a refused body may add to the node's resident memory


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


class MemoryLab:
    """One node process with a budget and the bundled model loaded, for the memory probes."""

    def __init__(self, secret):
        from turbocluster.runtime.cluster.cluster import start_local_nodes
        from turbocluster.runtime.model import loader

        self.desc = loader.describe(None)
        [self.node] = start_local_nodes(1, memory_budget=MEMORY_BUDGET, secret=secret)
        self.client = NodeClient(self.node.address, self.desc["identity"], secret=secret, will_load=True)
        self.client.load(None, 0, self.desc["num_layers"])

    def bounded(self, send):
        """``(refused, code, detail)`` of ``send(sent)``, where ``sent`` counts the MiB that left the client."""
        from turbocluster.runtime.transport.errors import REASON_TOO_LARGE

        before, sent = _rss(self.node.proc.pid), []
        refused, code, detail = _status(lambda: send(sent))
        grew = max(0, _rss(self.node.proc.pid) - before)
        self.client.create_session("alive", 8)  # the node still serves
        self.client.drop("alive")
        held = refused and grew < MEMORY_MARGIN and (code == "NOT_FOUND" or REASON_TOO_LARGE in detail)
        return held, code, f"{detail}; {len(sent)} MiB offered by the client, node RSS +{grew >> 20} MiB"

    def close(self):
        from turbocluster.runtime.cluster.cluster import stop_local_nodes

        self.client.close()
        stop_local_nodes([self.node])


def _junk(n, sent):
    piece = os.urandom(wire.CHUNK_BYTES)
    for i in range(n):
        sent.append(i)
        yield i, piece, wire.checksum(piece)


def _import_header(mem, total_bytes, session_id):
    from turbocluster.kernels.format import FORMAT_VERSION
    from turbocluster.runtime.sessions import container

    d = mem.desc
    return pb.SessionHeader(total_bytes=total_bytes, session_id=session_id, model_identity=d["identity"], layer_start=0,
                            layer_end=d["num_layers"], num_tokens=1, format_version=FORMAT_VERSION,
                            container_version=container.CONTAINER_VERSION)


def _hidden_stream(mem, session_id, declared, n, sent):
    header = pb.ForwardRequest(session_id=session_id, want=pb.HIDDEN)
    header.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, mem.desc["hidden_size"]]))

    def messages():
        yield pb.ForwardChunk(header=header, payload_bytes=declared)
        for i, piece, crc in _junk(n, sent):
            yield pb.ForwardChunk(chunk=pb.Chunk(index=i, data=piece, crc32=crc))

    return mem.client.stub.ForwardStream(messages(), metadata=mem.client.metadata, timeout=60)


def memory_oversized_import(mem):
    from turbocluster.runtime.sessions import calls

    return mem.bounded(lambda sent: calls.send(mem.client, _import_header(mem, 16 << 30, "big"), None, pieces=_junk(1024, sent)))


def memory_import_lying_about_its_size(mem):
    from turbocluster.runtime.sessions import calls

    return mem.bounded(lambda sent: calls.send(mem.client, _import_header(mem, 2 << 20, "liar"), None, pieces=_junk(256, sent)))


def memory_stream_for_no_session(mem):
    return mem.bounded(lambda sent: _hidden_stream(mem, "no-such-session", 2 << 20, 512, sent))


def memory_oversized_stream(mem):
    mem.client.create_session("target", 8)
    try:
        return mem.bounded(lambda sent: _hidden_stream(mem, "target", 1 << 30, 512, sent))
    finally:
        mem.client.drop("target")


def memory_restore_dev_zero(mem):
    from turbocluster.runtime.sessions import container

    try:
        container.load_snapshot("/dev/zero")
    except container.SessionFormatError as e:
        return True, e.code, str(e)
    return False, "OK", "read /dev/zero as a snapshot"


PROBES = {name[len("probe_"):]: fn for name, fn in globals().items() if name.startswith("probe_")}
MEMORY_PROBES = {name: fn for name, fn in globals().items() if name.startswith("memory_") and callable(fn)}


def run_probes(lab, names=None):
    """``[{"name", "refused", "held", "code", "detail"}]`` for each probe."""
    out = []
    for name in names or PROBES:
        refused, code, detail = PROBES[name](lab)
        out.append({"name": name, "refused": refused, "held": refused, "code": code, "detail": detail})
    return out


def run_memory_probes(secret, names=None):
    """The memory probes against one real node process: held = refused early, RSS within the margin, still serving."""
    names = [n for n in (names or MEMORY_PROBES) if n in MEMORY_PROBES]
    if not names:
        return []
    mem, out = MemoryLab(secret), []
    try:
        for name in names:
            held, code, detail = MEMORY_PROBES[name](mem)
            out.append({"name": name, "refused": held, "held": held, "code": str(code), "detail": detail})
    finally:
        mem.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the probes as JSON")
    p.add_argument("--probe", action="append", choices=sorted(PROBES) + sorted(MEMORY_PROBES),
                   help="run only this probe (repeatable)")
    args = p.parse_args(argv)
    lab = Lab()
    try:
        security = [n for n in args.probe if n in PROBES] if args.probe else None
        probes = run_probes(lab, security) if security or not args.probe else []
        probes += run_memory_probes(lab.secret, args.probe)
    finally:
        lab.close()
    if args.json:
        print(json.dumps({"probes": probes}, indent=1))
    else:
        for r in probes:
            print(f"{'held ' if r['held'] else 'FAILED'} {r['name']:<28} {r['code']:<18} {r['detail']}")
        print(f"{sum(r['held'] for r in probes)}/{len(probes)} probes held")
    return 0 if all(r["held"] for r in probes) else 1


if __name__ == "__main__":
    sys.exit(main())
