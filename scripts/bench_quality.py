"""Quality of KV caches on a long text: perplexity, KL and top-1 agreement vs the fp16 cache.

    python scripts/bench_quality.py                         # default model, GPL-3 text, 4096 tokens
    python scripts/bench_quality.py --caches fp16,turbo4,k5v3 --tokens 1024 --json

The text is fed through every cache in chunks of ``--chunk`` tokens, so each
chunk attends to the earlier chunks as the cache stored them (compressed), and
every position's next-token distribution is compared with the fp16 cache's at
the same position (the caches run in lockstep, chunk by chunk).

Columns: ppl (exp of mean next-token NLL), kl (mean KL(fp16 || cache) in nats),
top1 (fraction of positions whose argmax equals fp16's), bytes_per_token_layer
(the cache's ``nbytes`` over tokens and layers; fp16 is counted at 2 bytes per
number although the CPU run holds it in float32; the fixed per-sequence key/value
means of the *-mean rows are reported apart as fixed_bytes_per_layer),
ratio_vs_fp16, and bits_per_coord (stored bits per token, scales included, per
K or V coordinate). bits_4k counts the same at a 4096-token context whatever
--tokens is: packed words and scales of every position, plus the float16
sinks and window and the key means, over 4096 positions.

Rows named alloc* take per-layer widths from ``allocate`` measured on
--calib-text (never the scored text); preset-* rows are ``presets.PRESETS``.

``--layer-sweep`` adds the per-layer error attribution: one row per layer with
only that layer's keys (or values) compressed.
"""

import argparse
import json
import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_cache

from turbocluster.kernels import turboquant as tq
from turbocluster.runtime.cache import allocate as alloc
from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache, make_turbo_cache

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
CALIB_TEXT = "/usr/share/common-licenses/Apache-2.0"
CONTEXT = 4096  # bits_4k counts at this context
CALIB = {}  # "tokens": calibration tokens (main fills it), "sens": the measurement, made once


def _mlx_quantized(bits, group_size=64):
    def make(model):
        return [mlx_cache.QuantizedKVCache(group_size=group_size, bits=bits) if type(c) is mlx_cache.KVCache else c for c in mlx_cache.make_prompt_cache(model)]

    return make, dict(bits=bits, group_size=group_size)


def _turbo(**options):
    return (lambda model: make_turbo_cache(model, **options)), options


def _only_layer(layer, k_bits, v_bits):
    """Compress one layer (the others stay fp16): the per-layer error sweep."""

    def make(model):
        caches = mlx_cache.make_prompt_cache(model)
        caches[layer] = TurboQuantKVCache(k_bits, v_bits)
        return caches

    return make, dict(layer=layer, k_bits=k_bits, v_bits=v_bits)


def _allocated(budget, sinks=0, window=0, k_widths=(3, 4, 5, 6), v_widths=(2, 3, 4)):
    """Per-layer widths within ``budget`` bits at CONTEXT, sinks and window included."""
    options = dict(budget=budget, sinks=sinks, window=window, key_mean=True)

    def make(model):
        key = (k_widths, v_widths)
        if key not in CALIB:
            CALIB[key] = alloc.measure(model, CALIB["tokens"], k_widths, v_widths)
        head_dim = model.layers[0].self_attn.head_dim if hasattr(model.layers[0].self_attn, "head_dim") else model.args.head_dim
        fixed = 16 * (sinks + window) / CONTEXT + 8 / CONTEXT  # float16 ends, and the key mean (one vector per head)
        lb = alloc.allocate(CALIB[key], budget - fixed, head_dim)
        options["layer_bits"] = {i: (k, v) for i, k, v in lb}
        return make_turbo_cache(model, k_bits=4, v_bits=3, key_mean=True, sinks=sinks, window=window, layer_bits=options["layer_bits"])

    return make, options


def _preset(name):
    return (lambda model: make_turbo_cache(model, preset=name)), dict(preset=name)


CACHES = {
    "fp16": ((lambda model: mlx_cache.make_prompt_cache(model)), {}),
    "mlx-q8": _mlx_quantized(8),
    "mlx-q4": _mlx_quantized(4),
    "mlx-q4-g32": _mlx_quantized(4, 32),
    "mlx-q3": _mlx_quantized(3),
    "turbo4": _turbo(k_bits=4, v_bits=4),
    "turbo3": _turbo(k_bits=3, v_bits=3),
    "k4v3": _turbo(k_bits=4, v_bits=3),
    "seed-turbo4": _turbo(k_bits=4, v_bits=4, codebook="seed", rotate_values=False),
    "seed-turbo3": _turbo(k_bits=3, v_bits=3, codebook="seed", rotate_values=False),
    # where the error comes from: keys or values
    "k4v8": _turbo(k_bits=4, v_bits=8),
    "k8v4": _turbo(k_bits=8, v_bits=4),
    "k8v2": _turbo(k_bits=8, v_bits=2),
    # moonshot candidates at <= 4.25 bits per coordinate
    "k5v3": _turbo(k_bits=5, v_bits=3),
    "k6v2": _turbo(k_bits=6, v_bits=2),
    "k4v4-kmean": _turbo(k_bits=4, v_bits=4, key_mean=True),
    "k4v4-kvmean": _turbo(k_bits=4, v_bits=4, key_mean=True, value_mean=True),
    "k5v3-kmean": _turbo(k_bits=5, v_bits=3, key_mean=True),
    "k5v3-kvmean": _turbo(k_bits=5, v_bits=3, key_mean=True, value_mean=True),
    "k6v2-kvmean": _turbo(k_bits=6, v_bits=2, key_mean=True, value_mean=True),
    "k4v2-kvmean-fp1": _turbo(k_bits=4, v_bits=2, key_mean=True, value_mean=True, fp16_layers=1),
    # K6 on the 15 layers with the largest key error (--attribution 4x4, key mean on), K4 on the rest
    "k6k4v3-kmean": _turbo(k_bits=4, v_bits=3, key_mean=True,
                           layer_bits={i: (6, 3) for i in (12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 25, 26, 27)}),
    # fidelity (issue 13): sinks, a recent window, allocated widths
    "k4v3-kmean": _turbo(k_bits=4, v_bits=3, key_mean=True),
    "k4v3-kmean-s4": _turbo(k_bits=4, v_bits=3, key_mean=True, sinks=4),
    "k4v3-kmean-w64": _turbo(k_bits=4, v_bits=3, key_mean=True, window=64),
    "k4v3-kmean-s4w64": _turbo(k_bits=4, v_bits=3, key_mean=True, sinks=4, window=64),
    "k4v3-kmean-s4w120": _turbo(k_bits=4, v_bits=3, key_mean=True, sinks=4, window=120),
    "k5v3-kmean-s4": _turbo(k_bits=5, v_bits=3, key_mean=True, sinks=4),
    "k3v3-kmean": _turbo(k_bits=3, v_bits=3, key_mean=True),
    "k3v3-kmean-s4w32": _turbo(k_bits=3, v_bits=3, key_mean=True, sinks=4, window=32),
    "k4v2-kmean": _turbo(k_bits=4, v_bits=2, key_mean=True),
    "k4v2-kmean-s4w32": _turbo(k_bits=4, v_bits=2, key_mean=True, sinks=4, window=32),
    "alloc425-s4": _allocated(4.25, sinks=4),
    "alloc425-s4w32": _allocated(4.25, sinks=4, window=32),
    "alloc425-s4w64": _allocated(4.25, sinks=4, window=64),
    "alloc325-s4": _allocated(3.25, sinks=4),
    "alloc325-s4w32": _allocated(3.25, sinks=4, window=32),
    "alloc325-s4w64": _allocated(3.25, sinks=4, window=64),
    "preset-best": _preset("best"),
    "preset-small": _preset("small"),
}
DEFAULT_CACHES = "fp16,mlx-q8,mlx-q4,mlx-q4-g32,mlx-q3,turbo4,turbo3,k4v3,seed-turbo4,seed-turbo3"
BEST_BUDGET = 4.25  # bits per coordinate at CONTEXT
SMALL_BUDGET = 3.25


# --- a benchmark-only speed-up: the model's matmuls through numpy's BLAS ----------------
#
# The Linux mlx[cpu] wheel links the netlib reference BLAS (~4 GFLOP/s here), so
# one 4096-token pass of the 135M model takes minutes per cache. These modules
# hold the same weights (dequantized exactly from the 4-bit file) and multiply
# with numpy's OpenBLAS; the caches and attention are untouched, and every row,
# fp16 included, runs the same arithmetic. --mlx-matmul turns it off.


def _weight(mod):
    if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(mod.weight, mod.scales, mod.biases, mod.group_size, mod.bits).astype(mx.float32)
    return mod.weight.astype(mx.float32)


def _np_matmul(x, w_t):
    mx.eval(x)
    y = np.asarray(x.astype(mx.float32)).reshape(-1, w_t.shape[0]) @ w_t
    return mx.array(y).reshape(*x.shape[:-1], w_t.shape[1])


class NumpyLinear(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.w_t = np.ascontiguousarray(np.asarray(_weight(mod)).T)
        self.b = mod.bias if "bias" in mod else None

    def __call__(self, x):
        y = _np_matmul(x, self.w_t)
        return y if self.b is None else y + self.b


class NumpyEmbedding(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.table = _weight(mod)
        self.w_t = np.ascontiguousarray(np.asarray(self.table).T)

    def __call__(self, ids):
        return self.table[ids]

    def as_linear(self, x):
        return _np_matmul(x, self.w_t)


def numpy_matmuls(model):
    swaps = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
            swaps.append((name, NumpyLinear(mod)))
        elif isinstance(mod, (nn.Embedding, nn.QuantizedEmbedding)):
            swaps.append((name, NumpyEmbedding(mod)))
    model.update_modules(tree_unflatten(swaps))
    return model


def load_tokens(tokenizer, path, n):
    with open(path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < n:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than --tokens {n}")
    return mx.array(ids[:n])


def bits_at(caches, context=CONTEXT):
    """Stored bits per K or V coordinate at ``context`` positions: float ends and means included."""
    total = coords = 0
    for c in caches:
        if isinstance(c, TurboQuantKVCache):
            h, dk, dv = c.k_packed.shape[1], c.k_dim, c.v_dim
            per = h * (tq.vector_nbytes(dk, c.k_bits) + tq.vector_nbytes(dv, c.v_bits))
            fixed = h * (min(c.sinks, context) + min(c.window, context)) * (dk + dv) * 2
            fixed += sum(m.nbytes for m in (c.key_mean, c.value_mean) if m is not None)
            total += per * context + fixed
        elif isinstance(c, mlx_cache.QuantizedKVCache):
            h, d = c.keys[0].shape[1], c.keys[0].shape[3] * 32 // c.bits
            per = sum(a.nbytes for a in (*c.keys, *c.values)) / c.keys[0].shape[2]
            total += per * context
        else:  # float caches at 2 bytes a number
            h, d = c.keys.shape[1], c.keys.shape[3]
            total += 2 * h * d * 2 * context
        coords += 2 * h * (c.k_dim if isinstance(c, TurboQuantKVCache) else d) * context
    return 8 * total / coords


def evaluate(model, tokens, names, chunk, factories):
    """Run every cache over ``tokens`` in lockstep; one result dict per name."""
    caches = {name: factories[name][0](model) for name in names}
    stats = {name: dict(nll=0.0, kl=0.0, top1=0.0) for name in names}
    n, count = tokens.shape[0], 0
    for start in range(0, n, chunk):
        piece = tokens[start : start + chunk]
        targets = tokens[start + 1 : start + chunk + 1]
        t = targets.shape[0]
        ref_lp = ref_top = None
        for name in names:
            logits = model(piece[None], cache=caches[name])[0, :t].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
            top = lp.argmax(-1)
            if ref_lp is None:
                ref_lp, ref_top = lp, top
                kl, agree = mx.array(0.0), mx.array(float(t))
            else:
                kl = (mx.exp(ref_lp) * (ref_lp - lp)).sum()
                agree = (top == ref_top).sum()
            mx.eval(nll, kl, agree)
            s = stats[name]
            s["nll"] += nll.item()
            s["kl"] += kl.item()
            s["top1"] += agree.item()
        count += t
        print(f"[{start + piece.shape[0]}/{n} tokens]", file=sys.stderr, flush=True)
    rows = []
    for name in names:
        cache = caches[name]
        n_layers = len(cache)
        if name == "fp16":  # counted at 2 bytes per number
            bytes_tl = sum(c.keys.size + c.values.size for c in cache) * 2 / n / n_layers
            fixed = 0
        else:  # the key/value means are a fixed cost per sequence, reported apart
            fixed = sum(m.nbytes for c in cache for m in (getattr(c, "key_mean", None), getattr(c, "value_mean", None)) if m is not None)
            # plain KVCache layers (fp16_layers) are counted at 2 bytes per number too
            stored = sum((c.keys.size + c.values.size) * 2 if type(c) is mlx_cache.KVCache else c.nbytes for c in cache)
            bytes_tl = (stored - fixed) / n / n_layers
        s = stats[name]
        rows.append(dict(cache=name, ppl=math.exp(s["nll"] / count), kl=s["kl"] / count, top1=s["top1"] / count,
                         bytes_per_token_layer=bytes_tl, fixed_bytes_per_layer=fixed / n_layers, bits_4k=bits_at(cache),
                         options=_jsonable(factories[name][1])))
    fp16 = rows[0]["bytes_per_token_layer"]
    first = caches[names[0]][0]
    coords = 2 * first.keys.shape[1] * first.keys.shape[3]  # K and V coordinates per token per layer
    for r in rows:
        r["ratio_vs_fp16"] = fp16 / r["bytes_per_token_layer"]
        r["bits_per_coord"] = 8 * r["bytes_per_token_layer"] / coords
    return rows


def attribution(model, tokens, k_bits, v_bits):
    """Per layer: relative error of the attention output with only K, or only V, compressed.

    One fp16 prefill of ``tokens`` records every layer's queries, keys and
    values; each layer's causal attention is then recomputed with decoded keys
    (exact values), decoded values (exact keys), and decoded mean-subtracted
    keys, against the exact output.
    """
    from turbocluster.kernels import turboquant as tq
    from turbocluster.runtime.cache import allocate

    records = allocate.record(model, tokens)

    def sdpa(q, k, v, scale):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    rows = []
    for layer, (q, k, v, scale) in enumerate(records):
        ref = sdpa(q, k, v, scale)
        err = lambda o: (mx.linalg.norm(o - ref) / mx.linalg.norm(ref)).item()
        kd = tq.decode(*tq.encode(k, k_bits), k_bits)
        vd = tq.decode(*tq.encode(v, v_bits), v_bits)
        mean = k.mean(axis=2, keepdims=True)
        kmd = tq.decode(*tq.encode(k - mean, k_bits), k_bits) + mean
        rows.append(dict(layer=layer, k_err=err(sdpa(q, kd, v, scale)), v_err=err(sdpa(q, k, vd, scale)),
                         k_err_mean=err(sdpa(q, kmd, v, scale)), both_err=err(sdpa(q, kd, vd, scale))))
    return rows


def _jsonable(options):
    return {k: ({str(i): list(b) for i, b in v.items()} if isinstance(v, dict) else v) for k, v in options.items()}


def pick_best(rows, budget=BEST_BUDGET, label="best", ppl_limit=1.02, top1_min=0.95):
    """The TurboQuant row with the lowest perplexity within ``budget`` bits at CONTEXT."""
    fp16 = rows[0]
    turbo = lambda r: r["cache"].startswith(("k", "turbo", "alloc", "preset")) and "layer" not in r["options"]
    cands = [r for r in rows if r["cache"] in CACHES and turbo(r) and r["bits_4k"] <= budget + 1e-9]
    if not cands:
        return None
    best = dict(min(cands, key=lambda r: r["ppl"]))
    best["from"] = best["cache"]
    best["cache"] = label
    best["meets_target"] = best["ppl"] <= ppl_limit * fp16["ppl"] and best["top1"] >= top1_min
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model for loader.load() (default: the bundled SmolLM2-135M)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="a long English text file")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk: later chunks attend to compressed earlier ones")
    p.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma-separated from {sorted(CACHES)}, or 'all'")
    p.add_argument("--layer-sweep", default=None, metavar="KxV", help="e.g. 4x16: add one row per layer compressing only it (16 = fp16)")
    p.add_argument("--attribution", default=None, metavar="KxV", help="e.g. 4x4: per-layer attention-output error of K-only / V-only compression, then exit")
    p.add_argument("--mlx-matmul", action="store_true", help="keep MLX's own (slow on Linux CPU) matmuls")
    p.add_argument("--calib-text", default=CALIB_TEXT, help="text the alloc* rows measure layer sensitivity on (not the scored one)")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from turbocluster.runtime.model import loader

    model, tokenizer = loader.load(args.model)
    if not args.mlx_matmul and mx.default_device() == mx.cpu:
        numpy_matmuls(model)
    tokens = load_tokens(tokenizer, args.text, args.tokens)
    if args.calib_text == args.text:
        p.error("--calib-text must differ from --text: the allocation is measured on a text that is not scored")
    CALIB["tokens"] = load_tokens(tokenizer, args.calib_text, args.calib_tokens)
    if args.attribution:
        kb, vb = (int(x) for x in args.attribution.split("x"))
        rows = attribution(model, tokens, kb, vb)
        if args.json:
            print(json.dumps({"tokens": args.tokens, "k_bits": kb, "v_bits": vb, "rows": rows}, indent=1))
            return
        print(f"relative attention-output error per layer, {args.tokens} tokens, K{kb} / V{vb}")
        print(f"{'layer':>5} {'K only':>8} {'V only':>8} {'K-mean':>8} {'both':>8}")
        for r in rows:
            print(f"{r['layer']:5d} {r['k_err']:8.4f} {r['v_err']:8.4f} {r['k_err_mean']:8.4f} {r['both_err']:8.4f}")
        return
    names = list(CACHES) if args.caches == "all" else args.caches.split(",")
    factories = dict(CACHES)
    if "fp16" in names:
        names.remove("fp16")
    names.insert(0, "fp16")
    for name in names:
        if name not in factories:
            p.error(f"unknown cache {name!r}; choose from {sorted(CACHES)}")
    if args.layer_sweep:
        kb, vb = (int(x) for x in args.layer_sweep.split("x"))
        for layer in range(len(model.layers)):
            name = f"layer{layer}-k{kb}v{vb}"
            factories[name] = _only_layer(layer, kb if kb < 16 else 8, vb if vb < 16 else 8)
            names.append(name)
    start = time.perf_counter()
    rows = evaluate(model, tokens, names, args.chunk, factories)
    picks = [pick_best(rows), pick_best(rows, SMALL_BUDGET, "small", ppl_limit=1.08, top1_min=0.0)]
    rows += [b for b in picks if b]
    if args.json:
        print(json.dumps({"tokens": args.tokens, "text": args.text, "seconds": time.perf_counter() - start, "rows": rows}, indent=1))
        return
    print(f"{args.tokens} tokens of {args.text}, chunks of {args.chunk}, {time.perf_counter() - start:.0f} s")
    print(f"{'cache':18} {'ppl':>8} {'dppl%':>7} {'kl':>8} {'top1':>6} {'B/tok/layer':>11} {'ratio':>6} {'bits':>5} {'bits4k':>6}")
    fp = rows[0]["ppl"]
    for r in rows:
        print(f"{r['cache']:18} {r['ppl']:8.3f} {100 * (r['ppl'] / fp - 1):7.2f} {r['kl']:8.4f} {r['top1']:6.3f} "
              f"{r['bytes_per_token_layer']:11.1f} {r['ratio_vs_fp16']:6.2f} {r['bits_per_coord']:5.2f} {r['bits_4k']:6.2f}")
    for b in picks:
        if b:
            print(f"{b['cache']}: {b['from']} {b['options']} meets target: {b['meets_target']}")


if __name__ == "__main__":
    main()
