"""K1 projection: bit-exact Pi from the kernel, accumulation semantics, dense float64 references,
Johnson-Lindenstrauss statistics (with broken generators that must fail), factored linear mode."""
import math

import numpy as np
import pytest
import torch

from gtp_kernels.ops import project as project_module
from gtp_kernels.ops.project import project, project_linear_factored, projection_matrix

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KINDS = ["rademacher", "gaussian"]
# Triton-only tests run on the GPU when there is one, else through the interpreter on CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SENTINEL = -12345.5


def _backends(device):
    return ["triton", "torch"]


def _dense_reference(grads, d, seed, kind, offset):
    pi = projection_matrix(d, grads.shape[1], seed, kind, offset, dtype=torch.float64, device="cpu")
    return grads.double().cpu() @ pi.T, grads.double().abs().cpu() @ pi.abs().T


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    ai = a.cpu().numpy().astype(np.float32).view(np.int32).astype(np.int64)
    bi = b.cpu().numpy().astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(ai - bi).max()) if ai.size else 0


# ------------------------------------------------------------------------------------------------
# Pi itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_features,d,seed,offset", [
    (77, 33, 0, 0),
    (130, 200, 12345, 2**33 - 64),            # crosses 2^33 inside the block
    (61, 129, 2**64 - 1, 2**40 - 30),          # crosses 2^40
    (45, 5, 2**32 + 7, 2**62),
])
def test_kernel_pi_is_bit_exact(kind, n_features, d, seed, offset, device):
    """Projecting the identity with the Triton path returns Pi^T exactly (float32)."""
    eye = torch.eye(n_features, dtype=torch.float32, device=device)
    implied = project(eye, d, seed, kind, offset, backend="triton").T.cpu()
    expected = projection_matrix(d, n_features, seed, kind, offset, dtype=torch.float32)
    if kind == "rademacher" or device.type == "cpu":
        assert torch.equal(implied, expected)
    else:
        # CUDA libdevice vs CPU float64 log/cos/sin: equal after rounding to float32 except, rarely,
        # by one float32 ulp (see gtp_kernels/ops/philox.py).
        assert _ulp_distance(implied, expected) <= 1
        assert (implied == expected).double().mean().item() > 0.999
    if kind == "rademacher":
        assert set(torch.unique(implied * math.sqrt(d)).round().tolist()) <= {-1.0, 1.0}


def test_pi_independent_of_block_sizes(monkeypatch):
    """The kernel's Pi does not change with the tile shape or the split-K count."""
    n_features, d, offset = 200, 130, 2**35
    eye = torch.eye(n_features, dtype=torch.float32, device=KERNEL_DEVICE)
    reference = {k: projection_matrix(d, n_features, 3, k, offset, dtype=torch.float32) for k in KINDS}
    original = project_module._launch_config
    variants = [(64, 128, 32, 3), (128, 256, 256, 1)] if KERNEL_DEVICE.type == "cpu" else [(32, 128, 32, 3),
                                                                                              (128, 128, 64, 1)]
    for block_b, block_d, block_p, splits in variants:
        def config(*args, _bb=block_b, _bd=block_d, _bp=block_p, _s=splits, **kwargs):
            cfg = original(*args, **kwargs)
            cfg.update(block_b=_bb, block_d=_bd, block_p=_bp)
            cfg["p_per_split"] = -(-(-(-n_features // _s)) // _bp) * _bp
            cfg["splits"] = -(-n_features // cfg["p_per_split"])
            return cfg
        monkeypatch.setattr(project_module, "_launch_config", config)
        for kind in KINDS:
            implied = project(eye, d, 3, kind, offset, backend="triton").T.cpu()
            if kind == "rademacher" or KERNEL_DEVICE.type == "cpu":
                assert torch.equal(implied, reference[kind]), (kind, block_b, block_d, block_p, splits)
            else:
                assert _ulp_distance(implied, reference[kind]) <= 1


def test_seeds_and_offsets_change_pi_without_wraparound():
    base = projection_matrix(256, 200, 1, dtype=torch.float32)
    other_seed = projection_matrix(256, 200, 2, dtype=torch.float32)
    assert 0.45 < (base == other_seed).double().mean().item() < 0.55
    # Seeds differing only in their high 32 bits (the second key word) also differ.
    high = projection_matrix(256, 200, 1 + 2**32, dtype=torch.float32)
    assert 0.45 < (base == high).double().mean().item() < 0.55
    # Indices 2^32, 2^40 apart must not alias (a 32-bit counter would wrap them onto each other).
    for shift in (2**32, 2**40, 2**40 + 2**32):
        shifted = projection_matrix(256, 200, 1, feature_offset=shift, dtype=torch.float32)
        assert 0.45 < (base == shifted).double().mean().item() < 0.55
    # ... and the Triton path at such offsets agrees with the generator (not with the wrapped index).
    eye = torch.eye(40, device=KERNEL_DEVICE)
    implied = project(eye, 256, 1, feature_offset=2**40 + 5, backend="triton").T.cpu()
    assert torch.equal(implied, projection_matrix(256, 40, 1, feature_offset=2**40 + 5, dtype=torch.float32))
    assert not torch.equal(implied, projection_matrix(256, 40, 1, feature_offset=5, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# Accumulation semantics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_chunked_accumulation_equals_whole(kind, device):
    torch.manual_seed(0)
    grads = torch.randn(7, 401, device=device)
    offset = 2**33 - 100
    for backend in _backends(device):
        whole = project(grads, 150, 9, kind, offset, backend=backend)
        chunked = torch.zeros(7, 150, device=device)
        for start, stop in [(0, 37), (37, 38), (38, 290), (290, 401)]:
            project(grads[:, start:stop], 150, 9, kind, offset + start, out=chunked, backend=backend)
        ref, magnitude = _dense_reference(grads, 150, 9, kind, offset)
        assert torch.allclose(chunked.cpu().double(), whole.cpu().double(), rtol=0, atol=1e-5 * magnitude.max())
        assert ((chunked.cpu().double() - ref).abs() <= 1e-5 * magnitude + 1e-30).all()


@pytest.mark.parametrize("kind", KINDS)
def test_column_block_placement_scale_and_strided_out(kind, device):
    """Checkpoint t's projection lands in columns [t*d, (t+1)*d) of a trajectory buffer with its weight;
    every other entry (sentinel) is untouched. The buffer is a strided view (every other row)."""
    torch.manual_seed(1)
    n, d, n_ckpt = 5, 70, 3
    grads = [torch.randn(n, 300, device=device, dtype=torch.bfloat16) for _ in range(n_ckpt)]
    weights = [0.5, 2.0, -1.25]
    for backend in _backends(device):
        storage = torch.full((2 * n, n_ckpt * d + 9), SENTINEL, device=device)
        buffer = storage[::2]  # row stride 2*(n_ckpt*d + 9)
        start_values = torch.randn(n, n_ckpt * d, device=device)
        buffer[:, : n_ckpt * d] = start_values
        for t in range(n_ckpt):
            returned = project(grads[t], d, 100 + t, kind, 0, out=buffer, out_columns=slice(t * d, (t + 1) * d),
                               scale=weights[t], backend=backend)
            assert returned.data_ptr() == buffer.data_ptr()
        assert (storage[1::2] == SENTINEL).all()
        assert (buffer[:, n_ckpt * d:] == SENTINEL).all()
        for t in range(n_ckpt):
            ref, magnitude = _dense_reference(grads[t], d, 100 + t, kind, 0)
            expected = start_values[:, t * d:(t + 1) * d].cpu().double() + weights[t] * ref
            got = buffer[:, t * d:(t + 1) * d].cpu().double()
            assert ((got - expected).abs() <= 1e-5 * abs(weights[t]) * magnitude + 1e-6).all(), (backend, t)


def test_split_k_is_deterministic_and_matches_single_split():
    torch.manual_seed(2)
    grads = torch.randn(9, 700, device=KERNEL_DEVICE)
    d = 140
    outs = []
    for splits in (1, 3, 3):
        out = torch.zeros(9, d, device=KERNEL_DEVICE)
        project_module._project_triton(grads, d, 4, "rademacher", 10, out, 1 / math.sqrt(d), n_splits=splits)
        outs.append(out.cpu())
    assert torch.equal(outs[1], outs[2])
    ref, magnitude = _dense_reference(grads, d, 4, "rademacher", 10)
    for out in outs:
        assert ((out.double() - ref).abs() <= 1e-5 * magnitude).all()


def test_default_out_allocation_and_empty_inputs():
    grads = torch.randn(3, 50, device=KERNEL_DEVICE)
    out = project(grads, 20, 0, out_columns=slice(10, 30), backend="triton").cpu()
    assert out.shape == (3, 30) and out.dtype == torch.float32
    assert (out[:, :10] == 0).all()
    ref, magnitude = _dense_reference(grads, 20, 0, "rademacher", 0)
    assert ((out[:, 10:].double() - ref).abs() <= 1e-5 * magnitude).all()
    assert project(torch.randn(0, 50), 20, 0).shape == (0, 20)
    empty_p = torch.full((3, 20), 2.5)
    assert torch.equal(project(torch.randn(3, 0), 20, 0, out=empty_p.clone()), empty_p)


# ------------------------------------------------------------------------------------------------
# Against a dense float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_rows,n_features,d", [(1, 1, 1), (3, 257, 131), (19, 129, 300)])
def test_matches_dense_float64_reference(dtype, kind, n_rows, n_features, d, device):
    """Errors are measured against the float64 product of the *same* (already rounded) inputs, relative
    to sum_p |g_p Pi_jp|: fp32 accumulation over a few hundred terms stays below 1e-5 of it; on GPUs
    16-bit Gaussian entries are used as a hi+lo pair (~2^-17 relative) and fp32 grads as three exact
    bf16 pieces, both inside the same bound."""
    torch.manual_seed(n_rows * 1000 + n_features)
    base = torch.randn(n_rows, 2 * n_features + 3, device=device) * 3
    grads = base[:, 1 : 2 * n_features + 1 : 2].to(dtype)  # non-contiguous columns
    ref, magnitude = _dense_reference(grads, d, 77, kind, 2**34 + 1)
    for backend in _backends(device):
        poisoned = torch.full((n_rows, d + 4), float("nan"), device=device)
        poisoned[:, 2 : d + 2] = 0.0
        out = project(grads, d, 77, kind, 2**34 + 1, out=poisoned, out_columns=slice(2, d + 2), backend=backend)
        got = out[:, 2 : d + 2].cpu().double()
        assert torch.isnan(out[:, :2]).all() and torch.isnan(out[:, d + 2:]).all()
        err = (got - ref).abs()
        assert (err <= 1e-5 * magnitude + 1e-30).all(), (backend, (err / magnitude).max().item())


# ------------------------------------------------------------------------------------------------
# Johnson-Lindenstrauss behaviour
# ------------------------------------------------------------------------------------------------

def _jl_test_vectors(n_features: int, generator: torch.Generator) -> torch.Tensor:
    """Dense Gaussian vectors plus differences of two basis vectors, some at power-of-two distances
    (these expose generators whose columns repeat with a period)."""
    dense = torch.randn(48, n_features, generator=generator, dtype=torch.float64)
    pairs = []
    for k in range(48):
        a = int(torch.randint(0, n_features // 2, (1,), generator=generator))
        gap = 2 ** (k % 10) if k % 2 == 0 else int(torch.randint(1, n_features // 2, (1,), generator=generator))
        v = torch.zeros(n_features, dtype=torch.float64)
        v[a], v[a + gap] = 1.0, -1.0
        pairs.append(v)
    return torch.cat([dense, torch.stack(pairs)])


def jl_statistic_holds(projected: torch.Tensor, vectors: torch.Tensor, d: int) -> tuple[bool, str]:
    """Do the projections preserve squared norms and inner products as a JL map with d rows should?

    For a fixed vector x and i.i.d. zero-mean entries of variance 1/d, ||Pi x||^2 / ||x||^2 has mean 1 and
    variance <= 2/d (Rademacher is slightly below), and for unit x, y: <Pi x, Pi y> - <x, y> has mean 0
    and variance (1 + <x,y>^2)/d. Checks, over n vectors / consecutive pairs: every normalised deviation
    within 7 standard deviations (sub-Gaussian tails: no chance failure), the mean within 5 standard
    errors, and the mean squared normalised deviation between 0.3 and 1.8 (a 96-sample chi-square-like
    average: about 4 standard errors either side). A constant, periodic or low-rank generator fails.
    (A circulant matrix of one random sign row would pass: it is a legitimate fast JL construction.)
    """
    norms2 = (vectors ** 2).sum(1)
    ratio = (projected ** 2).sum(1) / norms2
    z_norm = (ratio - 1) / math.sqrt(2 / d)
    unit_x = vectors / norms2.sqrt()[:, None]
    unit_p = projected / norms2.sqrt()[:, None]
    cos = (unit_x[:-1] * unit_x[1:]).sum(1)
    z_inner = ((unit_p[:-1] * unit_p[1:]).sum(1) - cos) / torch.sqrt((1 + cos ** 2) / d)
    n = len(vectors)
    for name, z in (("norm", z_norm), ("inner", z_inner)):
        if z.abs().max() > 7:
            return False, f"{name}: max |deviation| {z.abs().max():.1f} sd"
        if abs(z.mean()) > 5 / math.sqrt(n):
            return False, f"{name}: mean deviation {z.mean():.2f} sd"
        if not 0.3 < (z ** 2).mean() < 1.8:
            return False, f"{name}: mean squared deviation {(z ** 2).mean():.2f} (expected <= 1)"
    return True, "ok"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [256, 1024, 4096])
def test_johnson_lindenstrauss(kind, d):
    n_features = 3000
    generator = torch.Generator().manual_seed(d)
    vectors = _jl_test_vectors(n_features, generator)
    pi = projection_matrix(d, n_features, seed=d + 1, kind=kind, feature_offset=2**36)
    ok, why = jl_statistic_holds(vectors @ pi.T, vectors, d)
    assert ok, why


def test_johnson_lindenstrauss_through_kernel():
    """The same statistic on the Triton path's output (bf16 input, d = 256)."""
    generator = torch.Generator().manual_seed(5)
    vectors = _jl_test_vectors(1000, generator).to(torch.bfloat16)
    projected = project(vectors.to(KERNEL_DEVICE), 256, 42, backend="triton").double().cpu()
    ok, why = jl_statistic_holds(projected, vectors.double(), 256)
    assert ok, why


@pytest.mark.parametrize("d", [256, 1024, 4096])
def test_johnson_lindenstrauss_statistic_rejects_broken_generators(d):
    n_features = 3000
    generator = torch.Generator().manual_seed(d)
    vectors = _jl_test_vectors(n_features, generator)
    good = projection_matrix(d, n_features, seed=3)
    broken = {
        "constant": torch.full((d, n_features), 1 / math.sqrt(d), dtype=torch.float64),
        "rows repeat every 16": good[torch.arange(d) % 16],
        "columns repeat every 64": good[:, torch.arange(n_features) % 64],
        "checkerboard signs": (1 - 2 * ((torch.arange(d)[:, None] + torch.arange(n_features)) % 2)).double()
        / math.sqrt(d),
        "same bit for 32 columns": good[(torch.arange(d) // 32) * 32],
    }
    for name, pi in broken.items():
        ok, why = jl_statistic_holds(vectors @ pi.T, vectors, d)
        assert not ok, f"the JL statistic accepted a broken generator: {name}"


# ------------------------------------------------------------------------------------------------
# Factored mode
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_equals_explicit_kronecker_projection(kind, dtype, device):
    torch.manual_seed(3)
    n_batch, n_tokens, n_in, n_out, d_in, d_out = 3, 6, 21, 13, 5, 7
    offset = 2**33 + 17
    inputs = torch.randn(n_batch, n_tokens, n_in, device=device).to(dtype)
    out_grads = torch.randn(n_batch, n_tokens, n_out, device=device).to(dtype)
    mask = torch.ones(n_batch, n_tokens, dtype=torch.bool, device=device)
    mask[0, 4:] = False
    mask[2, :1] = False
    inputs[~mask] = float("nan")  # padding junk must not leak
    out_grads[~mask] = float("inf")
    x = torch.where(mask[..., None], inputs.double(), 0.0).cpu()
    delta = torch.where(mask[..., None], out_grads.double(), 0.0).cpu()
    per_example = torch.einsum("bsa,bsc->bac", delta, x).reshape(n_batch, n_out * n_in)  # row-major W
    pi_in = projection_matrix(d_in, n_in, 11, kind, offset)
    pi_out = projection_matrix(d_out, n_out, 11, kind, offset, output_factor=True)
    expected = 0.75 * per_example @ torch.kron(pi_out, pi_in).T
    magnitude = 0.75 * per_example.abs() @ torch.kron(pi_out, pi_in).abs().T
    for backend in _backends(device):
        out = torch.full((n_batch, d_in * d_out + 3), SENTINEL, device=device)
        out[:, 3:] = 0.0
        project_linear_factored(inputs, out_grads, d_in, d_out, 11, kind, offset, token_mask=mask, out=out,
                                out_columns=slice(3, 3 + d_in * d_out), scale=0.75, backend=backend)
        assert (out[:, :3] == SENTINEL).all()
        got = out[:, 3:].cpu().double()
        assert ((got - expected).abs() <= 1e-5 * magnitude + 1e-9).all(), backend
    # 0/1 integer masks work like bool masks
    as_int = project_linear_factored(inputs, out_grads, d_in, d_out, 11, kind, offset, token_mask=mask.int())
    assert ((as_int.cpu().double() - expected / 0.75).abs() <= 1e-5 * magnitude / 0.75 + 1e-9).all()


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    g = torch.randn(4, 10)
    cases = [
        (TypeError, "grads", lambda: project(g.numpy(), 8, 0)),
        (ValueError, "grads", lambda: project(g[0], 8, 0)),
        (TypeError, "grads", lambda: project(g.double(), 8, 0)),
        (TypeError, "grads", lambda: project(g.int(), 8, 0)),
        (ValueError, "d", lambda: project(g, 0, 0)),
        (TypeError, "d", lambda: project(g, 8.0, 0)),
        (ValueError, "seed", lambda: project(g, 8, -1)),
        (ValueError, "seed", lambda: project(g, 8, 2**64)),
        (ValueError, "kind", lambda: project(g, 8, 0, kind="sparse")),
        (ValueError, "feature_offset", lambda: project(g, 8, 0, feature_offset=-1)),
        (ValueError, "feature_offset", lambda: project(g, 8, 0, feature_offset=2**63 - 5)),
        (TypeError, "out", lambda: project(g, 8, 0, out=torch.zeros(4, 8, dtype=torch.float64))),
        (ValueError, "out", lambda: project(g, 8, 0, out=torch.zeros(5, 8))),
        (ValueError, "out_columns", lambda: project(g, 8, 0, out=torch.zeros(4, 8), out_columns=slice(4, 12))),
        (ValueError, "out_columns", lambda: project(g, 8, 0, out=torch.zeros(4, 20), out_columns=slice(0, 7))),
        (ValueError, "out_columns", lambda: project(g, 8, 0, out=torch.zeros(4, 20), out_columns=slice(0, 16, 2))),
        (TypeError, "out_columns", lambda: project(g, 8, 0, out_columns=(0, 8))),
        (ValueError, "scale", lambda: project(g, 8, 0, scale=float("nan"))),
        (ValueError, "backend", lambda: project(g, 8, 0, backend="cuda")),
        (ValueError, "inputs and out_grads", lambda: project_linear_factored(
            torch.randn(2, 3, 4), torch.randn(2, 4, 5), 2, 2, 0)),
        (ValueError, "token_mask", lambda: project_linear_factored(
            torch.randn(2, 3, 4), torch.randn(2, 3, 5), 2, 2, 0, token_mask=torch.ones(2, 4))),
        (ValueError, "inputs", lambda: project_linear_factored(torch.randn(2, 4), torch.randn(2, 3, 5), 2, 2, 0)),
        (ValueError, "d_in", lambda: project_linear_factored(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 0, 2, 0)),
    ]
    for error, word, call in cases:
        with pytest.raises(error, match=word):
            call()


# ------------------------------------------------------------------------------------------------
# GPU only: the CUDA kernel against the CPU generator and the CPU projection
# ------------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_projection_equals_cpu_projection(dtype):
    torch.manual_seed(4)
    grads = (torch.randn(70, 5000) * 2).to(dtype)
    for kind in KINDS:
        cpu = project(grads, 1000, 8, kind, 2**39, backend="torch")
        gpu = project(grads.cuda(), 1000, 8, kind, 2**39).cpu()
        _, magnitude = _dense_reference(grads, 1000, 8, kind, 2**39)
        assert ((gpu.double() - cpu.double()).abs() <= 2e-5 * magnitude).all(), kind


# ------------------------------------------------------------------------------------------------
# Compile the GPU kernel for sm_90 on a CPU machine (Triton's bundled ptxas / cuobjdump)
# ------------------------------------------------------------------------------------------------
_SM90_COMPILE = r'''
import json, os, re, subprocess
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gtp_kernels.ops import project as k1

bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
fn = k1._project_kernel
results = []
cases = [("bf16", "rademacher", n, acc) for n in (32, 64, 256) for acc in (True, False)]
cases += [("fp16", "rademacher", 64, True), ("fp32", "rademacher", 128, True),
          ("bf16", "gaussian", 32, False), ("fp32", "gaussian", 128, True)]
for name, kind, n_rows, accumulate in cases:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    block_b, block_d, block_p, warps, stages = k1.gpu_blocks(n_rows, kind == "gaussian")
    consts = dict(k1.kernel_constexprs(dtype, kind, on_gpu=True), ACCUMULATE=accumulate, BLOCK_B=block_b,
                  BLOCK_D=block_d, BLOCK_P=block_p, stride_gp=1)  # contiguous grads: Triton specialises stride 1
    sig = {"g_ptr": "*" + name, "stride_gb": "i64", "stride_gp": "constexpr", "n_rows": "i32", "n_features": "i64",
           "out_ptr": "*fp32", "stride_ob": "i64", "stride_od": "i64", "stride_ws": "i64", "d": "i32",
           "feature_offset": "i64", "seed_lo": "i64", "seed_hi": "i64", "multiplier": "fp32", "p_per_split": "i64"}
    sig.update({k: "constexpr" for k in consts})
    aligned = ("g_ptr", "out_ptr", "stride_gb", "stride_ob", "stride_ws", "p_per_split")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with open("k1.cubin", "wb") as f:
        f.write(c.asm["cubin"])
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", "k1.cubin"], capture_output=True,
                          text=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    back = [(a, int(t.group(1), 16)) for a, op, arg in ins if op.startswith("BRA")
            for t in [re.search(r"0x([0-9a-f]+)", arg)] if t and int(t.group(1), 16) < a]
    end, start = max(back, key=lambda ab: ab[0] - ab[1])  # the main loop: the longest backward jump
    body = [op for a, op, _ in ins if start <= a <= end]
    results.append(dict(case=f"{name} {kind} B={n_rows} accumulate={accumulate}", shared=c.metadata.shared,
                        loop_local=sum(op.startswith(("LDL", "STL")) for op in body), loop_len=len(body),
                        wgmma="wgmma.mma_async" in c.asm["ptx"], cp_async="cp.async" in c.asm["ptx"]))
print("RESULTS" + json.dumps(results))
'''


@pytest.mark.slow
def test_kernel_compiles_for_sm90(tmp_path):
    """The GPU kernel (not the interpreter) compiles for sm_90 with the launch shapes of gpu_blocks():
    wgmma (except fp32 Gaussian, which uses the fp32 FMA dot) and pipelined cp.async loads, shared memory
    within a Hopper SM, and a Rademacher main loop free of register spills. (Gaussian loops may spill a
    little: float64 Box-Muller.)"""
    import json
    import os
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("triton's bundled ptxas/cuobjdump are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULTS", 1)[1])
    assert len(results) == 10
    for r in results:
        assert r["shared"] <= 227 * 1024, r
        assert r["cp_async"], r
        if r["case"].startswith("fp32 gaussian"):
            continue  # the plain fp32 ("ieee") dot runs on the FMA units, not wgmma
        assert r["wgmma"], r
        if "rademacher" in r["case"]:
            assert r["loop_local"] == 0, r


# ------------------------------------------------------------------------------------------------
# Non-finite values: one reduction over the output, an InputError naming the input row
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_grads_are_an_input_error(backend, bad):
    """NaN/Inf in grads went through silently into the projection."""
    from gtp_kernels.validation import InputError
    grads = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    grads[3, 17] = bad
    with pytest.raises(InputError, match=r"grads contains NaN or Inf \(first in row 3\)"):
        project(grads, 16, 5, backend=backend)
    out = torch.full((5, 20), 2.0)
    with pytest.raises(InputError, match="out\\[:, out_columns\\] now holds the non-finite result"):
        project(grads, 16, 5, out=out, out_columns=slice(4, 20), backend=backend)
    assert (out[:, :4] == 2.0).all()  # columns outside out_columns untouched
    got = project(grads, 16, 5, backend=backend, check_finite=False)  # opted out: passes through
    assert not torch.isfinite(got[3]).all() and torch.isfinite(got[[0, 1, 2, 4]]).all()


def test_float32_overflow_is_an_input_error():
    from gtp_kernels.validation import InputError
    grads = torch.full((2, 64), 3e38)  # finite, but the sums of 64 of them overflow float32
    with pytest.raises(InputError, match="the projection overflowed float32"):
        project(grads, 4, 0, kind="rademacher", scale=64.0, backend="torch")


def test_factored_projection_checks_real_tokens_only():
    from gtp_kernels.validation import InputError
    g = torch.Generator().manual_seed(2)
    inputs, out_grads = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 3] = False
    inputs[1, 3] = float("nan")  # padding: masked out, fine
    assert torch.isfinite(project_linear_factored(inputs, out_grads, 2, 2, 0, token_mask=mask, backend="torch")).all()
    out_grads[2, 0, 1] = float("inf")  # a real token
    with pytest.raises(InputError, match=r"out_grads contains NaN or Inf \(first in row 2\)"):
        project_linear_factored(inputs, out_grads, 2, 2, 0, token_mask=mask, backend="torch")


def test_project_errors_are_input_errors():
    from gtp_kernels.validation import InputError, InputTypeError
    g = torch.randn(4, 10)
    with pytest.raises(InputTypeError, match="check_finite must be True or False"):
        project(g, 8, 0, check_finite="no")
    with pytest.raises(InputTypeError, match="grads"):
        project(g.double(), 8, 0)
    with pytest.raises(InputError, match="d must be"):
        project(g, 0, 0)


def test_triton_on_cpu_without_the_interpreter_is_an_input_error(monkeypatch):
    """It was a RuntimeError from deep in the dispatch."""
    from gtp_kernels.validation import InputError
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton and the kernels are imported already (module top)
    with pytest.raises(InputError, match="needs the Triton interpreter"):
        project(torch.randn(4, 10), 8, 0, backend="triton")
    with pytest.raises(InputError, match="needs the Triton interpreter"):
        project_linear_factored(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 2, 2, 0, backend="triton")


def test_numpy_integer_arguments_project_as_python_ints():
    g = torch.randn(3, 40)
    expected = project(g, 8, 5, feature_offset=7, backend="torch")
    got = project(g, np.int64(8), np.uint64(5), feature_offset=np.int32(7), scale=np.float32(1.0), backend="torch")
    assert torch.equal(got, expected)
    assert torch.equal(projection_matrix(np.int64(8), np.int64(40), np.uint64(5)), projection_matrix(8, 40, 5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_that_require_grad_record_no_graph(backend):
    # Per-example gradients from torch.func over parameters that require grad require grad
    # themselves; the torch path used to record grads @ Pi^T, so autograd held every generated
    # block of Pi alive through ``out`` (3.3 GB per call in bench_bergson_collect.py).
    torch.manual_seed(3)
    params = torch.randn(5, 37, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    grads = (params * 1.5).float()  # a non-leaf that requires grad, like torch.func.grad's outputs
    assert grads.requires_grad
    reference, _ = _dense_reference(grads.detach(), 12, 4, "rademacher", 0)
    out = torch.full((5, 12), SENTINEL, device=KERNEL_DEVICE)
    got = project(grads, 12, seed=4, out=out, backend=backend)
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got.double().cpu(), reference + SENTINEL, rtol=1e-5, atol=1e-4)

    inputs = torch.randn(2, 3, 7, device=KERNEL_DEVICE, requires_grad=True) * 1.0
    out_grads = torch.randn(2, 3, 5, device=KERNEL_DEVICE, requires_grad=True) * 1.0
    factored = project_linear_factored(inputs, out_grads, 4, 3, seed=2, backend=backend)
    assert factored.grad_fn is None and not factored.requires_grad
    explicit = torch.einsum("bso,bsi->boi", out_grads.detach().double(), inputs.detach().double()).reshape(2, -1)
    pi = torch.kron(projection_matrix(3, 5, 2, "rademacher", 0, dtype=torch.float64, output_factor=True),
                    projection_matrix(4, 7, 2, "rademacher", 0, dtype=torch.float64))
    torch.testing.assert_close(factored.double().cpu(), explicit.cpu() @ pi.T, rtol=1e-5, atol=1e-5)
