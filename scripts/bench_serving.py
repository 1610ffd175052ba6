"""Aggregate tokens/s and time to first token of N concurrent streams through `turbo-cluster serve`'s scheduler.

    python scripts/bench_serving.py [--streams 1,2,4,8] [--max-tokens 32] [--nodes 2] [--no-unbatched] [--json]

Each stream is one request (greedy, a distinct short chat prompt) driven by the
server's Scheduler over ``--nodes`` local node processes (the HTTP layer is left
out: it adds a constant per request). The cluster runs twice: with the nodes
batching concurrent decode steps (the default) and with batching off
(``TURBOCLUSTER_MAX_BATCH=1``, each session's step its own forward). Beside
it, one mlx-lm process serves the same load with ``mlx_lm.batch_generate``
(its batch generator: all N prompts in one batch), on the same model in the
same process as this script.
"""

import argparse
import json
import os
import threading
import time

PROMPTS = ["Tell me about the sea.", "Name three colours.", "What is a CPU?", "Describe a cat.",
           "Why is the sky blue?", "Write a haiku.", "What is rain?", "List some fruits."]


def bench_cluster(streams, max_tokens, nodes):
    from turbocluster.runtime.cluster.cluster import Cluster
    from turbocluster.runtime.server.engine import Engine, Sampling
    from turbocluster.runtime.server.scheduler import Job, Scheduler

    rows = []
    with Cluster.connect(local=nodes) as cluster:
        cluster.load(cluster.plan(context=1024))
        engine = Engine(cluster, context=1024, max_kept=0)
        sched = Scheduler(engine, workers=max(streams), queue_limit=64)
        try:
            for rnd, n in enumerate([1, *streams]):  # round 0 is not counted: it warms the nodes (MLX builds kernels on first use)
                done, first = [], []
                lock = threading.Lock()
                events = []
                t0 = time.perf_counter()
                for i in range(n):
                    ids = cluster.encode(PROMPTS[i % len(PROMPTS)])
                    ev = threading.Event()
                    events.append(ev)

                    def emit(kind, v, ev=ev):
                        with lock:
                            if kind == "done":
                                done.append(v)
                                first.append(v["ttft_s"])
                                ev.set()
                            elif kind == "error":
                                done.append({"completion_tokens": 0, "error": str(v)})
                                ev.set()

                    sched.submit(Job(ids=ids, max_tokens=max_tokens, sampling=Sampling(), emit=emit, keep=False))
                for ev in events:
                    ev.wait()
                dt = time.perf_counter() - t0
                tokens = sum(d["completion_tokens"] for d in done)
                if rnd == 0:
                    continue
                rows.append({"streams": n, "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 2),
                             "ttft_s": round(sum(x for x in first if x) / max(len(first), 1), 3),
                             "errors": [d["error"] for d in done if "error" in d]})
        finally:
            sched.close()
            engine.close()
    return rows


def bench_mlx(streams, max_tokens):
    from mlx_lm.generate import batch_generate

    from turbocluster.runtime.model import loader

    model, tok = loader.load(None)
    rows = []
    for rnd, n in enumerate([1, *streams]):  # round 0 warms up, uncounted
        prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
                   for i in range(n)]
        t0 = time.perf_counter()
        out = batch_generate(model, tok, prompts, max_tokens=max_tokens, return_token_ids=True)
        dt = time.perf_counter() - t0
        tokens = sum(len(t) for t in out.token_ids) if getattr(out, "token_ids", None) else n * max_tokens
        if rnd == 0:
            continue
        rows.append({"streams": n, "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 2)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-process mlx-lm run")
    ap.add_argument("--no-unbatched", action="store_true", help="skip the run with the nodes' batching off")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    cluster = bench_cluster(streams, args.max_tokens, args.nodes)
    unbatched = []
    if not args.no_unbatched:
        os.environ["TURBOCLUSTER_MAX_BATCH"] = "1"  # the local nodes inherit it
        try:
            unbatched = bench_cluster(streams, args.max_tokens, args.nodes)
        finally:
            del os.environ["TURBOCLUSTER_MAX_BATCH"]
    base = [] if args.no_baseline else bench_mlx(streams, args.max_tokens)
    if args.json:
        print(json.dumps({"cluster": cluster, "cluster_unbatched": unbatched, "mlx_lm_batch": base}, indent=1))
        return
    nan = float("nan")
    print(f"{'streams':>7}  {'cluster tok/s':>13}  {'ttft s':>7}  {'unbatched tok/s':>15}  {'ttft s':>7}  {'mlx-lm batch tok/s':>18}")
    for i, r in enumerate(cluster):
        u = unbatched[i] if unbatched else {"tokens_per_s": nan, "ttft_s": nan}
        b = base[i]["tokens_per_s"] if base else nan
        print(f"{r['streams']:>7}  {r['tokens_per_s']:>13.2f}  {r['ttft_s']:>7.3f}  {u['tokens_per_s']:>15.2f}  {u['ttft_s']:>7.3f}  {b:>18.2f}")
    for name, rows in (("batched", cluster), ("unbatched", unbatched)):
        if rows and rows[0]["streams"] == 1:
            print(f"{name}: aggregate over one stream: " + ", ".join(f"{r['streams']}: {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x" for r in rows))


if __name__ == "__main__":
    main()
