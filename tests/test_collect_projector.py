"""collect.projector.Projector: K1 over named parameter blocks at global offsets, Pi cached or not."""
import pytest
import torch

from gtp_kernels.collect.projector import Projector
from gtp_kernels.ops.project import project, projection_matrix


def _blocks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = {"a.weight": 7, "b.bias": 3, "c.weight": 12}
    return sizes, {name: torch.randn(5, size, generator=gen) for name, size in sizes.items()}


@pytest.mark.parametrize("cache_mb", [0.0, 64.0])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_equals_projecting_the_concatenation(cache_mb, kind):
    """Sum over parameters of scale * G_j Pi[:, o_j:o_j+P_j]^T equals scale * concat(G) Pi^T (float64 reference)."""
    sizes, grads = _blocks()
    projector = Projector(sizes, 16, [3, 4], kind=kind, backend="torch", cache_mb=cache_mb)
    assert projector.cached == (cache_mb > 0)
    assert projector.offsets == {"a.weight": 0, "b.bias": 7, "c.weight": 10}
    for seed in (3, 4):
        block = torch.zeros(5, 16)
        for name, g in grads.items():
            projector(g, name, seed, block, 0.5)
        whole = torch.cat(list(grads.values()), dim=1).double()
        pi = projection_matrix(16, 22, seed, kind, 0, dtype=torch.float64)
        torch.testing.assert_close(block.double(), 0.5 * whole @ pi.T, rtol=1e-5, atol=1e-5)


def test_cached_and_generated_agree_with_project():
    sizes, grads = _blocks(1)
    cached = Projector(sizes, 8, [0], backend="torch", cache_mb=64.0)
    generated = Projector(sizes, 8, [0], backend="torch", cache_mb=0.0)
    out_cached, out_generated = torch.zeros(5, 8), torch.zeros(5, 8)
    for name, g in grads.items():
        cached(g, name, 0, out_cached, 1.0)
        generated(g, name, 0, out_generated, 1.0)
    expected = project(torch.cat(list(grads.values()), dim=1), 8, 0, backend="torch")
    torch.testing.assert_close(out_cached, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_generated, expected, rtol=1e-5, atol=1e-5)


def test_cache_budget_is_respected():
    sizes, _ = _blocks()
    # 2 seeds * 22 parameters * 16 dims * 4 bytes = 2816 bytes
    assert not Projector(sizes, 16, [0, 1], backend="torch", cache_mb=2815 / 2**20).cached
    assert Projector(sizes, 16, [0, 1], backend="torch", cache_mb=2816 / 2**20).cached


def test_key_says_what_the_projection_depends_on():
    sizes, _ = _blocks()
    assert Projector.key_of(sizes, [0, 1]) == Projector(sizes, 4, [0, 1]).key
    assert Projector.key_of(sizes, [0, 1]) != Projector.key_of({**sizes, "b.bias": 4}, [0, 1])
    assert Projector.key_of(sizes, [0, 1]) != Projector.key_of(sizes, [0])


def test_check_finite_is_opt_in():
    sizes = {"w": 4}
    bad = torch.tensor([[1.0, float("nan"), 0.0, 0.0]])
    Projector(sizes, 4, [0], backend="torch")(bad, "w", 0, torch.zeros(1, 4), 1.0)  # the collection checks shards whole
    from gtp_kernels.validation import InputError

    with pytest.raises(InputError):
        Projector(sizes, 4, [0], backend="torch", check_finite=True)(bad, "w", 0, torch.zeros(1, 4), 1.0)
