"""Session migration: packed KV leaves one node and arrives whole on another, or not at all.

The first part runs the node-side steps (``kv.export_session`` ->
chunks -> ``receive`` -> ``import_session`` -> ``SessionStore.add``) in one
process over shards of a tiny model, so every outcome is compared with an
unmigrated run token for token. The real-node tests below start node
processes on loopback once for the module.
"""

import hashlib

import mlx.core as mx
import msgpack
import pytest

from conftest import build_tiny
from turbocluster.runtime.cluster import migration
from turbocluster.runtime.sessions import calls
from turbocluster.runtime.sessions import transfer as kv
from turbocluster.runtime.sessions import container as session_io
from turbocluster.runtime.cache.factory import make_caches
from turbocluster.runtime.model import shard as stage
from turbocluster.runtime.transport import wire
from turbocluster.runtime.sessions.container import SessionFormatError
from turbocluster.runtime.sessions.store import Session, SessionError, SessionStore

MODEL_ID = "test/tiny-qwen3@random-0"
PROMPT = [5, 17, 300, 41, 9, 1000, 77, 12, 3, 8, 600, 2]
SPLIT = [(0, 1), (1, 4), (4, 5)]
CACHES = {"fp16": None, "turbo3": {"k_bits": 3, "v_bits": 3}, "turbo4": {"k_bits": 4, "v_bits": 4}}


@pytest.fixture(scope="module")
def model():
    return build_tiny("qwen3")


def open_session(part, sid="s", cache=None):
    return Session(
        session_id=sid, max_context=256, caches=make_caches(part, cache), cache_config=dict(cache or {}),
        sampling={"temperature": 0.0, "top_p": 0.0}, rng_state=mx.random.key(0),
    )


class Pipeline:
    """Shards and their sessions, stepped in turn as the nodes step them (greedy)."""

    def __init__(self, model, split, cache=None):
        self.parts = [stage.shard(model, a, b) for a, b in split]
        self.sessions = [open_session(p, cache=cache) for p in self.parts]
        self.pending = None

    def step(self, ids):
        x = mx.array([ids])
        for p, s in zip(self.parts, self.sessions):
            x = stage.forward(p, x, s.caches)
        return mx.argmax(x[:, -1, :], axis=-1).item()

    def generate(self, n, prompt=PROMPT):
        out = []
        if self.pending is None:
            self.pending = self.step(prompt)
        for _ in range(n):
            out.append(self.pending)
            self.pending = self.step([self.pending])
        return out


def transfer(session, held, layers=None, expect=None, compress=True, mangle=None):
    """Export -> chunks -> receive -> import, as the two nodes do; returns the new Session."""
    data = kv.export_session(session, MODEL_ID, held, layers, compress_prefill=compress)
    pieces = list(kv.chunks(data, size=4096))
    if mangle:
        pieces = mangle(pieces)
    total = len(data)
    got = kv.receive(iter(pieces), total)
    layers = tuple(layers or held)
    return kv.import_session(got, expect or {"model": MODEL_ID, "layers": layers}, lambda n, c: 1000)


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_moving_the_middle_stage_mid_generation_keeps_greedy_tokens(model, cache):
    ref = Pipeline(model, SPLIT, CACHES[cache]).generate(12)
    run = Pipeline(model, SPLIT, CACHES[cache])
    first = run.generate(6)
    target = SessionStore(1 << 30)
    moved = target.add(transfer(run.sessions[1], SPLIT[1]))
    assert moved.offset == run.sessions[1].offset and moved.cache_config == run.sessions[1].cache_config
    run.sessions[1] = moved  # the route now goes through the new node
    assert first + run.generate(6) == ref


@pytest.mark.parametrize("cache", ["fp16", "turbo3"])
def test_pre_copied_stage_plus_its_tail_equals_the_session(model, cache):
    """Copy while generating, then send only the positions made since: the pause moves a few tokens."""
    ref = Pipeline(model, SPLIT, CACHES[cache]).generate(12)
    run = Pipeline(model, SPLIT, CACHES[cache])
    first = run.generate(4)
    staged = transfer(run.sessions[1], SPLIT[1])  # positions 0..T0, sent while the session goes on
    t0 = staged.offset
    first += run.generate(4)
    tail = kv.export_session(run.sessions[1], MODEL_ID, SPLIT[1], from_token=t0)
    caches, meta = session_io.unpack_session(tail, {"layers": SPLIT[1], "delta_from": t0})
    assert meta["num_tokens"] == 4 and all(c.offset == 4 for c in caches)
    kv.append(staged.caches, caches)
    assert staged.offset == run.sessions[1].offset
    run.sessions[1] = staged
    assert first + run.generate(4) == ref


def test_sliding_window_caches_refuse_a_tail_and_move_whole():
    gemma = build_tiny("gemma3_text")
    session = open_session(stage.shard(gemma, 0, 3))
    with pytest.raises(SessionError) as e:
        kv.delta(session.caches, 0)
    assert e.value.code == "FAILED_PRECONDITION" and "RotatingKVCache" in str(e.value)


def test_turbo_kv_travels_packed_and_five_times_smaller_than_fp16(model):
    sizes = {}
    for name in ("fp16", "turbo3"):
        run = Pipeline(model, [(0, 5)], CACHES[name])
        run.generate(1, prompt=list(range(10, 266)))  # 256 positions
        sizes[name] = len(kv.export_session(run.sessions[0], MODEL_ID, (0, 5)))
        body = msgpack.unpackb(kv.export_session(run.sessions[0], MODEL_ID, (0, 5))[session_io.HEADER_BYTES:])
        if name == "turbo3":
            assert body["caches"][0]["state"][0]["dtype"] == 4  # uint32 words, not re-expanded
    heads, dim, n = 4, 64, 257
    fp16 = 5 * 2 * heads * n * dim * 2  # keys and values in float16
    assert sizes["fp16"] >= fp16  # the tiny model's KV is bfloat16: same size
    assert fp16 / sizes["turbo3"] >= 4.8, sizes


def test_handoff_from_a_prefill_node_compresses_fp16_phase_kv_and_splits_it(model):
    """Prefill on one whole-model node, decode on two: the same tokens as compressing at that point."""
    prefill_cache = {"k_bits": 3, "v_bits": 3, "quantized_start": 64}  # prompt stays fp16 on the prefill node
    # Reference: a cache whose threshold is the prompt, so it compresses all at the first decode step.
    ref = Pipeline(model, [(0, 2), (2, 5)], dict(prefill_cache, quantized_start=len(PROMPT)))
    want = ref.generate(10)
    pre = Pipeline(model, [(0, 5)], prefill_cache)
    got = pre.generate(1)
    assert not pre.sessions[0].caches[0].compressed
    dec = Pipeline(model, [(0, 2), (2, 5)], prefill_cache)
    dec.sessions = [transfer(pre.sessions[0], (0, 5), layers) for layers in [(0, 2), (2, 5)]]
    assert all(c.compressed for s in dec.sessions for c in s.caches)
    assert not pre.sessions[0].caches[0].compressed  # the source is left as it was
    dec.pending = pre.pending
    assert got + dec.generate(9) == want


def _reseal(data, edit):
    """A container with its meta edited and its sha256 recomputed (a well-formed stranger)."""
    body = msgpack.unpackb(data[session_io.HEADER_BYTES:])
    edit(body["meta"])
    body = msgpack.packb(body, use_bin_type=True)
    return session_io.MAGIC + hashlib.sha256(body).digest() + body


def _flip(pieces):
    i, piece, crc = pieces[1]
    pieces[1] = (i, piece[:100] + bytes([piece[100] ^ 1]) + piece[101:], crc)
    return pieces


BAD = {
    "corrupted chunk": (dict(mangle=_flip), "DATA_LOSS", "stream"),
    "corrupted and re-checksummed": (
        dict(mangle=lambda p: [(i, d, wire.checksum(d)) for i, d, _ in _flip(p)]), "DATA_LOSS", "sha256"),
    "truncated": (dict(mangle=lambda p: p[:-1]), "DATA_LOSS", "stream"),
    "reordered": (dict(mangle=lambda p: [p[1], p[0]] + p[2:]), "DATA_LOSS", "stream"),
    "wrong model": (dict(expect={"model": "another/model", "layers": (1, 4)}), "FAILED_PRECONDITION", "meta.model"),
    "wrong layers": (dict(expect={"model": MODEL_ID, "layers": (1, 3)}), "FAILED_PRECONDITION", "meta.layers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_transfers_are_refused_and_the_source_keeps_generating(model, case):
    kwargs, status, field = BAD[case]
    ref = Pipeline(model, SPLIT, CACHES["turbo3"]).generate(8)
    run = Pipeline(model, SPLIT, CACHES["turbo3"])
    first = run.generate(4)
    target = SessionStore(1 << 30)
    with pytest.raises(SessionFormatError) as e:
        target.add(transfer(run.sessions[1], SPLIT[1], **kwargs))
    assert kv.status_of(e.value) == status and e.value.field == field, str(e.value)
    assert len(target) == 0
    assert first + run.generate(4) == ref  # the source session is intact


def test_wrong_codec_version_is_refused_naming_the_field(model):
    run = Pipeline(model, SPLIT, CACHES["turbo3"])
    run.generate(2)
    data = kv.export_session(run.sessions[1], MODEL_ID, SPLIT[1])
    for key in ("format_version", "container_version"):
        bad = _reseal(data, lambda m: m.update({key: m[key] + 1}))
        with pytest.raises(SessionFormatError) as e:
            kv.import_session(bad, {"model": MODEL_ID}, lambda n, c: 0)
        assert e.value.field == f"meta.{key}" and kv.status_of(e.value) == "FAILED_PRECONDITION"
        assert "expected" in str(e.value) and "found" in str(e.value)


def test_import_is_all_or_nothing_in_the_store(model):
    run = Pipeline(model, SPLIT, CACHES["turbo3"])
    run.generate(2)
    store = SessionStore(5000)
    store.add(transfer(run.sessions[1], SPLIT[1]))
    with pytest.raises(SessionError) as e:  # same id again
        store.add(transfer(run.sessions[1], SPLIT[1]))
    assert e.value.code == "ALREADY_EXISTS"
    again = transfer(run.sessions[1], SPLIT[1])
    again.session_id = "other"
    with pytest.raises(SessionError) as e:  # 1000 + 1000 reserved fits 5000; a 4000-byte one does not
        again.kv_bytes_reserved = 4500
        store.add(again)
    assert e.value.code == "RESOURCE_EXHAUSTED" and len(store) == 1


def test_sampling_state_travels_with_the_last_stage(model):
    run = Pipeline(model, SPLIT, None)
    run.generate(1)
    last = run.sessions[2]
    last.sampling = {"temperature": 0.7, "top_p": 0.9}
    last.rng_state = mx.random.split(mx.random.key(42))[0]
    moved = transfer(last, SPLIT[2])
    # every field set travels (the container also carries mlx-lm's other sampler fields, at their defaults)
    assert {k: moved.sampling[k] for k in last.sampling} == last.sampling
    assert mx.array_equal(moved.rng_state, last.rng_state).item()


def test_merged_snapshot_restores_onto_another_split(model, tmp_path):
    ref = Pipeline(model, SPLIT, CACHES["turbo4"]).generate(10)
    run = Pipeline(model, SPLIT, CACHES["turbo4"])
    first = run.generate(5)
    parts = [session_io.unpack_session(kv.export_session(s, MODEL_ID, held)) for s, held in zip(run.sessions, SPLIT)]
    caches, meta = kv.merge(parts)
    assert meta["layers"] == (0, 5)
    path = tmp_path / "s.tcs"
    session_io.save_snapshot(path, caches, {k: v for k, v in meta.items() if not k.endswith("_version")})
    caches, meta = session_io.load_snapshot(path, expect={"model": MODEL_ID})
    other = Pipeline(model, [(0, 3), (3, 5)], CACHES["turbo4"])
    for i, layers in enumerate([(0, 3), (3, 5)]):
        piece = session_io.pack_session(*kv.split(caches, meta, layers))
        other.sessions[i] = kv.import_session(piece, {"model": MODEL_ID, "layers": layers}, lambda n, c: 0)
    other.pending = run.pending
    assert first + other.generate(5) == ref


# --------------------------------------------------------------------------- real nodes

import grpc  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from turbocluster.proto import turbo_pb2 as pb  # noqa: E402
from turbocluster.runtime.cli import cluster as cli  # noqa: E402
from turbocluster.runtime.model import loader  # noqa: E402
from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."
N = 8  # tokens before and after each move
TURBO3 = {"k_bits": 3, "v_bits": 3}


@pytest.fixture(scope="module")
def nodes():
    """Four empty node processes on loopback, shared by the real-node tests of this module."""
    if not hasattr(pb, "PushSessionRequest"):
        pytest.skip("the proto has no migration RPCs yet (run scripts/gen_proto.sh after adding them)")
    started = start_local_nodes(4)
    try:
        yield started
    finally:
        stop_local_nodes(started)


@pytest.fixture(scope="module")
def bundled():
    model, tok = loader.load()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return model, ids


def reference(bundled, cache=None, n=2 * N):
    """Greedy tokens from mlx-lm in this process, without stopping at EOS (the cluster runs are told the same)."""
    from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

    model, ids = bundled
    prompt_cache = make_turbo_cache(model, **cache) if cache else None
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=prompt_cache)]


def connect(nodes, *indices, cache=None, context=256):
    cluster = Cluster.connect(nodes=[nodes[i].address for i in indices])
    cluster.load(cluster.plan(context=context, cache=cache))
    return cluster


def generation(cluster, bundled, sid, cache=None, n=2 * N):
    return cluster.generate_tokens(bundled[1], max_tokens=n, cache=cache, session_id=sid, stop_at_eos=False)


def take(gen, n=N):
    return [next(gen) for _ in range(n)]


@pytest.mark.parametrize("cache,concurrent", [("fp16", False), ("turbo3", True)])
def test_migrating_the_middle_layers_to_another_node_keeps_greedy_tokens(nodes, bundled, cache, concurrent):
    """Paused between tokens, or (concurrent) while another thread keeps generating: the tail follows."""
    import threading

    cache = TURBO3 if cache == "turbo3" else None
    total = 6 * N if concurrent else 2 * N  # room to keep generating while the layers move
    ref = reference(bundled, cache, total)
    with connect(nodes, 0, 1, 2, cache=cache) as cluster:
        middle = cluster.plan_.assignments[1]
        gen = generation(cluster, bundled, "mig", cache, total)
        first, rest, done = take(gen), [], threading.Event()

        def consume():
            while not done.is_set() and len(rest) < total - N - 1:
                rest.append(next(gen))

        consumer = threading.Thread(target=consume)
        if concurrent:
            consumer.start()
        report = cluster.migrate("mig", (middle.start, middle.end), nodes[3].address)
        done.set()
        if concurrent:
            consumer.join()
        assert report["wire_bytes"] > 0 and report["pause_ms"] > 0
        [row] = cluster.sessions()
        assert [st["address"] for st in row["stages"]] == [nodes[i].address for i in (0, 3, 2)]
        assert first + rest + list(gen) == ref
        assert cluster.sessions() == []  # dropped on the new route when generation ended


@pytest.mark.parametrize("which", ["first", "middle"])
def test_a_migrate_run_by_another_process_during_generation_keeps_greedy_tokens(nodes, bundled, which):
    """`turbo-cluster migrate` from another process while this one generates: the nodes' lock makes this
    process's steps wait (not fail), then they follow the moved stages (a moved first stage leaves a
    pointer); the tokens are mlx-lm's, nothing is replayed, and nothing is left on any node."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from turbocluster.runtime.cluster import failover

    total = 160  # a window long enough for the other process to start and move the layers
    ref = reference(bundled, TURBO3, total)
    sid = f"xproc-{which}"
    with connect(nodes, 0, 1, 2, cache=TURBO3) as cluster:
        moved = cluster.plan_.assignments[0 if which == "first" else 1]
        route = ",".join(nodes[i].address for i in (0, 1, 2))
        gen = generation(cluster, bundled, sid, TURBO3, total)
        tokens = take(gen, 2)
        cli_path = Path(sys.executable).with_name("turbo-cluster")
        argv = [str(cli_path), "migrate", "--nodes", route, "--session", sid,
                "--layers", f"{moved.start}:{moved.end}", "--to", nodes[3].address]
        other = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while other.poll() is None and len(tokens) < total:
            tokens.append(next(gen))
            time.sleep(0.05)  # paced: the migration must land inside the generation
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert "moved layers" in out
        assert len(tokens) < total - 4, "the generation ended before the other process migrated"
        tokens += list(gen)
        assert tokens == ref
        assert failover.state(cluster).rebuilds == []  # followed the move, did not replay the session
    with Cluster.connect(nodes=[n.address for n in nodes]) as everyone:
        assert everyone.sessions() == []  # the moved stage too: dropped along the chain the nodes hold


def test_handoff_from_a_prefill_node_to_two_decode_nodes_keeps_greedy_tokens(nodes, bundled):
    model, ids = bundled
    cache = dict(TURBO3, quantized_start=4096)  # the prefill node keeps the prompt's KV in fp16
    # Compressing at the handoff is what a cache does when the context first passes its threshold.
    ref = reference(bundled, dict(TURBO3, quantized_start=len(ids)))
    with connect(nodes, 0, cache=cache, context=4096 + 2 * N) as cluster:
        gen = generation(cluster, bundled, "hand", cache)
        first = take(gen, 1)  # the prompt is prefilled and the first token sampled
        report = cluster.handoff("hand", [nodes[1].address, nodes[2].address])
        [row] = cluster.sessions()
        assert [st["address"] for st in row["stages"]] == [nodes[1].address, nodes[2].address]
        fp16_bytes = 30 * 3 * 64 * 2 * 2 * len(ids)
        assert report["wire_bytes"] < fp16_bytes / 4  # it travelled compressed
        assert first + list(gen) == ref


def test_snapshot_restores_onto_another_split_and_continues_identically(nodes, bundled, tmp_path):
    cache = {"k_bits": 4, "v_bits": 4}
    ref = reference(bundled, cache)
    path = tmp_path / "session.tcs"
    with connect(nodes, 0, 1, cache=cache) as cluster:
        gen = generation(cluster, bundled, "snap", cache)
        first = take(gen)
        assert cluster.snapshot(path, "snap") == path.stat().st_size
        gen.close()
    with connect(nodes, 1, 2, 3, cache=cache) as cluster:
        sid = cluster.restore(path)
        assert sid == "snap" and [r["offset"] for r in cluster.sessions()] == [len(bundled[1]) + N - 1]
        assert first + list(cluster.resume(sid, N, stop_at_eos=False)) == ref


def _chunks_then(action, after=2, size=4096):
    """A stand-in for kv.chunks: small chunks, then ``action()`` mid-stream."""

    def chunks(data, _size=None):
        for i, piece, crc in wire.split_chunks(data, size):
            if i == after:
                action()
            yield i, piece, crc

    return chunks


def _drop():
    raise ConnectionResetError("the coordinator's connection dropped mid-stream")


def test_migration_killed_mid_stream_leaves_the_session_generating_on_the_source(nodes, bundled, monkeypatch):
    ref = reference(bundled)
    spare = start_local_nodes(1)
    try:
        with connect(nodes, 0, 1, 2) as cluster:
            middle = cluster.plan_.assignments[1]
            layers = (middle.start, middle.end)
            gen = generation(cluster, bundled, "kill")
            first = take(gen, 4)
            # the coordinator's side of a relayed stream drops
            monkeypatch.setattr(calls, "chunks", _chunks_then(_drop))
            with pytest.raises((migration.MigrationError, ConnectionResetError)):
                cluster.migrate("kill", layers, nodes[3].address, relay=True)
            # the importing node dies mid-stream
            target = spare[0]
            cluster.peers[target.address] = migration.connect(cluster, target.address)
            migration.prepare(cluster, cluster.peers[target.address], layers)
            monkeypatch.setattr(calls, "chunks", _chunks_then(target.proc.kill))
            with pytest.raises(migration.MigrationError) as e:
                cluster.migrate("kill", layers, target.address, relay=True)
            assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), str(e.value)
            monkeypatch.undo()
            [row] = [r for r in cluster.sessions() if r["session_id"] == "kill"]
            assert [st["address"] for st in row["stages"]] == [nodes[i].address for i in (0, 1, 2)]
            assert first + list(gen) == ref  # nothing was lost on the source
    finally:
        stop_local_nodes(spare)


def test_bad_session_streams_get_clear_statuses(nodes, bundled):
    with connect(nodes, 0, 1) as cluster:
        gen = generation(cluster, bundled, "bad")
        take(gen, 2)
        first, last = cluster.clients
        header, data = calls.fetch(last, "bad")
        assert header.layer_start == cluster.plan_.assignments[1].start and header.num_tokens == len(bundled[1]) + 1

        def status(header, pieces=None, data=data):
            with pytest.raises(grpc.RpcError) as e:
                calls.send(last, header, data, pieces=pieces)
            return e.value.code(), e.value.details()

        def fresh(**changes):
            h = pb.SessionHeader()
            h.CopyFrom(header)
            h.session_id = "bad-copy"
            for k, v in changes.items():
                setattr(h, k, v)
            return h

        pieces = list(wire.split_chunks(data, 4096))
        flipped = [pieces[0], (1, bytes([pieces[1][1][0] ^ 1]) + pieces[1][1][1:], pieces[1][2])] + pieces[2:]
        code, msg = status(fresh(), flipped)
        assert code == grpc.StatusCode.DATA_LOSS and "checksum" in msg
        code, msg = status(fresh(), pieces[:-1])
        assert code == grpc.StatusCode.DATA_LOSS and "announced" in msg
        code, msg = status(fresh(format_version=99))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "format_version: expected 1, found 99" in msg
        code, msg = status(fresh(model_identity="0" * 64))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "model_identity" in msg
        code, msg = status(fresh(layer_start=0))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "layer_start" in msg
        stranger = _reseal(data, lambda m: m.update(model="another-model"))
        code, msg = status(fresh(total_bytes=len(stranger)), data=stranger)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "meta.model" in msg
        assert status(header)[0] == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            calls.fetch(last, "no-such-session")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [r["session_id"] for r in cluster.sessions()] == ["bad"]  # nothing half-built anywhere
        gen.close()


def test_draining_and_joining_nodes_replans_and_the_session_moves_with_its_layers(nodes, bundled, capsys):
    import json

    ref = reference(bundled, n=3 * N)
    with connect(nodes, 0, 1, 2) as cluster:
        gen = generation(cluster, bundled, "replan", n=3 * N)
        tokens = take(gen)
        assert cli.cluster_main(["sessions", "--nodes", ",".join(n.address for n in nodes[:3]), "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["session_id"] == "replan" and len(row["stages"]) == 3
        for members in ([0, 2], [0, 3, 2]):  # node 1 is drained, then node 3 joins
            plan = cluster.replan([nodes[i].address for i in members])
            assert [a.address for a in plan.assignments] == [nodes[i].address for i in members]
            [row] = cluster.sessions()
            assert [st["layers"] for st in row["stages"]] == [[a.start, a.end] for a in plan.assignments]
            tokens += take(gen)
        assert tokens + list(gen) == ref


def test_cli_lists_migrates_snapshots_and_restores_sessions(nodes, bundled, tmp_path, capsys):
    ref = reference(bundled)
    with connect(nodes, 0, 1, 2) as cluster:
        gen = generation(cluster, bundled, "cli")
        first = take(gen)
        middle = cluster.plan_.assignments[1]
        route = [nodes[i].address for i in (0, 1, 2)]
        everyone = ",".join(route + [nodes[3].address])
        # another process (the CLI) moves the session this coordinator is generating
        argv = ["--nodes", ",".join(route), "--session", "cli", "--layers", f"{middle.start}:{middle.end}"]
        assert cli.cluster_main(["migrate", *argv, "--to", nodes[3].address]) == 0
        assert "moved layers" in capsys.readouterr().out
        assert cli.cluster_main(["sessions", "--nodes", everyone]) == 0
        line = capsys.readouterr().out
        assert line.startswith("cli ") and nodes[3].address in line and nodes[1].address not in line
        path = tmp_path / "cli.tcs"
        assert cli.cluster_main(["snapshot", "--nodes", everyone, "--session", "cli", "--out", str(path)]) == 0
        assert path.stat().st_size > 0 and "wrote" in capsys.readouterr().out
        migration.connect(cluster, nodes[3].address)
        migration.live_session(cluster, "cli", refresh=True)  # learn the route the CLI changed
        assert first + list(gen) == ref  # the tokens did not notice
        assert cluster.sessions() == []
    assert cli.cluster_main(["restore", "--nodes", everyone, str(path), "--session-id", "again"]) == 0
    assert capsys.readouterr().out.strip() == "again"
    with Cluster.connect(nodes=[n.address for n in nodes]) as cluster:
        [row] = cluster.sessions()
        assert row["session_id"] == "again" and row["offset"] == len(bundled[1]) + N - 1
        for st in row["stages"]:
            migration.connect(cluster, st["address"]).drop("again")
    assert cli.cluster_main(["migrate", *argv, "--to", nodes[3].address]) == 1  # no such session: a clear error
    assert "cli" in capsys.readouterr().err
