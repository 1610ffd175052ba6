"""The TurboQuant codec: codebooks, packing, rotation, error figures and bad input."""

import math
import re
from pathlib import Path

import mlx.core as mx
import pytest

from turbocluster import kernels
from turbocluster.kernels import turboquant as tq

LLOYD_MAX_MSE = {2: 0.117482, 3: 0.0345478, 4: 0.00950101}
DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def _pdf(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _cells(bits):
    return [-math.inf, *tq.boundaries(bits), math.inf]


def _cell_mse(bits):
    b, c, total = _cells(bits), tq.centroids(bits), 0.0
    for i, ci in enumerate(c):
        lo, hi = b[i], b[i + 1]
        p = _cdf(hi) - _cdf(lo)
        ex = _pdf(lo) - _pdf(hi)
        ex2 = p + (lo * _pdf(lo) if math.isfinite(lo) else 0) - (hi * _pdf(hi) if math.isfinite(hi) else 0)
        total += ex2 - 2 * ci * ex + ci * ci * p
    return total


@pytest.mark.parametrize("bits", tq.SUPPORTED_BITS)
def test_codebook_centroids_are_conditional_means_of_their_cells(bits):
    b, c = _cells(bits), tq.centroids(bits)
    assert len(c) == 2**bits and list(c) == sorted(c)
    for i, ci in enumerate(c):
        mean = (_pdf(b[i]) - _pdf(b[i + 1])) / (_cdf(b[i + 1]) - _cdf(b[i]))
        assert abs(mean - ci) < 1e-9, (bits, i, mean, ci)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_mse_matches_lloyd_max_figures(bits):
    assert _cell_mse(bits) == pytest.approx(LLOYD_MAX_MSE[bits], abs=1e-6)


def _python_pack(indices, bits):
    """Pack one vector exactly as docs/format.md describes: a little-endian bit stream."""
    stream = 0
    for i, v in enumerate(indices):
        stream |= v << (i * bits)
    words = -(-len(indices) * bits // 32)
    return [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(words)]


@pytest.mark.parametrize("bits", tq.SUPPORTED_BITS)
@pytest.mark.parametrize("lead,dim", [((), 64), ((3,), 16), ((2, 5), 80), ((1, 3, 7), 96), ((4,), 256)])
def test_pack_unpack_is_identity_and_matches_the_documented_layout(bits, lead, dim):
    idx = mx.random.randint(0, 2**bits, (*lead, dim)).astype(mx.uint32)
    packed = tq.pack(idx, bits)
    assert packed.dtype == mx.uint32
    assert packed.shape == (*lead, tq.packed_words(dim, bits))
    assert mx.array_equal(tq.unpack(packed, bits, dim), idx)
    flat_idx = idx.reshape(-1, dim).tolist()
    flat_packed = packed.reshape(-1, packed.shape[-1]).tolist()
    for row_idx, row_packed in zip(flat_idx, flat_packed):
        assert row_packed == _python_pack(row_idx, bits)


def test_three_bit_packs_32_indices_into_3_words_with_no_waste():
    idx = mx.array([7] * 32, dtype=mx.uint32)
    assert tq.pack(idx, 3).tolist() == [0xFFFFFFFF] * 3
    idx = mx.array([0] * 10 + [7] + [0] * 21, dtype=mx.uint32)  # index 10 straddles words 0 and 1
    assert tq.pack(idx, 3).tolist() == [0xC0000000, 0x1, 0x0]


def test_rotation_is_the_documented_signed_hadamard_and_orthonormal():
    dim = 64
    signs = tq.sign_list(dim)
    h = [[(-1) ** bin(r & c).count("1") / math.sqrt(dim) for c in range(dim)] for r in range(dim)]
    x = mx.random.normal((5, dim))
    expected = mx.array([[sum(h[r][c] * signs[c] * v[c] for c in range(dim)) for r in range(dim)] for v in x.tolist()])
    assert mx.allclose(kernels.rotate(x), expected, atol=1e-5)
    assert mx.allclose(kernels.unrotate(kernels.rotate(x)), x, atol=1e-5)
    q = mx.random.normal((5, dim))
    assert mx.allclose((kernels.rotate(q) * kernels.rotate(x)).sum(-1), (q * x).sum(-1), atol=1e-4)


def test_non_power_of_two_dims_rotate_blockwise():
    assert tq.rotation_blocks(80) == (64, 16)
    assert tq.rotation_blocks(96) == (64, 32)
    x = mx.random.normal((3, 80))
    y = kernels.rotate(x)
    assert mx.allclose(kernels.unrotate(y), x, atol=1e-5)
    assert mx.allclose((y * y).sum(-1), (x * x).sum(-1), rtol=1e-5)


def test_sign_vector_matches_the_mask_written_in_the_docs():
    match = re.search(r"sign-mask-256: (.+)", DOC.read_text())
    masks = [int(w, 16) for w in match.group(1).split()]
    documented = [-1.0 if masks[i // 64] >> (i % 64) & 1 else 1.0 for i in range(256)]
    assert list(tq.sign_list(256)) == documented
    assert tq.sign_list(64) == tq.sign_list(256)[:64]


def _relative_error(x, bits, scale_mode=tq.DEFAULT_SCALE_MODE):
    packed, scales = kernels.encode(x, bits, scale_mode=scale_mode)
    xh = kernels.decode(packed, scales, bits)
    x = x.astype(mx.float32)
    return (((x - xh) ** 2).sum(-1) / (x**2).sum(-1)).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gaussian_error_matches_lloyd_max_within_two_percent(bits):
    mx.random.seed(bits)
    x = mx.random.normal((8192, 256))
    errors = {mode: _relative_error(x, bits, mode) for mode in tq.SCALE_MODES}
    assert errors["norm"] == pytest.approx(LLOYD_MAX_MSE[bits], rel=0.02)
    # The default (least squares) is never worse than the other scale rules.
    assert errors[tq.DEFAULT_SCALE_MODE] <= min(errors.values()) + 1e-6
    assert errors[tq.DEFAULT_SCALE_MODE] <= LLOYD_MAX_MSE[bits]


def _hard_inputs(dim):
    mx.random.seed(7)
    n = 4096
    # Student-t with 3 degrees of freedom in every coordinate.
    heavy = mx.random.normal((n, dim)) / mx.sqrt((mx.random.normal((n, dim, 3)) ** 2).sum(-1) / 3)
    outlier = mx.random.normal((n, dim)) * mx.where(mx.arange(dim) % 17 == 3, 40.0, 1.0) + mx.where(
        mx.arange(dim) == 5, 25.0, 0.0
    )
    scaled = mx.random.normal((n, dim)) * mx.power(10.0, mx.random.uniform(-3, 3, (n, 1)))
    return {"heavy-tailed": heavy, "outlier-channels": outlier, "wildly-scaled": scaled}


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_on_hard_inputs_stays_at_or_below_lloyd_max(dim, bits):
    for name, x in _hard_inputs(dim).items():
        err = _relative_error(x, bits)
        assert err <= LLOYD_MAX_MSE[bits] * 1.02, (name, err)


def test_rotation_is_what_tames_outlier_channels():
    x = _hard_inputs(64)["outlier-channels"]
    # Quantize without the rotation (same codebook and scale rule): far worse.
    norm = mx.sqrt((x * x).sum(-1, keepdims=True))
    u = x * 8 / norm
    c = mx.take(mx.array(tq.centroids(3)), tq.quantize(u, 3))
    scale = (u * c).sum(-1, keepdims=True) / (c * c).sum(-1, keepdims=True) * norm / 8
    unrotated = (((x - scale * c) ** 2).sum(-1) / (x * x).sum(-1)).mean().item()
    assert unrotated > 2 * _relative_error(x, 3)


@pytest.mark.parametrize("bits", [3, 4])
def test_inner_products_are_within_the_expected_error(bits):
    mx.random.seed(11)
    dim = 128
    k = mx.random.normal((4096, dim))
    q = mx.random.normal((4096, dim))
    packed, scales = kernels.encode(k, bits)
    kh = kernels.decode(packed, scales, bits)
    err = (q * kh).sum(-1) - (q * k).sum(-1)
    # Each coordinate of the error carries ~MSE*||k||^2/D variance; <q, e> has ~MSE*||q||^2||k||^2/D.
    expected_sd = math.sqrt(LLOYD_MAX_MSE[bits] * dim)
    assert abs(err.mean().item()) < 4 * expected_sd / math.sqrt(4096)
    assert mx.sqrt((err**2).mean()).item() < 1.1 * expected_sd
    # The same inner products computed in the rotated space (how attention does it).
    scores = (kernels.rotate(q) * kernels.dequantize_rotated(packed, scales, bits)).sum(-1)
    assert mx.allclose(scores, (q * kh).sum(-1), atol=1e-3)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_encode_accepts_float_dtypes_and_any_leading_shape(dtype):
    x = mx.random.normal((2, 3, 5, 64)).astype(dtype)
    packed, scales = kernels.encode(x, 4)
    assert packed.shape == (2, 3, 5, 8) and packed.dtype == mx.uint32
    assert scales.shape == (2, 3, 5, 1) and scales.dtype == mx.float16
    assert kernels.decode(packed, scales, 4).shape == x.shape


def test_zero_vector_encodes_to_zero():
    packed, scales = kernels.encode(mx.zeros((2, 64)), 3)
    assert mx.array_equal(kernels.decode(packed, scales, 3), mx.zeros((2, 64)))


def test_three_bit_head_dim_64_takes_26_bytes():
    packed, scales = kernels.encode(mx.random.normal((10, 64)), 3)
    per_vector = (packed.nbytes + scales.nbytes) / 10
    assert per_vector == 26 == kernels.vector_nbytes(64, 3)
    assert 64 * 2 / per_vector == pytest.approx(4.92, abs=0.005)


def test_large_inputs_are_encoded_in_chunks_with_the_same_result(monkeypatch):
    x = mx.random.normal((3000, 64))
    whole = kernels.encode(x, 3)
    monkeypatch.setattr(tq, "CHUNK_VECTORS", 1000)
    chunked = kernels.encode(x, 3)
    assert mx.array_equal(whole[0], chunked[0]) and mx.array_equal(whole[1], chunked[1])
    assert mx.array_equal(kernels.decode(*whole, 3), kernels.decode(*chunked, 3))


def _doc_decoder(words, scale, bits, dim):
    """A decoder written from docs/format.md alone, in plain Python."""
    stream = sum(w << (32 * k) for k, w in enumerate(words))
    idx = [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(dim)]
    table = re.search(rf"^\| {bits} \| (.+) \|$", DOC.read_text(), re.M).group(1)
    half = [float(v) for v in table.split(",")]
    codebook = [-v for v in reversed(half)] + half
    y = [scale * codebook[i] for i in idx]
    masks = [int(w, 16) for w in re.search(r"sign-mask-256: (.+)", DOC.read_text()).group(1).split()]
    signs = [-1.0 if masks[i // 64] >> (i % 64) & 1 else 1.0 for i in range(dim)]
    h = [[(-1) ** bin(r & c).count("1") / math.sqrt(dim) for c in range(dim)] for r in range(dim)]
    return [signs[r] * sum(h[r][c] * y[c] for c in range(dim)) for r in range(dim)]


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_a_decoder_written_from_the_docs_agrees(bits):
    x = mx.random.normal((3, 64))
    packed, scales = kernels.encode(x, bits)
    ours = kernels.decode(packed, scales, bits).tolist()
    for row in range(3):
        theirs = _doc_decoder(packed[row].tolist(), scales[row, 0].item(), bits, 64)
        assert max(abs(a - b) for a, b in zip(ours[row], theirs)) < 1e-4


def test_bad_inputs_raise_clear_errors():
    x = mx.random.normal((4, 64))
    with pytest.raises(ValueError, match="bits must be one of"):
        kernels.encode(x, 9)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels.encode(x.astype(mx.int32), 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.encode(mx.random.normal((4, 72)), 4)
    with pytest.raises(TypeError, match="mx.array"):
        kernels.encode([[1.0] * 64], 4)
    packed, scales = kernels.encode(x, 4)
    with pytest.raises(ValueError, match="scales must have shape"):
        kernels.decode(packed, scales[:2], 4)
    with pytest.raises(ValueError, match="must be uint32"):
        kernels.decode(packed.astype(mx.int32), scales, 4)
    with pytest.raises(ValueError, match="must be float16"):
        kernels.decode(packed, scales.astype(mx.float32), 4)
    with pytest.raises(ValueError, match="match no head dim"):
        kernels.decode(packed[:, :7], scales, 4)
    with pytest.raises(ValueError, match="needs 8 words"):
        kernels.decode(packed[:, :6], scales, 4, dim=64)
    with pytest.raises(ValueError, match="scale_mode"):
        kernels.encode(x, 4, scale_mode="max")
