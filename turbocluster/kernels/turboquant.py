"""The packed TurboQuant format: codebooks, rotation, bit packing, encode and decode.

This module is the single owner of the format (``docs/format.md`` says the same
in words); the KV cache, the wire and any fast kernel import it. Everything
here is plain ``mx`` ops, so it runs on every MLX device and is the reference
that fast paths must match bit for bit.

A vector x of head dim D is stored as
  * ``packed``: uint32[ceil(D * bits / 32)], the codebook index of every
    rotated, normalised coordinate, bit-packed little-endian, and
  * ``scale``: float16[1], so that the rotated vector is ``scale * centroid[idx]``.
"""

import functools
import math

import mlx.core as mx

from . import fast

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_MODES = ("norm", "length", "lsq")
DEFAULT_SCALE_MODE = "lsq"
MIN_BLOCK = 16  # smallest Walsh-Hadamard block; head dims must be multiples of it
SIGN_SEED = 0x5475726230517561  # "TurboQua" as ASCII, the SplitMix64 seed of the sign vector
INPUT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
CHUNK_VECTORS = 1 << 16  # vectors per compiled call; bounds transient memory

# Positive half of the Lloyd-Max quantizer of N(0, 1) for each bit width
# (the codebook is symmetric). Made by scripts/make_codebooks.py.
_HALF_CENTROIDS = {
    2: (0.45278003463649125, 1.5104176084990943),
    3: (0.24509417894422139, 0.75600528120587673, 1.3439092785049982, 2.1519457045369887),
    4: (0.12839502985114584, 0.38804829949029002, 0.6567591185324636, 0.94234045648696119, 1.2562311973471747, 1.6180463860218823, 2.0690172265313858, 2.7325895709951764),
    5: (0.065889659770823519, 0.1980518296694353, 0.33137830576011507, 0.46669952297668366, 0.60493362400943718, 0.74713570368782023, 0.89456511738837996, 1.048783319923202, 1.2118043806092678, 1.3863403395866329, 1.5762280786121867, 1.7872332177032741, 2.0287283993955048, 2.3177394041947283, 2.6911195773766163, 3.2607324934015427),
    6: (0.033409506370096063, 0.10027828930388664, 0.16729690336899689, 0.23456698533601017, 0.30219284637170002, 0.37028264525894278, 0.43894967165863968, 0.50831378089800028, 0.57850303051880803, 0.64965558106354571, 0.72192194056968184, 0.79546765584086154, 0.87047658654412308, 0.94715494474329409, 1.025736349077341, 1.1064882395373294, 1.1897201418608701, 1.2757944864337512, 1.3651410198102059, 1.4582763746978065, 1.5558312247051214, 1.6585889004238545, 1.7675418829911653, 1.8839772405224398, 2.0096110425936682, 2.1468102170558252, 2.2989812097603672, 2.4713047976181843, 2.6722738352552442, 2.9174067907230206, 3.2404370550118364, 3.7441012708952353),
    7: (0.016828169457247077, 0.05049086396323775, 0.08417264205884431, 0.11788628230311897, 0.15164464790980114, 0.18546072142566275, 0.21934764023849468, 0.25331873317011716, 0.28738755842464703, 0.32156794318062021, 0.35587402513819255, 0.39032029636006516, 0.4249216497777053, 0.45969342877355013, 0.49465148029589123, 0.52981221201787598, 0.56519265411636199, 0.6008105263218062, 0.63668431097968592, 0.67283333296957115, 0.7092778474519672, 0.74603913656114296, 0.78313961633746143, 0.82060295540168737, 0.85845420712457587, 0.89671995734493704, 0.93542849005214812, 0.97460997388747017, 1.014296672852389, 1.0545231852639234, 1.0953267157982338, 1.1367473864538766, 1.178828593494228, 1.2216174189677267, 1.2651651073356136, 1.3095276201894221, 1.354766285165286, 1.4009485591850719, 1.4481489313717864, 1.4964499978133032, 1.5459437493732808, 1.5967331257919848, 1.6489339055839609, 1.7026770234583024, 1.7581114377452709, 1.8154077134956994, 1.8747625484930455, 1.9364045587160552, 2.0006017717387437, 2.0676714756108265, 2.1379933780431775, 2.2120275175252107, 2.2903391620213753, 2.3736342698394801, 2.4628114331297475, 2.559040521520243, 2.6638865386309885, 2.7795142579809888, 2.9090470736096368, 3.0572461506082012, 3.2319332042663254, 3.4474302711033005, 3.7349366443632959, 4.1896941567381987),
    8: (0.008446193222763184, 0.025339383099353283, 0.042234983804254965, 0.05913460434086832, 0.076039856392549204, 0.092952355401244996, 0.10987372165233783, 0.12680558136812201, 0.14374956781155782, 0.1607073224022427, 0.17768049584675691, 0.1946707492853455, 0.21167975545689366, 0.2287091998847692, 0.24576078208520163, 0.26283621680104274, 0.27993723526293018, 0.29706558648063874, 0.31422303856681799, 0.3314113800964083, 0.34863242150400087, 0.36588799652253962, 0.38317996366620688, 0.40051020776106433, 0.41788064152663745, 0.43529320721233328, 0.45274987829248159, 0.47025266122408282, 0.48780359727175021, 0.50540476440419946, 0.52305827926758208, 0.54076629924064235, 0.55853102457720627, 0.57635470064236838, 0.59423962024821508, 0.61218812609635032, 0.63020261333425909, 0.64828553223330188, 0.66643939099708793, 0.68466675870858207, 0.70297026842650157, 0.72135262044051751, 0.73981658569730568, 0.7583650094090838, 0.77700081485783723, 0.79572700740955771, 0.81454667875358411, 0.8334630113838295, 0.85247928333984169, 0.87159887322700536, 0.89082526553774, 0.91016205629579161, 0.92961295905008745, 0.94918181124425582, 0.96887258099273066, 0.98868937429583437, 1.0086364427295944, 1.0287181916497194, 1.0489391889528643, 1.0693041744423732, 1.0898180698504447, 1.1104859895747357, 1.1313132521917797, 1.1523053928177214, 1.1734681763937662, 1.1948076119817956, 1.2163299681651152, 1.2380417896606153, 1.2599499152599583, 1.2820614972305759, 1.3043840223241436, 1.3269253345561041, 1.349693659941217, 1.3726976333913221, 1.395946328009567, 1.4194492870442625, 1.4432165587984038, 1.4672587348347248, 1.4915869918575952, 1.5162131377094421, 1.5411496619795817, 1.5664097917965605, 1.592007553457558, 1.6179578406518098, 1.6442764901441205, 1.6709803659311826, 1.6980874530371854, 1.7256169623183963, 1.7535894478704495, 1.7820269389146917, 1.8109530883739979, 1.8403933407531647, 1.8703751224324077, 1.9009280580841901, 1.932084217666783, 1.9638783993543012, 1.9963484549094643, 2.0295356654155192, 2.0634851770763203, 2.0982465090564761, 2.1338741482219783, 2.1704282493675522, 2.2079754643312066, 2.2465899297316985, 2.2863544513982186, 2.3273619347279246, 2.369717125268656, 2.4135387444116798, 2.4589621335865486, 2.5061425604163201, 2.5552593973814743, 2.6065214664600744, 2.6601739656949102, 2.7165075785783768, 2.7758706526993202, 2.8386857867568227, 2.9054729036651321, 2.9768821337004594, 3.0537420161685391, 3.1371325317004852, 3.2285002105787139, 3.3298484699992685, 3.4440716782112943, 3.5755879723939201, 3.7316662622206187, 3.925637783935588, 4.1865954428591818, 4.6035356123955706),
}


def _check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def centroids(bits):
    """The 2**bits Lloyd-Max centroids of N(0, 1), ascending, as Python floats."""
    _check_bits(bits)
    half = _HALF_CENTROIDS[bits]
    return tuple(-v for v in reversed(half)) + tuple(half)


def boundaries(bits):
    """The 2**bits - 1 decision boundaries: midpoints of neighbouring centroids."""
    c = centroids(bits)
    return tuple((a + b) / 2 for a, b in zip(c[:-1], c[1:]))


def check_dim(dim):
    if not isinstance(dim, int) or dim <= 0 or dim % MIN_BLOCK:
        raise ValueError(
            f"head dim must be a positive multiple of {MIN_BLOCK}, got {dim!r}"
        )


def rotation_blocks(dim):
    """Walsh-Hadamard block sizes for ``dim``: its binary decomposition, largest first.

    A power of two is one block; 80 is (64, 16) and 96 is (64, 32).
    """
    check_dim(dim)
    return tuple(1 << k for k in reversed(range(dim.bit_length())) if dim >> k & 1)


@functools.lru_cache(maxsize=None)
def sign_list(dim):
    """The fixed +-1 sign vector of the format: bit 63 of successive SplitMix64 outputs."""
    mask = (1 << 64) - 1
    state, signs = SIGN_SEED, []
    for _ in range(dim):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        signs.append(-1.0 if z >> 63 else 1.0)
    return tuple(signs)


def packed_words(dim, bits):
    """uint32 words that hold ``dim`` indices of ``bits`` bits."""
    return -(-dim * bits // 32)


def dim_from_words(words, bits):
    """The head dim whose packed size is ``words`` (unique for multiples of 16)."""
    dim = (32 * words // bits) // MIN_BLOCK * MIN_BLOCK
    if dim <= 0 or packed_words(dim, bits) != words:
        raise ValueError(f"{words} packed words match no head dim at {bits} bits")
    return dim


def vector_nbytes(dim, bits):
    """Bytes one encoded vector takes: packed indices plus its float16 scale."""
    return 4 * packed_words(dim, bits) + 2


def _hadamard(x, dim, inverse):
    blocks = rotation_blocks(dim)
    signs = mx.array(sign_list(dim), dtype=mx.float32)
    if not inverse:
        x = x * signs
    if len(blocks) == 1:
        y = mx.hadamard_transform(x, scale=1 / math.sqrt(dim))
    else:
        parts, start = [], 0
        for b in blocks:
            parts.append(mx.hadamard_transform(x[..., start : start + b], scale=1 / math.sqrt(b)))
            start += b
        y = mx.concatenate(parts, axis=-1)
    if inverse:
        y = y * signs
    return y


def _check_float(x, name="x"):
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one axis (the head dim)")
    check_dim(x.shape[-1])


def rotate(x):
    """Rotate the last axis into the quantization space: H . diag(signs) . x, in float32.

    The rotation is orthonormal, so <rotate(q), rotate(k)> == <q, k>.
    """
    _check_float(x)
    return _hadamard(x.astype(mx.float32), x.shape[-1], inverse=False)


def unrotate(y):
    """Inverse of ``rotate``: diag(signs) . H . y, in float32."""
    _check_float(y, "y")
    return _hadamard(y.astype(mx.float32), y.shape[-1], inverse=True)


# --- bit packing -----------------------------------------------------------------


def pack(indices, bits):
    """Pack uint32 indices < 2**bits along the last axis into uint32 words.

    Index i of a vector occupies bits [i*bits, (i+1)*bits) of a little-endian bit
    stream; word k holds stream bits [32k, 32k+32), bit 0 being the least
    significant. Trailing bits of the last word are zero.
    """
    _check_bits(bits)
    dim = indices.shape[-1]
    words = packed_words(dim, bits)
    groups = -(-dim // 32)  # 32 indices fill exactly `bits` words
    lead = indices.shape[:-1]
    idx = indices.astype(mx.uint32)
    if groups * 32 != dim:
        idx = mx.pad(idx, [(0, 0)] * len(lead) + [(0, groups * 32 - dim)])
    idx = idx.reshape(*lead, groups, 32)
    out = []
    for k in range(bits):
        # Indices starting in word k, shifted into place; disjoint bits, so sum == or.
        first, last = -(-32 * k // bits), -(-32 * (k + 1) // bits)
        shifts = mx.array([(i * bits) % 32 for i in range(first, last)], dtype=mx.uint32)
        w = mx.left_shift(idx[..., first:last], shifts).sum(axis=-1)
        prev_shift = ((first - 1) * bits) % 32
        if first > 0 and prev_shift + bits > 32:  # the high bits of the index before
            w = w + mx.right_shift(idx[..., first - 1], 32 - prev_shift)
        out.append(w.astype(mx.uint32))
    return mx.stack(out, axis=-1).reshape(*lead, groups * bits)[..., :words]


def unpack(packed, bits, dim):
    """Inverse of ``pack``: uint32 words -> uint32 indices of shape [..., dim]."""
    _check_bits(bits)
    words = packed_words(dim, bits)
    if packed.dtype != mx.uint32:
        raise ValueError(f"packed must be uint32, got {packed.dtype}")
    if packed.shape[-1] != words:
        raise ValueError(
            f"{dim} indices of {bits} bits need {words} words, got {packed.shape[-1]}"
        )
    groups = -(-dim // 32)
    lead = packed.shape[:-1]
    if groups * bits != words:
        packed = mx.pad(packed, [(0, 0)] * len(lead) + [(0, groups * bits - words)])
    w = packed.reshape(*lead, groups, bits)
    # Static slices per word rather than a gather: MLX fuses shifts, not gathers.
    pieces = []
    for k in range(bits):
        first, last = -(-32 * k // bits), -(-32 * (k + 1) // bits)
        shifts = [(i * bits) % 32 for i in range(first, last)]
        v = mx.right_shift(w[..., k : k + 1], mx.array(shifts, dtype=mx.uint32))
        spill = [s + bits > 32 for s in shifts]
        if any(spill):
            hi_shift = mx.array([32 - s if sp else 0 for s, sp in zip(shifts, spill)], dtype=mx.uint32)
            hi_mask = mx.array([0xFFFFFFFF if sp else 0 for sp in spill], dtype=mx.uint32)
            v = v | (mx.left_shift(w[..., k + 1 : k + 2], hi_shift) & hi_mask)
        pieces.append(v)
    idx = mx.concatenate(pieces, axis=-1) & ((1 << bits) - 1)
    return idx.reshape(*lead, groups * 32)[..., :dim]


def lookup(indices, bits):
    """``centroids(bits)[indices]`` in float32, as a tree of selects on the index bits.

    Equivalent to a gather, but MLX fuses selects into one pass and is several
    times faster than ``mx.take`` on the CPU.
    """
    level = [mx.array(v, dtype=mx.float32) for v in centroids(bits)]
    for t in range(bits):
        bit = (mx.right_shift(indices, t) & 1).astype(mx.bool_)
        level = [mx.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


# --- reading many packed vectors at once ------------------------------------------
#
# Indices are a little-endian bit stream (see turboquant.pack), so on a
# little-endian host the bytes of the uint32 words are the stream's bytes in
# order. We cut the stream into fields of F = m * bits bits (m indices each) and
# look each field up in a table of 2**F rows of m centroids: one gather per m
# coordinates instead of one per coordinate, plus a few shifts.


_FIELDS = {2: 4, 3: 4, 4: 4, 5: 2, 6: 2, 7: 2, 8: 2}  # indices per field


@functools.lru_cache(maxsize=None)
def _field_table(bits, codebook):
    m = _FIELDS[bits]
    values = mx.array(codebook if codebook is not None else centroids(bits), dtype=mx.float32)
    if values.shape != (1 << bits,):
        raise ValueError(f"a {bits}-bit codebook needs {1 << bits} values, got {values.shape[0]}")
    field = mx.arange(1 << (m * bits), dtype=mx.uint32)
    cols = [mx.take(values, mx.right_shift(field, bits * j) & ((1 << bits) - 1)) for j in range(m)]
    return mx.stack(cols, axis=1)


def _fields(packed, bits, dim):
    """The packed stream cut into F-bit fields, as an integer array [..., dim / m]."""
    m = _FIELDS[bits]
    width = m * bits
    nbytes = dim * bits // 8  # dim is a multiple of 16, so whole bytes
    if width == 16:
        return packed.view(mx.uint16)[..., : nbytes // 2]
    data = packed.view(mx.uint8)[..., :nbytes]
    if width == 8:
        return data
    period_bits = width * 8 // math.gcd(width, 8)
    period_bytes, per_period = period_bits // 8, period_bits // width
    b = data.reshape(*data.shape[:-1], nbytes // period_bytes, period_bytes).astype(mx.uint32)
    out = []
    for k in range(per_period):
        start = k * width
        first, shift = divmod(start, 8)
        span = (shift + width + 7) // 8
        v = b[..., first]
        for j in range(1, span):
            v = v | (b[..., first + j] << (8 * j))
        out.append((v >> shift) & ((1 << width) - 1))
    f = mx.stack(out, axis=-1)
    return f.reshape(*f.shape[:-2], -1)


def codebook_values(packed, bits, dim, codebook=None):
    """Unscaled centroid values of packed vectors: float32 [..., dim].

    ``codebook`` (2**bits floats) replaces the format's Lloyd-Max table, for
    comparisons with other codebooks; the bit layout is the format's.
    """
    f = _fields(packed, bits, dim)
    c = mx.take(_field_table(bits, codebook), f, axis=0)
    return c.reshape(*packed.shape[:-1], dim)


# --- encode / decode ---------------------------------------------------------------


def quantize(u, bits):
    """Codebook index of each N(0, 1)-normalised coordinate: how many boundaries are < u."""
    idx = mx.zeros(u.shape, dtype=mx.uint32)
    for b in boundaries(bits):  # fused compare-and-add; no gather
        idx = idx + (u > b).astype(mx.uint32)
    return idx


def _encode_rows(x, bits, scale_mode):
    dim = x.shape[-1]
    y = _hadamard(x.astype(mx.float32), dim, inverse=False)
    norm = mx.sqrt((y * y).sum(axis=-1, keepdims=True))
    u = y * (math.sqrt(dim) / mx.maximum(norm, 1e-30))
    if fast.kernels_for_device() is not None:
        packed = fast.quantize_pack(u, bits, packed_words(dim, bits))
        c = fast.dequantize(packed, mx.ones(norm.shape, dtype=mx.float16), bits, dim)
    else:
        idx = _compiled(quantize, ("bits", bits))(u)
        c = _compiled(lookup, ("bits", bits))(idx)
        packed = _compiled(pack, ("bits", bits))(idx)
    if scale_mode == "norm":
        scale = norm / math.sqrt(dim)
    elif scale_mode == "length":
        scale = norm / mx.maximum(mx.sqrt((c * c).sum(axis=-1, keepdims=True)), 1e-30)
    else:  # lsq: the scale that minimises ||y - scale * c||
        scale = (y * c).sum(axis=-1, keepdims=True) / mx.maximum((c * c).sum(axis=-1, keepdims=True), 1e-30)
    return packed, scale.astype(mx.float16)


def _dequantize_rows(packed, scales, bits, dim):
    if fast.kernels_for_device() is not None:
        return fast.dequantize(packed, scales, bits, dim)
    return codebook_values(packed, bits, dim) * scales.astype(mx.float32)


@functools.lru_cache(maxsize=None)
def _compiled(fn, *static):
    return mx.compile(functools.partial(fn, **dict(static)))


def _chunked(fn, arrays):
    """Run ``fn`` over the flattened leading axes in chunks of CHUNK_VECTORS rows."""
    lead = arrays[0].shape[:-1]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
    n = flat[0].shape[0]
    if n <= CHUNK_VECTORS:
        outs = fn(*flat)
    else:
        pieces = [fn(*[a[i : i + CHUNK_VECTORS] for a in flat]) for i in range(0, n, CHUNK_VECTORS)]
        outs = tuple(mx.concatenate(p, axis=0) for p in zip(*pieces)) if isinstance(pieces[0], tuple) else mx.concatenate(pieces, axis=0)
    if isinstance(outs, tuple):
        return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)
    return outs.reshape(*lead, outs.shape[-1])


def encode(x, bits, scale_mode=DEFAULT_SCALE_MODE):
    """Encode vectors along the last axis: returns ``(packed uint32, scales float16[..., 1])``."""
    _check_bits(bits)
    _check_float(x)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    # Compiled piece by piece (see _dequantize_rows): whole-graph fusion is slower on CPU.
    fn = functools.partial(_encode_rows, bits=bits, scale_mode=scale_mode)
    return _chunked(fn, [x])


def _check_packed(packed, scales, bits, dim):
    if not isinstance(packed, mx.array) or not isinstance(scales, mx.array):
        raise TypeError("packed and scales must be mx.arrays")
    if packed.dtype != mx.uint32:
        raise ValueError(f"packed must be uint32, got {packed.dtype}")
    if scales.dtype != mx.float16:
        raise ValueError(f"scales must be float16, got {scales.dtype}")
    if packed.ndim < 1 or scales.shape != tuple(packed.shape[:-1]) + (1,):
        raise ValueError(
            f"scales must have shape {tuple(packed.shape[:-1]) + (1,)} for packed {packed.shape}, got {scales.shape}"
        )
    if dim is None:
        dim = dim_from_words(packed.shape[-1], bits)
    check_dim(dim)
    if packed.shape[-1] != packed_words(dim, bits):
        raise ValueError(
            f"head dim {dim} at {bits} bits needs {packed_words(dim, bits)} words, got {packed.shape[-1]}"
        )
    return dim


def dequantize_rotated(packed, scales, bits, dim=None):
    """Reconstruction in the rotated space (float32): ``scale * centroid[idx]``.

    Attention works here: rotate the query once and sum rotated values, then
    ``unrotate`` once per output row.
    """
    _check_bits(bits)
    dim = _check_packed(packed, scales, bits, dim)
    fn = functools.partial(_dequantize_rows, bits=bits, dim=dim)
    return _chunked(fn, [packed, scales])


def decode(packed, scales, bits, dim=None):
    """Reconstruct the original vectors (float32) from ``encode``'s output."""
    y = dequantize_rotated(packed, scales, bits, dim)
    return _hadamard(y, y.shape[-1], inverse=True)
