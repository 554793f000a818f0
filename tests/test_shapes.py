"""Shapes: T inferred from checkpoint_weights on flat rows where it is unambiguous, and shape
mistakes answered with what to do (transpose, reshape the target, pass num_checkpoints)."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.cli import main as cli_main

N, T, d = 40, 3, 6
D = T * d
g = torch.Generator().manual_seed(0)
A3 = torch.randn(N, T, d, generator=g)
A = A3.reshape(N, D)
b = A[:4].sum(0)
lrs = [3.0, 2.0, 1.0]


@pytest.mark.parametrize("method", list(gk.METHODS))
def test_flat_rows_with_checkpoint_weights_infer_T(method):
    """README's line: gk.select(candidates, target, k, method="topk", checkpoint_weights=lrs)."""
    got = gk.select(A, b, 5, method=method, checkpoint_weights=lrs)
    want = gk.select(A, b, 5, method=method, checkpoint_weights=lrs, num_checkpoints=T)
    assert got.params["num_checkpoints"] == T
    assert got.indices.tolist() == want.indices.tolist()
    np.testing.assert_array_equal(got.weights, want.weights)


def test_inferred_T_works_for_numpy_and_tensor_weights():
    for weights in (np.asarray(lrs), torch.tensor(lrs), tuple(lrs)):
        assert gk.select(A.numpy(), b.numpy(), 3, checkpoint_weights=weights).params["num_checkpoints"] == T


def test_weights_that_do_not_divide_D_name_num_checkpoints():
    with pytest.raises(gk.InputError, match=r"4 entries.*num_checkpoints"):
        gk.select(A, b, 3, checkpoint_weights=[1.0, 1.0, 1.0, 1.0])


def test_weights_against_an_explicit_T_name_num_checkpoints():
    with pytest.raises(gk.InputError, match=r"T=2 entries.*num_checkpoints=2"):
        gk.select(A, b, 3, checkpoint_weights=lrs, num_checkpoints=2)


def test_transposed_candidates_say_transpose():
    wide = torch.randn(8, 50, generator=g)  # a pool of 50 examples of D=8 given as (D, N)
    with pytest.raises(gk.InputError, match="transpose"):
        gk.select(wide, torch.randn(8, generator=g), 3)


@pytest.mark.parametrize("target,needle", [
    (b[None, :], r"reshape the target to \(D,\)"),
    (torch.stack([b, 2 * b]), r"\(D, m\).*target\.T"),
    (b.reshape(T, d), r"\(T, d\).*reshape the target to \(D,\)"),
    (torch.stack([b, b]).reshape(2, T, d), r"\(m, T, d\).*\(D, m\)"),
    (b[:5], r"reshape the target to \(D,\) or \(D, m\)"),
])
def test_target_shape_mistakes_say_what_to_do(target, needle):
    with pytest.raises(gk.InputError, match=needle):
        gk.select(A3, target, 3)


def test_a_T_by_d_target_with_flat_rows_suggests_num_checkpoints():
    with pytest.raises(gk.InputError, match=f"num_checkpoints={T}"):
        gk.select(A, b.reshape(T, d), 3)


def test_cli_transposed_candidates_one_line(tmp_path, capsys):
    np.save(tmp_path / "A.npy", np.random.default_rng(0).standard_normal((8, 50)).astype(np.float32))
    np.save(tmp_path / "b.npy", np.ones(8, dtype=np.float32))
    assert cli_main(["select", "--candidates", str(tmp_path / "A.npy"), "--target", str(tmp_path / "b.npy"),
                     "--k", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gtp: error: ") and "transpose" in err[0]
    assert not (tmp_path / "o").exists()
