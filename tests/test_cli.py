"""The gtp command end to end: select from each file format, the demo, --help lists methods."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.cli import main as cli_main
from problems import planted_problem


@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors"])
def test_select_writes_jsonl_and_summary(tmp_path, fmt, capsys):
    A, B, supports, _ = planted_problem(80, 30, 4, seed=0, dtype=torch.float32)
    b = B[:, 0]
    if fmt == "npy":
        np.save(tmp_path / "A.npy", A.numpy()); np.save(tmp_path / "b.npy", b.numpy())
        fa, fb = tmp_path / "A.npy", tmp_path / "b.npy"
    elif fmt == "pt":
        torch.save(A, tmp_path / "A.pt"); torch.save({"target": b}, tmp_path / "b.pt")
        fa, fb = tmp_path / "A.pt", tmp_path / "b.pt"
    else:
        from safetensors.torch import save_file
        save_file({"grads": A, "other": A[:2].clone()}, str(tmp_path / "A.safetensors"))
        save_file({"target": b}, str(tmp_path / "b.safetensors"))
        fa, fb = f"{tmp_path / 'A.safetensors'}:grads", tmp_path / "b.safetensors"
    out = tmp_path / "sel"
    assert cli_main(["select", "--candidates", str(fa), "--target", str(fb), "--k", "4", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "selection.jsonl").read_text().splitlines()]
    assert [x["rank"] for x in lines] == [0, 1, 2, 3]
    assert sorted(x["index"] for x in lines) == sorted(supports[0].tolist())
    assert all(x["weight"] > 0 for x in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected"] == 4 and summary["targets"][0]["stopped_by"] in ("tolerance", "budget")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_safetensors_with_several_tensors_needs_a_key(tmp_path, capsys):
    from safetensors.torch import save_file
    A = torch.randn(10, 5)
    save_file({"a": A, "b": A.clone()}, str(tmp_path / "A.safetensors"))
    np.save(tmp_path / "b.npy", np.ones(5, dtype=np.float32))
    code = cli_main(["select", "--candidates", str(tmp_path / "A.safetensors"), "--target",
                     str(tmp_path / "b.npy"), "--k", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "holds 2 tensors" in err and ":KEY" in err
    assert not (tmp_path / "o").exists()


def test_help_lists_every_method():
    out = subprocess.run([sys.executable, "-m", "gtp_kernels", "select", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in gk.METHODS:
        assert name in out.stdout


def test_demo_runs_and_gtp_beats_topk_on_duplicates(capsys):
    from gtp_kernels.demo import run_demo
    rows = run_demo(k=24, num_candidates=2500, echo=lambda *_: None)
    by = {r["method"]: r for r in rows}
    gtp = next(r for name, r in by.items() if name.startswith("gtp"))
    assert gtp["relative_residual"] < by["topk"]["relative_residual"]
    assert gtp["relative_residual"] < by["random"]["relative_residual"]
    assert gtp["near_duplicates"] < by["topk"]["near_duplicates"]


def test_collect_then_select_writes_the_chosen_examples(tmp_path, capsys):
    """gtp collect (pool, then targets on the pool's checkpoints), gtp select from the stores."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer(chat_template=True).save_pretrained(folder)
    pool = write_jsonl(tmp_path / "pool.jsonl",
                       [{**r, "id": f"pool-{i}"} for i, r in enumerate(instruction_records(12, seed=1))])
    val = write_jsonl(tmp_path / "val.jsonl",
                      [{**r, "id": f"val-{i}"} for i, r in enumerate(instruction_records(3, seed=2))])
    common = ["--d", "16", "--shard-size", "5", "--device", "cpu", "--quiet", "--lora-r", "2"]
    assert cli_main(["collect", "--model", str(folder), "--data", pool, "--out", str(tmp_path / "pool_store"),
                     "--warmup-fraction", "0.5", "--warmup-epochs", "2", *common]) == 0
    assert cli_main(["collect", "--model", str(folder), "--data", val, "--out", str(tmp_path / "val_store"),
                     "--checkpoints", str(tmp_path / "pool_store" / "warmup"), "--gradient-type", "sgd", *common]) == 0
    out = tmp_path / "sel"
    assert cli_main(["select", "--candidates", str(tmp_path / "pool_store"), "--target", str(tmp_path / "val_store"),
                     "--k", "4", "--out", str(out), "--data", pool]) == 0
    chosen = [json.loads(x) for x in (out / "selection.jsonl").read_text().splitlines()]
    assert 1 <= len(chosen) <= 4 and all(c["id"].startswith("pool-") for c in chosen)
    examples = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == [c["id"] for c in chosen]  # the examples, in selection order
    pool_by_id = {json.loads(x)["id"]: json.loads(x) for x in open(pool)}
    assert all(e["instruction"] == pool_by_id[e["id"]]["instruction"] for e in examples)


def test_select_data_without_store_is_refused(tmp_path, capsys):
    np.save(tmp_path / "A.npy", np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    np.save(tmp_path / "b.npy", np.ones(4, dtype=np.float32))
    (tmp_path / "d.jsonl").write_text("{}\n")
    code = cli_main(["select", "--candidates", str(tmp_path / "A.npy"), "--target", str(tmp_path / "b.npy"),
                     "--k", "2", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d.jsonl")])
    assert code == 2 and "trajectory store" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_plot_is_written_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    from gtp_kernels.demo import run_demo
    out = tmp_path / "demo.png"
    run_demo(k=8, num_candidates=1200, plot=str(out), echo=lambda *_: None)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]
