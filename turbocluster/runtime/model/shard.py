"""Run a contiguous layer range ``[start, end)`` of any mlx-lm model through the model's own code.

There is no per-architecture forward here. A shard is the ordinary mlx-lm
``Model`` whose decoder layer list holds only layers ``[start, end)``
(``restrict`` makes one in place, ``shard`` makes a view of a whole model).
To run it, the model's own ``__call__`` is called with its layer list
temporarily replaced by one of *global* length:

- held layers at their global index, wrapped so the first one takes the
  incoming hidden state (on a later shard) and the last one hands its output
  back (on an earlier shard);
- every other index holds a *skeleton*: the layer's plain attributes
  (``use_sliding``, ``is_linear``, ``layer_idx``, ...) without weights, which
  passes its input through;
- the cache list has the session's caches at the held indices and *ghost*
  caches (fresh ones of the type ``model.make_cache()`` gives, set to the
  session's offset) elsewhere.

So the model builds its masks as it always does (``create_attention_mask``,
windowed masks for sliding layers, ``create_ssm_mask`` for SSM layers, from
the cache of whichever global layer it picks), embeds and scales tokens on the
first shard, and applies its final norm, head, tied embeddings and logit
soft-capping on the last one. A model wrapped for images (``language_model``)
runs its text model. What cannot work this way is refused by
``splittable`` before any node loads (``UnsplittableModel``).
"""

import copy
import inspect
import logging
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

logger = logging.getLogger(__name__)

WRAPPERS = ("language_model",)  # multimodal Model -> its text model
INNER = ("model", "backbone", "transformer")  # text model -> the module owning the layer list
LAYERS = ("layers", "h")  # the decoder layer list's name inside it
EMBEDDINGS = ("embed_tokens",)  # removed from shards that neither embed nor use it as a tied head
FINAL_NORMS = ("norm",)  # removed from shards that are not last
HEADS = ("lm_head",)


# --- finding the parts -------------------------------------------------------------


def text_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a multimodal wrapper, or the model itself."""
    for name in WRAPPERS:
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return text_model(inner)
    return model


def _find(model):
    """``(text, inner, layers_name)`` or None when the model has no recognisable layer list."""
    text = text_model(model)
    for name in INNER:
        inner = getattr(text, name, None)
        if not isinstance(inner, nn.Module):
            continue
        for layers in LAYERS:
            if isinstance(inner.get(layers, None), list):
                return text, inner, layers
    return None


def parts(model: nn.Module):
    """``(text, inner, layers_name)``: the text model, the module its layers hang on, the list's name."""
    found = _find(model)
    if found is None:
        raise UnsplittableModel(
            f"{model_type(model)}: no decoder layer list found (looked for {'/'.join(INNER)}.{'/'.join(LAYERS)})",
            model_type(model),
        )
    return found


def held_layers(model: nn.Module) -> list:
    """The shard's own layers, also while a call has the global-length list in place (other threads ask)."""
    info = getattr(model, "_shard_info", None)
    held = getattr(info, "held", None)
    if held is not None:
        return held
    _, inner, name = parts(model)
    return inner[name]


def model_type(model) -> str:
    t = getattr(model, "model_type", None)
    if t is None and hasattr(model, "args"):
        t = getattr(model.args, "model_type", None)
    return t or type(model).__module__.rsplit(".", 1)[-1]


def layer_range(model: nn.Module) -> Tuple[int, int, int]:
    """``(start, end, total)`` of a shard; a plain mlx-lm model is the whole range."""
    n = len(held_layers(model))
    start, end = getattr(model, "layer_range", (0, n))
    total = getattr(model, "num_layers_total", n)
    if end - start != n:
        raise ValueError(f"shard says layers {start}:{end} but holds {n} layers")
    return start, end, total


def is_first(model) -> bool:
    return layer_range(model)[0] == 0


def is_last(model) -> bool:
    start, end, total = layer_range(model)
    return end == total


# --- refusal ----------------------------------------------------------------------

# Architectures whose layers read more than the hidden state that crosses a
# shard boundary. Each entry says why; the runner would give wrong tokens.
REFUSED = {
    "gemma3n": "every layer reads per-layer inputs computed from the token ids, and later layers reuse earlier layers' KV",
    "gemma4": "every layer reads per-layer inputs computed from the token ids, and later layers reuse earlier layers' KV",
    "gemma4_text": "every layer reads per-layer inputs computed from the token ids, and later layers reuse earlier layers' KV",
    "hunyuan": "cross-layer attention: a layer reuses the KV of the layer before it, which may sit on another node",
    "nemotron_h": "its caches are numbered per mixer (MLP layers take none), so a layer range does not name its caches",
}

# Architectures whose attention computes its scores from the cached keys itself
# instead of calling mlx-lm's scaled_dot_product_attention, so it cannot read a
# TurboQuant (packed) cache; they run with fp16 caches only.
OWN_ATTENTION = {
    "gemma2": "its attention soft-caps scores it computes itself from the cached keys",
    "olmo": "its attention computes scores itself from the cached keys",
    "stablelm": "its attention casts the cached keys to float32 itself",
    "phi3small": "its block-sparse attention computes scores itself",
    "deepseek_v3": "multi-head latent attention reads the cached latent keys itself",
}


def packed_cache_refusal(model: nn.Module) -> Optional[str]:
    """None, or why this model's attention cannot read a TurboQuant cache."""
    for kind in (model_type(model), model_type(text_model(model))):
        if kind in OWN_ATTENTION:
            return f"model type {kind!r} cannot use a TurboQuant cache: {OWN_ATTENTION[kind]}; use an fp16 cache"
    return None
REFUSED_CODE = "unsplittable-architecture"


class UnsplittableModel(ValueError):
    """An architecture the shard runner cannot split; ``code`` and ``model_type`` are for callers."""

    code = REFUSED_CODE

    def __init__(self, message: str, model_type: str):
        super().__init__(message)
        self.model_type = model_type


def _config_type(config: dict) -> str:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("model_type") or text.get("model_type") or "unknown"


def check_splittable(model_or_config) -> None:
    """Raise ``UnsplittableModel`` (naming the architecture and why) for a model the runner cannot split.

    Takes a loaded model, a ``config.json`` dict, or ``loader.describe``'s dict;
    config-level checks need no weights, so a plan can refuse before any node loads.
    """
    if isinstance(model_or_config, nn.Module):
        kind = model_type(model_or_config)
        inner_kind = model_type(text_model(model_or_config))
        for k in (kind, inner_kind):
            if k in REFUSED:
                raise UnsplittableModel(f"model type {k!r} cannot be split across nodes: {REFUSED[k]}", k)
        parts(model_or_config)
        total = layer_range(model_or_config)[2]
        slots = len(make_full_cache(model_or_config))
        if slots != total:
            raise UnsplittableModel(f"model type {kind!r}: make_cache gives {slots} caches for {total} layers", kind)
        params = inspect.signature(type(model_or_config).__call__).parameters
        if "cache" not in params:
            raise UnsplittableModel(f"model type {kind!r}: its __call__ takes no cache, so it cannot run in steps", kind)
        return
    config = dict(model_or_config or {})
    kind = _config_type(config)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for k in (kind, text.get("model_type")):
        if k in REFUSED:
            raise UnsplittableModel(f"model type {k!r} cannot be split across nodes: {REFUSED[k]}", k)
    if "num_layers" in config and config.get("num_layers", 1) < 1:
        raise UnsplittableModel(f"model type {kind!r} has no layers to split", kind)
    try:
        from mlx_lm.utils import _get_classes

        _get_classes({"model_type": kind, **config})
    except (ImportError, ValueError) as e:
        raise UnsplittableModel(f"model type {kind!r} is not an mlx-lm architecture: {e}", kind) from None


def splittable(model_or_config) -> Optional[str]:
    """None, or the reason ``check_splittable`` would give."""
    try:
        check_splittable(model_or_config)
    except UnsplittableModel as e:
        return str(e)
    return None


# --- skeletons, ghosts and the view --------------------------------------------------


def _strip(value):
    """``value`` with every array dropped and every module turned into a skeleton."""
    if isinstance(value, nn.Module):
        return Skeleton(value)
    if isinstance(value, mx.array):
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(v) for v in value)
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()}
    return value


class Skeleton:
    """A layer's plain attributes without its weights; calling it passes the hidden state through.

    The model's own loop reads such attributes (which mask, which cache kind)
    from every layer, held or not, so layers outside the shard keep them.
    """

    def __init__(self, module: nn.Module):
        for k, v in vars(module).items():
            if not isinstance(v, mx.array):
                object.__setattr__(self, k, _strip(v))
        for k, v in module.items():
            object.__setattr__(self, k, _strip(v))

    def __call__(self, x, *args, **kwargs):
        return x


class _Info:
    """What a shard keeps about the layers it does not hold (a plain object, not a module child)."""

    def __init__(self, skeletons, removed):
        self.skeletons = skeletons  # {global index: Skeleton}
        self.removed = removed  # names removed from the inner model (embedding, final norm)
        self.ghosts = None  # {global index: ghost cache}, built on first use
        self.held = None  # the held layers while a call has the global-length list in place


def _info(model) -> _Info:
    info = getattr(model, "_shard_info", None)
    if info is None:
        info = _Info({}, ())
        object.__setattr__(model, "_shard_info", info)
    return info


def _skeleton(model, i):
    """The skeleton of global layer ``i`` (made once; a held layer's from the layer itself)."""
    info = _info(model)
    sk = info.skeletons.get(i)
    if sk is None:
        start, end, _ = layer_range(model)
        held = held_layers(model)
        # a shard built without ``restrict`` (a GGUF llama) has no skeletons: its layers are alike
        sk = info.skeletons[i] = Skeleton(held[i - start] if start <= i < end else held[0])
    return sk


class _Zeros(nn.Module):
    """Stands in for a removed embedding: the shard's real input is injected at its first layer."""

    def __init__(self, dims, dtype):
        super().__init__()
        self._dims, self._dtype = dims, dtype

    def __call__(self, ids):
        if self._dims is None:
            raise ValueError("this shard has no embedding; it takes hidden states")
        return mx.zeros((*ids.shape, self._dims), self._dtype)


class _Identity(nn.Module):
    def __call__(self, x, *args, **kwargs):
        return x


class _Held:
    """A held layer in the model's loop: takes the injected input, hands back its output."""

    def __init__(self, layer, run, first, last):
        self._layer, self._run, self._first, self._last = layer, run, first, last

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __call__(self, x, *args, **kwargs):
        run = self._run
        if self._first and run.inject is not None:
            x = run.inject
        out = self._layer(x, *args, **kwargs)
        if run.overlap:
            mx.async_eval(out)
        if self._last:
            run.out = out
        return out


class _Const:
    """Skeleton for the head-only call: returns the given hidden state whatever it is passed."""

    def __init__(self, like, h):
        self._like, self._h = like, h

    def __getattr__(self, name):
        return getattr(self._like, name)

    def __call__(self, x, *args, **kwargs):
        return self._h


class _Run:
    def __init__(self, inject=None, overlap=False):
        self.inject, self.overlap, self.out = inject, overlap, None


def _full_layers(model, run=None):
    """The global-length layer list: held layers (wrapped for ``run``) among skeletons of the others."""
    start, end, total = layer_range(model)
    held = held_layers(model)
    out = []
    for i in range(total):
        if start <= i < end:
            out.append(_Held(held[i - start], run, i == start, i == end - 1) if run else held[i - start])
        else:
            out.append(_skeleton(model, i))
    return out


def _skeletons(model):
    """Skeletons only, for the calls that run no layer (embedding, head)."""
    return [_skeleton(model, i) for i in range(layer_range(model)[2])]


class _View:
    """Context: the model's layer list of global length and its removed parts stood in for."""

    def __init__(self, model, layers, like=None):
        self.model, self.layers, self.like = model, layers, like

    def __enter__(self):
        text, inner, name = parts(self.model)
        self.inner, self.name, self.saved = inner, name, inner[name]
        self.info = _info(self.model)
        self.outer = self.info.held is None
        if self.outer:
            self.info.held = self.saved
        self.added = []
        # what restrict (or the GGUF builder) removed; a stand-in for a name the model lacks is never called
        for attr in EMBEDDINGS + FINAL_NORMS:
            if attr in inner:
                continue
            if attr in EMBEDDINGS:
                like = self.like
                setattr(inner, attr, _Zeros(None if like is None else like.shape[-1], None if like is None else like.dtype))
            else:
                setattr(inner, attr, _Identity())
            self.added.append(attr)
        inner[name] = self.layers
        return self

    def __exit__(self, *exc):
        self.inner[self.name] = self.saved
        if self.outer:
            self.info.held = None
        for attr in self.added:
            delattr(self.inner, attr)
        return False


def make_full_cache(model: nn.Module) -> list:
    """Fresh caches for *every* global layer, of the types the model's ``make_cache`` gives."""
    with _View(model, _full_layers(model)):
        caches = make_prompt_cache(model)
    total = layer_range(model)[2]
    if len(caches) != total:
        kind = model_type(model)
        raise UnsplittableModel(f"model type {kind!r}: make_cache gives {len(caches)} caches for {total} layers", kind)
    return caches


def make_caches(model: nn.Module) -> list:
    """The held layers' caches as mlx-lm makes them (rotating for sliding layers, arrays for SSM layers)."""
    start, end, _ = layer_range(model)
    return make_full_cache(model)[start:end]


def sliding_windows(model: nn.Module) -> List[Optional[int]]:
    """Per held layer: the rotating cache's size, or None (full attention, or a fixed-size SSM state)."""
    return [getattr(c, "max_size", None) if type(c).__name__ == "RotatingKVCache" else None for c in make_caches(model)]


def _offset(caches):
    for c in caches or ():
        off = getattr(c, "offset", None)
        if isinstance(off, int):
            return off
    return 0


def _full_caches(model, caches):
    """The session's caches at the held indices, ghosts at the others (at the session's offset)."""
    start, end, total = layer_range(model)
    if caches is None:
        return None
    if len(caches) != end - start:
        raise ValueError(f"expected {end - start} caches for the held layers, got {len(caches)}")
    info = _info(model)
    if info.ghosts is None:
        full = make_full_cache(model)
        info.ghosts = {i: c for i, c in enumerate(full) if not start <= i < end}
    off = _offset(caches)
    for g in info.ghosts.values():
        if isinstance(getattr(g, "offset", None), int):
            g.offset = off
    return [caches[i - start] if start <= i < end else info.ghosts[i] for i in range(total)]


# --- running -------------------------------------------------------------------------


def _call(model, x, caches, want_logits, overlap, inject=None):
    start, end, total = layer_range(model)
    tokens = x.dtype in (mx.int32, mx.uint32, mx.int64) and inject is None
    if start != 0 and tokens:
        raise ValueError(f"token ids go to the first shard; this one starts at layer {start}")
    if not tokens and inject is None:
        inject = x
    ids = x if tokens else mx.zeros(inject.shape[:2], mx.int32)
    run = _Run(inject, overlap)
    full = _full_caches(model, caches)
    logits = want_logits and end == total
    with _View(model, _full_layers(model, run), None if tokens else inject) as view:
        if logits:
            return model(ids, cache=full)
        view.inner(ids, cache=full)
    out = run.out
    return out[0] if isinstance(out, tuple) else out


def forward(model: nn.Module, x: mx.array, caches, want_logits: bool = True, overlap: bool = False) -> mx.array:
    """One step through the shard: token ids ``[1, L]`` on the first shard, hidden states ``[1, L, H]`` elsewhere.

    Returns logits on the last shard when ``want_logits``, otherwise the hidden
    state after the shard's last layer. ``overlap=True`` starts evaluating each
    layer as soon as its graph is built, so building layer i+1 in Python
    overlaps computing layer i (what ``generate_step`` gets from ``async_eval``
    across steps, which a pipeline stage cannot do). Same ops, same results.
    """
    return _call(model, x, caches, want_logits, overlap)


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """Token ids to the first layer's input, as the model's own code makes it (scaling included)."""
    if not is_first(model):
        raise ValueError("only the first shard embeds tokens")
    seen = []

    class Probe(_Const):
        def __call__(self, x, *args, **kwargs):
            seen.append(x)
            return x

    layers = _skeletons(model)
    layers[0] = Probe(layers[0], None)
    with _View(model, layers) as view:
        view.inner(tokens, cache=None)
    return seen[0]


def run_layers(model: nn.Module, h: mx.array, caches, overlap: bool = False) -> mx.array:
    """The held layers on hidden state ``h`` (already embedded on the first shard), masks as the model makes them."""
    return _call(model, h, caches, False, overlap, inject=h)


def head(model: nn.Module, h: mx.array) -> mx.array:
    """The model's own final norm and head on ``h`` (tied embeddings, soft-capping, logit scales included)."""
    if not is_last(model):
        raise ValueError("only the last shard has the head")
    layers = _skeletons(model)
    layers[-1] = _Const(layers[-1], h)
    with _View(model, layers, h):
        return model(mx.zeros(h.shape[:2], mx.int32), cache=None)


# --- making shards -----------------------------------------------------------------------


def restrict(model: nn.Module, start: int, end: int) -> nn.Module:
    """Keep layers ``[start, end)`` of ``model`` in place; drop the embedding, norm and head a shard does not use.

    Skeletons of the other layers are kept (no weights) so the model's own loop still runs.
    """
    text, inner, name = parts(model)
    layers = inner[name]
    n = len(layers)
    if not 0 <= start < end <= n:
        raise ValueError(f"layer range {start}:{end} must satisfy 0 <= start < end <= {n}")
    info = _Info({i: Skeleton(l) for i, l in enumerate(layers) if not start <= i < end}, ())
    tied = not any(h in text for h in HEADS)
    inner[name] = layers[start:end]
    removed = []
    if start != 0 and not (end == n and tied):
        removed += [a for a in EMBEDDINGS if a in inner]
    if end != n:
        removed += [a for a in FINAL_NORMS if a in inner]
        for a in HEADS:
            if a in text:
                delattr(text, a)
    for a in removed:
        delattr(inner, a)
    info.removed = tuple(removed)
    object.__setattr__(model, "_shard_info", info)
    model.layer_range = (start, end)
    model.num_layers_total = n
    return model


def shard(model: nn.Module, start: int, end: int) -> nn.Module:
    """A view of a whole in-memory model holding layers ``[start, end)`` (shares weights; tests and benchmarks)."""
    _, inner, name = parts(model)
    n = len(inner[name])
    if not 0 <= start < end <= n:
        raise ValueError(f"layer range {start}:{end} must satisfy 0 <= start < end <= {n}")
    part = copy.copy(model)
    # copy the chain wrapper -> text model -> inner so the slice does not touch the original
    node = part
    for attr in WRAPPERS:
        if isinstance(getattr(node, attr, None), nn.Module):
            setattr(node, attr, copy.copy(getattr(node, attr)))
            node = getattr(node, attr)
    for attr in INNER:
        if getattr(node, attr, None) is inner:
            setattr(node, attr, copy.copy(inner))
            new_inner = getattr(node, attr)
            break
    layers = new_inner[name]
    object.__setattr__(part, "_shard_info", _Info({i: Skeleton(l) for i, l in enumerate(layers) if not start <= i < end}, ()))
    new_inner[name] = layers[start:end]
    part.layer_range = (start, end)
    part.num_layers_total = n
    return part
