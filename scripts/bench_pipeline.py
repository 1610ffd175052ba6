#!/usr/bin/env python3
"""Decode speed of one process vs the same model split over 2 and 3 local nodes.

For each cache type (fp16, turbo3) it measures, side by side in one run:
  * mlx-lm's own generate_step in this process (the baseline, nodes = 1, mode "process");
  * a cluster of N local node processes on loopback (mode "cluster"), N in --nodes.
Reported per row: decode tokens/s (after the first token), hop_ms (average time
per hop that is not model compute: gRPC, serialisation, thread hand-offs), and
bytes_per_step (tensor payload bytes sent per decode step, all hops together).
Each configuration runs --repeats times, interleaved, and the best run is kept
(the machine is shared; the best run is the least disturbed one).

    python scripts/bench_pipeline.py [--max-tokens 64] [--nodes 1,2,3] [--json]
"""

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from turbocluster.runtime.model import loader
from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes
from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

CACHES = {"fp16": None, "turbo3": {"k_bits": 3, "v_bits": 3}}


def bench_process(model, ids, max_tokens, cache):
    """Decode tokens/s of mlx-lm in this process."""
    prompt_cache = make_turbo_cache(model, **cache) if cache else make_prompt_cache(model)
    times = []
    for _, _ in zip(range(max_tokens), generate_step(mx.array(ids), model, max_tokens=max_tokens, prompt_cache=prompt_cache)):
        times.append(time.perf_counter())
    return {"tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "hop_ms": 0.0, "bytes_per_step": 0}


def bench_cluster(cluster, ids, max_tokens, cache):
    """Decode tokens/s through the cluster, with per-hop overhead and payload bytes per step."""
    steps = []
    last = None
    for _ in cluster.generate_tokens(ids, max_tokens=max_tokens, cache=cache, stop_at_eos=False):
        now = time.perf_counter()
        if last is not None:
            steps.append(now - last)
        last = now
    s = cluster.stats
    k = len(cluster.clients)
    # wall time of a step minus the compute of every node, per hop
    overhead = [(w * 1e3 - sum(h[1] for h in hops)) / k for w, hops in zip(steps, s.hops)]
    return {
        "tokens_per_s": s.tokens_per_s,
        "hop_ms": statistics.median(overhead),
        "bytes_per_step": int(statistics.median(sum(h[3] for h in hops) for hops in s.hops)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--nodes", default="1,2,3", help="cluster sizes to measure")
    p.add_argument("--caches", default="fp16,turbo3")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")]
    caches = args.caches.split(",")

    model, tok = loader.load(args.model)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    best = {}

    def keep(key, row):
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row

    # one set of nodes per cluster size, so the repeats never wait for a reload
    nodes = {}
    clusters = {}
    try:
        for k in sizes:
            nodes[k] = start_local_nodes(k)
            clusters[k] = Cluster.connect(args.model, nodes=[n.address for n in nodes[k]])
        for r in range(args.repeats):
            for name in caches:
                cache = CACHES[name]
                keep((1, "process", name), bench_process(model, ids, args.max_tokens, cache))
                for k in sizes:
                    c = clusters[k]
                    c.load(c.plan(context=len(ids) + args.max_tokens, cache=cache))  # no-op once loaded
                    keep((k, "cluster", name), bench_cluster(c, ids, args.max_tokens, cache))
                print(f"repeat {r + 1}/{args.repeats} {name} done", file=sys.stderr, flush=True)
    finally:
        for c in clusters.values():
            c.close()
        for started in nodes.values():
            stop_local_nodes(started)

    rows = []
    for (k, mode, name), row in sorted(best.items(), key=lambda kv: (kv[0][2] != "fp16", kv[0][1] != "process", kv[0][0])):
        base = best[(1, "process", name)]["tokens_per_s"]
        rows.append({"nodes": k, "mode": mode, "cache": name, **{f: round(v, 3) for f, v in row.items()},
                     "vs_process": round(row["tokens_per_s"] / base, 3)})
    if args.json:
        print(json.dumps({"model": args.model or "bundled SmolLM2-135M", "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    else:
        print(f"{'nodes':>5} {'mode':8} {'cache':7} {'tok/s':>7} {'x proc':>7} {'hop ms':>7} {'bytes/step':>10}")
        for r in rows:
            print(f"{r['nodes']:>5} {r['mode']:8} {r['cache']:7} {r['tokens_per_s']:7.2f} {r['vs_process']:7.3f} "
                  f"{r['hop_ms']:7.2f} {r['bytes_per_step']:>10}")


if __name__ == "__main__":
    sys.exit(main())
