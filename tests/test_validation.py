"""Every bad input raises a clear error before any work; the CLI exits 2 and writes nothing."""
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
    sel = gk.select(big, b, 3, method="topk")
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
