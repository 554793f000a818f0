"""`torchrun --nproc_per_node=2 -m gtp_kernels collect` (gloo, CPU) writes the same store as a
single-process `python -m gtp_kernels collect`: byte-identical shard files, the same manifest
(the store folder's own path aside), the same warm-up checkpoints; and it resumes a store that a
single process left incomplete.

The runs are subprocesses on the tiny Llama of collect_tiny.py (saved as a model folder), each
with one thread so that thread counts cannot differ between the runs compared; each has a time
limit so that a rank left waiting in a collective fails the test instead of hanging the suite.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.skipif(not dist.is_available() or shutil.which("torchrun") is None,
                                reason="torch.distributed or torchrun not available")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400
N_EXAMPLES, SHARD_SIZE = 23, 5  # five shards, the last one short
OPTIONS = ["--d", "48", "--batch-size", "4", "--shard-size", str(SHARD_SIZE), "--max-length", "64",
           "--warmup-fraction", "0.5", "--warmup-epochs", "2", "--warmup-lr", "5e-3", "--warmup-batch-size", "4",
           "--lora-r", "4", "--lora-alpha", "8", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_collect")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer(chat_template=True).save_pretrained(root / "model")
    write_jsonl(root / "pool.jsonl", instruction_records(N_EXAMPLES, seed=1))
    return root


def _run(launcher, root, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # "--": torchrun's parser would read --d as an abbreviation of its own --duplicate-... options
    command = launcher + ["-m", "gtp_kernels", "--", "collect", "--model", str(root / "model"),
                          "--data", str(root / "pool.jsonl"), "--out", str(out), *OPTIONS, *extra]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def single(root, out, *extra):
    return _run([sys.executable], root, out, *extra)


def torchrun(root, out, *extra, processes=2):
    return _run(["torchrun", "--standalone", f"--nproc_per_node={processes}"], root, out, *extra)


def _manifest(store: Path) -> dict:
    """The manifest with the store's own folder written as STORE (the warm-up paths contain it)."""
    text = (store / "manifest.json").read_text(encoding="utf-8")
    return json.loads(text.replace(json.dumps(str(store.resolve()))[1:-1], "STORE"))


def assert_same_store(got: Path, want: Path):
    assert _manifest(got) == _manifest(want)
    manifest = _manifest(want)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(range(5))
    for entry in manifest["shards"]:
        assert (got / entry["file"]).read_bytes() == (want / entry["file"]).read_bytes(), entry["file"]
    warm_files = sorted(p.relative_to(want / "warmup") for p in (want / "warmup").rglob("*") if p.is_file())
    assert warm_files == sorted(p.relative_to(got / "warmup") for p in (got / "warmup").rglob("*") if p.is_file())
    for name in warm_files:  # one warm-up, on rank 0, equal to the single process's
        if name.suffix == ".json":  # peft writes target_modules, a set, in the process's hash order
            assert _json_sets_sorted(got / "warmup" / name) == _json_sets_sorted(want / "warmup" / name), name
        else:
            assert (got / "warmup" / name).read_bytes() == (want / "warmup" / name).read_bytes(), name


def _json_sets_sorted(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return data


@pytest.fixture(scope="module")
def reference(inputs):
    single(inputs, inputs / "single")
    return inputs / "single"


def test_two_ranks_write_the_single_process_store(inputs, reference):
    out = inputs / "two_ranks"
    done = torchrun(inputs, out)
    assert_same_store(out, reference)
    assert not list(out.glob(".*.tmp"))
    # the tiny Llama barely learns random words at lr 5e-3 (flagged): rank 0 alone says so, once
    assert done.stderr.count("gtp: warning: the warm-up did not learn") == 1, done.stderr[-3000:]
    # a rerun on the finished store: rank 0 decides for both that there is nothing to write
    manifest = (out / "manifest.json").read_bytes()
    done = torchrun(inputs, out)
    assert (out / "manifest.json").read_bytes() == manifest
    assert done.stderr.count("gtp: warning: the warm-up did not learn") == 1, done.stderr[-3000:]


def test_two_ranks_resume_a_partial_single_process_store(inputs, reference):
    """A single process wrote shards 1 and 2 (and the warm-up); two ranks fill 0, 3 and 4."""
    out = inputs / "resumed"
    single(inputs, out, "--shards", "1,2")
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [1, 2]
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    torchrun(inputs, out)
    assert_same_store(out, reference)
    assert {p: (out / p).stat().st_mtime_ns for p in written} == written  # kept, not recomputed


def test_no_resume_is_refused_on_an_existing_store(inputs, reference):
    out = inputs / "again"
    shutil.copytree(reference, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "gtp_kernels", "--", "collect", "--model",
               str(inputs / "model"), "--data", str(inputs / "pool.jsonl"), "--out", str(out), *OPTIONS, "--no-resume"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode != 0 and "already exists" in done.stdout + done.stderr


def test_sharded_selection_of_a_store_under_torchrun(inputs, reference, tmp_path):
    """python/select_sharded_store.py on two ranks (whole shards each) picks what select() picks."""
    import numpy as np

    import gtp_kernels as gk
    from gtp_kernels.collect import open_store, store_target

    out = tmp_path / "selected.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = ["torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "python" / "select_sharded_store.py"),
               "--candidates", str(reference), "--target", str(reference), "--k", "6", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-5000:]
    got = json.loads(out.read_text())
    pool = open_store(reference)
    want = gk.select(pool.candidates(), store_target(pool), 6, method="gtp",
                     checkpoint_weights=pool.selection_checkpoint_weights)
    assert got["rows"] == want.indices.tolist() and got["ids"] == [pool.ids[i] for i in want.indices]
    np.testing.assert_allclose(got["weights"], want.weights, rtol=1e-6)
    assert got["world_size"] == 2


def _model_failing_on_rank_0():
    """A model factory that fails where only rank 0 calls it first: building the warm-up's model."""
    if dist.get_rank() == 0:
        raise RuntimeError("injected failure while building the warm-up model")
    return tiny_llama()


def _failing_rank(rank, world, rendezvous, out, messages):
    from gtp_kernels.collect import LoraSettings, WarmupSettings, collect_distributed

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        collect_distributed(_model_failing_on_rank_0, instruction_records(8, seed=1), out,
                            tokenizer=tiny_tokenizer(chat_template=True), d=16, batch_size=4, shard_size=4,
                            warmup=WarmupSettings(fraction=0.5, epochs=1, batch_size=4, lora=LoraSettings(r=2, alpha=4)),
                            progress=False, device="cpu")
    except Exception as error:  # noqa: BLE001 - recorded for the test, which checks what each rank raised
        Path(messages, f"rank{rank}").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


def test_a_failure_of_rank_0_before_the_warm_up_reaches_the_other_ranks(tmp_path):
    """Rank 1 waits for rank 0's warm-up; rank 0 fails building its model: rank 1 is told and
    raises too, instead of waiting in the collective until the group's timeout."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_failing_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "store"),
                                                      str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "a rank did not finish"
    first = (tmp_path / "rank0").read_text()
    assert first.startswith("RuntimeError: injected failure")
    second = (tmp_path / "rank1").read_text()
    assert "rank 0 failed before the checkpoints were ready" in second and "injected failure" in second
