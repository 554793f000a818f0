"""gtp_kernels.files: reading candidate/target arrays (.npy, .pt, .safetensors), checking output
paths before any work, and writing a selection's output folder whole (crashes simulated between
the steps)."""
import json
import os

import numpy as np
import pytest
import torch

import gtp_kernels as gk
import gtp_kernels.files as gfiles
from gtp_kernels.atomic import host_tag
from problems import planted_problem


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _outputs(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --- load_array ---

def test_load_array_reads_npy_memory_mapped_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    loaded = gfiles.load_array(str(tmp_path / "a.npy"))
    assert torch.equal(loaded, torch.from_numpy(a))
    assert loaded.dtype == torch.float32
    torch.save(torch.from_numpy(a).double(), tmp_path / "a.pt")
    assert torch.equal(gfiles.load_array(str(tmp_path / "a.pt")), torch.from_numpy(a).double())
    torch.save({"only": torch.ones(2)}, tmp_path / "d.pt")
    assert torch.equal(gfiles.load_array(str(tmp_path / "d.pt")), torch.ones(2))
    save_file({"x": torch.zeros(2, 2), "y": torch.ones(3)}, str(tmp_path / "s.safetensors"))
    assert torch.equal(gfiles.load_array(f"{tmp_path / 's.safetensors'}:y"), torch.ones(3))
    torch.save({"x": torch.zeros(1), "y": torch.ones(1)}, tmp_path / "two.pt")
    assert torch.equal(gfiles.load_array(f"{tmp_path / 'two.pt'}:y"), torch.ones(1))


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"), ("folder", "is a folder"), ("ints", "expected floating point"),
    ("npy_key", "has no keys"), ("suffix", "unsupported file type"), ("corrupt", "cannot read"),
    ("two_tensors", "holds 2 tensors"), ("absent_key", "has no tensor 'z'"), ("not_tensor", "does not hold a tensor"),
])
def test_load_array_refuses_bad_files_with_one_line_naming_the_input(tmp_path, case, message):
    spec = {"missing": tmp_path / "nope.npy", "folder": tmp_path, "ints": tmp_path / "i.npy",
            "npy_key": f"{tmp_path / 'f.npy'}:k", "suffix": tmp_path / "a.csv", "corrupt": tmp_path / "c.npy",
            "two_tensors": tmp_path / "two.pt", "absent_key": f"{tmp_path / 'two.pt'}:z",
            "not_tensor": tmp_path / "list.pt"}[case]
    np.save(tmp_path / "i.npy", np.arange(3))
    np.save(tmp_path / "f.npy", np.ones(3))
    (tmp_path / "a.csv").write_text("1,2\n")
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY garbage")
    torch.save({"x": torch.zeros(1), "y": torch.ones(1)}, tmp_path / "two.pt")
    torch.save([1.0, 2.0], tmp_path / "list.pt")
    with pytest.raises(gk.InputError, match=message) as info:
        gfiles.load_array(str(spec), "candidates")
    assert "\n" not in str(info.value)
    if case in ("missing", "folder", "ints", "npy_key", "suffix", "corrupt"):
        assert "candidates" in str(info.value)


# --- output paths, checked before any work ---

def test_check_output_file_refuses_a_folder_and_an_unwritable_place_and_creates_nothing(tmp_path):
    assert gfiles.check_output_file(tmp_path / "new" / "deeper" / "f.json", "--out") == tmp_path / "new" / "deeper" / "f.json"
    assert not (tmp_path / "new").exists()
    with pytest.raises(gk.InputError, match="exists and is not a file"):
        gfiles.check_output_file(tmp_path, "--out")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(gk.InputError, match="is not a folder"):
        gfiles.check_output_file(tmp_path / "plain" / "f.json", "--out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_paths_refuse_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(gk.InputError, match="no permission"):
            gfiles.check_output_file(locked / "f.json", "--out")
        with pytest.raises(gk.InputError, match="no permission"):
            gfiles.check_output_folder(locked / "sub", "--out")
    finally:
        locked.chmod(0o700)


def test_check_output_folder_refuses_a_file_and_a_folder_in_place_of_an_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(gk.InputError, match="exists and is not a folder"):
        gfiles.check_output_folder(tmp_path / "file", "--out")
    (tmp_path / "out" / "manifest.json").mkdir(parents=True)
    with pytest.raises(gk.InputError, match="manifest.json exists and is not a file"):
        gfiles.check_output_folder(tmp_path / "out", "--out", files=["manifest.json"])
    assert gfiles.check_output_folder(tmp_path / "fresh", "--out", files=["manifest.json"]) == tmp_path / "fresh"
    assert not (tmp_path / "fresh").exists()


def test_check_replaceable_folder_needs_force_and_only_owned_files(tmp_path):
    out = tmp_path / "o"
    assert gfiles.check_replaceable_folder(out, "--out", force=False) == out  # absent: fine
    out.mkdir()
    assert gfiles.check_replaceable_folder(out, "--out", force=False) == out  # empty: fine
    (out / "summary.json").write_text("{}")
    with pytest.raises(gk.InputError, match="not empty"):
        gfiles.check_replaceable_folder(out, "--out", force=False)
    assert gfiles.check_replaceable_folder(out, "--out", force=True) == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(gk.InputError, match="notes.txt"):
        gfiles.check_replaceable_folder(out, "--out", force=True)
    os.symlink(out, tmp_path / "link")
    with pytest.raises(gk.InputError, match="symbolic link"):
        gfiles.check_replaceable_folder(tmp_path / "link", "--out", force=True)


# --- output folders written whole ---

def test_render_selection_and_write_output_folder_write_the_selection_whole(tmp_path):
    A, B, _, _ = planted_problem(60, 20, 3, seed=2, dtype=torch.float32)
    sel = gk.select(A, B[:, 0], 3)

    def write(selection):
        texts = gfiles.render_selection(selection)
        return gfiles.write_output_folder(tmp_path / "o", {name: texts[name].encode() for name in texts}, force=True)
    out = write(sel)
    assert sorted(p.name for p in out.iterdir()) == ["selection.jsonl", "summary.json"]
    assert len(_lines(out / "selection.jsonl")) == len(sel.indices)
    write(gk.select(A, B[:, 0], 2, method="topk"))  # replaces its own output
    assert json.loads((out / "summary.json").read_text())["method"] == "topk"
    (out / "other").write_text("x")
    with pytest.raises(gk.InputError, match="other"):
        write(sel)


def test_render_selection_adds_ids_examples_and_summary_entries():
    A, B, _, _ = planted_problem(40, 16, 2, seed=3)
    sel = gk.select(A, B[:, 0], 2)
    ids = [f"ex{i}" for i in range(40)]
    examples = [{"text": f"t{i}"} for i in range(40)]
    texts = gfiles.render_selection(sel, ids, examples, extra_summary={"command": "gtp select"})
    records = [json.loads(line) for line in texts["selection.jsonl"].splitlines()]
    assert [r["index"] for r in records] == [int(i) for i in sel.indices]
    assert [r["id"] for r in records] == [ids[r["index"]] for r in records]
    assert [r["example"] for r in records] == [examples[r["index"]] for r in records]
    summary = json.loads(texts["summary.json"])
    assert summary["command"] == "gtp select" and summary["method"] == sel.summary()["method"]


def test_jsonl_writes_one_json_object_a_line_keeping_unicode():
    text = gfiles.jsonl([{"a": 1}, {"b": "é"}])
    assert text == '{"a": 1}\n{"b": "é"}\n'
    assert gfiles.jsonl([]) == ""


def test_a_failure_while_staging_leaves_the_previous_output_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "o"
    gfiles.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"{\"old\": 1}\n"})
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file: the first is already staged
            raise OSError(28, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(gfiles.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        gfiles.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"{\"new\": 1}\n"}, force=True)
    assert _outputs(out) == {"selection.jsonl": b"old\n", "summary.json": b"{\"old\": 1}\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_failed_rename_into_place_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "o"
    gfiles.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"{}\n"})
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place, after the old one moved aside
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)
    monkeypatch.setattr(gfiles.os, "rename", rename)
    with pytest.raises(OSError):
        gfiles.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"{}\n"}, force=True)
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
    gfiles.write_output_folder(out, {"selection.jsonl": b"old\n", "summary.json": b"old\n"})
    real_rename, real_replace, calls = os.rename, os.replace, []

    def crashing(real):
        def step(src, dst):
            calls.append(src)
            if len(calls) >= crash_at:
                raise _Killed()
            return real(src, dst)
        return step
    with monkeypatch.context() as m:
        m.setattr(gfiles.os, "rename", crashing(real_rename))
        m.setattr(gfiles.os, "replace", crashing(real_replace))
        m.setattr(gfiles.os, "getpid", lambda: DEAD_PID)
        m.setattr(gfiles.shutil, "rmtree", lambda *a, **kw: None)  # a killed process cleans nothing up
        with pytest.raises(_Killed):
            gfiles.write_output_folder(out, {"selection.jsonl": b"new\n", "summary.json": b"new\n"}, force=True)
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
    gfiles.write_output_folder(out, {"selection.jsonl": b"third\n", "summary.json": b"third\n"}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the stale staging is gone
    assert _outputs(out)["summary.json"] == b"third\n"


def test_staging_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "o"
    live = tmp_path / f".o.tmp-{host_tag()}-{os.getppid()}"  # our parent: alive
    live.mkdir()
    gfiles.write_output_folder(out, {"selection.jsonl": b"x\n"})
    assert live.exists()
