"""Build an mlx-lm llama ``Model`` and tokenizer from a GGUF file.

``mx.load`` already turns GGUF Q4_0/Q4_1/Q8_0 tensors into MLX affine
quantized triples (``weight``, ``scales``, ``biases``, group size 32), so this
module only maps names, undoes llama.cpp's Q/K row permutation, picks dtypes
and builds the tokenizer from the metadata.
"""

import re

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

GROUP_SIZE = 32  # MLX's GGUF reader always uses groups of 32

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"(\w+)\.(weight|scales|biases|bias)$")

# SmolLM2 / GPT-2 style: split every digit, then the byte-level GPT-2 regex.
_PRE_TOKENIZERS = {"smollm", "gpt2", "starcoder", "refact", "default"}

_CONTROL = 3  # llama.cpp token type for special tokens such as <|im_end|>
_USER_DEFINED = 4


def read(path):
    """Return ``(tensors, metadata)`` of a GGUF file, metadata as Python values."""
    tensors, meta = mx.load(str(path), return_metadata=True)
    meta = {k: v.item() if isinstance(v, mx.array) and v.ndim == 0 else v for k, v in meta.items()}
    return tensors, meta


def model_args(meta):
    """mlx-lm llama ``ModelArgs`` from GGUF metadata (llama architecture only)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture must be 'llama', found {arch!r}")
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads))
    vocab = meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=meta["llama.block_count"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        vocab_size=vocab,
        max_position_embeddings=meta.get("llama.context_length"),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        # The rows are un-permuted below, so HF's half-split RoPE is the right one.
        rope_traditional=False,
        tie_word_embeddings=False,  # set by the caller from the tensor list
    )


def _unpermute(w, n_heads):
    """Undo llama.cpp's ``permute`` of Q/K rows (HF half-split -> interleaved pairs).

    convert_hf_to_gguf.py does ``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)``
    so that llama.cpp can use interleaved ("traditional") RoPE. We restore HF's
    row order instead of switching to traditional RoPE: both give the same
    attention scores, but only this one leaves the KV cache (and anything that
    rotates or quantizes it per head dimension) laid out exactly as the HF /
    mlx-lm safetensors model, so caches and logits compare one to one across
    formats. Rows stay whole, so weight, scales and biases permute alike.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_name(gguf_name):
    """Map a GGUF tensor name to ``(mlx-lm name, layer index or None)``."""
    if m := _BLOCK.match(gguf_name):
        layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if part not in _LAYER_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}; expected one of {sorted(_LAYER_NAMES)}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}", layer
    m = _TOP.match(gguf_name)
    if m is None or m.group(1) not in _TOP_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}; expected one of {sorted(_TOP_NAMES)} or blk.N.*")
    return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}", None


def runtime_dtype(dtype, float32):
    """The dtype a loaded floating tensor is kept in (integers are left alone)."""
    if float32 and mx.issubdtype(dtype, mx.floating):
        return mx.float32
    return dtype


def weights_for(tensors, meta, start, end, float32):
    """mlx-lm weights for layers ``start:end``, renumbered from 0, in runtime dtypes.

    Tensors of other layers (and the embedding, norm and head when the shard
    does not use them) are dropped here, before anything is evaluated.
    """
    n = meta["llama.block_count"]
    tied = "output.weight" not in tensors
    need_embed = start == 0 or (end == n and tied)
    heads = {"q_proj": meta["llama.attention.head_count"]}
    heads["k_proj"] = meta.get("llama.attention.head_count_kv", heads["q_proj"])
    out = {}
    for name in list(tensors):
        w = tensors.pop(name)
        if name == "rope_freqs.weight":
            raise ValueError("GGUF rope_freqs (llama 3 rope scaling) is not supported")
        key, layer = mlx_name(name)
        if layer is not None:
            if not start <= layer < end:
                continue
            key = key.replace(f"layers.{layer}.", f"layers.{layer - start}.", 1)
            proj = key.split(".")[-2]
            if proj in heads:
                w = _unpermute(w, heads[proj])
        elif key.startswith("model.embed_tokens") and not need_embed:
            continue
        elif (key.startswith("model.norm") or key.startswith("lm_head")) and end != n:
            continue
        out[key] = w.astype(runtime_dtype(w.dtype, float32))
    return out


def quant_params(weights, path):
    """``{"group_size", "bits"}`` for a quantized module, or False."""
    if f"{path}.scales" not in weights:
        return False
    w, s = weights[f"{path}.weight"], weights[f"{path}.scales"]
    in_dims = s.shape[-1] * GROUP_SIZE
    return {"group_size": GROUP_SIZE, "bits": w.shape[-1] * 32 // in_dims}


def build_model(tensors, meta, start, end, float32):
    """The llama ``Model`` holding layers ``start:end`` with weights loaded and evaluated.

    Layers outside the range are sliced off before any weight is created; the
    embedding is removed unless the shard embeds tokens (start == 0) or needs
    it as the tied head; the final norm and head are removed unless end == n.
    """
    args = model_args(meta)
    args.tie_word_embeddings = "output.weight" not in tensors
    n = args.num_hidden_layers
    weights = weights_for(tensors, meta, start, end, float32)
    model = llama.Model(args)
    inner = model.model
    inner.layers = inner.layers[start:end]
    if "model.embed_tokens.weight" not in weights:
        del inner.embed_tokens
    if end != n:
        del inner.norm
        if not args.tie_word_embeddings:
            del model.lm_head
    nn.quantize(model, class_predicate=lambda p, m: hasattr(m, "to_quantized") and quant_params(weights, p))
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def tokenizer(meta):
    """mlx-lm ``TokenizerWrapper`` around a byte-level BPE built from the metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer must be gpt2 BPE with a pre-tokenizer in {sorted(_PRE_TOKENIZERS)}, found {kind!r}/{pre!r}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    bpe.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    bpe.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(fast, BPEStreamingDetokenizer, eos_token_ids=[meta["tokenizer.ggml.eos_token_id"]])
