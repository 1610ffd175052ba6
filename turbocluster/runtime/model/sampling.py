"""Turning the last position's logits into a token, through mlx-lm's own samplers and logits processors.

The node keeps one random key per session (so interleaved sessions, replays and
migrations stay reproducible) and lends it to mlx-lm's sampler as the global
random state (``mx.random.seed`` of the key's two words) for the one call; with the same seed, params and logits the tokens
are those of ``mlx_lm.sample_utils.make_sampler`` after ``mx.random.seed(seed)``.
"""

import logging
import math
from functools import lru_cache
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 20  # mlx-lm's default look-back of the penalties
MAX_CONTEXT = 1 << 16
# name -> default; the session's sampling dict holds exactly these keys
FIELDS = {
    "temperature": 0.0,
    "top_p": 0.0,
    "top_k": 0,
    "min_p": 0.0,
    "min_tokens_to_keep": 1,
    "repetition_penalty": 0.0,
    "repetition_context_size": DEFAULT_CONTEXT,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "penalty_context_size": DEFAULT_CONTEXT,
}


class SamplingError(ValueError):
    """Sampling parameters a node refuses (answered INVALID_ARGUMENT); the message names the field."""


def check(params: Optional[dict]) -> dict:
    """``params`` completed with defaults and checked; raises SamplingError naming the bad field."""
    params = dict(params or {})
    unknown = set(params) - set(FIELDS) - {"seed"}
    if unknown:
        raise SamplingError(f"sampling: unknown fields {sorted(unknown)}")
    out = {}
    for name, default in FIELDS.items():
        v = params.get(name, default)
        if isinstance(default, int) and not isinstance(default, bool):
            if type(v) is not int or not 0 <= v <= MAX_CONTEXT:
                raise SamplingError(f"sampling.{name} must be an int in 0..{MAX_CONTEXT}, got {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise SamplingError(f"sampling.{name} must be a finite number, got {v!r}")
        out[name] = v if isinstance(default, int) else float(v)
    if out["temperature"] < 0:
        raise SamplingError(f"sampling.temperature must be >= 0, got {out['temperature']}")
    for name in ("top_p", "min_p"):
        if not 0 <= out[name] <= 1:
            raise SamplingError(f"sampling.{name} must be in [0, 1], got {out[name]}")
    if out["repetition_penalty"] < 0:
        raise SamplingError(f"sampling.repetition_penalty must be >= 0 (0 = off), got {out['repetition_penalty']}")
    for name in ("min_tokens_to_keep", "repetition_context_size", "penalty_context_size"):
        out[name] = out[name] or FIELDS[name]  # 0 in the proto = mlx-lm's default
    return out


def from_proto(s) -> dict:
    """The checked sampling dict of a ``pb.Sampling`` message (seed not included: it seeds the key)."""
    return check({name: getattr(s, name) for name in FIELDS})


def history_size(params: dict) -> int:
    """Tokens of context the logits processors look at; 0 when there are none."""
    n = 0
    if params.get("repetition_penalty"):
        n = max(n, params.get("repetition_context_size") or DEFAULT_CONTEXT)
    if params.get("presence_penalty") or params.get("frequency_penalty"):
        n = max(n, params.get("penalty_context_size") or DEFAULT_CONTEXT)
    return n


@lru_cache(maxsize=64)
def _build(key: tuple):
    p = dict(key)
    sampler = make_sampler(
        temp=p["temperature"], top_p=p["top_p"], min_p=p["min_p"], min_tokens_to_keep=p["min_tokens_to_keep"], top_k=p["top_k"]
    )
    processors = make_logits_processors(
        repetition_penalty=p["repetition_penalty"] or None,
        repetition_context_size=p["repetition_context_size"],
        presence_penalty=p["presence_penalty"] or None,
        presence_context_size=p["penalty_context_size"],
        frequency_penalty=p["frequency_penalty"] or None,
        frequency_context_size=p["penalty_context_size"],
    )
    return sampler, processors


def make(params: dict):
    """``(sampler, logits_processors)`` from mlx-lm for a checked sampling dict (cached per setting)."""
    return _build(tuple((k, params.get(k, d)) for k, d in FIELDS.items()))


def sample(logits: mx.array, params: dict, key: Optional[mx.array], history: Sequence[int] = ()):
    """``(token, next_key)`` for logits of shape [1, vocab], as mlx_lm.generate_step samples them.

    ``key`` is the session's random key: it stands in for mlx's global random
    state during the sampler call and its successor is returned.
    """
    sampler, processors = make(params)
    if processors and len(history):
        tokens = mx.array(list(history), dtype=mx.int32)
        for proc in processors:
            logits = proc(tokens, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if not params.get("temperature") or key is None:
        return int(sampler(logprobs).item()), key
    saved = mx.random.state[0]
    _set_state(key)
    try:
        token = sampler(logprobs)
        after = mx.random.state[0]
        mx.eval(token, after)
        return int(token.item()), after
    finally:
        _set_state(saved)


def _set_state(key: mx.array) -> None:
    """Make ``key`` mlx's global random state: ``mx.random.seed(s)`` sets the key ``[s >> 32, s & 0xffffffff]``."""
    hi, lo = (int(x) for x in key.tolist())
    mx.random.seed((hi << 32) | lo)
