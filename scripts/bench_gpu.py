"""GPU speed of the packed TurboQuant cache beside the fp16 cache: decode, one layer's attention, prefill.

    python scripts/bench_gpu.py                             # Llama-3.1-8B-shaped, random fp16 weights
    python scripts/bench_gpu.py --contexts 1024,8192 --tokens 16 --json
    python scripts/bench_gpu.py --layers 4 --contexts 1024   # a quick smoke run

Runs wherever MLX has a GPU (CUDA or Metal). For every context the caches are
filled with random keys and values of the model's shapes (decode speed does
not depend on their values), then ``--tokens`` decode steps are timed. Each
TurboQuant cache runs three ways (``--paths``): all fused (``kernels/fused.py``:
one encode launch and two attention launches a layer), fused attention with
the mx-ops encode (``TURBOCLUSTER_FUSED_ENCODE=0``), and the plain-``mx``
reference (``TURBOCLUSTER_FUSED=0``). Reported per
row: tokens/s, the ratio to fp16 at the same context, host ms per step (time to
build the step's graph, before evaluation), run ms per step (one built step
evaluated alone: its kernel launches and GPU time), KV bytes and peak memory.
A pipelined step takes about max(host + launches, GPU): where host_ms plus the
launches nears the step time, the step is bound by Python, not by the GPU.

``encode`` rows time one layer's new keys and values encoded by the fused
kernel against the mx-ops encode. ``attention`` rows time one layer's attention (32 query / 8 kv heads x 128)
alone: fp16 ``mx.fast.scaled_dot_product_attention`` against the fused decode
kernel, with GB/s on the bytes each reads. Those rows time 50 calls' graphs
built first (``host_us``) and then run in one go (``us``, the GPU's time). ``prefill`` rows time a prompt of
``--prefill`` tokens in chunks of 2048 (mlx-lm's prefill step) into an empty cache.
"""

import argparse
import gc
import json
import os
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import llama

from turbocluster.kernels import fused
from turbocluster.runtime.cache import factory
from turbocluster.runtime.cache.attention import PackedKV
from turbocluster.runtime.cache.turbo_cache import make_turbo_cache

CACHES = {
    "fp16": lambda m: mlx_cache.make_prompt_cache(m),
    "turbo4": lambda m: make_turbo_cache(m, k_bits=4, v_bits=4),
    "turbo3": lambda m: make_turbo_cache(m, k_bits=3, v_bits=3),
    "k5v3": lambda m: make_turbo_cache(m, k_bits=5, v_bits=3, key_mean=True),
}


def build_model(layers, quantize):
    """Llama-3.1-8B's shapes with random float16 weights (optionally 4-bit quantized)."""
    args = llama.ModelArgs(model_type="llama", hidden_size=4096, num_hidden_layers=layers, intermediate_size=14336,
                           num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
                           rope_theta=500000.0, head_dim=128, tie_word_embeddings=False)
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def fill(cache, model, context, chunk=4096):
    args = model.args
    for c in cache:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = mx.random.normal((1, args.num_key_value_heads, n, args.head_dim)).astype(mx.float16)
            v = mx.random.normal((1, args.num_key_value_heads, n, args.head_dim)).astype(mx.float16)
            c.update_and_fetch(k, v)
            mx.eval([a for a in (getattr(c, n_, None) for n_ in ("keys", "values", "k_packed", "k_scales", "v_packed", "v_scales")) if a is not None])


def kv_nbytes(cache):
    return sum(c.nbytes for c in cache)


PATHS = ("fused", "fused-attn", "reference")  # all fused; fused attention, mx-ops encode; plain mx


def set_path(path):
    os.environ["TURBOCLUSTER_FUSED"] = "0" if path == "reference" else "1"
    os.environ["TURBOCLUSTER_FUSED_ENCODE"] = "1" if path == "fused" else "0"


def time_decode(model, cache, tokens):
    """Decode steps pipelined as mlx-lm does (build step n+1 while the GPU runs step n)."""
    def step(y):
        return model(y, cache=cache)[:, -1:].argmax(axis=-1)

    x = mx.array([[7]])
    first = model(x, cache=cache)[:, -1].astype(mx.float32)
    mx.eval(first)  # warm-up: compile, self-check
    mx.eval(step(x))
    mx.synchronize()
    mx.reset_peak_memory()
    host, t0 = 0.0, time.perf_counter()
    y = step(x)
    mx.async_eval(y)
    for _ in range(tokens):
        h0 = time.perf_counter()
        nxt = step(y)
        host += time.perf_counter() - h0
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    dt = time.perf_counter() - t0
    run, n_run = 0.0, 4
    for _ in range(n_run):  # a step alone: launches and GPU time, nothing built meanwhile
        nxt = step(y)
        r0 = time.perf_counter()
        mx.eval(nxt)
        run += time.perf_counter() - r0
        y = nxt
    return (tokens + 1) / dt, 1000 * host / tokens, 1000 * run / n_run, mx.get_peak_memory(), first


def bench_decode(model, contexts, caches, tokens, weights, paths=PATHS):
    rows = []
    time_decode(model, CACHES["fp16"](model), 32)  # warm the GPU (and its clocks) up before the first timed row
    for ctx in contexts:
        base = None
        for name in caches:
            logits = {}
            for path in (("fp16",) if name == "fp16" else paths):
                set_path(path)
                cache = CACHES[name](model)
                factory.warm_up_gpu(model, cache)  # compile and self-check now, as a node does at session open
                mx.random.seed(ctx)  # the same cache contents on every path
                fill(cache, model, ctx)
                tps, host_ms, run_ms, peak, logits[path] = time_decode(model, cache, tokens)
                if name == "fp16":
                    base = tps
                row = dict(kind="decode", weights=weights, cache=name, path=path, context=ctx, tokens_per_s=round(tps, 2),
                           vs_fp16=round(tps / base, 3) if base else None, host_ms=round(host_ms, 2), run_ms=round(run_ms, 2),
                           kv_mib=round(kv_nbytes(cache) / 2**20, 1), peak_gib=round(peak / 2**30, 2))
                if path != "fused" and "fused" in logits:  # first step's logits vs the all-fused path, same cache contents
                    diff = mx.abs(logits["fused"] - logits[path]).max() / mx.abs(logits[path]).max()
                    row["logits_rel_diff_fused"] = float(diff.item())
                    logits[path] = None
                print(row, flush=True)
                rows.append(row)
                del cache
                gc.collect()
                mx.clear_cache()
    set_path("fused")
    return rows


def _bench(fn, iters=50):
    """(host seconds to build one call's graph, seconds per call to run them), calls queued back to back.

    The two are timed apart: the graphs of all calls are built first, then run
    in one go, so the second is the GPU's time (kernel launches overlapping it)
    and the first is what a forward pass spends in Python before the GPU sees the work.
    """
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    outs = [fn() for _ in range(iters)]
    t1 = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
    return (t1 - t0) / iters, (time.perf_counter() - t1) / iters


def bench_attention(contexts):
    """One layer's decode attention alone: fp16 SDPA vs the fused kernel (per width)."""
    rows = []
    n_q, n_kv, D = 32, 8, 128
    q = mx.random.normal((1, n_q, 1, D)).astype(mx.float16)
    from turbocluster.kernels import turboquant as tq

    for ctx in contexts:
        k = mx.random.normal((1, n_kv, ctx, D)).astype(mx.float16)
        v = mx.random.normal((1, n_kv, ctx, D)).astype(mx.float16)
        mx.eval(k, v)
        host, t = _bench(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5))
        nbytes = k.nbytes + v.nbytes
        base = t
        rows.append(dict(kind="attention", cache="fp16", context=ctx, us=round(t * 1e6, 1), gb_s=round(nbytes / t / 1e9, 1),
                         vs_fp16=1.0, host_us=round(host * 1e6, 1)))
        print(rows[-1], flush=True)
        for name, (kb, vb) in (("turbo4", (4, 4)), ("turbo3", (3, 3)), ("k5v3", (5, 3))):
            kp, ks = tq.encode(k, kb)
            vp, vs = tq.encode(v, vb)
            keys, values = PackedKV(kp, ks, kb, D), PackedKV(vp, vs, vb, D)
            mx.eval(kp, ks, vp, vs)
            host, t = _bench(lambda: fused.decode_attention(q, keys, values, D**-0.5))
            nbytes = sum(a.nbytes for a in (kp, ks, vp, vs))
            rows.append(dict(kind="attention", cache=name, context=ctx, us=round(t * 1e6, 1), gb_s=round(nbytes / t / 1e9, 1),
                             vs_fp16=round(base / t, 2), host_us=round(host * 1e6, 1)))
            print(rows[-1], flush=True)
        del k, v
        mx.clear_cache()
    return rows


def bench_encode(token_counts, widths=((4, 4), (3, 3), (5, 3))):
    """Encoding new keys and values of one layer (8 kv heads x 128): one fused launch vs the mx-ops encode."""
    rows = []
    from turbocluster.kernels import turboquant as tq

    for n in token_counts:
        k = mx.random.normal((1, 8, n, 128)).astype(mx.float16)
        v = mx.random.normal((1, 8, n, 128)).astype(mx.float16)
        mx.eval(k, v)
        for kb, vb in widths:
            h_ops, t_ops = _bench(lambda: tq.encode(k, kb) + tq.encode(v, vb))
            h_fused, t_fused = _bench(lambda: fused.encode_kv(k, v, kb, vb))
            rows.append(dict(kind="encode", cache=f"k{kb}v{vb}", tokens=n, mx_ops_us=round(t_ops * 1e6, 1),
                             fused_us=round(t_fused * 1e6, 1), speedup=round(t_ops / t_fused, 2),
                             mx_ops_host_us=round(h_ops * 1e6, 1), fused_host_us=round(h_fused * 1e6, 1)))
            print(rows[-1], flush=True)
    return rows


def bench_prefill(model, caches, n_tokens, weights, chunk=2048, paths=PATHS):
    rows, base = [], None
    prompt = mx.random.randint(0, model.args.vocab_size, (1, n_tokens))
    for name in caches:
        for path in (("fp16",) if name == "fp16" else paths):
            set_path(path)
            best = None
            for _ in range(2):  # the first round compiles
                cache = CACHES[name](model)
                mx.synchronize()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                for s in range(0, n_tokens, chunk):
                    mx.eval(model(prompt[:, s : s + chunk], cache=cache))
                mx.synchronize()
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
                peak = mx.get_peak_memory()
                del cache
                gc.collect()
                mx.clear_cache()
            tps = n_tokens / best
            if name == "fp16":
                base = tps
            rows.append(dict(kind="prefill", weights=weights, cache=name, path=path, tokens=n_tokens, tokens_per_s=round(tps, 1),
                             vs_fp16=round(tps / base, 3), peak_gib=round(peak / 2**30, 2)))
            print(rows[-1], flush=True)
    set_path("fused")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,8192,32768", help="decode context lengths")
    p.add_argument("--attention-contexts", default="32768,131072", help="context lengths of the one-layer attention rows ('' skips)")
    p.add_argument("--encode-tokens", default="1,2048", help="token counts of the encode rows ('' skips)")
    p.add_argument("--caches", default=",".join(CACHES), help=f"caches, from {','.join(CACHES)}")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per row")
    p.add_argument("--prefill", type=int, default=4096, help="prompt tokens for the prefill rows (0 skips)")
    p.add_argument("--layers", type=int, default=32, help="transformer layers (32 is Llama-3.1-8B)")
    p.add_argument("--weights", default="fp16", help="fp16, q4 or both comma-separated")
    p.add_argument("--paths", default=",".join(PATHS), help=f"TurboQuant paths per cache, from {','.join(PATHS)}")
    p.add_argument("--json", action="store_true", help="print one JSON document at the end")
    a = p.parse_args()
    if fused.backend() is None:
        raise SystemExit("bench_gpu: no CUDA or Metal GPU backend in this MLX (the fused kernels need one)")
    caches = [c for c in a.caches.split(",") if c]
    unknown = [c for c in caches if c not in CACHES]
    if unknown:
        raise SystemExit(f"bench_gpu: unknown caches {unknown}; choose from {list(CACHES)}")
    contexts = [int(c) for c in a.contexts.split(",") if c]
    paths = [p for p in a.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"bench_gpu: --paths takes some of {','.join(PATHS)}, got {a.paths!r}")
    info = dict(device=mx.device_info().get("device_name"), mlx=mx.__version__, layers=a.layers, tokens=a.tokens)
    print(info, flush=True)
    rows = []
    if a.attention_contexts:
        rows += bench_attention([int(c) for c in a.attention_contexts.split(",")])
    if a.encode_tokens:
        rows += bench_encode([int(c) for c in a.encode_tokens.split(",")])
    for weights in a.weights.split(","):
        model = build_model(a.layers, weights == "q4")
        rows += bench_decode(model, contexts, caches, a.tokens, weights, paths)
        if a.prefill:
            rows += bench_prefill(model, caches, a.prefill, weights, paths=paths)
        del model
        gc.collect()
        mx.clear_cache()
    if a.json:
        print(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
