"""Encode/decode throughput of the TurboQuant codec beside a plain float16 copy.

    python scripts/bench_codec.py [--vectors N] [--repeats R] [--json]

The baseline "fp16" row is what an uncompressed cache does with the same data:
cast float32 -> float16 to store, float16 -> float32 to read.
"""

import argparse
import json
import time

import mlx.core as mx

from turbocluster import kernels
from turbocluster.kernels import fast


def _time(fn, repeats):
    mx.eval(fn())  # warm up (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def run(vectors, repeats, dims=(64, 128), bits_list=(2, 3, 4)):
    rows = []
    for dim in dims:
        x = mx.random.normal((vectors, dim))
        half = x.astype(mx.float16)
        mx.eval(x, half)
        enc = _time(lambda: x.astype(mx.float16), repeats)
        dec = _time(lambda: half.astype(mx.float32), repeats)
        rows.append(dict(dim=dim, codec="fp16", encode_vps=vectors / enc, decode_vps=vectors / dec, bytes_per_vector=2 * dim))
        for bits in bits_list:
            packed, scales = kernels.encode(x, bits)
            mx.eval(packed, scales)
            enc = _time(lambda: kernels.encode(x, bits), repeats)
            dec = _time(lambda: kernels.decode(packed, scales, bits), repeats)
            dec_rot = _time(lambda: kernels.dequantize_rotated(packed, scales, bits), repeats)
            if kernels.turboquant.fast_kernels() is not None:  # the plain-mx reference beside the GPU kernels
                kind = fast.backend()
                saved = fast._state[kind]
                fast._state[kind] = None
                enc_ref = _time(lambda: kernels.encode(x, bits), repeats)
                dec_ref = _time(lambda: kernels.dequantize_rotated(packed, scales, bits), repeats)
                fast._state[kind] = saved
                rows.append(dict(dim=dim, codec=f"turbo{bits}-ref", encode_vps=vectors / enc_ref, decode_vps=float("nan"),
                                 dequant_rotated_vps=vectors / dec_ref, bytes_per_vector=kernels.vector_nbytes(dim, bits)))
            rows.append(
                dict(
                    dim=dim,
                    codec=f"turbo{bits}",
                    encode_vps=vectors / enc,
                    decode_vps=vectors / dec,
                    dequant_rotated_vps=vectors / dec_rot,
                    bytes_per_vector=kernels.vector_nbytes(dim, bits),
                )
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args.vectors, args.repeats)
    if args.json:
        print(json.dumps({"device": str(mx.default_device()), "rows": rows}))
        return
    print(f"device {mx.default_device()}, fast path {fast.backend() if kernels.turboquant.fast_kernels() else 'none'}, "
          f"{args.vectors} vectors, best of {args.repeats}")
    print(f"{'dim':>4} {'codec':>10} {'encode vec/s':>14} {'decode vec/s':>14} {'rotated vec/s':>14} {'bytes/vec':>10}")
    for r in rows:
        rot = f"{r['dequant_rotated_vps']:14.3g}" if "dequant_rotated_vps" in r else f"{'-':>14}"
        print(f"{r['dim']:>4} {r['codec']:>10} {r['encode_vps']:14.3g} {r['decode_vps']:14.3g} {rot} {r['bytes_per_vector']:>10}")


if __name__ == "__main__":
    main()
