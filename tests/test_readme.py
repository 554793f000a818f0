"""README.md runs as written: its Python blocks execute on small data, every `gtp ...` command
line in its bash blocks parses, the cheap commands run, and `gtp demo` prints README's table.

The Python blocks are executed verbatim after a prelude that defines the names they use
(`candidates`, `target`, `lrs`, `my_rows`); only the data sizes are ours.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text(encoding="utf-8")) if lang == language]


def _section_of(block: str) -> str:
    text = README.read_text(encoding="utf-8")
    before = text[: text.index(block)]
    headings = re.findall(r"^## (.+)$", before, re.M)
    return headings[-1] if headings else ""


def python_blocks() -> dict[str, str]:
    """README's Python blocks by section (a section's blocks joined in order)."""
    out: dict[str, str] = {}
    for body in blocks("python"):
        section = _section_of(body)
        out[section] = out.get(section, "") + body
    return out


# every section with Python blocks, and the test here that runs them
RUN_HERE = {"The API in five lines", "Several GPUs or machines", "Drop-in for scikit-learn and GRAD-MATCH (CORDS)",
            "Using gtp_kernels from other frameworks"}


def test_readme_has_the_blocks_this_file_runs():
    sections = set(python_blocks())
    assert sections == RUN_HERE, f"a new Python block in README.md needs a prelude here: {sorted(sections)}"


# N >= 1000 because the block asks for k=1000; T=2 checkpoints of d=24 keep the pursuit cheap.
N, T, D_CHECKPOINT = 1100, 2, 24


def _api_prelude(layout: str) -> dict:
    g = torch.Generator().manual_seed(3)
    trajectories = torch.randn(N, T, D_CHECKPOINT, generator=g, dtype=torch.float64)
    support = torch.randperm(N, generator=g)[:12]
    target = (trajectories[support].reshape(12, -1).T @ torch.rand(12, generator=g, dtype=torch.float64))
    candidates = trajectories if layout == "trajectories" else trajectories.reshape(N, T * D_CHECKPOINT)
    return {"candidates": candidates, "target": target, "lrs": [2e-5, 1e-5]}


@pytest.mark.parametrize("layout", [
    "trajectories",
    "flat",
])
def test_api_block_runs_as_written(layout):
    """README's "API in five lines", verbatim, on (N, T, d) trajectories and on flat (N, T*d) rows
    (the block's comment offers both)."""
    namespace = _api_prelude(layout)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()["The API in five lines"], "README.md", "exec"), namespace)
    sel = namespace["sel"]
    assert 1 <= len(sel.indices) <= 1000 and len(sel.weights) == len(sel.indices)
    assert (sel.weights > 0).all() and len(sel.residual_norms) >= 1
    assert float(sel.residual_norms[-1]) < float(sel.residual_norms[0])
    assert "gtp" in out.getvalue() and "topk" in out.getvalue()


def test_distributed_block_runs_as_written(tmp_path):
    """README's select_sharded line on a one-rank gloo group equals gk.select on the same rows."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    namespace = _api_prelude("trajectories")
    namespace.update(gk=gk, my_rows=namespace.pop("candidates"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        exec(compile(python_blocks()["Several GPUs or machines"], "README.md", "exec"), namespace)
    finally:
        dist.destroy_process_group()
    single = gk.select(namespace["my_rows"], namespace["target"], k=1000)
    assert namespace["sel"].indices.tolist() == single.indices.tolist()


def gtp_command_lines() -> list[str]:
    """Every `gtp ...` command in README's bash blocks (also after `&&`), optional parts `[...]` kept."""
    lines = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():  # continuation lines joined
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("gtp "):
                    lines.append(part)
    return lines


def _argv(line: str) -> list[str]:
    """`gtp demo [--k 64] [--plot demo.png]` -> ['demo', '--k', '64', '--plot', 'demo.png']."""
    return [token.strip("[]") for token in shlex.split(line)[1:] if token.strip("[]")]


def test_readme_has_gtp_commands():
    commands = {_argv(line)[0] for line in gtp_command_lines()}
    assert {"demo", "collect", "select"} <= commands, commands


@pytest.mark.parametrize("line", gtp_command_lines())
def test_every_gtp_command_line_parses(line):
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(_argv(line))
    except SystemExit:
        pytest.fail(f"README command does not parse: {line}\n{err.getvalue()}")
    assert callable(args.func)


def test_cheap_readme_commands_run(capsys):
    assert main(["demo", "--k", "8", "--num-candidates", "600"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^gtp\s+8\s", printed, re.M) and re.search(r"^topk\s+8\s", printed, re.M)


def _table_rows(text: str) -> dict[str, list[str]]:
    """method -> the table's columns without the time (noisy)."""
    rows = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in ("gtp", "topk", "random") and len(fields) >= 6:
            rows[fields[0]] = fields[1:-1]
    return rows


def test_gtp_demo_prints_readmes_table(capsys):
    """`gtp demo` with its defaults gives the figures README quotes (all but the time column)."""
    quoted = next(body for body in blocks("") if body.lstrip().startswith("method"))
    assert main(["demo"]) == 0
    printed = _table_rows(capsys.readouterr().out)
    assert printed == _table_rows(quoted), f"README.md's demo table is stale:\n{quoted}"


def test_compat_blocks_run_as_written():
    """README's scikit-learn and CORDS drop-in lines, verbatim, on a small dictionary."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((120, 200))
    y = X[:, :8] @ rng.uniform(0.5, 2.0, 8)
    Y = np.stack([y, X[:, 8:14] @ rng.uniform(0.5, 2.0, 6)], axis=1)
    grads = torch.as_tensor(rng.standard_normal((300, 64)), dtype=torch.float32)
    target_grad = grads[:10].sum(dim=0)
    namespace = {"X": X, "y": y, "Y": Y, "grads": grads, "target_grad": target_grad, "budget": 10, "torch": torch}
    exec(compile(python_blocks()["Drop-in for scikit-learn and GRAD-MATCH (CORDS)"], "README.md", "exec"), namespace)
    assert namespace["coef"].shape == (200, 2)
    assert namespace["path"].shape[0] == 200
    assert namespace["est"].coef_.shape == (200,) and (namespace["est"].coef_ >= 0).all()
    w, w_np = namespace["w"], namespace["w_np"]
    assert w.shape == (300,) and 1 <= int((w != 0).sum()) <= 10 and (w >= 0).all()
    assert w_np.shape == (300,) and 1 <= int((w_np != 0).sum()) <= 10
    assert namespace["idx"].tolist() == torch.nonzero(w).view(-1).tolist()


def _framework_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text)
            if lang == "python" and _section_of(body) == "Using gtp_kernels from other frameworks"]


def _framework_block(needle: str) -> str:
    found = [b for b in _framework_blocks() if needle in b]
    assert len(found) == 1, (needle, len(found))
    return found[0]


def test_framework_blocks_are_all_run_here():
    assert len(_framework_blocks()) == 3  # torch.compile, TRAK, datasets: each has a test below


def test_torch_compile_block_runs_as_written():
    namespace: dict = {}
    exec(compile(_framework_block("torch.compile"), "README.md", "exec"), namespace)
    values, rows = namespace["values"], namespace["rows"]
    assert values.shape == rows.shape and values.shape[-1] == 8


def test_trak_block_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trak", reason="traker not installed")
    monkeypatch.chdir(tmp_path)  # TRAKer writes its save_dir under the working directory
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    namespace = {"model": model, "n": 12, "device": "cpu"}
    exec(compile(_framework_block("TRAKer"), "README.md", "exec"), namespace)
    assert namespace["traker"].projector is namespace["projector"]
    sketch = namespace["projector"].project(torch.randn(4, namespace["grad_dim"]), model_id=0)
    assert sketch.shape == (4, 2048)


def test_datasets_block_runs_as_written(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets not installed")
    from test_cli import _tiny_store

    monkeypatch.chdir(tmp_path)
    rows = _tiny_store(tmp_path / "pool_store", n=1200)
    ids = [f"ex{i}" for i in range(1200)]
    datasets.Dataset.from_dict({"id": ids, "text": [f"example {i}" for i in range(1200)]}).save_to_disk("pool_dataset")
    target = rows[:5].reshape(5, -1).sum(axis=0)
    exec(compile(_framework_block("selection_to_dataset"), "README.md", "exec"), {"target": target})
    picked = datasets.load_from_disk("selected_dataset")
    assert 1 <= len(picked) <= 1000 and picked["gtp_rank"] == list(range(len(picked)))
    assert all(i in ids for i in picked["id"])
