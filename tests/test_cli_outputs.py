"""gtp select's outputs: k rows per column by default with one line saying why pursuit stopped,
target stores as one column or one per example, summary.json's record of the run, --version,
--force, and an output folder that is written whole (crashes simulated between the steps)."""
import json
import os

import numpy as np
import pytest
import torch

import gtp_kernels as gk
import gtp_kernels.io as gio
from gtp_kernels.cli import main as cli_main
from gtp_kernels.collect import store_target
from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter, open_store
from problems import planted_problem

def _planted_files(tmp_path, k_true=4, m=1):
    A, B, supports, _ = planted_problem(200, 50, k_true, seed=1, dtype=torch.float32, m=m)
    np.save(tmp_path / "A.npy", A.numpy())
    np.save(tmp_path / "b.npy", (B[:, 0] if m == 1 else B).numpy())
    return ["select", "--candidates", str(tmp_path / "A.npy"), "--target", str(tmp_path / "b.npy")], supports


def _store(folder, rows, weights=(0.6, 0.4)):
    n, t, d = rows.shape
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=n, t=t, d=d, example_ids=[f"{folder.name}{i}" for i in range(n)],
                                                     shard_size=max(1, n // 2), dtype=str(rows.dtype),
                                                     metadata={"checkpoint_weights": list(weights)}))
    for index in range(writer.spec.n_shards):
        start, stop = writer.spec.shard_rows(index)
        writer.write_shard(index, rows[start:stop])
    writer.finish()
    return open_store(folder)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_select_fills_to_k_by_default_and_says_why_in_one_line(tmp_path, capsys):
    args, supports = _planted_files(tmp_path)
    assert cli_main(args + ["--k", "10", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.splitlines()
    line = out[0]
    assert "selected=10: 4 pursued, 6 filled by cosine with the target" in line
    assert "pursuit stopped: tolerance (residual below --tol)" in line
    assert not any("pursued" in x or "stopped" in x for x in out[1:])  # one line says it all
    rows = _lines(tmp_path / "o" / "selection.jsonl")
    assert len(rows) == 10 and [r["filled"] for r in rows] == [False] * 4 + [True] * 6
    assert sorted(r["index"] for r in rows[:4]) == sorted(supports[0].tolist())
    assert all(r["weight"] == 0 for r in rows[4:]) and all(r["targets"] == [0] for r in rows)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["selected"], summary["pursued"], summary["filled"]) == (10, 4, 6)
    assert summary["params"]["fill"] == "target"


def test_select_fill_none_keeps_pursuits_rows_and_says_it_is_short(tmp_path, capsys):
    args, _ = _planted_files(tmp_path)
    assert cli_main(args + ["--k", "10", "--out", str(tmp_path / "o"), "--fill", "none"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "selected=4: 4 pursued, 0 filled (--fill none)" in line
    assert "6 rows short of k (pass --fill to fill the budget)" in line
    assert len(_lines(tmp_path / "o" / "selection.jsonl")) == 4


def test_select_fill_residual_and_several_targets(tmp_path, capsys):
    args, _ = _planted_files(tmp_path, m=2)
    assert cli_main(args + ["--k", "6", "--out", str(tmp_path / "o"), "--fill", "residual"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "k=6 per target, 2 targets" in line and "(union): 8 pursued, 4 filled by cosine with the final residual" \
        in line
    assert "pursuit stopped: tolerance (residual below --tol) for 2 targets" in line
    rows = _lines(tmp_path / "o" / "selection.jsonl")
    per_column = [sum(c in r["targets"] for r in rows) for c in (0, 1)]
    assert per_column == [6, 6]


def test_summary_records_inputs_version_and_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pool = _store(tmp_path / "pool", rng.standard_normal((20, 2, 5)).astype(np.float32))
    _store(tmp_path / "val", rng.standard_normal((3, 2, 5)).astype(np.float16))
    argv = ["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "3",
            "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    import hashlib
    cand, target = summary["inputs"]["candidates"], summary["inputs"]["target"]
    assert cand["path"] == str((tmp_path / "pool").resolve()) and cand["kind"] == "store"
    assert cand["shape"] == [20, 2, 5] and cand["dtype"] == "float32"
    assert cand["manifest_sha256"] == hashlib.sha256((pool.path / "manifest.json").read_bytes()).hexdigest()
    assert target["shape"] == [3, 2, 5] and target["dtype"] == "float16" and target["mode"] == "joint"
    assert summary["gtp_kernels_version"] == gk.__version__
    assert summary["command_line"].split() == ["gtp"] + argv
    # a file target: path, shape, dtype of the array
    np.save(tmp_path / "b.npy", rng.standard_normal(10).astype(np.float64))
    assert cli_main(argv[:3] + ["--target", str(tmp_path / "b.npy"), "--k", "3", "--out", str(tmp_path / "o2")]) == 0
    target = json.loads((tmp_path / "o2" / "summary.json").read_text())["inputs"]["target"]
    assert target == {"path": str(tmp_path / "b.npy"), "kind": "file", "shape": [10], "dtype": "float64"}


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"gtp (gtp_kernels) {gk.__version__}"


def test_target_store_as_examples_or_mean(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pool_rows = rng.standard_normal((40, 2, 5)).astype(np.float32)
    _store(tmp_path / "pool", pool_rows)
    val = _store(tmp_path / "val", (pool_rows[:3] + 0.1 * rng.standard_normal((3, 2, 5))).astype(np.float32))
    columns = store_target(val, "examples")
    assert columns.shape == (10, 3) and columns.dtype == np.float32
    np.testing.assert_array_equal(columns.T, val.candidates())
    np.testing.assert_array_equal(store_target(val, "mean"), val.mean())
    base = ["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "2"]
    assert cli_main(base + ["--out", str(tmp_path / "e"), "--target-mode", "examples", "--method", "topk"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["num_targets"] == 3 and summary["inputs"]["target"]["mode"] == "examples"
    rows = _lines(tmp_path / "e" / "selection.jsonl")
    for j in range(3):  # target example j is a noisy copy of pool row j: top of its own column
        assert j in {r["index"] for r in rows if j in r["targets"]}
    assert cli_main(base + ["--out", str(tmp_path / "m"), "--target-mode", "mean"]) == 0
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["num_targets"] == 1
    # the default for a store, joint: --k rows in all, serving every example; k = 3 takes the
    # three pool rows the examples copy
    capsys.readouterr()
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "3",
                     "--out", str(tmp_path / "j")]) == 0
    assert "k=3 in all, joint over 3 targets" in capsys.readouterr().out
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    assert summary["inputs"]["target"]["mode"] == "joint" and summary["params"]["targets"] == "joint"
    assert sorted(r["index"] for r in _lines(tmp_path / "j" / "selection.jsonl")) == [0, 1, 2]
    # compressive sampling has no joint mode: its default stays the mean
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "3",
                     "--method", "gtp-cosamp", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["inputs"]["target"]["mode"] == "mean"
    # a (D, m) file target, jointly on request
    np.save(tmp_path / "b.npy", store_target(val, "examples"))
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "b.npy"), "--k",
                     "3", "--target-mode", "joint", "--out", str(tmp_path / "f")]) == 0
    assert sorted(r["index"] for r in _lines(tmp_path / "f" / "selection.jsonl")) == [0, 1, 2]


def test_target_mode_examples_refuses_a_zero_example_and_a_file_target(tmp_path, capsys):
    rng = np.random.default_rng(2)
    _store(tmp_path / "pool", rng.standard_normal((10, 2, 5)).astype(np.float32))
    rows = rng.standard_normal((3, 2, 5)).astype(np.float32)
    rows[1] = 0
    val = _store(tmp_path / "val", rows)
    with pytest.raises(gk.collect.StoreError, match="val1.*all-zero"):
        store_target(val, "examples")
    with pytest.raises(gk.InputError, match="target mode"):
        store_target(val, "median")
    base = ["select", "--candidates", str(tmp_path / "pool"), "--k", "2", "--target-mode", "examples"]
    assert cli_main(base + ["--target", str(tmp_path / "val"), "--out", str(tmp_path / "o")]) == 2
    np.save(tmp_path / "b.npy", rng.standard_normal(10).astype(np.float32))
    assert cli_main(base + ["--target", str(tmp_path / "b.npy"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "all-zero" in err[0] and "needs --target to be a store" in err[1]
    assert not (tmp_path / "o").exists()


# --- --out: new or empty unless --force; written whole ---

def _outputs(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_non_empty_out_is_refused_unless_force(tmp_path, capsys):
    args, _ = _planted_files(tmp_path)
    out = tmp_path / "o"
    out.mkdir()  # an empty folder is fine
    assert cli_main(args + ["--k", "4", "--out", str(out)]) == 0
    first = _outputs(out)
    capsys.readouterr()
    assert cli_main(args + ["--k", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert _outputs(out) == first
    assert cli_main(args + ["--k", "3", "--out", str(out), "--force"]) == 0
    assert len(_lines(out / "selection.jsonl")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.npy", "b.npy", "o"]  # no staging left


def test_force_never_replaces_a_folder_with_other_files(tmp_path, capsys):
    args, _ = _planted_files(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(args + ["--k", "3", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not a selection output" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_library_write_selection_writes_the_folder_whole(tmp_path):
    A, B, _, _ = planted_problem(60, 20, 3, seed=2, dtype=torch.float32)
    sel = gk.select(A, B[:, 0], 3)
    paths = gio.write_selection(tmp_path / "o", sel)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["selection.jsonl", "summary.json"]
    assert len(_lines(paths["selection"])) == len(sel.indices)
    gio.write_selection(tmp_path / "o", gk.select(A, B[:, 0], 2, method="topk"))  # replaces its own output
    assert json.loads(paths["summary"].read_text())["method"] == "topk"
    (tmp_path / "o" / "other").write_text("x")
    with pytest.raises(gk.InputError, match="other"):
        gio.write_selection(tmp_path / "o", sel)


def test_a_failure_while_staging_leaves_the_previous_output_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "o"
    gio.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"{\"old\": 1}\n"})
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file: the first is already staged
            raise OSError(28, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(gio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        gio.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"{\"new\": 1}\n"}, force=True)
    assert _outputs(out) == {"selection.jsonl": b"old\n", "summary.json": b"{\"old\": 1}\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_failed_rename_into_place_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "o"
    gio.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"{}\n"})
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place, after the old one moved aside
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)
    monkeypatch.setattr(gio.os, "rename", rename)
    with pytest.raises(OSError):
        gio.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"{}\n"}, force=True)
    assert _outputs(out) == {"selection.jsonl": b"old\n", "summary.json": b"{}\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


class _Killed(BaseException):
    """The process dies here: nothing after this point runs (no cleanup, no restore)."""


DEAD_PID = 2 ** 22 + 12345  # above Linux's largest pid_max: no such process


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_between_steps_never_leaves_a_mixed_pair_and_the_next_run_cleans_up(tmp_path, monkeypatch,
                                                                                    crash_at):
    """crash_at 1: killed before the old output moves aside; 2: between moving it aside and
    renaming the new folder in (the only window with no OUT). The killed writer's pid is dead."""
    out = tmp_path / "o"
    gio.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"old\n"})
    real_rename, real_replace, calls = os.rename, os.replace, []

    def crashing(real):
        def step(src, dst):
            calls.append(src)
            if len(calls) >= crash_at:
                raise _Killed()
            return real(src, dst)
        return step
    with monkeypatch.context() as m:
        m.setattr(gio.os, "rename", crashing(real_rename))
        m.setattr(gio.os, "replace", crashing(real_replace))
        m.setattr(gio.os, "getpid", lambda: DEAD_PID)
        m.setattr(gio.shutil, "rmtree", lambda *a, **kw: None)  # a killed process cleans nothing up
        with pytest.raises(_Killed):
            gio.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"new\n"}, force=True)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert leftovers  # the killed process's staging
    for folder in [out] + leftovers:  # every folder on disk is one run's complete pair
        if folder.exists():
            files = _outputs(folder)
            assert sorted(files) == ["selection.jsonl", "summary.json"] and len(set(files.values())) == 1
    if crash_at == 1:
        assert _outputs(out)["summary.json"] == b"old\n"
    else:
        assert not out.exists()
    gio.write_output_folder(out, {"selection.jsonl": b"third\n", "summary.json": b"third\n"}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the stale staging is gone
    assert _outputs(out)["summary.json"] == b"third\n"


def test_staging_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "o"
    live = tmp_path / f".o.tmp-{gio._host_tag()}-{os.getppid()}"  # our parent: alive
    live.mkdir()
    gio.write_output_folder(out, {"selection.jsonl": b"x\n"})
    assert live.exists()
