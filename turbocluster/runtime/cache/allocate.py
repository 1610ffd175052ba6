"""Per-layer TurboQuant widths from a sensitivity measurement on a calibration text.

``measure`` runs one fp16 prefill of calibration tokens, records every layer's
queries, keys and values, and measures each layer's relative attention-output
error with only its keys (mean-subtracted when ``key_mean``) or only its values
encoded at each width. ``allocate`` then spends a bit budget greedily: every
layer starts at the smallest widths, and the upgrade (one key or value width
step on one layer) with the largest drop in summed squared error per bit is
taken while the average stays within the budget. The result is a
``CacheConfig.layer_bits`` tuple, so the allocation travels with the session.

Measure on a text that is not the one scored (the benchmark uses Apache-2.0,
scores GPL-3 and MPL-1.1).
"""

import logging
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from ...kernels import turboquant as tq
from . import attention

logger = logging.getLogger(__name__)

Sensitivity = List[Dict[str, Dict[int, float]]]  # per layer: {"k": {bits: err}, "v": {bits: err}}


def record(model, tokens) -> list:
    """(queries, keys, values, scale) of every attention call in one fp16 prefill of ``tokens``."""
    records, original = [], attention._original_sdpa

    def hook(queries, keys, values, cache, scale, mask, sinks=None):
        records.append((queries, keys, values, scale))
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    attention._original_sdpa = hook
    try:
        mx.eval(model(tokens[None], cache=mlx_cache.make_prompt_cache(model)))
    finally:
        attention._original_sdpa = original
    return records


def _attend(q, k, v, scale):
    """Causal attention of the last q.shape[2] positions, float32, numpy (MLX's CPU matmul is slow here)."""
    n_q, n_kv, L, T = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    q = q.reshape(q.shape[0], n_kv, -1, q.shape[3])  # [B, n_kv, n_rep * L, D]
    s = q @ k.swapaxes(-1, -2) * scale
    rows = np.tile(np.arange(T - L, T), n_q // n_kv)[:, None]
    s = np.where(rows >= np.arange(T)[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def measure(model, tokens, k_widths: Sequence[int] = (3, 4, 5, 6), v_widths: Sequence[int] = (2, 3, 4), key_mean=True,
            queries: int = 256) -> Sensitivity:
    """Per layer, the relative attention-output error of K-only and V-only encoding at each width.

    The error is taken over the last ``queries`` positions (attending to all of
    ``tokens``): the long-context rows that decode reads.
    """
    out = []
    np_ = lambda a: np.asarray(a.astype(mx.float32))
    for q, k, v, scale in record(model, tokens):
        qn, kn, vn = np_(q[..., -queries:, :]), np_(k), np_(v)
        ref = _attend(qn, kn, vn, scale)
        err = lambda o: float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        mean = k.mean(axis=2, keepdims=True) if key_mean else mx.zeros_like(k[..., :1, :])
        ke = {b: err(_attend(qn, np_(tq.decode(*tq.encode(k - mean, b), b) + mean), vn, scale)) for b in k_widths}
        ve = {b: err(_attend(qn, kn, np_(tq.decode(*tq.encode(v, b), b)), scale)) for b in v_widths}
        out.append({"k": ke, "v": ve})
    return out


def pair_bits(head_dim: int, k_bits: int, v_bits: int) -> float:
    """Stored bits per K or V coordinate of one position (scales included)."""
    return 8 * (tq.vector_nbytes(head_dim, k_bits) + tq.vector_nbytes(head_dim, v_bits)) / (2 * head_dim)


def allocate(sens: Sensitivity, budget_bits: float, head_dim: int, first_layer: int = 0) -> Tuple[Tuple[int, int, int], ...]:
    """``(layer, k_bits, v_bits)`` per layer, averaging at most ``budget_bits`` (``pair_bits``)."""
    widths = [(sorted(s["k"]), sorted(s["v"])) for s in sens]
    choice = [[0, 0] for _ in sens]  # index into each layer's sorted widths
    bits = lambda i: pair_bits(head_dim, widths[i][0][choice[i][0]], widths[i][1][choice[i][1]])
    spent = sum(bits(i) for i in range(len(sens)))
    limit = budget_bits * len(sens)
    if spent > limit + 1e-9:
        raise ValueError(f"the smallest widths already take {spent / len(sens):.3f} bits, over the budget {budget_bits}")
    while True:
        best = None
        for i, s in enumerate(sens):
            for side, j in (("k", 0), ("v", 1)):
                c = choice[i][j]
                if c + 1 >= len(widths[i][j]):
                    continue
                w0, w1 = widths[i][j][c], widths[i][j][c + 1]
                before = bits(i)
                choice[i][j] += 1
                cost = bits(i) - before
                choice[i][j] -= 1
                if spent + cost > limit + 1e-9:
                    continue
                gain = (s[side][w0] ** 2 - s[side][w1] ** 2) / cost
                if best is None or gain > best[0]:
                    best = (gain, i, j, cost)
        if best is None or best[0] <= 0:
            break
        _, i, j, cost = best
        choice[i][j] += 1
        spent += cost
    out = tuple((first_layer + i, widths[i][0][c[0]], widths[i][1][c[1]]) for i, c in enumerate(choice))
    logger.debug("allocated %.3f bits per coordinate over %d layers", spent / len(sens), len(sens))
    return out
