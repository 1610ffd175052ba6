"""Bytes on the wire and pause time of a session migration: turbo3, turbo4 and fp16 KV, side by side.

    python scripts/bench_migration.py                        # real nodes on loopback, 1k/4k/8k contexts
    python scripts/bench_migration.py --contexts 1024 --json
    python scripts/bench_migration.py --inproc               # pack -> chunks -> unpack in one process

Each row moves one session holding ``context`` positions in every layer of the
bundled model (SmolLM2-135M: 30 layers, 3 KV heads, head dim 64) from one node
to another with ``Cluster.migrate``: the exporter packs the caches, pushes the
container to the importer in crc32-checked chunks, the importer checks and
installs it, the pipeline is rerouted and the old copy dropped. The KV is
random data of the model's shape (its bytes do not depend on the values),
imported once into the first node, so no 8k-token prefill is needed; one
decode step on the new node checks that the session runs there.

``wire_bytes`` is the container as sent; ``fp16_bytes`` is the same KV as
float16 keys and values; ``seconds`` the export + transfer + import time;
``pause_ms`` the whole migrate call (generation of that session waits for it).
"""

import argparse
import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from turbocluster.runtime.cluster import migration  # noqa: E402
from turbocluster.runtime.model import loader  # noqa: E402
from turbocluster.runtime.sessions import calls  # noqa: E402
from turbocluster.runtime.sessions import transfer as kv  # noqa: E402
from turbocluster.runtime.sessions import container as session_io  # noqa: E402

CACHES = {"turbo3": {"k_bits": 3, "v_bits": 3}, "turbo4": {"k_bits": 4, "v_bits": 4}, "fp16": {}}


def synthetic_caches(desc, context, cache, seed=0):
    """One cache per layer holding ``context`` random positions of the model's KV shape."""
    from mlx_lm.models.cache import KVCache

    from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache

    shape = (1, desc["num_kv_heads"], context, desc["head_dim"])
    out = []
    for i in range(desc["num_layers"]):
        k = mx.random.normal(shape, key=mx.random.key(seed + 2 * i)).astype(mx.float16)
        v = mx.random.normal(shape, key=mx.random.key(seed + 2 * i + 1)).astype(mx.float16)
        c = TurboQuantKVCache(cache["k_bits"], cache["v_bits"]) if cache else KVCache()
        c.update_and_fetch(k, v)
        mx.eval(c.state)
        out.append(c)
    return out


def fp16_bytes(desc, context):
    return 2 * desc["num_layers"] * desc["num_kv_heads"] * context * desc["head_dim"] * 2


def meta_for(desc, context, cache, sid):
    return {
        "model": desc["identity"], "layers": (0, desc["num_layers"]), "num_tokens": context, "cache_config": dict(cache),
        "session_id": sid, "max_context": context + 16, "sampling": {"temperature": 0.0, "top_p": 0.0},
    }


def bench_inproc(desc, contexts):
    rows = []
    for context in contexts:
        for name, cache in CACHES.items():
            caches = synthetic_caches(desc, context, cache)
            meta = meta_for(desc, context, cache, "bench")
            t0 = time.perf_counter()
            data = session_io.pack_session(caches, meta)
            pieces = list(kv.chunks(data))
            got = kv.receive(iter(pieces), len(data))
            session = kv.import_session(got, {"model": desc["identity"]}, lambda n, c: 0)
            mx.eval([c.state for c in session.caches])
            dt = time.perf_counter() - t0
            rows.append(dict(cache=name, context=context, wire_bytes=len(data), fp16_bytes=fp16_bytes(desc, context),
                             seconds=round(dt, 4), pause_ms=round(dt * 1e3, 1)))
    return rows


def bench_nodes(desc, contexts):
    from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes

    rows = []
    nodes = start_local_nodes(2)
    try:
        with Cluster.connect(nodes=[nodes[0].address]) as cluster:
            cluster.load(cluster.plan(context=max(contexts) + 16))
            n = desc["num_layers"]
            migration.prepare(cluster, migration.connect(cluster, nodes[1].address), (0, n))
            here, there = (migration.connect(cluster, node.address) for node in nodes)
            for context in contexts:
                for name, cache in CACHES.items():
                    sid = f"bench-{name}-{context}"
                    meta = meta_for(desc, context, cache, sid)
                    data = session_io.pack_session(synthetic_caches(desc, context, cache), meta)
                    calls.send(here, calls.header_for(meta, len(data), sid), data)
                    cluster.live[sid] = migration.Live(sid, [migration.Stage(here, 0, n)])
                    report = cluster.migrate(sid, (0, n), there.address)
                    there.forward(sid, tokens=[1], want=1)  # pb.NONE: the session runs on its new node
                    there.drop(sid)
                    del cluster.live[sid]
                    rows.append(dict(cache=name, context=context, wire_bytes=report["wire_bytes"],
                                     fp16_bytes=fp16_bytes(desc, context), seconds=round(report["seconds"], 4),
                                     pause_ms=round(report["pause_ms"], 1)))
                    here, there = there, here
    finally:
        stop_local_nodes(nodes)
    return rows


def table(rows):
    lines = [f"{'cache':7s} {'context':>7s} {'wire MiB':>9s} {'fp16 MiB':>9s} {'ratio':>6s} {'seconds':>8s} {'pause ms':>9s}"]
    for r in rows:
        lines.append(
            f"{r['cache']:7s} {r['context']:7d} {r['wire_bytes'] / 2**20:9.2f} {r['fp16_bytes'] / 2**20:9.2f} "
            f"{r['fp16_bytes'] / r['wire_bytes']:6.2f} {r['seconds']:8.3f} {r['pause_ms']:9.1f}"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,4096,8192", help="comma-separated context lengths")
    p.add_argument("--json", action="store_true", help='print {"rows": [...]} instead of a table')
    p.add_argument("--inproc", action="store_true", help="measure pack -> chunks -> import in this process, no nodes")
    args = p.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    desc = loader.describe()
    rows = bench_inproc(desc, contexts) if args.inproc else bench_nodes(desc, contexts)
    print(json.dumps({"rows": rows}, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
