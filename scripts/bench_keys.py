"""Keys at b bits: TurboQuant's MSE quantizer against its inner-product variant (issue 13), by attention error.

    python scripts/bench_keys.py [--tokens 1024] [--queries 256] [--bits 3,4,5] [--text PATH]

The paper's second quantizer ("TurboQuant-prod") stores a key as (b-1)-bit
Lloyd-Max codes plus a 1-bit QJL sketch of the residual, sign(S r) with S a
d x d Gaussian matrix, and the residual's norm: q . k is then unbiased. This
compares it with plain b-bit keys (the cache's own encoder) on one fp16
prefill of a text with the bundled model: every layer's queries, keys and
values are recorded, and each layer's causal attention over the last
``--queries`` positions is recomputed with encoded keys (exact values).
Printed per width: the relative error of the attention output and of the
scores q . k (mean over layers, and the worst layer), and the bits each
stores per key coordinate (codes, scale, sketch, norm). Both use the key mean
(as the best caches do). Not the perplexity: a proxy that decides whether
the variant is worth a cache option.
"""

import argparse
import math

import mlx.core as mx
import numpy as np


def prod_keys(k: mx.array, bits: int, rng: np.random.Generator) -> np.ndarray:
    """(bits-1)-bit TurboQuant keys plus a 1-bit QJL sketch of the residual, decoded (unbiased for q . k)."""
    from turbocluster.kernels import turboquant as tq

    mse = np.asarray(tq.decode(*tq.encode(k, bits - 1), bits - 1).astype(mx.float32))
    kn = np.asarray(k.astype(mx.float32))
    r = kn - mse
    d = kn.shape[-1]
    s = rng.standard_normal((d, d)).astype(np.float32)
    sketch = np.sign(r @ s.T)
    sketch[sketch == 0] = 1
    norm = np.linalg.norm(r, axis=-1, keepdims=True).astype(np.float16).astype(np.float32)
    return mse + math.sqrt(math.pi / 2) / d * norm * (sketch @ s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--bits", default="3,4,5")
    ap.add_argument("--text", default="/usr/share/common-licenses/Apache-2.0", help="calibration text (not a scored one)")
    args = ap.parse_args(argv)

    from turbocluster.kernels import turboquant as tq
    from turbocluster.runtime.cache import allocate
    from turbocluster.runtime.model import loader

    model, tok = loader.load(None)
    ids = tok.encode(open(args.text).read())[: args.tokens]
    records = allocate.record(model, mx.array(ids))
    rng = np.random.default_rng(0)
    widths = [int(b) for b in args.bits.split(",")]
    rows = {(kind, b): ([], []) for b in widths for kind in ("mse", "prod")}
    for q, k, v, scale in records:
        qn = np.asarray(q[..., -args.queries :, :].astype(mx.float32))
        vn = np.asarray(v.astype(mx.float32))
        mean = k.mean(axis=2, keepdims=True)
        kc = k - mean
        kn = np.asarray(k.astype(mx.float32))
        ref = allocate._attend(qn, kn, vn, scale)
        n_kv = kn.shape[1]
        qr = qn.reshape(qn.shape[0], n_kv, -1, qn.shape[3])
        ref_s = qr @ kn.swapaxes(-1, -2)
        m = np.asarray(mean.astype(mx.float32))
        for b in widths:
            for kind, kd in (("mse", np.asarray(tq.decode(*tq.encode(kc, b), b).astype(mx.float32))),
                             ("prod", prod_keys(kc, b, rng))):
                kd = kd + m
                out = allocate._attend(qn, kd, vn, scale)
                rows[kind, b][0].append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
                rows[kind, b][1].append(float(np.linalg.norm(qr @ kd.swapaxes(-1, -2) - ref_s) / np.linalg.norm(ref_s)))
    d = records[0][1].shape[-1]
    print(f"{len(records)} layers, {len(ids)} tokens of {args.text}, last {args.queries} queries, head_dim {d}")
    print(f"{'keys':<22} {'bits/coord':>10} {'attn err mean':>13} {'worst layer':>11} {'score err':>9}")
    for b in widths:
        for kind in ("mse", "prod"):
            attn, score = rows[kind, b]
            stored = b + 16 / d if kind == "mse" else (b - 1) + 16 / d + 1 + 16 / d
            name = f"{b}-bit MSE" if kind == "mse" else f"{b - 1}-bit MSE + 1-bit QJL"
            print(f"{name:<22} {stored:>10.3f} {np.mean(attn):>13.4f} {max(attn):>11.4f} {np.mean(score):>9.4f}")


if __name__ == "__main__":
    main()
