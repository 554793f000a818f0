"""LESS gradient folders (dim<d>/all_orig.pt, all_unormalized.pt, grads-<count>.pt) read correctly."""
import numpy as np
import pytest
import torch

from gtp_kernels.collect.less_store import less_to_store, read_less_gradients


def _write_less_checkpoint(folder, rows, d, merged=True, shard_every=4):
    dim = folder / f"dim{d}"
    dim.mkdir(parents=True)
    for count in range(shard_every, len(rows) + shard_every, shard_every):  # LESS names shards by running count
        torch.save(rows[count - shard_every : count].clone(), dim / f"grads-{min(count, len(rows))}.pt")
    if merged:
        torch.save(torch.nn.functional.normalize(rows, dim=1), dim / "all_orig.pt")
        torch.save(rows.clone(), dim / "all_unormalized.pt")


def _trajectory(n=10, t=3, d=16, seed=0):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))


def test_read_folder_of_checkpoints(tmp_path):
    rows = _trajectory()
    # Steps 104 < 1000: name order ("ckpt1000" < "ckpt104") differs from step order on purpose.
    for t, step in enumerate([104, 208, 1000]):
        _write_less_checkpoint(tmp_path / f"llama-p0.05-lora-ckpt{step}-adam", rows[:, t], 16)
    normalized = read_less_gradients(tmp_path)
    assert normalized.checkpoint_names == ["llama-p0.05-lora-ckpt104-adam", "llama-p0.05-lora-ckpt208-adam", "llama-p0.05-lora-ckpt1000-adam"]
    torch.testing.assert_close(normalized.trajectory, torch.nn.functional.normalize(rows, dim=2))
    raw = read_less_gradients(tmp_path, normalized=False)
    torch.testing.assert_close(raw.trajectory, rows, rtol=0, atol=0)
    assert raw.d == 16 and raw.files[0][0].endswith("all_unormalized.pt")


def test_read_shards_only_and_single_checkpoint(tmp_path):
    rows = _trajectory(n=11, t=1, d=8)[:, 0]
    _write_less_checkpoint(tmp_path / "ckpt", rows, 8, merged=False, shard_every=4)
    got = read_less_gradients(tmp_path / "ckpt", normalized=False)
    assert [f.rsplit("/", 1)[1] for f in got.files[0]] == ["grads-4.pt", "grads-8.pt", "grads-11.pt"]
    torch.testing.assert_close(got.trajectory[:, 0], rows, rtol=0, atol=0)
    got = read_less_gradients(tmp_path / "ckpt" / "dim8", normalized=True)
    torch.testing.assert_close(got.trajectory[:, 0], torch.nn.functional.normalize(rows, dim=1))


def test_less_to_store_round_trip(tmp_path):
    rows = _trajectory(n=9, t=2, d=8)
    for t in range(2):
        _write_less_checkpoint(tmp_path / "grads" / f"run-ckpt{t + 1}-adam", rows[:, t], 8)
    store = less_to_store(tmp_path / "grads", tmp_path / "store", checkpoint_weights=[3.0, 1.0], shard_size=4)
    assert store.checkpoint_weights == [0.75, 0.25] and not store.weights_applied
    np.testing.assert_allclose(store.trajectory_view(), torch.nn.functional.normalize(rows, dim=2).numpy(), rtol=1e-6)
    assert store.ids == [str(i) for i in range(9)]


def test_less_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_less_gradients(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no dim"):
        read_less_gradients(tmp_path / "empty")
    _write_less_checkpoint(tmp_path / "two" / "a-ckpt1", _trajectory(n=5, t=1)[:, 0], 16)
    _write_less_checkpoint(tmp_path / "two" / "a-ckpt2", _trajectory(n=6, t=1)[:, 0], 16)
    with pytest.raises(ValueError, match="disagree"):
        read_less_gradients(tmp_path / "two")
    _write_less_checkpoint(tmp_path / "dims" / "c", _trajectory(n=5, t=1, d=16)[:, 0], 16)
    _write_less_checkpoint(tmp_path / "dims" / "c2", _trajectory(n=5, t=1, d=8)[:, 0], 8)
    (tmp_path / "dims" / "c2" / "dim8").rename(tmp_path / "dims" / "c" / "dim8")
    with pytest.raises(ValueError, match="pass d"):
        read_less_gradients(tmp_path / "dims" / "c")
    assert read_less_gradients(tmp_path / "dims" / "c", d=8).d == 8
    with pytest.raises(ValueError, match="checkpoint_weights"):
        less_to_store(tmp_path / "two" / "a-ckpt1", tmp_path / "s", checkpoint_weights=[1.0, 2.0])


class _Payload:
    """A pickled object: torch.load(weights_only=True) refuses it (nothing of it runs)."""

    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.mark.parametrize("problem, match", [
    ("pickled", "refused, it holds pickled Python objects"),
    ("truncated", "not a readable torch tensor file"),
    ("not_torch", "not a readable torch tensor file"),
    ("integer_rows", "expected floating-point gradients"),
])
def test_less_unreadable_files_are_input_errors(tmp_path, problem, match, capsys):
    """UnpicklingError, RuntimeError and friends from torch.load became InputError naming the file."""
    from gtp_kernels.validation import InputError
    rows = _trajectory(n=6, t=1, d=8)[:, 0]
    _write_less_checkpoint(tmp_path / "g" / "run-ckpt1", rows, 8)
    bad = tmp_path / "g" / "run-ckpt1" / "dim8" / "all_orig.pt"
    if problem == "pickled":
        torch.save({"rows": _Payload()}, bad)
    elif problem == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif problem == "not_torch":
        bad.write_text("rows")
    else:
        torch.save(torch.ones(6, 8, dtype=torch.int64), bad)
    with pytest.raises(InputError, match=match) as err:
        less_to_store(tmp_path / "g", tmp_path / "store")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "store").exists()
    assert "payload ran" not in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, match", [
    (dict(checkpoint_weights=["a"]), "checkpoint_weights must hold real numbers"),
    (dict(checkpoint_weights=[1 + 1j]), "checkpoint_weights must hold real numbers"),
    (dict(checkpoint_weights=np.ones((1, 1))), "one weight per checkpoint"),
    (dict(d="8"), "d must be an integer"),
    (dict(normalized="yes"), "normalized must be True or False"),
    (dict(shard_size=2.0), "shard_size must be an integer"),
    (dict(example_ids=5), "example_ids must be a sequence"),
])
def test_less_to_store_bad_arguments_are_input_errors(tmp_path, kwargs, match):
    """These raised TypeError (or read a complex weight's real part) instead of InputError."""
    from gtp_kernels.validation import InputError
    _write_less_checkpoint(tmp_path / "g" / "run-ckpt1", _trajectory(n=6, t=1, d=8)[:, 0], 8)
    with pytest.raises(InputError, match=match):
        less_to_store(tmp_path / "g", tmp_path / "store", **kwargs)
    assert not (tmp_path / "store").exists()
