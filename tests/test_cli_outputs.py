"""gtp select's outputs: k rows per column by default with one line saying why pursuit stopped,
target stores as one column or one per example, summary.json's record of the run, --version,
and --force (the output folder's atomic write is tested in test_files.py)."""
import json

import numpy as np
import pytest
import torch

import gtp_kernels as gk
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
    # compressive sampling has a joint mode too (the same picks as gtp's): joint by default
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "3",
                     "--method", "gtp-cosamp", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["inputs"]["target"]["mode"] == "joint"
    assert _lines(tmp_path / "c" / "selection.jsonl") == _lines(tmp_path / "j" / "selection.jsonl")
    # the mean, on request
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "3",
                     "--method", "gtp-cosamp", "--target-mode", "mean", "--out", str(tmp_path / "cm")]) == 0
    assert json.loads((tmp_path / "cm" / "summary.json").read_text())["inputs"]["target"]["mode"] == "mean"
    # a (D, m) file target, jointly on request
    np.save(tmp_path / "b.npy", store_target(val, "examples"))
    assert cli_main(["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "b.npy"), "--k",
                     "3", "--target-mode", "joint", "--out", str(tmp_path / "f")]) == 0
    assert sorted(r["index"] for r in _lines(tmp_path / "f" / "selection.jsonl")) == [0, 1, 2]


def test_joint_selection_screens_candidates_by_default_and_on_request(tmp_path, capsys):
    """gtp select's candidate screen: --screen 1.5 with a joint target unless told otherwise (the
    library's select(screen=...) on the same store), none for per-column targets."""
    from gtp_kernels.cli import DEFAULT_JOINT_SCREEN
    from gtp_kernels.collect import select_from_stores

    rng = np.random.default_rng(4)
    pool = _store(tmp_path / "pool", rng.standard_normal((45, 2, 5)).astype(np.float32))
    val = _store(tmp_path / "val", rng.standard_normal((4, 2, 5)).astype(np.float32))
    base = ["select", "--candidates", str(tmp_path / "pool"), "--target", str(tmp_path / "val"), "--k", "6"]
    for name, extra, screen in (("default", [], DEFAULT_JOINT_SCREEN), ("two", ["--screen", "2"], 2.0),
                                ("off", ["--screen", "none"], None), ("mean", ["--target-mode", "mean"], None)):
        capsys.readouterr()
        assert cli_main(base + extra + ["--out", str(tmp_path / name)]) == 0
        line = capsys.readouterr().out
        params = json.loads((tmp_path / name / "summary.json").read_text())["params"]
        assert params["screen"] == screen, name
        mode = "mean" if name == "mean" else "joint"
        want = select_from_stores(pool, val, 6, target_mode=mode, screen=screen, fill="target")
        assert [r["index"] for r in _lines(tmp_path / name / "selection.jsonl")] == want.indices.tolist(), name
        assert params["screened_out"] == want.params["screened_out"]
        if screen is None:
            assert params["screened_out"] == 0 and "--screen" not in line
        else:
            assert params["screened_out"] > 0
            assert f"among {45 - params['screened_out']} of 45 candidates (--screen {screen:g})" in line
    for bad in ("0.5", "two", "nan"):
        with pytest.raises(SystemExit) as exit_:
            cli_main(base + ["--screen", bad, "--out", str(tmp_path / "bad")])
        assert exit_.value.code == 2
        assert "expected a number >= 1 or 'none'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


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
