"""GTPProjector (gtp_kernels.integrations.trak) with the real TRAK package (traker) on a tiny model, CPU."""
import math

import pytest
import torch

trak = pytest.importorskip("trak", reason="traker not installed (pip install --no-deps traker)")

from gtp_kernels.integrations.trak import GTPProjector, model_seed  # noqa: E402
from gtp_kernels.ops.project import projection_matrix  # noqa: E402


def _dense_sketch(grads: torch.Tensor, proj_dim: int, seed: int, model_id: int, kind: str) -> torch.Tensor:
    """float64 reference: grads @ E^T with E = sqrt(proj_dim) * K1's Pi (entries +-1 or N(0, 1))."""
    pi = projection_matrix(proj_dim, grads.shape[1], model_seed(seed, model_id), kind)
    return grads.double() @ pi.T * math.sqrt(proj_dim)


@pytest.mark.parametrize("proj_type,kind", [("rademacher", "rademacher"), ("normal", "gaussian")])
def test_project_matches_dense_matrix_and_dict_equals_flat(proj_type, kind):
    gen = torch.Generator().manual_seed(0)
    blocks = {"w": torch.randn(5, 3, 4, generator=gen), "b": torch.randn(5, 3, generator=gen)}
    flat = torch.cat([blocks["w"].reshape(5, -1), blocks["b"]], dim=1)
    proj = GTPProjector(15, 24, seed=11, proj_type=proj_type, device="cpu")
    sketch = proj.project(flat, model_id=2)
    assert sketch.dtype == torch.float32 and sketch.shape == (5, 24)
    torch.testing.assert_close(sketch.double(), _dense_sketch(flat, 24, 11, 2, kind), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.project(blocks, model_id=2), sketch, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(proj.project(flat, model_id=3), sketch)  # another checkpoint, another matrix
    if kind == "rademacher":  # entries +-1: TRAK's scale, not K1's 1/sqrt(d)
        unit = proj.project(torch.eye(15), model_id=0)
        assert set(unit.abs().unique().tolist()) == {1.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_type"):
        GTPProjector(10, 4, 0, "sparse", "cpu")
    with pytest.raises(ValueError, match="grad_dim=10"):
        GTPProjector(10, 4, 0, "rademacher", "cpu").project(torch.randn(2, 9), 0)


class _Recording(GTPProjector):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def project(self, grads, model_id):
        sketch = super().project(grads, model_id)
        flat = grads if isinstance(grads, torch.Tensor) else torch.cat([g.flatten(1) for g in grads.values()], 1)
        self.calls.append((flat.detach().clone(), model_id, sketch.clone()))
        return sketch


def test_traker_end_to_end_with_gtp_projector(tmp_path):
    """TRAKer(..., projector=GTPProjector) featurizes and scores; what TRAK stores is our sketch / sqrt(grad_dim)."""
    from trak import TRAKer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    grad_dim = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    proj = _Recording(grad_dim, 32, 5, "rademacher", "cpu")
    traker = TRAKer(model=model, task="image_classification", train_set_size=12, save_dir=str(tmp_path),
                    device="cpu", projector=proj, proj_dim=32, use_half_precision=False, lambda_reg=1e-2)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for start in (0, 6):
        traker.featurize(batch=(x[start:start + 6], y[start:start + 6]), num_samples=6)
    stored = torch.as_tensor(traker.saver.current_store["grads"]).clone()
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="t", checkpoint=model.state_dict(), model_id=0, num_targets=3)
    traker.score(batch=(x[:3], y[:3]), num_samples=3)
    scores = traker.finalize_scores(exp_name="t")
    assert scores.shape == (12, 3) and bool(torch.isfinite(torch.as_tensor(scores)).all())

    assert len(proj.calls) == 3 and all(model_id == 0 for _, model_id, _ in proj.calls)
    train = torch.cat([grads for grads, _, _ in proj.calls[:2]])
    assert train.shape == (12, grad_dim) and bool((train != 0).any())
    expected = _dense_sketch(train, 32, 5, 0, "rademacher") / math.sqrt(grad_dim)
    torch.testing.assert_close(stored.double(), expected, rtol=1e-5, atol=1e-6)
