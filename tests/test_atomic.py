"""gtp_kernels.atomic: a file is replaced whole or not at all; a failure at any step keeps the old
file and leaves no temp file; temp names say who wrote them; several files are staged first."""
import os
import re
import subprocess
import sys

import pytest

import gtp_kernels.atomic as atomic


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_atomically_replaces_the_file_with_what_the_writer_wrote(tmp_path):
    path = tmp_path / "f.bin"
    atomic.write_atomically(path, lambda handle: handle.write(b"first"))
    assert path.read_bytes() == b"first"
    atomic.write_atomically(path, lambda handle: (handle.write(b"sec"), handle.write(b"ond")))
    assert path.read_bytes() == b"second"
    assert _names(tmp_path) == ["f.bin"]


def test_new_files_get_the_mode_a_plain_open_gives(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    atomic.write_atomically(tmp_path / "a", lambda handle: handle.write(b"x"))
    atomic.atomic_write_bytes(tmp_path / "b", b"x")
    expected = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "a").stat().st_mode == expected == (tmp_path / "b").stat().st_mode


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def half_then_fail(handle):
        handle.write(b"new, half of i")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic.write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["f.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_fsync_or_rename_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(atomic.os, failing, fail)
    with pytest.raises(OSError, match="Input/output"):
        atomic.write_atomically(path, lambda handle: handle.write(b"new"))
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["f.json"]


def test_a_killed_writer_leaves_the_old_file_and_a_temp_named_after_it(tmp_path):
    """A process killed after staging (before the rename) leaves the old file whole; its temp
    names its host and pid, which is how collect.store tells it is stale."""
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    script = ("import os, signal, gtp_kernels.atomic as a\n"
              "def die(src, dst): os.kill(os.getpid(), signal.SIGKILL)\n"
              "a.os.replace = die\n"
              f"a.write_atomically({str(path)!r}, lambda h: h.write(b'new'))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.wait() == -9
    assert path.read_bytes() == b"old"
    leftovers = [name for name in _names(tmp_path) if name != "f.json"]
    assert len(leftovers) == 1
    match = re.fullmatch(r"\.f\.json\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{16}\.tmp", leftovers[0])
    assert match and match["host"] == atomic.host_tag() and int(match["pid"]) == proc.pid
    assert (tmp_path / leftovers[0]).read_bytes() == b"new"  # complete and fsync'ed, never renamed
    assert not atomic.process_alive(proc.pid)


def test_temp_paths_sit_beside_the_target_and_never_repeat(tmp_path):
    names = {atomic.temp_path(tmp_path / "shard-00001.npy") for _ in range(100)}
    assert len(names) == 100
    assert all(p.parent == tmp_path and p.name.startswith(".shard-00001.npy.") and p.name.endswith(".tmp")
               for p in names)


def test_stage_file_refuses_to_write_into_an_existing_temp(tmp_path, monkeypatch):
    taken = tmp_path / ".f.taken.tmp"
    taken.write_bytes(b"someone else's")
    monkeypatch.setattr(atomic, "temp_path", lambda path: taken)
    with pytest.raises(FileExistsError):
        atomic.stage_file(tmp_path / "f", lambda handle: handle.write(b"x"))
    assert taken.read_bytes() == b"someone else's"


def test_atomic_write_text_is_utf8_and_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "t.txt"
    atomic.atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode("utf-8")


def test_atomic_write_files_touches_no_output_when_staging_one_fails(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    (tmp_path / "stale").write_bytes(b"stale")
    real_fsync, calls = os.fsync, []

    def second_fails(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(atomic.os, "fsync", second_fails)
    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write_files({tmp_path / "a": b"new a", tmp_path / "b": b"new b"}, remove=[tmp_path / "stale"])
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == \
        {"a": b"old a", "b": b"old b", "stale": b"stale"}


def test_atomic_write_files_writes_every_file_and_removes_the_stale_ones(tmp_path):
    (tmp_path / "stale").write_bytes(b"stale")
    atomic.atomic_write_files({tmp_path / "a": b"A", tmp_path / "sub" / "b": b"B"},
                              remove=[tmp_path / "stale", tmp_path / "never-existed"])
    assert _names(tmp_path) == ["a", "sub"]
    assert (tmp_path / "a").read_bytes() == b"A" and (tmp_path / "sub" / "b").read_bytes() == b"B"


def test_process_alive_tells_this_process_from_a_finished_one():
    assert atomic.process_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait() == 0
    assert not atomic.process_alive(proc.pid) or os.path.exists(f"/proc/{proc.pid}")  # unless the pid was reused
    assert atomic.process_alive(-1)  # cannot tell: keep its files


def test_host_tag_is_a_plain_file_name_part():
    assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", atomic.host_tag())
