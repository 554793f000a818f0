"""benchmarks/scale_model.py: its arithmetic on a hand-checked case, and docs/SCALE.md's table is
what the script prints with its defaults (the projection is regenerated, not edited by hand)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_model.py"


def _load():
    spec = importlib.util.spec_from_file_location("scale_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_the_scripts_output():
    printed = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    table = [line for line in printed.splitlines() if line.startswith("|")]
    docs = (ROOT / "docs" / "SCALE.md").read_text(encoding="utf-8")
    assert "\n".join(table) in docs, "docs/SCALE.md's table is stale: re-run benchmarks/scale_model.py"


def test_pass_time_and_memory_by_hand():
    module = _load()
    import argparse

    args = argparse.Namespace(n=1e6, dim=8192, bytes=2, k=1000, k_eff=None, gpus=1, gpu_memory_gb=141.0,
                              bandwidth_tbs=4.3, k2_efficiency=1.0, exact_pass_ratio=1.0, cosamp_k_per_pass=10.0,
                              cosamp_sample_work=0.0, collective_us=20.0, link_gbs=200.0, k3_sweeps=3,
                              k3_sm_gbs=100.0, k3_tile=64, k3_step_us=3.0, workspace_gb=0.0)
    rows = {name: value for name, _, value in module.model(args)}
    # SPEC: N = 1M, D = 8192, bf16 is 16.4 GB, about 3.8 ms a pass at 4.3 TB/s
    assert rows["one pass (K2) per GPU"] == "3.81 ms"
    assert rows["passes, compressive"].startswith("100 ->")
    # shard 16.384 GB + factor 1000^2 x 8 B + selected rows 1000 x 8192 x 4 B
    assert rows["memory per GPU"].startswith(f"{(16.384e9 + 8e6 + 32.768e6) / 1e9:.1f} GB")
    assert rows["rank bound"] == "useful atoms <= 1,000"
    with pytest.raises(KeyError):
        rows["no such row"]
