#!/usr/bin/env python3
"""Rebuilding a lost session's KV: replaying its steps vs restoring a packed KV checkpoint.

    python scripts/bench_failover.py [--prompt 256] [--decode 16,64,256] [--json]

For the bundled model in one process (no network): a session is run as the
coordinator runs it (one prefill chunk, then one-token decode steps). Replay
repeats those steps on fresh caches, as failover.py does on the new plan;
restore unpacks a session_io container of the same caches (what a node would
import from a checkpoint) and evaluates its arrays. Both are checked to give
back bit-for-bit the same caches. Cache kinds: fp16 and TurboQuant 3-bit.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_steps(model, caches, steps):
    import mlx.core as mx

    for ids in steps:
        model(mx.array([ids]), cache=caches)
        mx.eval([c.state for c in caches])


def held(cache):
    """The arrays of a cache's state, cut to the positions it holds (fp16 buffers grow in steps of 256)."""
    import mlx.core as mx

    out = []
    for x in cache.state if isinstance(cache.state, (tuple, list)) else [cache.state]:
        for y in x if isinstance(x, (tuple, list)) else [x]:
            if isinstance(y, mx.array):
                out.append(y[:, :, : cache.offset] if y.ndim == 4 and y.shape[2] > cache.offset else y)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--decode", default="16,64,256", help="decode steps before the failure (default 16,64,256)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from turbocluster.runtime.model import loader
    from turbocluster.runtime.sessions import container as session_io
    from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

    model, _ = loader.load()
    desc = loader.describe()
    n = desc["num_layers"]
    kinds = {"fp16": lambda: make_prompt_cache(model), "turbo3": lambda: make_turbo_cache(model, 3, 3)}
    rows = []
    for kind, make in kinds.items():
        for d in [int(x) for x in args.decode.split(",")]:
            ids = [(i * 7919) % 40000 + 10 for i in range(args.prompt + d)]
            steps = [ids[: args.prompt]] + [[t] for t in ids[args.prompt :]]
            caches = make()
            run_steps(model, caches, steps)
            data = session_io.pack_session(caches, {"model": desc["identity"], "layers": (0, n), "num_tokens": len(ids)})

            t0 = time.perf_counter()
            again = make()
            run_steps(model, again, steps)
            replay = time.perf_counter() - t0

            t0 = time.perf_counter()
            restored, _ = session_io.unpack_session(data)
            mx.eval([c.state for c in restored])
            restore = time.perf_counter() - t0

            for a, b, c in zip(caches, again, restored):
                x, y, z = held(a), held(b), held(c)
                assert len(x) == len(y) == len(z), f"{kind}: rebuilt caches differ in structure"
                for u, v, w in zip(x, y, z):
                    assert mx.array_equal(u, v).item() and mx.array_equal(u, w).item(), f"{kind}: rebuilt KV differs"
            rows.append({"cache": kind, "positions": len(ids), "decode_steps": d, "replay_s": round(replay, 3),
                         "restore_s": round(restore, 4), "checkpoint_bytes": len(data)})
            if not args.json:
                r = rows[-1]
                print(f"{kind:6s} {r['positions']:5d} positions ({d:4d} decode steps): replay {replay:7.3f} s, "
                      f"restore {restore:7.4f} s from a {len(data) / (1 << 20):6.2f} MiB checkpoint", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
