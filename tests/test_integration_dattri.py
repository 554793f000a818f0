"""GTPDattriProjector (gtp_kernels.integrations.dattri) with the real dattri package on tiny inputs, CPU."""
import pytest
import torch

pytest.importorskip("dattri", reason="dattri not installed (pip install --no-deps dattri)")

from dattri.func.projection import AbstractProjector, BasicProjector, ProjectionType  # noqa: E402
from dattri.func.utils import _vectorize  # noqa: E402

from gtp_kernels.integrations.dattri import GTPDattriProjector, model_seed  # noqa: E402
from gtp_kernels.ops.project import projection_matrix  # noqa: E402


@pytest.mark.parametrize("proj_type,kind", [(ProjectionType.rademacher, "rademacher"), ("normal", "gaussian")])
def test_project_matches_dense_matrix_and_dict_equals_dattri_vectorize(proj_type, kind):
    gen = torch.Generator().manual_seed(0)
    blocks = {"w": torch.randn(5, 3, 4, generator=gen), "b": torch.randn(5, 3, generator=gen)}
    flat = _vectorize(blocks, device="cpu")  # dattri's own flattening of a dict of per-example blocks
    proj = GTPDattriProjector(15, 24, seed=11, proj_type=proj_type, device="cpu")
    assert isinstance(proj, AbstractProjector)
    assert (proj.feature_dim, proj.proj_dim, proj.seed) == (15, 24, 11)
    sketch = proj.project(flat, ensemble_id=2)
    assert sketch.dtype == torch.float32 and sketch.shape == (5, 24)
    # dattri's scale: features @ E^T / sqrt(proj_dim), which is K1's Pi as it stands
    expected = flat.double() @ projection_matrix(24, 15, model_seed(11, 2), kind).T
    torch.testing.assert_close(sketch.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.project(blocks, ensemble_id=2), sketch, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(proj.project(flat, ensemble_id=3), sketch)  # another ensemble, another matrix
    if kind == "rademacher":
        unit = proj.project(torch.eye(15), ensemble_id=0)
        torch.testing.assert_close(unit.abs(), torch.full((15, 24), 24 ** -0.5))


def test_sketch_dtype_is_dattris_default():
    feats = torch.randn(3, 40, dtype=torch.float64)
    ours = GTPDattriProjector(40, 8, 0, "rademacher", "cpu").project(feats, 0)
    theirs = BasicProjector(40, 8, 0, ProjectionType.rademacher, torch.device("cpu")).project(feats, 0)
    assert ours.dtype == theirs.dtype == torch.float32
    assert GTPDattriProjector(40, 8, 0, "rademacher", "cpu", dtype=None).project(feats, 0).dtype == torch.float64


def test_same_jl_scale_as_dattri_basic_projector():
    """Both sketches estimate the features' Gram matrix on the same scale (JL, proj_dim = 1024)."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(1, 3000, generator=gen)
    feats = torch.randn(6, 3000, generator=gen) + 0.7 * shared
    exact = feats.double() @ feats.double().T
    norms = exact.diagonal().sqrt()
    errors = {}
    for name, proj in (("gtp", GTPDattriProjector(3000, 1024, 0, "rademacher", "cpu")),
                       ("dattri", BasicProjector(3000, 1024, 0, ProjectionType.rademacher, torch.device("cpu"),
                                                 block_size=1024))):
        s = proj.project(feats, ensemble_id=0).double()
        errors[name] = ((s @ s.T - exact) / (norms[:, None] * norms[None, :])).abs().max().item()
    # sd of each entry's error is at most sqrt(2 / 1024) = 0.044; 0.2 is > 4.5 sd for both
    assert errors["gtp"] < 0.2 and errors["dattri"] < 0.2, errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_type"):
        GTPDattriProjector(10, 4, 0, ProjectionType.sjlt, "cpu")
    with pytest.raises(ValueError, match="feature_dim must be"):
        GTPDattriProjector(0, 4, 0, "rademacher", "cpu")
    with pytest.raises(ValueError, match="feature_dim=10"):
        GTPDattriProjector(10, 4, 0, "rademacher", "cpu").project(torch.randn(2, 9), 0)
