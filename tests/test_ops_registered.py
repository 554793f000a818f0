"""K1, K2, K3 as registered torch ops (torch.ops.gtp_kernels.*): opcheck, torch.compile, torch.export.

Tiny shapes: these tests check the registration (schema, fake kernels, declared mutations,
traceability), not the numerics, which the per-kernel tests cover against float64 references.
The same opcheck calls run on CUDA in benchmarks/gpu_check.sh (part "opcheck").
"""
import itertools
import math

import pytest
import torch

from gtp_kernels.ops import correlate as k2
from gtp_kernels.ops import lsq as k3
from gtp_kernels.ops import project as k1

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _project_cases(device):
    op = torch.ops.gtp_kernels.project_accumulate.default
    gen = torch.Generator().manual_seed(0)
    for dtype, kind in ((torch.float32, "rademacher"), (torch.bfloat16, "gaussian")):
        grads = torch.randn(3, 21, generator=gen).to(device, dtype)
        out = torch.randn(3, 13, generator=gen).to(device)
        # (grads, out, col_start, d, seed, kind, feature_offset, multiplier, output_factor, backend)
        yield op, (grads, out, 4, 8, -5, kind, 17, 0.25, False, "auto")
        yield op, (grads, out, 0, 13, 3, kind, 0, 1.0, True, "torch")


def _correlate_cases(device):
    op = torch.ops.gtp_kernels.correlate_topk.default
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(30, 12, generator=gen).to(device)
    R = torch.randn(12, 3, generator=gen).to(device)
    exclude = (torch.rand(30, 3, generator=gen) < 0.2).to(device)
    scale = torch.rand(30, generator=gen).to(device) + 0.5
    # (candidates, residuals, m_top, exclude, row_scale, absolute, backend)
    yield op, (A, R, 4, exclude, scale, True, "auto")
    yield op, (A.bfloat16(), R[:, 0].contiguous(), 1, None, None, False, "auto")


def _lsq_cases(device):
    op = torch.ops.gtp_kernels.lsq_update.default
    atoms, target, state = _lsq_problem(m=3)
    for step in ([0, 1, 2], [3, 4, -1]):
        new = torch.tensor(step)
        k3.lsq_update(state, new, *_lsq_inputs(state, atoms, target, new), lam=0.1, positive=True)
    new = torch.tensor([5, 2, 1])
    inputs = _lsq_inputs(state, atoms, target, new)
    args = [t.to(device) for t in (*vars(state).values(), new, *inputs)]
    backends = ["torch"] + (["ext"] if k3._resolve("auto", torch.device(device)) == "ext" else [])
    for backend, positive in itertools.product(backends, (True, False)):
        # (L, size, support, rhs, weights, new_atom, gram_col, gram_diag, rhs_new, lam, positive, dep_tol,
        #  weight_tol, backend)
        yield op, (*args, 0.1, positive, 1e-10, 1e-6, backend)


OPCHECK_CASES = {"project": _project_cases, "correlate_topk": _correlate_cases, "lsq_update": _lsq_cases}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck(name, device):
    """torch.library.opcheck: schema (declared mutations), fake kernel, AOT dispatch, autograd registration."""
    n_cases = 0
    for op, args in OPCHECK_CASES[name](torch.device(device)):
        torch.library.opcheck(op, args)
        n_cases += 1
    assert n_cases >= 2


def test_ops_are_registered():
    for name in ("project_accumulate", "correlate_topk", "lsq_update"):
        assert hasattr(torch.ops.gtp_kernels, name)
    schema = str(torch.ops.gtp_kernels.lsq_update.default._schema)
    for arg in ("L", "size", "support", "rhs", "weights"):
        assert f"Tensor(" in schema and f"!) {arg}" in schema, schema  # declared as mutated
    assert "!" not in str(torch.ops.gtp_kernels.correlate_topk.default._schema)


def _graph_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


class _Recorder:
    """A torch.compile backend that keeps the FX graphs dynamo hands it, then runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def test_project_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    grads = torch.randn(3, 37)
    out0 = torch.randn(3, 12)  # accumulated into: never zeros

    def fn(g, out):
        out = k1.project(g, 8, 2**63 + 5, feature_offset=11, out=out, out_columns=slice(3, 11), scale=0.5)
        return k1.project(g * 2, 4, 7, kind="gaussian", out=out, out_columns=slice(8, 12))

    expected = fn(grads, out0.clone())
    rec = _Recorder()
    got = torch.compile(fn, fullgraph=True, backend=rec)(grads, out0.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "gtp_kernels.project_accumulate.default" in _graph_ops(rec.graphs[0])
    # the same through AOT autograd (functionalisation of the declared mutation)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(grads, out0.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_project_linear_factored_compiles():
    torch.manual_seed(1)
    x, delta = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def fn(x, delta, mask):
        return k1.project_linear_factored(x, delta, 3, 2, seed=9, token_mask=mask)

    expected = fn(x, delta, mask)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, delta, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_correlate_topk_compiles_and_exports():
    torch.manual_seed(2)
    A, R = torch.randn(40, 16), torch.randn(16, 3)
    exclude = torch.zeros(40, dtype=torch.bool)
    exclude[[4, 9]] = True

    class Select(torch.nn.Module):
        def forward(self, A, R, exclude):
            values, idx = k2.correlate_topk(A, R, 4, exclude=exclude, absolute=True)
            return values * 2, idx

    expected = Select()(A, R, exclude)
    rec = _Recorder()
    got = torch.compile(Select(), fullgraph=True, backend=rec)(A, R, exclude)
    assert "gtp_kernels.correlate_topk.default" in _graph_ops(rec.graphs[0])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    exported = torch.export.export(Select(), (A, R, exclude))
    assert "gtp_kernels.correlate_topk.default" in _graph_ops(exported.graph_module)
    A2, R2 = torch.randn(40, 16), torch.randn(16, 3)
    for e, g in zip(Select()(A2, R2, exclude), exported.module()(A2, R2, exclude)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _lsq_problem(m=2, k_max=4, n_atoms=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, 9, dtype=torch.float64, generator=gen)
    target = torch.randn(m, 9, dtype=torch.float64, generator=gen)
    return atoms, target, k3.lsq_init(m, k_max)


def _lsq_inputs(state, atoms, target, new_atom):
    support = state.support.clamp(min=0)
    gram_col = (atoms[support] @ atoms[new_atom.clamp(min=0)][:, :, None])[:, :, 0].contiguous()
    gram_diag = (atoms[new_atom.clamp(min=0)] ** 2).sum(1)
    rhs_new = (atoms[new_atom.clamp(min=0)] * target).sum(1)
    return gram_col, gram_diag, rhs_new


def test_lsq_update_compiles_and_exports_with_declared_mutations():
    atoms, target, state = _lsq_problem()
    # two appends in eager to get a non-trivial state, then the third through each tracer
    for step in ([0, 1], [2, 3]):
        new = torch.tensor(step)
        k3.lsq_update(state, new, *_lsq_inputs(state, atoms, target, new), lam=0.1, positive=True)
    new = torch.tensor([4, -1])
    inputs = _lsq_inputs(state, atoms, target, new)

    def step(L, size, support, rhs, weights, new, gram_col, gram_diag, rhs_new):
        st = k3.LsqState(L, size, support, rhs, weights)
        # checked=False: the size check reads state.size on the host (a graph break)
        return k3.lsq_update(st, new, gram_col, gram_diag, rhs_new, lam=0.1, positive=True, checked=False)

    expected_state = state.clone()
    expected = step(*vars(expected_state).values(), new, *inputs)
    assert expected.tolist()[1] == k3.STATUS_INACTIVE and expected.tolist()[0] & k3.STATUS_APPENDED

    compiled_state = state.clone()
    rec = _Recorder()
    got = torch.compile(step, fullgraph=True, backend=rec)(*vars(compiled_state).values(), new, *inputs)
    assert "gtp_kernels.lsq_update.default" in _graph_ops(rec.graphs[0])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(vars(compiled_state).values(), vars(expected_state).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the mutation reached the caller's tensors

    aot_state = state.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*vars(aot_state).values(), new, *inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(vars(aot_state).values(), vars(expected_state).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    class Step(torch.nn.Module):
        def forward(self, L, size, support, rhs, weights, new, gram_col, gram_diag, rhs_new):
            return step(L, size, support, rhs, weights, new, gram_col, gram_diag, rhs_new)

    exported = torch.export.export(Step(), (*vars(state.clone()).values(), new, *inputs))
    assert "gtp_kernels.lsq_update.default" in _graph_ops(exported.graph_module)
    # functionalised (as a compiler backend sees it): the five state tensors are the mutated inputs
    functional = exported.run_decompositions({})
    mutated = set(functional.graph_signature.user_inputs_to_mutate.values())
    placeholders = [n.name for n in functional.graph_module.graph.nodes if n.op == "placeholder"]
    assert mutated == set(placeholders[:5]), (mutated, placeholders)
    export_state = state.clone()
    got = exported.module()(*vars(export_state).values(), new, *inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(vars(export_state).values(), vars(expected_state).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors_are_raised_before_the_op():
    """Bad arguments fail in the Python entry with the documented error types, not inside the dispatcher."""
    with pytest.raises(ValueError, match="backend"):
        k2.correlate_topk(torch.randn(4, 3), torch.randn(3), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        k1.project(torch.randn(2, 3), 4, 1, backend="numpy")
    _, _, state = _lsq_problem()
    with pytest.raises(ValueError, match="backend"):
        k3.lsq_update(state, torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.float64),
                      torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), backend="gpu")


def test_project_seed_above_2_63_round_trips():
    """Seeds in [2^63, 2^64) travel as int64 with the same bits: the projection equals the dense matrix's."""
    grads = torch.randn(2, 9, dtype=torch.float64).float()
    seed = 2**64 - 3
    got = k1.project(grads, 5, seed)
    dense = k1.projection_matrix(5, 9, seed)
    torch.testing.assert_close(got.double(), grads.double() @ dense.T, rtol=1e-6, atol=1e-6)
    assert not math.isclose(float(got.abs().sum()), float(k1.project(grads, 5, seed - 2**63).abs().sum()))
