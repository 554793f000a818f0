"""The counter-based generator: Philox4x32-10 known answers, Triton == torch bit for bit, and the
documented mapping from (seed, p, j) to Philox words, bits and Box-Muller pairs."""
import math

import numpy as np
import pytest
import torch

from gtp_kernels.ops import philox

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

M32 = 0xFFFFFFFF

# Random123 known-answer vectors for philox4x32_10 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox.philox4x32_10(*(torch.tensor(c) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def _philox_numpy_uint64(c, k0, k1):
    """Independent reimplementation with numpy uint64 products (the plain 32x32->64 multiply)."""
    c = [x.astype(np.uint64) for x in c]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m32 = np.uint64(M32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return c


@triton.jit
def _philox_kernel(c_ptr, out_ptr, k0, k1, N: tl.constexpr):
    idx = tl.arange(0, N)
    c0 = tl.load(c_ptr + idx)
    c1 = tl.load(c_ptr + N + idx)
    c2 = tl.load(c_ptr + 2 * N + idx)
    c3 = tl.load(c_ptr + 3 * N + idx)
    w0, w1, w2, w3 = philox.philox4x32_10_tl(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + idx, w0)
    tl.store(out_ptr + N + idx, w1)
    tl.store(out_ptr + 2 * N + idx, w2)
    tl.store(out_ptr + 3 * N + idx, w3)


def test_torch_numpy_triton_philox_agree_on_random_counters(device):
    rng = np.random.default_rng(0)
    n = 256
    counters = rng.integers(0, 2**32, size=(4, n), dtype=np.uint64)
    key = (int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32)))
    expected = np.stack(_philox_numpy_uint64(list(counters), *key))
    got_torch = torch.stack(philox.philox4x32_10(*torch.from_numpy(counters.astype(np.int64)).to(device), *key))
    np.testing.assert_array_equal(got_torch.cpu().numpy().astype(np.uint64), expected)
    # Triton: uint32 in, uint32 out (torch has no uint32 arithmetic here: move the bits through int32).
    c_i32 = torch.from_numpy(counters.astype(np.uint32).view(np.int32)).to(device).contiguous()
    out = torch.full((4, n), -1, dtype=torch.int32, device=device)
    _philox_kernel[(1,)](c_i32.view(torch.uint32), out.view(torch.uint32), key[0], key[1], N=n)
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32).astype(np.uint64), expected)


def test_rademacher_mapping_matches_documentation():
    seed, start = 0xDEADBEEF12345678, 2**40 - 3
    d, n = 300, 6
    signs = philox.rademacher_signs(seed, start, n, d)
    k0, k1 = seed & M32, seed >> 32
    for p_local in range(n):
        p = start + p_local
        for j in (0, 1, 31, 32, 95, 127, 128, 200, 299):
            words = philox.philox4x32_10(torch.tensor(p & M32), torch.tensor(p >> 32), torch.tensor(j // 128),
                                         torch.tensor(0), k0, k1)
            bit = (int(words[(j % 128) // 32]) >> (j % 32)) & 1
            assert signs[j, p_local].item() == (1.0 if bit == 0 else -1.0)


def test_gaussian_mapping_matches_documentation():
    seed, start = 98765, 2**33 + 11
    d, n = 10, 4
    z = philox.gaussian_normals(seed, start, n, d)
    for p_local in range(n):
        p = start + p_local
        for j in range(d):
            words = [int(w) for w in philox.philox4x32_10(torch.tensor(p & M32), torch.tensor(p >> 32),
                                                          torch.tensor(j // 4), torch.tensor(1), seed & M32,
                                                          seed >> 32)]
            x, y = (words[0], words[1]) if j % 4 < 2 else (words[2], words[3])
            radius = math.sqrt(-2.0 * math.log((x + 0.5) * 2.0**-32))
            theta = y * 2.0**-32 * (2.0 * math.pi)
            value = radius * (math.cos(theta) if j % 2 == 0 else math.sin(theta))
            expected = np.float32(value)
            got = np.float32(z[j, p_local].item())
            # libm vs torch float64 functions may differ by a float64 ulp: at most one float32 ulp after.
            assert abs(got.view(np.int32).astype(np.int64) - expected.view(np.int32).astype(np.int64)) <= 1


def test_streams_and_kinds_are_distinct_and_prefix_consistent():
    a = philox.rademacher_signs(5, 0, 500, 256)
    assert torch.equal(philox.rademacher_signs(5, 0, 500, 100), a[:100])  # smaller d: leading rows
    b = philox.rademacher_signs(5, 0, 500, 256, output_factor=True)
    agree = (a == b).double().mean().item()
    assert 0.47 < agree < 0.53
    z = philox.gaussian_normals(5, 0, 500, 256)
    z_out = philox.gaussian_normals(5, 0, 500, 256, output_factor=True)
    assert abs(torch.corrcoef(torch.stack([z.flatten(), z_out.flatten()]))[0, 1].item()) < 0.02
    assert torch.equal(philox.gaussian_normals(5, 0, 500, 7), z[:7])


def test_distribution_moments():
    signs = philox.rademacher_signs(11, 123, 2000, 512)
    n = signs.numel()
    assert abs(signs.mean().item()) < 5 / math.sqrt(n)
    # neighbouring bits of one word and neighbouring words must be uncorrelated
    assert abs((signs[1:] * signs[:-1]).mean().item()) < 5 / math.sqrt(n)
    assert abs((signs[:, 1:] * signs[:, :-1]).mean().item()) < 5 / math.sqrt(n)
    z = philox.gaussian_normals(11, 123, 2000, 256).double()
    m = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(m)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / m)
    assert abs((z ** 4).mean().item() - 3.0) < 5 * math.sqrt(96 / m)  # kurtosis of a normal
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(m)  # cos/sin partners uncorrelated


def test_seed_and_kind_validation():
    with pytest.raises(ValueError, match="seed"):
        philox.seed_key(-1)
    with pytest.raises(ValueError, match="seed"):
        philox.seed_key(2**64)
    with pytest.raises(TypeError, match="seed"):
        philox.seed_key(1.5)
    with pytest.raises(ValueError, match="kind"):
        philox.check_kind("uniform")
    assert philox.seed_key(2**64 - 1) == (M32, M32)
    # numpy integers are seeds too, and come back as Python ints (what the kernels' keys take)
    assert philox.check_seed(np.uint64(2**64 - 1)) == 2**64 - 1 and type(philox.check_seed(np.int64(3))) is int
    assert philox.seed_key(np.uint64(2**64 - 1)) == (M32, M32)
    with pytest.raises(TypeError, match="seed"):
        philox.seed_key(True)
