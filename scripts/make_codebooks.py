"""Compute the Lloyd-Max quantizers of N(0, 1) that the TurboQuant format uses.

Prints the centroid tables pasted into ``turbocluster/kernels/turboquant.py``.
Lloyd's iteration: boundaries are midpoints of neighbouring centroids and each
centroid is the conditional mean of N(0, 1) over its cell, run in float64 until
nothing moves.
"""

import math
import sys


def pdf(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def lloyd_max(bits, iters=200000, tol=1e-15):
    n = 1 << bits
    # Start from equal-probability cell means.
    c = [math.sqrt(2) * _erfinv(2 * (i + 0.5) / n - 1) for i in range(n)]
    for _ in range(iters):
        b = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
        new = [(pdf(b[i]) - pdf(b[i + 1])) / (cdf(b[i + 1]) - cdf(b[i])) for i in range(n)]
        delta = max(abs(x - y) for x, y in zip(new, c))
        c = new
        if delta < tol:
            break
    return c


def mse(c):
    n = len(c)
    b = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
    total = 0.0
    for i in range(n):
        lo, hi = b[i], b[i + 1]
        p = cdf(hi) - cdf(lo)
        # E[x^2; cell] = p + lo*pdf(lo) - hi*pdf(hi); E[x; cell] = pdf(lo) - pdf(hi)
        ex2 = p + (lo * pdf(lo) if math.isfinite(lo) else 0) - (hi * pdf(hi) if math.isfinite(hi) else 0)
        ex = pdf(lo) - pdf(hi)
        total += ex2 - 2 * c[i] * ex + c[i] ** 2 * p
    return total


def _erfinv(y):
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.erf(mid) < y:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


if __name__ == "__main__":
    for bits in range(1, 9):
        c = lloyd_max(bits)
        half = c[len(c) // 2 :]
        print(f"# {bits}-bit: mse/dim {mse(c):.9g}", file=sys.stderr)
        print(f"    {bits}: (" + ", ".join(f"{v:.17g}" for v in half) + ("," if len(half) == 1 else "") + "),")
