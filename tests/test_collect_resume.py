"""A `gtp collect` killed with SIGKILL and resumed gives the same store, byte for byte, as an
uninterrupted run (issue 12's done-when).

The killed collection is a real process, warm-up included, killed (SIGKILL: no cleanup code
runs) at two points: right after its first shard is listed in the manifest, and with the
second shard streamed to its temp file but not yet renamed. It is then resumed with the same
command line, and every shard file and the manifest are compared with those of a run that
was never interrupted.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl
from gtp_kernels.cli import main
from gtp_kernels.collect.store import StoreError, open_store

ROOT = Path(__file__).resolve().parents[1]

# Runs `gtp collect ARGS` in this process and SIGKILLs it at the point named by MODE.
KILLER = r"""
import os, signal, sys
import gtp_kernels.collect.pipeline as pipeline
import gtp_kernels.collect.store as store
from gtp_kernels.cli import main

mode, argv = sys.argv[1], sys.argv[2:]

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "after_first_shard":
    collect = pipeline.collect_trajectory
    pipeline.collect_trajectory = lambda *a, **kw: collect(*a, on_shard_written=die, **kw)
elif mode == "before_second_rename":
    replace = os.replace
    def replace_or_die(src, dst, *a, **kw):
        if os.path.basename(dst) == "shard-00001.npy":
            die()
        return replace(src, dst, *a, **kw)
    store.os.replace = replace_or_die
main(["collect"] + argv)
raise SystemExit("not killed")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = root / "model"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer(chat_template=True).save_pretrained(model)
    data = write_jsonl(root / "pool.jsonl", instruction_records(10, seed=4))
    return root, model, data


def _argv(model: Path, data: str, out: Path) -> list[str]:
    # 10 examples in shards of 3: four shards; the warm-up (2 checkpoints) runs inside each collection.
    return ["--model", str(model), "--data", data, "--out", str(out), "--d", "16", "--shard-size", "3",
            "--batch-size", "2", "--warmup-fraction", "0.5", "--warmup-epochs", "2", "--warmup-lr", "1e-3",
            "--lora-r", "2", "--device", "cpu", "--quiet"]


def _manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["metadata"]["checkpoints"] = [Path(p).relative_to(out.resolve()).as_posix()
                                           for p in manifest["metadata"]["checkpoints"]]
    return manifest


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """Not --quiet: it prints the plan, whose calibration batch must leave the results unchanged."""
    root, model, data = setup
    out = root / "uninterrupted"
    printed, bars = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(bars):
        assert main(["collect"] + [a for a in _argv(model, data, out) if a != "--quiet"]) == 0
    return out, printed.getvalue()


def test_collect_prints_its_plan_and_estimate_before_any_work(uninterrupted):
    _, printed = uninterrupted
    lines = printed.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan: "))
    assert re.search(r"N=10 examples .*max_length 512\), T=2 checkpoints, d=16, adam gradients, batch 2, "
                     r"4 of 4 shard\(s\) of 3 rows to write \(10 examples\), [\d,]+ trainable parameters \(LoRA r=2\)",
                     lines[plan]), lines[plan]
    assert re.search(r"^estimate \(one calibration batch of 2 on cpu\): warm-up ~\d+ s, collection ~\d+ s "
                     r"\([\d.]+ examples/s\), peak memory ~[\d.]+ GiB RSS$", lines[plan + 1]), lines[plan + 1]
    assert lines[-1].startswith("store ")  # the summary line comes last


@pytest.mark.parametrize("mode", ["after_first_shard", "before_second_rename"])
def test_killed_and_resumed_collection_equals_an_uninterrupted_one(setup, uninterrupted, tmp_path, mode):
    root, model, data = setup
    uninterrupted, _ = uninterrupted
    out = tmp_path / "store"
    argv = _argv(model, data, out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", KILLER, mode] + argv, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    listed = [s["index"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert listed == [0]
    if mode == "before_second_rename":  # the fsync'ed temp of shard 1 is left behind by the dead writer
        assert list(out.glob(".shard-00001.npy.*.tmp")) and not (out / "shard-00001.npy").exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)

    assert main(["collect"] + argv) == 0  # the same command line resumes
    shards = sorted(p.name for p in uninterrupted.glob("shard-*.npy"))
    assert len(shards) == 4 and sorted(p.name for p in out.glob("shard-*.npy")) == shards
    for name in shards:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert _manifest(out) == _manifest(uninterrupted)
    assert not list(out.glob(".*.tmp"))
    open_store(out, verify="sha256")


# --- collect.resume's checks on their own (no collection) ---

def _written_store(folder, d=3):
    import numpy as np

    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter

    meta = {"task": "causal_lm", "gradient_type": "adam", "normalisation": "unit", "weights_applied": True,
            "projection": {"kind": "rademacher", "seed": 0, "seed_mode": "per_checkpoint"}}
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=4, t=1, d=d, example_ids=list("abcd"), shard_size=2, metadata=meta))
    writer.write_shard(0, np.ones((2, 1, d), dtype=np.float32), input_sha256="0" * 64)
    return folder


def test_check_resumable_names_what_differs(tmp_path):
    from gtp_kernels.collect.resume import check_resumable

    store = _written_store(tmp_path / "s")
    same = dict(out=store, resume=True, n=4, ids=list("abcd"), d=3, dtype="float32", shard_size=2, task="causal_lm",
                gradient_type="adam", kind="rademacher", seed=0, seed_mode="per_checkpoint", normalise=True,
                weights_applied=True)
    check_resumable(**same)
    check_resumable(**{**same, "out": tmp_path / "new"})  # nothing there yet
    for change, needle in ((dict(d=4), "'d' differs"), (dict(seed=1), "'projection seed' differs"),
                           (dict(gradient_type="sgd"), "'gradient_type' differs"),
                           (dict(ids=list("abce")), "example ids differ"), (dict(resume=False), "already exists")):
        with pytest.raises(StoreError, match=needle):
            check_resumable(**{**same, **change})


def test_shard_digests_say_what_the_rows_were_computed_from(tmp_path):
    from gtp_kernels.collect.data import TokenizedExample
    from gtp_kernels.collect.resume import check_inputs_unchanged, shard_input_digest

    examples = [TokenizedExample(id=i, input_ids=[1, 2, 3], labels=[-100, 2, 3]) for i in "ab"]
    digest = shard_input_digest(examples)
    assert digest == shard_input_digest(list(examples))
    edited = [examples[0], TokenizedExample(id="b", input_ids=[1, 2, 4], labels=[-100, 2, 4])]
    assert shard_input_digest(edited) != digest
    store = _written_store(tmp_path / "s")  # shard 0 recorded with input digest "0" * 64
    check_inputs_unchanged(store, ["0" * 64, "f" * 64], list("abcd"), 2)  # shard 1 is not written: not compared
    with pytest.raises(StoreError, match="shard 0 .*'a'..'b'.*other content"):
        check_inputs_unchanged(store, [digest, "f" * 64], list("abcd"), 2)
