"""Every bad input raises a clear error before any work; the CLI exits 2 and writes nothing."""
import math

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.cli import main as cli_main
from gtp_kernels.validation import InputError

A = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
b = torch.randn(12, generator=torch.Generator().manual_seed(1))


def nan_at(t, idx):
    t = t.clone()
    t[idx] = float("nan")
    return t


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(candidates=A[0]), "candidates must be"),
        (dict(candidates=A[None, None]), "candidates must be"),
        (dict(target=b[:5]), "target has D=5"),
        (dict(target=b[:, None, None]), "target must be"),
        (dict(candidates=A.to(torch.int32)), "float16, bfloat16, float32 or float64"),
        (dict(candidates=nan_at(A, (3, 4))), "NaN or Inf .*row 3"),
        (dict(candidates=A.clone().index_fill_(0, torch.tensor([7]), float("inf"))), "NaN or Inf"),
        (dict(target=nan_at(b, 2)), "target contains NaN"),
        (dict(k=0), "k must be >= 1"),
        (dict(k=21), "larger than the pool"),
        (dict(k=2.5), "k must be an integer"),
        (dict(candidates=A[:0], k=1), "larger than the pool|empty"),
        (dict(candidates=A[:, :0], target=b[:0]), "empty"),
        (dict(target=torch.zeros(12)), "all zero"),
        (dict(checkpoint_weights=[1.0, -1.0], num_checkpoints=2), "non-negative"),
        (dict(checkpoint_weights=[1.0, float("nan")], num_checkpoints=2), "NaN or Inf"),
        (dict(checkpoint_weights=[0.0, 0.0], num_checkpoints=2), "all zero"),
        (dict(checkpoint_weights=[1.0, 1.0, 1.0], num_checkpoints=2), "T=2 entries"),
        (dict(num_checkpoints=5), "does not divide"),
        (dict(method="nope"), "unknown method"),
        (dict(exclude=[25]), r"exclude indices must lie in \[0, 20\)"),
        (dict(ridge=-1.0), "ridge must be"),
        (dict(ridge="0.1"), "ridge must be a number"),
        (dict(tol=float("nan")), "tol must be finite"),
        (dict(min_cosine=float("nan")), "min_cosine must be finite"),
        (dict(align_threshold=float("nan")), "align_threshold must be finite"),
        (dict(stop_ratio=1.0), r"stop_ratio must lie in \[0, 1\)"),
        (dict(seed=None, method="random"), "seed must be an integer"),
        (dict(seed=-1, method="random"), "seed must be an integer >= 0"),
        (dict(topk_reduce="median"), "topk_reduce must be 'mean' or 'max'"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(num_checkpoints=2.5), "num_checkpoints must be an integer"),
        (dict(device="nodevice"), "not a device torch knows"),
        (dict(device="meta"), "runs on cpu or cuda"),
        (dict(exclude=np.array([0.5, 1.7])), "bool mask or integer row indices"),
        (dict(exclude=torch.ones(20, dtype=torch.uint8)), "uint8 is ambiguous"),
        (dict(exclude=np.ones(20, dtype=bool)), "no candidate can be selected"),
        (dict(candidates=torch.zeros(20, 12)), "no candidate can be selected: all 20 rows are all-zero"),
        (dict(candidates=[[1.0]]), "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(candidates=A, target=b, k=3)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        gk.select(args.pop("candidates"), args.pop("target"), args.pop("k"), **args)


def test_dtype_errors_are_also_type_errors():
    with pytest.raises(TypeError):
        gk.select(A.to(torch.int64), b, 3)


def test_numpy_and_low_precision_inputs_accepted():
    for cand in (A.numpy(), A.to(torch.bfloat16), A.to(torch.float16)):
        sel = gk.select(cand, b, 3)
        assert 1 <= len(sel.indices) <= 3


def _write_inputs(tmp_path, cand, target):
    np.save(tmp_path / "A.npy", cand)
    np.save(tmp_path / "b.npy", target)
    return str(tmp_path / "A.npy"), str(tmp_path / "b.npy")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, t: (a, t[:5]), "target has D=5"),
        (lambda a, t: (np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a), t), "NaN or Inf"),
        (lambda a, t: (a.astype(np.int32), t), "floating"),
    ],
)
def test_cli_bad_input_exits_nonzero_one_line_writes_nothing(tmp_path, capsys, mutate, match):
    cand, target = mutate(A.numpy(), b.numpy())
    fa, fb = _write_inputs(tmp_path, cand, target)
    out = tmp_path / "out"
    code = cli_main(["select", "--candidates", fa, "--target", fb, "--k", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("gtp: error:")
    assert pytest.importorskip("re").search(match, err)
    assert not out.exists()


def test_cli_corrupt_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "A.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "b.npy", b.numpy())
    for cand in (str(bad), str(tmp_path / "missing.npy"), str(tmp_path / "A.txt")):
        (tmp_path / "A.txt").write_text("1 2 3")
        code = cli_main(["select", "--candidates", cand, "--target", str(tmp_path / "b.npy"),
                         "--k", "3", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    trunc = tmp_path / "t.pt"
    torch.save(A, trunc)
    trunc.write_bytes(trunc.read_bytes()[:100])
    assert cli_main(["select", "--candidates", str(trunc), "--target", str(tmp_path / "b.npy"),
                     "--k", "3", "--out", str(tmp_path / "out")]) == 2


def test_huge_finite_values_are_not_mistaken_for_inf():
    big = A.clone()
    big[2] = 3e38  # the row norm overflows float32; the values are finite
    with pytest.raises(gk.InputError, match="the largest overflows float32"):
        gk.select(big, b, 3, method="topk")  # float32 products would overflow: said, not NaN/Inf
    sel = gk.select(big, b, 3, method="topk", compute_dtype=torch.float64)
    assert len(sel.indices) == 3
    zero_row = A.clone()
    zero_row[5] = 0.0
    problem = __import__("gtp_kernels.validation", fromlist=["x"]).validate_problem(zero_row, b, 3)
    assert problem.exclude.tolist() == [i == 5 for i in range(20)]


@pytest.mark.parametrize("as_mask", [lambda m: m, torch.from_numpy, lambda m: np.flatnonzero(m).tolist()])
def test_exclude_accepts_numpy_and_torch_masks_and_index_lists(as_mask):
    mask = np.zeros(20, dtype=bool)
    mask[[1, 4, 9]] = True
    sel = gk.select(A, b, 10, method="topk", exclude=as_mask(mask))
    assert not set(sel.indices.tolist()) & {1, 4, 9}


def test_exclude_mask_of_wrong_length_is_refused():
    with pytest.raises(InputError, match="exclude mask must have shape"):
        gk.select(A, b, 3, exclude=np.zeros(5, dtype=bool))


def test_cuda_device_without_cuda_is_an_input_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InputError, match="CUDA is not available"):
        gk.select(A, b, 3, device="cuda")


def test_exclude_list_of_bools_is_a_mask_not_indices():
    """[True, True, False, ...] read as integers would exclude rows 0 and 1 only."""
    target = A[2] + A[3]
    mask = [i in (2, 3) for i in range(20)]
    for method in gk.METHODS:
        sel = gk.select(A, target, 3, method=method, exclude=mask)
        assert not set(sel.indices.tolist()) & {2, 3}, method
    assert sorted(gk.select(A, target, 2, exclude=[]).indices.tolist()) == [2, 3]  # empty list: none


@pytest.mark.parametrize("method", list(gk.METHODS))
def test_numpy_integer_budget(method):
    sel = gk.select(A, b, np.int64(3), method=method)
    assert sel.k == 3 and type(sel.k) is int and 1 <= len(sel.indices) <= 3


@pytest.mark.parametrize("scale", [2.0 ** 70, 2.0 ** -70, 1e30, 1e-30])
def test_target_magnitude_does_not_change_the_picks(scale):
    """Targets are scaled by a power of two inside select: the same picks at any magnitude,
    weights and residual norms scaling with the target (exactly, for a power of two)."""
    for method in ("gtp", "gtp-cosamp", "gtp-reference", "topk"):
        ref = gk.select(A, b, 5, method=method)
        sel = gk.select(A, b.double() * scale, 5, method=method)
        assert sel.indices.tolist() == ref.indices.tolist(), method
        expect = ref.weights * scale if gk.METHODS[method].fit_weights else ref.weights
        exact = math.log2(scale).is_integer()  # then every product rounds as at unit scale
        np.testing.assert_allclose(sel.weights, expect, rtol=1e-12 if exact else 1e-5)
        np.testing.assert_allclose(sel.residual_norms, ref.residual_norms * scale, rtol=1e-12 if exact else 1e-5)


def test_float32_products_out_of_range_are_refused_float64_works():
    for scale, side in ((1e20, "largest overflows float32"), (1e-25, "smallest underflows float32"),
                        (2.0 ** 52, "the largest is")):
        with pytest.raises(InputError, match=side):
            gk.select(A * scale, b, 3)
        # in float64 the same rows are fine and picked as at unit scale (tiny rows are not zero rows)
        sel = gk.select(A.double() * scale, b, 3, method="gtp")
        assert sel.indices.tolist() == gk.select(A.double(), b, 3, method="gtp").indices.tolist()
        sel32 = gk.select(A * scale, b, 3, method="gtp", compute_dtype=torch.float64)
        assert sel32.indices.tolist() == sel.indices.tolist()


def test_subnormal_and_huge_float64_targets():
    """The power-of-two target scaling stays inside float64 for any finite target."""
    A64 = A.double()
    ref = gk.select(A64, b.double(), 3).indices.tolist()
    for scale in (1e-310, 1e300):
        assert gk.select(A64, b.double() * scale, 3).indices.tolist() == ref


@pytest.mark.parametrize("method", ["gtp", "gtp-cosamp", "gtp-reference", "topk"])
def test_checkpoint_weight_magnitude_does_not_change_the_picks(method):
    """Checkpoint weights are scaled by a power of four inside select (ridge with them): the
    objective only scales, so picks and fit weights are the unit-scale ones, residual norms
    ||r||_W scale by the square root; extreme weights (1e-40, 1e30) no longer leave float32."""
    T = 3
    A3 = torch.randn(40, T * 8, generator=torch.Generator().manual_seed(2))
    b3 = A3[[1, 5, 9]].T @ torch.tensor([0.5, 1.0, 2.0]) + 0.01 * torch.randn(T * 8, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)
    ref = gk.select(A3, b3, 6, method=method, checkpoint_weights=w, num_checkpoints=T, ridge=0.01)
    for factor in (4.0 ** 40, 4.0 ** -40, 1e-40 / 0.25, 1e30):
        sel = gk.select(A3, b3, 6, method=method, checkpoint_weights=w * factor, num_checkpoints=T,
                        ridge=0.01 * factor)
        assert sel.indices.tolist() == ref.indices.tolist(), factor
        exact = math.log(factor, 4).is_integer()
        # a factor that is not a power of four rounds differently in float32: errors of a few ulps of
        # the largest weight, which the smallest weights (1/400 of it here) see as ~1e-4 relative
        np.testing.assert_allclose(sel.weights, ref.weights, rtol=1e-12 if exact else 1e-4,
                                   atol=0.0 if exact else 1e-5 * float(np.abs(ref.weights).max()))
        np.testing.assert_allclose(sel.residual_norms, ref.residual_norms * math.sqrt(factor),
                                   rtol=1e-12 if exact else 1e-4)
        assert sel.params["checkpoint_weights"] == pytest.approx((w * factor).tolist(), rel=1e-15)


# --- type gaps: each a clear InputError / InputTypeError before any work (issue 14, item 14) ---

@pytest.mark.parametrize("kwargs,match", [
    (dict(checkpoint_weights=["a", 1.0], num_checkpoints=2), "checkpoint_weights must hold real numbers, got 'a'"),
    (dict(checkpoint_weights=np.array([1 + 2j, 1.0]), num_checkpoints=2), "real numbers, got numpy dtype complex128"),
    (dict(checkpoint_weights=torch.tensor([1 + 2j, 1.0]), num_checkpoints=2), "real numbers, got a torch.complex64"),
    (dict(checkpoint_weights=[True, 1.0], num_checkpoints=2), "real numbers, got True"),
    (dict(positive="no"), "positive must be True or False, got 'no'"),
    (dict(positive=0), "positive must be True or False"),
    (dict(progress="yes"), "progress must be True or False"),
    (dict(exclude=[True, 0, 1]), "exclude mixes bools and other values"),
    (dict(seed=2 ** 70, method="random"), r"seed must be an integer <= 2\^64 - 1"),
    (dict(seed=2 ** 64, method="random"), r"seed must be an integer <= 2\^64 - 1"),
    (dict(seed=1.0, method="random"), "seed must be an integer"),
])
def test_type_gaps_are_input_type_errors(kwargs, match):
    """Each of these was read wrongly or crashed: strings in the weights (ValueError), complex
    weights (cut to their real part), positive="no" (True), [True, 0, 1] (rows 1, 0, 1),
    seed=2**70 (torch's ValueError deep in random)."""
    args = dict(candidates=A, target=b, k=3)
    args.update(kwargs)
    with pytest.raises(InputError, match=match) as err:
        gk.select(args.pop("candidates"), args.pop("target"), args.pop("k"), **args)
    assert isinstance(err.value, TypeError) == ("<=" not in match)  # a range error is no TypeError


def test_largest_seed_works():
    sel = gk.select(A, b, 3, method="random", seed=2 ** 64 - 1)
    assert len(sel.indices) == 3


@pytest.mark.parametrize("method", sorted(gk.METHODS))
def test_meta_tensors_are_refused(method):
    with pytest.raises(InputError, match="candidates is on the meta device"):
        gk.select(A.to("meta"), b, 3, method=method)
    with pytest.raises(InputError, match="candidates is on the meta device"):
        gk.select(A.to("meta"), b.to("meta"), 3, method=method)


@pytest.mark.parametrize("method", sorted(gk.METHODS))
def test_tensors_that_require_grad_are_read_as_values(method):
    """gtp, gtp-cosamp and topk raised RuntimeError on them; selection reads values only."""
    want = gk.select(A, b, 4, method=method)
    got = gk.select(A.clone().requires_grad_(), b.clone().requires_grad_(), 4, method=method)
    assert got.indices.tolist() == want.indices.tolist()
    np.testing.assert_array_equal(got.weights, want.weights)


@pytest.mark.parametrize("method", ["gtp", "gtp-cosamp", "topk"])
def test_triton_backend_on_cpu_without_the_interpreter_is_refused(method, monkeypatch):
    # triton reads TRITON_INTERPRET when it and the kernels are imported: import them first
    pytest.importorskip("triton")
    import gtp_kernels.ops.correlate  # noqa: F401
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="needs the Triton interpreter .*TRITON_INTERPRET=1"):
        gk.select(A, b, 3, method=method, backend="triton")


def test_triton_backend_on_cpu_runs_in_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1: the kernels run, and pick what torch picks
    got = gk.select(A, b, 3, backend="triton")
    want = gk.select(A, b, 3, backend="torch")
    assert got.indices.tolist() == want.indices.tolist()


def test_option_helpers():
    from gtp_kernels.validation import InputTypeError, check_bool, check_choice, check_int, check_real
    assert check_int(np.int64(3), "n", low=1) == 3 and type(check_int(np.int64(3), "n")) is int
    for bad in (True, 2.0, "2", None):
        with pytest.raises(InputTypeError, match="n must be an integer"):
            check_int(bad, "n")
    with pytest.raises(InputError, match="n must be an integer >= 1, got 0"):
        check_int(0, "n", low=1)
    assert check_real(np.float32(0.5), "x", low=0, high=1) == 0.5
    for bad in (1j, "0.5", False, None):
        with pytest.raises(InputTypeError, match="x must be a real number"):
            check_real(bad, "x")
    with pytest.raises(InputError, match="finite"):
        check_real(float("inf"), "x")
    assert check_real(float("inf"), "x", finite=False) == float("inf")
    with pytest.raises(InputError, match=r"x must lie in \[0, 1\], got 2.0"):
        check_real(2, "x", low=0, high=1)
    assert check_bool(np.bool_(True), "f") is True
    with pytest.raises(InputError, match="f must be True or False, got 1"):
        check_bool(1, "f")
    assert check_choice("max", "r", ("mean", "max")) == "max"
    with pytest.raises(InputError, match=r"r must be 1, 2 or 3, got True"):
        check_choice(True, "r", (1, 2, 3))

def test_float64_products_out_of_range_are_refused():
    """Issue 14: float64 rows of norm ~1e155 overflowed their Gram entries (an empty selection,
    'no_correlation'), ~1e-160 underflowed them (gtp-reference: 1 row and an infinite residual,
    gtp: 5 rows). Refused like float32 ones; inside 2^-400..2^400 the picks are the unit-scale ones."""
    A64, b64 = A.double(), b.double()
    for scale, side in ((1e155, "the largest"), (1e-160, "the smallest"), (2.0 ** 410, "the largest is")):
        for method in ("gtp", "gtp-reference"):
            with pytest.raises(InputError, match=f"for float64 products.*{side}"):
                gk.select(A64 * scale, b64, 5, method=method)
    ref = gk.select(A64, b64, 5, method="gtp").indices.tolist()
    for scale in (2.0 ** 390, 2.0 ** -390):
        for method in ("gtp", "gtp-reference", "gtp-cosamp"):
            sel = gk.select(A64 * scale, b64, 5, method=method)
            assert sel.indices.tolist() == gk.select(A64, b64, 5, method=method).indices.tolist(), (scale, method)
        assert sel.relative_residual < 1
    assert gk.select(A64 * 2.0 ** 390, b64, 5).indices.tolist() == ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 7), (301, 129), (5000, 640)])
def test_block_row_norms_match_float64(dtype, shape):
    """The input check's row norms: 16-bit rows upcast a slice at a time (several slices for the
    larger shapes) give the float64 norms of the stored values to float32 rounding."""
    from gtp_kernels.validation import block_row_norms

    g = torch.Generator().manual_seed(shape[0])
    block = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)
    block[0, 0] = 7.0  # never an all-zero first row
    got = block_row_norms(block, torch.float32)
    want = torch.linalg.vector_norm(block.double(), dim=1)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), want, rtol=4e-6 * max(1, shape[1]) ** 0.5, atol=0)
    bad = block.clone()
    bad[-1, -1] = float("inf")
    assert not bool(torch.isfinite(block_row_norms(bad, torch.float32)[-1]))
