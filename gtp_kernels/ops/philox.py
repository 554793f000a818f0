"""Counter-based generator behind the random projection (K1): one definition, two implementations.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
Random123 reference) maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four
32-bit words. Each of the 10 rounds is

    hi0:lo0 = 0xD2511F53 * c0        (32 x 32 -> 64-bit product)
    hi1:lo1 = 0xCD9E8D57 * c2
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    (k0, k1) <- (k0 + 0x9E3779B9, k1 + 0xBB67AE85)   (mod 2^32)

The projection entry Pi[j, p] is a pure function of (seed, p, j), p the *global* parameter index
(int64, any value in [0, 2^63)) and j the output column. Key: k0 = seed mod 2^32,
k1 = seed div 2^32 (seed in [0, 2^64)).

Rademacher (``kind="rademacher"``), Pi[j, p] = s / sqrt(d), s in {+1, -1}:
    counter = (p mod 2^32, p div 2^32, j div 128, 0)
    word    = output word number (j mod 128) div 32 of that Philox call (0..3)
    bit     = j mod 32 (bit 0 = least significant)
    s = +1 if the bit is 0 else -1
so one Philox call yields the 128 signs of columns 128*q .. 128*q + 127 of one parameter p.

Gaussian (``kind="gaussian"``), Pi[j, p] = z / sqrt(d), z ~ N(0, 1):
    counter = (p mod 2^32, p div 2^32, j div 4, 1)  -> words (w0, w1, w2, w3)
    pair a = (w0, w1) serves j mod 4 in {0, 1}, pair b = (w2, w3) serves j mod 4 in {2, 3}
    for a pair (x, y), in float64:  u1 = (x + 0.5) * 2^-32 in (0, 1),  u2 = y * 2^-32 in [0, 1)
        r = sqrt(-2 * log(u1)),  theta = u2 * TWO_PI  (TWO_PI = the float64 nearest 2*pi)
        first of the pair = r * cos(theta),  second = r * sin(theta)     (Box-Muller)
    z = that float64 value rounded to float32.
The uniforms are exact (integer -> float64 conversions and power-of-two scalings), and every
other step is a single IEEE operation or a library function (log, cos, sin) evaluated in float64,
with no multiply-add pairs a compiler could fuse. Library functions may differ by an ulp or two of
float64 between numpy (Triton interpreter), torch CPU and CUDA libdevice; since z is rounded to
float32 afterwards, z agrees bit for bit except when the float64 value falls within a few
float64 ulps of a float32 rounding boundary (probability ~1e-8 per entry); then z differs by one
float32 ulp. Rademacher signs are integer-only and agree bit for bit everywhere.

The counter's fourth word c3 is the *stream*: 0 Rademacher, 1 Gaussian, 2 and 3 the same kinds for
the output-side factor Pi_out of the factored (Kronecker) projection of a linear layer, so that its
two factors are independent even where their parameter indices coincide. (The formulas above show
c3 for the plain streams 0 and 1.) The definition does not involve the block sizes, the batch
size, the device or the number d of rows (a smaller d gives the leading rows of a larger one, up to
the 1/sqrt(d) scale).

Implementations: ``philox4x32_10`` (torch, int64 arithmetic, any device) and the Triton functions
``philox4x32_10_tl``, ``rademacher_sign_tile``, ``gaussian_normal_tile`` used inside kernels.
"""
from __future__ import annotations

import math

import torch

from ..validation import SEED_LIMIT, check_choice, check_int

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
SIGNS_PER_CALL = 128  # Rademacher: 4 words x 32 bits
NORMALS_PER_CALL = 4  # Gaussian: two Box-Muller pairs
STREAM_RADEMACHER = 0
STREAM_GAUSSIAN = 1
STREAM_OUTPUT_FACTOR = 2  # added to the kind's stream for Pi_out of the factored projection
TWO_PI = 2.0 * math.pi  # float64
MAX_FEATURE_INDEX = 2**63 - 1
KINDS = ("rademacher", "gaussian")


def check_seed(seed: int) -> int:
    """``seed`` as an int in [0, 2^64) (the 64-bit Philox key)."""
    return check_int(seed, "seed", low=0, high=SEED_LIMIT - 1)


def check_kind(kind: str) -> str:
    """``kind``, one of KINDS."""
    return check_choice(kind, "kind", KINDS)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a 64-bit seed."""
    seed = check_seed(seed)
    return seed & MASK32, seed >> 32


# ------------------------------------------------------------------------------------------------
# torch implementation (int64 tensors holding values in [0, 2^32); works on CPU and CUDA)
# ------------------------------------------------------------------------------------------------


def _mulhilo32(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of multiplier * x, without int64 overflow: split x into 16-bit halves."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    prod_lo = multiplier * x_lo  # < 2^48
    prod_hi = multiplier * x_hi  # < 2^48
    mid = ((prod_hi & 0xFFFF) << 16) + prod_lo  # < 2^49
    return (prod_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors of 32-bit values (broadcast together); key (k0, k1) ints."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _feature_counters(feature_start: int, n_features: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if feature_start < 0 or feature_start + n_features - 1 > MAX_FEATURE_INDEX:
        raise ValueError(f"global feature indices must lie in [0, 2^63), got start {feature_start}")
    p = feature_start + torch.arange(n_features, dtype=torch.int64, device=device)
    return p & MASK32, p >> 32


_BYTE_SIGNS: dict[torch.device, torch.Tensor] = {}


def _byte_sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) float32: row v holds 1 - 2 * bit k of v for k = 0..7 (bit 0 first)."""
    device = torch.device(device)
    if device not in _BYTE_SIGNS:
        values = torch.arange(256, dtype=torch.int64, device=device)
        bits = (values[:, None] >> torch.arange(8, device=device)) & 1
        _BYTE_SIGNS[device] = 1.0 - 2.0 * bits.to(torch.float32)
    return _BYTE_SIGNS[device]


def rademacher_signs_t(seed: int, feature_start: int, n_features: int, d: int,
                       device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """Signs s[j, p] in {+1, -1} as float32 of shape (n_features, d), feature-major (= rademacher_signs.T)."""
    k0, k1 = seed_key(seed)
    n_calls = -(-d // SIGNS_PER_CALL)
    p_lo, p_hi = _feature_counters(feature_start, n_features, device)
    chunk = torch.arange(n_calls, dtype=torch.int64, device=device)
    stream = torch.tensor(STREAM_RADEMACHER + STREAM_OUTPUT_FACTOR * output_factor, device=device)
    words = philox4x32_10(p_lo[:, None], p_hi[:, None], chunk[None, :], stream, k0, k1)
    words = torch.stack(words, dim=-1)  # (n, calls, 4): word w of call q
    # bytes lowest first, then an 8-sign lookup per byte: column 128 q + 32 w + 8 byte + bit
    byte_shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
    word_bytes = (words[..., None] >> byte_shifts) & 0xFF  # (n, calls, 4, 4)
    signs = _byte_sign_table(words.device)[word_bytes]  # (n, calls, 4, 4, 8)
    return signs.reshape(n_features, n_calls * SIGNS_PER_CALL)[:, :d]


def rademacher_signs(seed: int, feature_start: int, n_features: int, d: int,
                     device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """Signs s[j, p - feature_start] in {+1, -1} (float32, shape (d, n_features)) of the Rademacher Pi."""
    return rademacher_signs_t(seed, feature_start, n_features, d, device, output_factor).T


def gaussian_normals_t(seed: int, feature_start: int, n_features: int, d: int,
                       device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """Standard normals z[j, p] as float32 of shape (n_features, d), feature-major (= gaussian_normals.T)."""
    k0, k1 = seed_key(seed)
    n_calls = -(-d // NORMALS_PER_CALL)
    p_lo, p_hi = _feature_counters(feature_start, n_features, device)
    quad = torch.arange(n_calls, dtype=torch.int64, device=device)
    stream = torch.tensor(STREAM_GAUSSIAN + STREAM_OUTPUT_FACTOR * output_factor, device=device)
    w0, w1, w2, w3 = philox4x32_10(p_lo[:, None], p_hi[:, None], quad[None, :], stream, k0, k1)
    normals = []
    for x, y in ((w0, w1), (w2, w3)):
        u1 = (x.to(torch.float64) + 0.5) * 2.0**-32
        u2 = y.to(torch.float64) * 2.0**-32
        radius = torch.sqrt(-2.0 * torch.log(u1))
        theta = u2 * TWO_PI
        normals += [radius * torch.cos(theta), radius * torch.sin(theta)]
    z = torch.stack(normals, dim=-1).to(torch.float32)  # (n, calls, 4): column 4 q + i
    return z.reshape(n_features, n_calls * NORMALS_PER_CALL)[:, :d]


def gaussian_normals(seed: int, feature_start: int, n_features: int, d: int,
                     device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """Standard normals z[j, p - feature_start] (float32, shape (d, n_features)) of the Gaussian Pi."""
    return gaussian_normals_t(seed, feature_start, n_features, d, device, output_factor).T


def unscaled_entries_t(kind: str, seed: int, feature_start: int, n_features: int, d: int,
                       device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """sqrt(d) * Pi[:, feature_start : feature_start + n_features]^T, float32 (n_features, d)."""
    check_kind(kind)
    if kind == "rademacher":
        return rademacher_signs_t(seed, feature_start, n_features, d, device, output_factor)
    return gaussian_normals_t(seed, feature_start, n_features, d, device, output_factor)


def unscaled_entries(kind: str, seed: int, feature_start: int, n_features: int, d: int,
                     device: torch.device | str = "cpu", output_factor: bool = False) -> torch.Tensor:
    """sqrt(d) * Pi[:, feature_start : feature_start + n_features] as float32 (exact: signs or z);
    ``output_factor`` selects the stream of Pi_out in the factored projection."""
    return unscaled_entries_t(kind, seed, feature_start, n_features, d, device, output_factor).T


# ------------------------------------------------------------------------------------------------
# Triton implementation (the same math on uint32 tiles, for use inside kernels)
# ------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing: only the torch implementation exists
    triton = None

if triton is not None:
    _M0 = tl.constexpr(PHILOX_M0)
    _M1 = tl.constexpr(PHILOX_M1)
    _W0 = tl.constexpr(PHILOX_W0)
    _W1 = tl.constexpr(PHILOX_W1)
    _ROUNDS = tl.constexpr(PHILOX_ROUNDS)
    _TWO_PI = tl.constexpr(TWO_PI)

    @triton.jit
    def philox4x32_10_tl(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 tensors (c0..c3 broadcast together), uint32 key scalars k0, k1."""
        m0 = tl.full(c0.shape, _M0, tl.uint32)
        m1 = tl.full(c0.shape, _M1, tl.uint32)
        for _ in tl.static_range(_ROUNDS):
            hi0 = tl.umulhi(c0, m0)
            lo0 = c0 * m0
            hi1 = tl.umulhi(c2, m1)
            lo1 = c2 * m1
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + _W0
            k1 = k1 + _W1
        return c0, c1, c2, c3

    @triton.jit
    def _feature_counter_words(features, BLOCK_P: tl.constexpr, N_CALLS: tl.constexpr):
        """(p mod 2^32, p div 2^32) of int64 global indices `features` [BLOCK_P], as [BLOCK_P, N_CALLS]."""
        lo = (features & 0xFFFFFFFF).to(tl.uint32)
        hi = (features >> 32).to(tl.uint32)
        lo = tl.broadcast_to(lo[:, None], (BLOCK_P, N_CALLS))
        hi = tl.broadcast_to(hi[:, None], (BLOCK_P, N_CALLS))
        return lo, hi

    @triton.jit
    def rademacher_sign_tile(k0, k1, features, col_start, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                             STREAM: tl.constexpr):
        """Signs s[j, p] (+-1.0 float32) as a [BLOCK_P, BLOCK_D] tile: rows p = `features` (int64
        global indices), columns j = col_start + 0..BLOCK_D-1; col_start and BLOCK_D multiples of 128.
        STREAM: the counter word c3 (0, or 2 for the output factor). One Philox call per 128 entries."""
        N_CALLS: tl.constexpr = BLOCK_D // 128
        lo, hi = _feature_counter_words(features, BLOCK_P, N_CALLS)
        chunk = (col_start // 128 + tl.arange(0, N_CALLS)).to(tl.uint32)
        chunk = tl.broadcast_to(chunk[None, :], (BLOCK_P, N_CALLS))
        stream = tl.full((BLOCK_P, N_CALLS), STREAM, tl.uint32)
        w0, w1, w2, w3 = philox4x32_10_tl(lo, hi, chunk, stream, k0, k1)
        # join(join(w0, w2), join(w1, w3)) has [.., m, i] = w_{2m+i}: flattening gives w0 w1 w2 w3.
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_P, N_CALLS * 4))
        # Spread each word over 32 entries by five joins: join(v, v >> 16) puts the shift 16*k1 on a new
        # minor axis, then 8*k2, 4*k3, 2*k4, k5, so the flattened minor index k1 k2 k3 k4 k5 (binary) equals
        # the shift, i.e. entry b holds the word shifted right by b. Joins keep their new axis inside the
        # thread: a word's 32 signs (32 consecutive columns) stay in one thread, ready for vector stores
        # to shared memory, at ~1 shift per entry. Bit 0 of the shifted word moved to bit 31 is the
        # float32 sign bit of 1.0 (0x3F800000): no int->float conversion.
        spread = tl.join(words, words >> 16)
        spread = tl.join(spread, spread >> 8)
        spread = tl.join(spread, spread >> 4)
        spread = tl.join(spread, spread >> 2)
        spread = tl.join(spread, spread >> 1)  # [BLOCK_P, N_CALLS * 4, 2, 2, 2, 2, 2]
        signs = ((spread << 31) | 0x3F800000).to(tl.float32, bitcast=True)
        return tl.reshape(signs, (BLOCK_P, BLOCK_D))

    @triton.jit
    def _box_muller(x, y, two_pi):
        u1 = (x.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2^-32 (exact in float32 too)
        u2 = y.to(tl.float64) * 2.3283064365386963e-10
        radius = tl.sqrt(-2.0 * tl.log(u1))  # float64 sqrt is correctly rounded (no approx form)
        theta = u2 * two_pi
        return (radius * tl.cos(theta)).to(tl.float32), (radius * tl.sin(theta)).to(tl.float32)

    @triton.jit
    def gaussian_normal_tile(k0, k1, features, col_start, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                             STREAM: tl.constexpr):
        """Normals z[j, p] (float32) as a [BLOCK_P, BLOCK_D] tile (see rademacher_sign_tile);
        col_start and BLOCK_D multiples of 4; STREAM 1 or 3. One Philox call per 4 entries."""
        N_CALLS: tl.constexpr = BLOCK_D // 4
        lo, hi = _feature_counter_words(features, BLOCK_P, N_CALLS)
        quad = (col_start // 4 + tl.arange(0, N_CALLS)).to(tl.uint32)
        quad = tl.broadcast_to(quad[None, :], (BLOCK_P, N_CALLS))
        stream = tl.full((BLOCK_P, N_CALLS), STREAM, tl.uint32)
        w0, w1, w2, w3 = philox4x32_10_tl(lo, hi, quad, stream, k0, k1)
        # A Python float literal would be rounded to float32 by Triton: build 2*pi as float64 exactly.
        two_pi = tl.full((), _TWO_PI, tl.float64)
        z0, z1 = _box_muller(w0, w1, two_pi)
        z2, z3 = _box_muller(w2, w3, two_pi)
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
        return tl.reshape(z, (BLOCK_P, BLOCK_D))
