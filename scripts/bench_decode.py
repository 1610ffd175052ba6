"""Decode speed and memory of the fp16 cache, mlx-lm's 4-bit cache and TurboQuant caches.

    python scripts/bench_decode.py                      # 1k, 4k, 8k contexts
    python scripts/bench_decode.py --contexts 256,1024 --tokens 8 --json

For every context the caches are filled with random keys and values of the
model's own shapes (decode speed does not depend on their values, and it
spares an 8k-token prefill per cache), then ``--tokens`` greedy steps are timed.
Rounds are interleaved across caches and the fastest round is reported, since
CPUs are often shared. ``peak_bytes`` is ``mx.get_peak_memory()`` over the
decode steps (model weights included); ``kv_bytes`` is the caches' ``nbytes``.
"""

import argparse
import gc
import json
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache

from turbocluster.kernels import native
from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

CACHES = {
    "fp16": lambda m: mlx_cache.make_prompt_cache(m),
    "mlx-q4": lambda m: [mlx_cache.QuantizedKVCache(group_size=64, bits=4) if type(c) is mlx_cache.KVCache else c for c in mlx_cache.make_prompt_cache(m)],
    "turbo3": lambda m: make_turbo_cache(m, k_bits=3, v_bits=3),
    "turbo4": lambda m: make_turbo_cache(m, k_bits=4, v_bits=4),
    "k4v3": lambda m: make_turbo_cache(m, k_bits=4, v_bits=3),
    "turbo3-mlx-ops": lambda m: make_turbo_cache(m, k_bits=3, v_bits=3),  # native kernel off
    # the presets (docs/cache.md "Fidelity"): float16 sinks and window read beside the packed middle
    "best": lambda m: make_turbo_cache(m, preset="best"),
    "small": lambda m: make_turbo_cache(m, preset="small"),
}


def load_model(random_model):
    if not random_model:
        from turbocluster.runtime.model import loader

        return loader.load()[0]
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                           num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                           head_dim=64, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def kv_shapes(model):
    """(n_kv_heads, k_dim, v_dim, dtype) of every layer, read from a one-token forward."""
    cache = mlx_cache.make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    return [(c.keys.shape[1], c.keys.shape[3], c.values.shape[3], c.keys.dtype) for c in cache]


def fill(cache, shapes, context, chunk=1024):
    for c, (h, dk, dv, dtype) in zip(cache, shapes):
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            c.update_and_fetch(mx.random.normal((1, h, n, dk)).astype(dtype), mx.random.normal((1, h, n, dv)).astype(dtype))
        mx.eval([a for _, a in tree_flatten(c.state) if isinstance(a, mx.array)])


def decode(model, cache, tokens):
    tok = mx.array([[1]])
    mx.eval(model(tok, cache=cache))  # warm up (compiles the native kernel once)
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model(tok, cache=cache)
        tok = logits[:, -1:].argmax(-1)
        mx.eval(tok)
    return time.perf_counter() - start, mx.get_peak_memory()


def run(model, contexts, names, tokens, rounds):
    shapes = kv_shapes(model)
    rows = []
    for context in contexts:
        best = {}
        for _ in range(rounds):
            for name in names:
                cache = CACHES[name](model)
                fill(cache, shapes, context)
                kv_bytes = sum(c.nbytes for c in cache)
                saved = native.NATIVE_MAX_ROWS
                if name.endswith("mlx-ops"):
                    native.NATIVE_MAX_ROWS = 0
                try:
                    seconds, peak = decode(model, cache, tokens)
                finally:
                    native.NATIVE_MAX_ROWS = saved
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, peak, kv_bytes)
                del cache
                gc.collect()
                mx.clear_cache()
        for name in names:
            seconds, peak, kv_bytes = best[name]
            rows.append(dict(cache=name, context=context, tokens_per_s=tokens / seconds, kv_bytes=kv_bytes, peak_bytes=peak))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,8192", help="comma-separated context lengths")
    p.add_argument("--caches", default="fp16,mlx-q4,turbo3,turbo4,turbo3-mlx-ops", help=f"comma-separated, from {sorted(CACHES)}")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is reported")
    p.add_argument("--random-model", action="store_true", help="a random SmolLM2-135M-shaped llama instead of loader.load()")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = args.caches.split(",")
    for n in names:
        if n not in CACHES:
            p.error(f"unknown cache {n!r}; choose from {sorted(CACHES)}")
    model = load_model(args.random_model)
    rows = run(model, [int(c) for c in args.contexts.split(",")], names, args.tokens, args.rounds)
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
        return
    fp = {r["context"]: r for r in rows if r["cache"] == "fp16"}
    print(f"{'cache':16} {'context':>7} {'tok/s':>7} {'vs fp16':>7} {'KV MiB':>8} {'peak MiB':>9}")
    for r in rows:
        rel = r["tokens_per_s"] / fp[r["context"]]["tokens_per_s"] if r["context"] in fp else float("nan")
        print(f"{r['cache']:16} {r['context']:7d} {r['tokens_per_s']:7.2f} {rel:7.2f} {r['kv_bytes'] / 2**20:8.1f} {r['peak_bytes'] / 2**20:9.1f}")


if __name__ == "__main__":
    main()
