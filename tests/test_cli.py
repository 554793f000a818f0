"""The gtp command end to end: select from each file format, the demo, --help lists methods."""
import json
import os
import stat
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


# --- user-facing defects: every refusal is one line `gtp: error:`, exit 2, nothing written ---

def _tiny_store(folder, n=30, t=2, d=8, seed=0):
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
    rows = np.random.default_rng(seed).standard_normal((n, t, d)).astype(np.float32)
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=n, t=t, d=d, example_ids=[f"ex{i}" for i in range(n)],
                                                     shard_size=n, metadata={"checkpoint_weights": [0.6, 0.4]}))
    writer.write_shard(0, rows)
    writer.finish()
    return rows


def _store_problem(tmp_path, n=30):
    rows = _tiny_store(tmp_path / "store", n=n)
    np.save(tmp_path / "b.npy", rows[:3].reshape(3, -1).sum(axis=0))
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "text": f"example {i}"}) + "\n" for i in range(n)))
    return ["select", "--candidates", str(tmp_path / "store"), "--target", str(tmp_path / "b.npy"), "--k", "3"]


def _no_work(monkeypatch):
    """Make the selection itself fail loudly: a refusal must come before it."""
    import gtp_kernels.api as api

    def boom(*a, **kw):
        raise AssertionError("select ran")
    monkeypatch.setattr(api, "select", boom)


def _one_line_error(capsys, *needles):
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gtp: error: "), cap.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return cap


def test_select_with_data_writes_all_three_files_with_plain_modes(tmp_path, capsys):
    from gtp_kernels.collect.data import write_selected_examples
    out = tmp_path / "o"
    assert cli_main(_store_problem(tmp_path) + ["--out", str(out), "--data", str(tmp_path / "pool.jsonl")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["selected.jsonl", "selection.jsonl", "summary.json"]
    chosen = [json.loads(x) for x in (out / "selection.jsonl").read_text().splitlines()]
    write_selected_examples(tmp_path / "pool.jsonl", [c["id"] for c in chosen], tmp_path / "ref.jsonl",
                            weights=[c["weight"] for c in chosen])
    assert (out / "selected.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()
    umask = os.umask(0o022); os.umask(umask)
    for p in out.iterdir():  # atomic writes give the mode a plain open() gives, not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


@pytest.mark.parametrize("problem", ["missing", "lacks_ids", "not_json", "folder"])
def test_select_bad_data_writes_nothing(tmp_path, capsys, monkeypatch, problem):
    args = _store_problem(tmp_path)
    data = tmp_path / "d.jsonl"
    if problem == "lacks_ids":
        data.write_text("".join(json.dumps({"id": f"ex{i}", "text": "x"}) + "\n" for i in range(5)))
    elif problem == "not_json":
        data.write_text("{not json\n")
    elif problem == "folder":
        data.mkdir()
    _no_work(monkeypatch)
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--data", str(data)]) == 2
    cap = _one_line_error(capsys, str(data))
    assert "wrote" not in cap.out and not (tmp_path / "o").exists()


@pytest.mark.parametrize("problem", ["out_is_file", "summary_is_folder", "parent_is_file"])
def test_select_bad_out_is_refused_before_work(tmp_path, capsys, monkeypatch, problem):
    args = _store_problem(tmp_path)
    out = tmp_path / "o"
    if problem == "out_is_file":
        out.write_text("x")
    elif problem == "summary_is_folder":
        (out / "summary.json").mkdir(parents=True)
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o"
    _no_work(monkeypatch)
    assert cli_main(args + ["--out", str(out)]) == 2
    _one_line_error(capsys, str(tmp_path))
    assert not (tmp_path / "o" / "selection.jsonl").exists()


def test_select_rerun_without_data_removes_stale_examples(tmp_path, capsys):
    args = _store_problem(tmp_path) + ["--out", str(tmp_path / "o")]
    assert cli_main(args + ["--data", str(tmp_path / "pool.jsonl")]) == 0
    assert (tmp_path / "o" / "selected.jsonl").exists()
    capsys.readouterr()
    assert cli_main(args[:-4] + ["--k", "2", "--out", str(tmp_path / "o"), "--force"]) == 0  # replacing needs --force
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["selection.jsonl", "summary.json"]


def test_select_multi_target_budget_is_per_target(tmp_path, capsys):
    A, B, _, _ = planted_problem(80, 30, 4, seed=0, m=2, dtype=torch.float32)
    np.save(tmp_path / "A.npy", A.numpy()); np.save(tmp_path / "B.npy", B.numpy())
    assert cli_main(["select", "--candidates", str(tmp_path / "A.npy"), "--target", str(tmp_path / "B.npy"),
                     "--k", "4", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "k=4 per target, 2 targets" in out and "(union)" in out
    helptext = subprocess.run([sys.executable, "-m", "gtp_kernels", "select", "--help"], capture_output=True,
                              text=True).stdout
    assert "per target column" in " ".join(helptext.split())


@pytest.mark.parametrize("argv", [["--num-candidates", "50"], ["--num-candidates", "0"], ["--seed", "-1"],
                                  ["--method", "bogus"], ["--k", "0"], ["--k", "9000"], ["--plot", "x.foo"],
                                  ["--seed", "99999999999999999999999"]])
def test_demo_bad_arguments_are_refused_before_the_pool(argv, capsys, monkeypatch, tmp_path):
    import gtp_kernels.demo as demo
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "make_synthetic_pool", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("built")))
    assert cli_main(["demo"] + argv) == 2
    _one_line_error(capsys, argv[0] if argv[0] != "--plot" else "foo")
    assert list(tmp_path.iterdir()) == []


def test_demo_method_topk_shows_each_method_once_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from gtp_kernels.demo import run_demo
    out = tmp_path / "t.png"
    rows = run_demo(k=8, num_candidates=1200, method="topk", plot=str(out), echo=lambda *_: None)
    assert [r["method"] for r in rows] == ["topk", "random"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix,magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_demo_plot_format_follows_the_suffix(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    from gtp_kernels.demo import run_demo
    out = tmp_path / f"demo.{suffix}"
    run_demo(k=8, num_candidates=1200, plot=str(out), echo=lambda *_: None)
    assert out.read_bytes()[:len(magic)] == magic
    umask = os.umask(0o022); os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("device", ["foo", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_select_bad_device_is_refused_up_front(tmp_path, capsys, monkeypatch, device):
    _no_work(monkeypatch)
    assert cli_main(_store_problem(tmp_path) + ["--out", str(tmp_path / "o"), "--device", device]) == 2
    _one_line_error(capsys, "--device")
    assert not (tmp_path / "o").exists()


def test_select_verify_sha256_catches_a_same_size_corruption(tmp_path, capsys):
    import struct

    from gtp_kernels.collect.store import SAMPLE_BLOCK_BYTES
    # a shard larger than the default's sample (4 x 64 KiB), changed between two sampled blocks
    rows = _tiny_store(tmp_path / "store", n=30, t=2, d=4096)
    np.save(tmp_path / "b.npy", rows[:3].reshape(3, -1).sum(axis=0))
    args = ["select", "--candidates", str(tmp_path / "store"), "--target", str(tmp_path / "b.npy"), "--k", "3"]
    shard = tmp_path / "store" / "shard-00000.npy"
    raw = bytearray(shard.read_bytes())
    at = 128 + SAMPLE_BLOCK_BYTES + 4000
    raw[at : at + 4] = struct.pack("<f", 0.125)  # same size, finite, different content
    shard.write_bytes(bytes(raw))
    assert cli_main(args + ["--out", str(tmp_path / "o1"), "--verify", "size"]) == 0
    capsys.readouterr()
    assert cli_main(args + ["--out", str(tmp_path / "o2"), "--verify", "sha256"]) == 2
    _one_line_error(capsys, "sha256")
    assert not (tmp_path / "o2").exists()
    raw[-4:] = struct.pack("<f", 0.125)  # inside the last sampled block: the default sees it too
    shard.write_bytes(bytes(raw))
    assert cli_main(args + ["--out", str(tmp_path / "o3")]) == 2
    _one_line_error(capsys, "sampled checksum")


def test_select_refuses_swapped_shards_and_a_flipped_fortran_order_by_default(tmp_path, capsys):
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
    rows = np.random.default_rng(0).standard_normal((30, 2, 8)).astype(np.float32)
    writer = TrajectoryStoreWriter(tmp_path / "store", StoreSpec(n=30, t=2, d=8, example_ids=[f"ex{i}" for i in range(30)],
                                                                 shard_size=10))
    for index in range(3):
        writer.write_shard(index, rows[10 * index : 10 * index + 10])
    writer.finish()
    np.save(tmp_path / "b.npy", rows[:3].reshape(3, -1).sum(axis=0))
    args = ["select", "--candidates", str(tmp_path / "store"), "--target", str(tmp_path / "b.npy"), "--k", "3"]
    first, second = tmp_path / "store" / "shard-00000.npy", tmp_path / "store" / "shard-00001.npy"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    assert cli_main(args + ["--out", str(tmp_path / "o1")]) == 2
    _one_line_error(capsys, "shard-00000.npy holds the data of shard-00001.npy", "swapped")
    first.write_bytes(a)
    second.write_bytes(b.replace(b"'fortran_order': False", b"'fortran_order': True "))
    assert cli_main(args + ["--out", str(tmp_path / "o2")]) == 2
    _one_line_error(capsys, "shard-00001.npy has a .npy header that differs")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_select_on_a_store_reads_its_shards_in_place(tmp_path, capsys, monkeypatch):
    """No copy of the whole store: the shards are read through a row source, a chunk at a time."""
    from gtp_kernels.collect.store import TrajectoryStore

    def whole_copy(*a, **kw):
        raise AssertionError("the whole store was copied into memory")
    monkeypatch.setattr(TrajectoryStore, "candidates", whole_copy)
    monkeypatch.setattr(TrajectoryStore, "trajectory_view", whole_copy)
    args = _store_problem(tmp_path)
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--method", "gtp-cosamp"]) == 0
    want = gk.select(np.load(tmp_path / "store" / "shard-00000.npy"), np.load(tmp_path / "b.npy"), 3,
                     method="gtp-cosamp", checkpoint_weights=[0.6, 0.4])
    got = [json.loads(line)["index"] for line in (tmp_path / "o" / "selection.jsonl").read_text().splitlines()]
    assert got == want.indices.tolist()


_PEAK_ANON = r"""
import sys, threading, time
import torch, numpy
from gtp_kernels.cli import main
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
base = anon(); peak = [base]; done = threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
thread = threading.Thread(target=poll, daemon=True); thread.start()
assert main(sys.argv[1:]) == 0
done.set(); thread.join()
print("PEAK", max(peak[0], anon()) - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_select_from_a_store_needs_no_more_memory_than_from_one_npy(tmp_path):
    """Peak anonymous memory of `gtp select` on a 64 MB fp16 store, against the same rows as one
    memory-mapped .npy: the store used to be copied twice (+2x its size); now both read in chunks."""
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
    n, t, d = 8192, 2, 2048
    spec = StoreSpec(n=n, t=t, d=d, example_ids=[f"ex{i}" for i in range(n)], dtype="float16", shard_size=4096,
                     metadata={"checkpoint_weights": [0.5, 0.5]})
    writer = TrajectoryStoreWriter(tmp_path / "store", spec)
    npy = np.lib.format.open_memmap(tmp_path / "rows.npy", mode="w+", dtype=np.float16, shape=(n, t * d))
    rng = np.random.default_rng(0)
    for index in range(spec.n_shards):
        rows = rng.standard_normal((4096, t * d), dtype=np.float32).astype(np.float16)
        writer.write_shard(index, rows.reshape(4096, t, d))
        npy[index * 4096 : (index + 1) * 4096] = rows
    npy.flush()
    del npy
    writer.finish()
    np.save(tmp_path / "b.npy", np.load(tmp_path / "rows.npy", mmap_mode="r")[:5].astype(np.float32).sum(axis=0))
    store_bytes = n * t * d * 2
    peaks = {}
    for name, extra in (("store", []), ("rows.npy", ["--checkpoint-weights", "0.5,0.5", "--num-checkpoints", "2"])):
        proc = subprocess.run([sys.executable, "-c", _PEAK_ANON, "select", "--candidates", str(tmp_path / name),
                               "--target", str(tmp_path / "b.npy"), "--k", "4", "--method", "gtp-cosamp",
                               "--out", str(tmp_path / f"out-{name}"), *extra],
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[name] = int(proc.stdout.split("PEAK")[-1])
    assert peaks["store"] < peaks["rows.npy"] + store_bytes / 2, (peaks, store_bytes)
    picks = [[(r["index"], r["weight"]) for r in map(json.loads, (tmp_path / f"out-{name}" / "selection.jsonl").read_text().splitlines())]
             for name in peaks]
    assert picks[0] == picks[1] and len(picks[0]) == 4


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_key_on_a_single_array_file_is_refused(tmp_path, capsys, fmt):
    A = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    if fmt == "npy":
        np.save(tmp_path / "A.npy", A)
    else:
        torch.save(torch.from_numpy(A), tmp_path / "A.pt")
    np.save(tmp_path / "b.npy", np.ones(4, dtype=np.float32))
    assert cli_main(["select", "--candidates", f"{tmp_path / ('A.' + fmt)}:foo", "--target", str(tmp_path / "b.npy"),
                     "--k", "2", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, ":foo")
    assert not (tmp_path / "o").exists()


def _weighted_store(folder, rows_raw, weights, metadata=None):
    """A store as gtp collect writes it: blocks carry sqrt(w_t) (weights_applied)."""
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
    n, t, d = rows_raw.shape
    meta = {"checkpoint_weights": list(weights), "weights_applied": True,
            "projection": {"kind": "rademacher", "seeds": [7, 8], "seed_mode": "per_checkpoint", "d": d}}
    meta.update(metadata or {})
    rows = (rows_raw * np.sqrt(np.asarray(weights))[None, :, None]).astype(np.float32)
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=n, t=t, d=d, example_ids=[f"ex{i}" for i in range(n)],
                                                     shard_size=n, metadata=meta))
    writer.write_shard(0, rows)
    writer.finish()
    return rows


def test_select_topk_on_a_weighted_store_uses_the_learning_rates(tmp_path, capsys):
    """Top-k's per-block cosine cancels the sqrt(w_t) built into the rows: it must be given w_t
    (it ranked as if the checkpoints were equally weighted)."""
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((40, 2, 6))
    weights = [0.9, 0.1]
    rows = _weighted_store(tmp_path / "pool", raw, weights)
    target = _weighted_store(tmp_path / "val", raw[:4] + 0.3 * rng.standard_normal((4, 2, 6)), weights)
    b = target.reshape(4, -1).astype(np.float64).mean(axis=0)
    flat = torch.from_numpy(rows.reshape(40, -1))
    want = gk.select(flat, torch.from_numpy(b), 8, method="topk", checkpoint_weights=weights, num_checkpoints=2)
    unweighted = gk.select(flat, torch.from_numpy(b), 8, method="topk", num_checkpoints=2)
    assert want.indices.tolist() != unweighted.indices.tolist()  # the weights matter here
    out = tmp_path / "o"
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"),
                     "--k", "8", "--method", "topk", "--target-mode", "mean", "--out", str(out)]) == 0
    got = [json.loads(x)["index"] for x in (out / "selection.jsonl").read_text().splitlines()]
    assert got == want.indices.tolist()


@pytest.mark.parametrize("change,needle", [
    ({"projection": {"kind": "rademacher", "seeds": [99, 100], "seed_mode": "per_checkpoint", "d": 6}},
     "projection seeds"),
    ({"normalisation": "none"}, "normalisation"),
    ({"checkpoint_weights": [0.5, 0.5]}, "checkpoint_weights"),
])
def test_select_refuses_stores_from_different_spaces(tmp_path, capsys, monkeypatch, change, needle):
    rng = np.random.default_rng(4)
    _weighted_store(tmp_path / "pool", rng.standard_normal((20, 2, 6)), [0.6, 0.4], {"normalisation": "unit"})
    meta = {"normalisation": "unit", **change}
    weights = meta.pop("checkpoint_weights", [0.6, 0.4])
    _weighted_store(tmp_path / "val", rng.standard_normal((3, 2, 6)), weights, meta)
    _no_work(monkeypatch)
    out = tmp_path / "o"
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"),
                     "--k", "3", "--out", str(out)]) == 2
    _one_line_error(capsys, "do not match", needle)
    assert not out.exists()


def test_select_refuses_weights_twice_on_a_weighted_store(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    rows = _weighted_store(tmp_path / "pool", rng.standard_normal((20, 2, 6)), [0.6, 0.4])
    np.save(tmp_path / "b.npy", rows[:2].reshape(2, -1).sum(axis=0))
    _no_work(monkeypatch)
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "b.npy"),
                     "--k", "3", "--out", str(tmp_path / "o"), "--checkpoint-weights", "0.6,0.4"]) == 2
    _one_line_error(capsys, "--checkpoint-weights", "twice")


# --- tracebacks that became one `gtp: error:` line, exit 2, nothing written (issue 14, item 13) ---

@pytest.mark.parametrize("method", ["gtp", "random"])
def test_select_seed_out_of_range_is_one_line_before_work(tmp_path, capsys, monkeypatch, method):
    """--seed 99999999999999999999999 overflowed torch's generator (a ValueError traceback)."""
    args = _store_problem(tmp_path)
    _no_work(monkeypatch)
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--method", method,
                            "--seed", "99999999999999999999999"]) == 2
    _one_line_error(capsys, "--seed must be an integer <= 2^64 - 1")
    assert not (tmp_path / "o").exists()


def test_select_deeply_nested_data_line_is_one_line(tmp_path, capsys, monkeypatch):
    """A JSON line nested 100000 deep raised RecursionError from json.loads."""
    args = _store_problem(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "ex0", "text": "x"}) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
    _no_work(monkeypatch)
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--data", str(data)]) == 2
    _one_line_error(capsys, str(data), "line 2", "nested too deeply")
    assert not (tmp_path / "o").exists()


def test_select_full_disk_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import errno
    args = _store_problem(tmp_path)
    out = tmp_path / "o"
    out.mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    assert cli_main(args + ["--out", str(out)]) == 2
    _one_line_error(capsys, "No space left on device")
    assert list(out.iterdir()) == []  # no output, no temp file


def test_oserror_anywhere_is_one_line(monkeypatch, capsys):
    """Any OSError out of a command (here: collect's store on a full disk) is one line, exit 2."""
    import errno
    import gtp_kernels.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/store/shard-00003.npy")
    monkeypatch.setattr(cli, "collect_from_args", full)
    assert cli_main(["collect", "--model", "m", "--data", "d.jsonl", "--out", "o"]) == 2
    cap = _one_line_error(capsys)
    assert cap.err.strip() == "gtp: error: No space left on device: /store/shard-00003.npy"


# gtp collect: its options (add_collect_arguments, collect_from_args)

def test_command_line_options_on_a_saved_model_folder(tmp_path, capsys):
    """`gtp collect` options (add_collect_arguments) on a model + tokenizer saved to disk, loaded offline."""
    import argparse

    from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl
    from gtp_kernels.cli import add_collect_arguments, collect_from_args

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer(chat_template=True).save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", [{**r, "uid": f"u{i}"} for i, r in enumerate(instruction_records(9, seed=2))])
    parser = argparse.ArgumentParser()
    add_collect_arguments(parser)
    args = parser.parse_args(["--model", str(folder), "--data", data, "--out", str(tmp_path / "store"), "--d", "24",
                              "--warmup-fraction", "0.5", "--warmup-epochs", "2", "--warmup-lr", "1e-3",
                              "--lora-r", "2", "--lora-targets", "q_proj,k_proj", "--shard-size", "4", "--id-field", "uid",
                              "--shared-seed", "--seed", "5", "--dtype", "float16", "--device", "cpu", "--quiet"])
    store = collect_from_args(args)
    assert store.ids == [f"u{i}" for i in range(9)] and store.t == 2 and store.d == 24 and store.dtype == np.float16
    assert store.metadata["projection"]["seeds"] == [5, 5] and store.metadata["model"] == str(folder)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "store" / "warmup" / "checkpoint-1" / "trainable.safetensors"))
    assert any("k_proj.lora_A" in n for n in trained) and not any("v_proj" in n for n in trained)


# gtp collect: the same, for its arguments, the file system and pickled checkpoint files

COLLECT_QUICK = ["--d", "8", "--shard-size", "4", "--device", "cpu", "--quiet", "--lora-r", "2",
                 "--warmup-fraction", "0.5", "--warmup-epochs", "1"]


class _Payload:
    """Pickled into a checkpoint file: torch.load(weights_only=True) refuses it unrun."""

    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer(chat_template=True).save_pretrained(root / "model")
    write_jsonl(root / "pool.jsonl", instruction_records(6, seed=3))
    return root


def _collect_fails(capsys, argv, *needles):
    capsys.readouterr()  # the set-up's own output (e.g. a loading bar)
    code = cli_main(["collect", *argv])
    cap = _one_line_error(capsys, *needles)
    assert code == 2
    assert "PAYLOAD RAN" not in cap.out
    return cap


@pytest.mark.parametrize("option, needle", [
    ("--seed", "seed must be an integer in [0, 2^64)"),
    ("--warmup-seed", "warm-up seed must be an integer <= 2^64 - 1"),
])
def test_collect_seed_out_of_range_is_one_line(tiny_model, tmp_path, capsys, option, needle):
    _collect_fails(capsys, ["--model", str(tmp_path / "nonexist"), "--data", str(tiny_model / "pool.jsonl"),
                            "--out", str(tmp_path / "o"), *COLLECT_QUICK, option, "99999999999999999999999"], needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, needle", [
    ("--d", "d (projected dimensions per checkpoint) must be an integer <= 2147483647"),
    ("--lora-r", "lora r must be an integer <= 2147483647"),
    ("--batch-size", "batch_size must be an integer <= 2147483647"),
    ("--warmup-epochs", "warm-up epochs must be an integer <= 2147483647"),
])
def test_collect_sizes_out_of_range_are_one_line(tiny_model, tmp_path, capsys, option, needle):
    """--d or --lora-r of 1e20 overflowed torch.empty's int64 sizes (a TypeError traceback from C++)."""
    _collect_fails(capsys, ["--model", str(tmp_path / "nonexist"), "--data", str(tiny_model / "pool.jsonl"),
                            "--out", str(tmp_path / "o"), *COLLECT_QUICK, option, "99999999999999999999"], needle)
    assert not (tmp_path / "o").exists()


def test_collect_deeply_nested_data_is_one_line(tiny_model, tmp_path, capsys):
    data = tmp_path / "deep.jsonl"
    data.write_text("[" * 100000 + "]" * 100000 + "\n")
    _collect_fails(capsys, ["--model", str(tiny_model / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                            *COLLECT_QUICK], str(data), "nested too deeply")
    assert not (tmp_path / "o").exists()


def test_collect_unwritable_out_is_refused_before_the_model_loads(tiny_model, tmp_path, capsys, monkeypatch):
    """A read-only file system (as root, chmod does not stop writes: os.access is what reports
    EROFS) was an OSError traceback from mkdir after the model had loaded."""
    import gtp_kernels.collect.models as models
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode, **kw))
    monkeypatch.setattr(models, "build_model", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("model loaded")))
    _collect_fails(capsys, ["--model", str(tiny_model / "model"), "--data", str(tiny_model / "pool.jsonl"),
                            "--out", str(tmp_path / "o"), *COLLECT_QUICK], "no permission to write in")
    assert not (tmp_path / "o").exists()


def test_collect_full_disk_while_saving_a_checkpoint_is_one_line(tiny_model, tmp_path, capsys):
    """optimizer.pt onto a full disk (/dev/full): torch.save(path) raised RuntimeError
    'unexpected pos'; now the write fails as an OSError, printed as one line."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    folder = tmp_path / "o" / "warmup" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").symlink_to("/dev/full")
    _collect_fails(capsys, ["--model", str(tiny_model / "model"), "--data", str(tiny_model / "pool.jsonl"),
                            "--out", str(tmp_path / "o"), *COLLECT_QUICK], "No space left on device")
    assert not (tmp_path / "o" / "manifest.json").exists() and not (tmp_path / "o" / "warmup" / "warmup.json").exists()


def test_collect_says_once_that_the_warm_up_did_not_learn(tiny_model, tmp_path, capsys):
    """The default --warmup-lr 2e-5 barely moves the tiny Llama: one `gtp: warning:` line naming
    the options to change, exit 0; a warnings filter (-W ignore::...) silences it."""
    import warnings

    from gtp_kernels.collect import WarmupDidNotLearnWarning
    argv = ["collect", "--model", str(tiny_model / "model"), "--data", str(tiny_model / "pool.jsonl"),
            "--out", str(tmp_path / "o"), *COLLECT_QUICK]
    capsys.readouterr()
    assert cli_main(argv) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gtp: warning: ")]
    assert len(lines) == 1 and "the warm-up did not learn" in lines[0] and "--warmup-lr" in lines[0], lines
    manifest = json.loads((tmp_path / "o" / "warmup" / "warmup.json").read_text())
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["metadata"]["warmup_losses"]["epoch_losses"] \
        == manifest["epoch_losses"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=WarmupDidNotLearnWarning)
        assert cli_main(argv) == 0  # the finished store again
    assert "gtp: warning" not in capsys.readouterr().err


def _peft_checkpoint(tiny_model, folder):
    """A checkpoint-1 folder as the transformers Trainer leaves it: a peft adapter (saved, not
    trained) plus trainer_state.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model / "model"), LoraConfig(r=2, task_type="CAUSAL_LM"))
    net.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "learning_rate": 1e-3}]}))
    return net


@pytest.mark.parametrize("pickled", ["pytorch_model.bin", "adapter_model.bin", "optimizer.pt"])
def test_collect_pickled_checkpoint_files_are_refused_in_one_line(tiny_model, tmp_path, capsys, pickled):
    """torch.load(weights_only=True) refused each payload safely, but as an UnpicklingError traceback."""
    import shutil
    model = tiny_model / "model"
    argv = ["--data", str(tiny_model / "pool.jsonl"), "--out", str(tmp_path / "o"), *COLLECT_QUICK]
    if pickled == "pytorch_model.bin":
        model = tmp_path / "model"
        shutil.copytree(tiny_model / "model", model)
        (model / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _Payload()}, model / "pytorch_model.bin")
    else:
        folder = tmp_path / "ckpts" / "checkpoint-1"
        net = _peft_checkpoint(tiny_model, folder)
        argv += ["--checkpoints", str(folder.parent)]
        if pickled == "adapter_model.bin":
            (folder / "adapter_model.safetensors").unlink()
            torch.save({"base_model.model.x": _Payload()}, folder / "adapter_model.bin")
            argv += ["--gradient-type", "sgd"]
        else:
            names = [n for n, p in net.named_parameters() if p.requires_grad]
            torch.save({"exp_avg": {n: _Payload() for n in names}, "exp_avg_sq": {}}, folder / "optimizer.pt")
    _collect_fails(capsys, ["--model", str(model), *argv], "was refused", "pickled Python objects",
                   "not an allowed global")
    assert not (tmp_path / "o" / "manifest.json").exists()
