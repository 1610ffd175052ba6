"""How many CPU kernels MLX compiles on a machine's first generations, and how long they take.

MLX's CPU backend compiles each fused graph of ``mx.compile`` with g++ into a
shared library under ``$TMPDIR/mlx/<version>/cpu`` and reuses it across
processes. This runs, in one process with a fresh kernel cache, a prefill plus
a few decode steps through a tiny random-weight qwen3 with TurboQuant caches at
several prompt lengths, and prints the kernels each length built and its time
beside the first length's: a per-shape recompile shows as new kernels on every
new length (the baseline is what the first generation costs).

    python scripts/bench_compile.py [--lengths 42 7 100 333] [--json]
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[42, 7, 100, 333])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--decode", type=int, default=4, help="decode steps after each prefill")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    fresh = tempfile.mkdtemp(prefix="mlx-kernels-")
    os.environ["TMPDIR"] = fresh  # read by std::filesystem::temp_directory_path on first compile
    import mlx.core as mx
    from mlx_lm.models import qwen3

    from turbocluster.runtime.cache.factory import make_caches

    cfg = dict(
        model_type="qwen3", hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=1024, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.float32)  # what a CPU node runs
    mx.eval(model.parameters())

    def kernels():
        return len(glob.glob(os.path.join(fresh, "mlx", "*", "cpu", "*.so")))

    rows = []
    for n in args.lengths:
        before, t0 = kernels(), time.perf_counter()
        caches = make_caches(model, {"k_bits": args.bits, "v_bits": args.bits})
        logits = model(mx.array([[(7 * i) % cfg["vocab_size"] for i in range(n)]]), cache=caches)
        mx.eval(logits)
        for _ in range(args.decode):
            logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=caches)
            mx.eval(logits)
        rows.append({"prompt": n, "kernels_built": kernels() - before, "seconds": round(time.perf_counter() - t0, 3)})

    if args.json:
        print(json.dumps({"bits": args.bits, "decode": args.decode, "lengths": rows, "kernel_cache": fresh}))
    else:
        print(f"turbo{args.bits}, fresh kernel cache {fresh}")
        print(f"{'prompt':>7} {'kernels built':>14} {'seconds':>8}   (baseline: the first length)")
        for r in rows:
            print(f"{r['prompt']:>7} {r['kernels_built']:>14} {r['seconds']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
