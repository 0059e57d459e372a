"""All-or-nothing writes (engine.durable): what a failed or interrupted write leaves behind."""

from __future__ import annotations

import errno
import pickle

import pytest

from engine.durable import (
    NoSpaceError,
    is_temporary,
    no_space,
    remove_stale_temporaries,
    replacing,
    temporary_path,
    write_text,
)


def test_a_write_appears_complete_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "dose.dcm"
    with replacing(target) as tmp:
        assert is_temporary(tmp.name) and tmp.parent == tmp_path
        tmp.write_bytes(b"first half ")
        assert not target.exists(), "nothing may appear under the real name before the end"
        with open(tmp, "ab") as f:
            f.write(b"second half")
    assert target.read_bytes() == b"first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["dose.dcm"]


def test_a_failing_write_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    target = write_text(tmp_path / "metrics.json", '{"old": 1}')
    with pytest.raises(RuntimeError, match="encoder failed"), replacing(target) as tmp:
        tmp.write_text('{"new": ')
        raise RuntimeError("encoder failed")
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        target = tmp_path / "plan.dcm"
        stale = tmp_path / f".plan.dcm.tmp-{dead.pid}"
        stale.write_bytes(b"half of a plan")
        busy = tmp_path / f".plan.dcm.tmp-{alive.pid}"   # another process writing it right now
        busy.write_bytes(b"a plan being written")
        other = tmp_path / f".dose.dcm.tmp-{dead.pid}"   # another file's: not this write's
        other.write_bytes(b"half of a dose")
        write_text(target, "plan")
        assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, busy.name,
                                                               "plan.dcm"]
        export = tmp_path / f".pt_1_20260101-120000.tmp-{dead.pid}"   # a killed folder export
        export.mkdir()
        (export / "RTPLAN.dcm").write_bytes(b"plan")
        remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "plan.dcm"]
    finally:
        alive.kill()
        alive.wait()


def test_a_folder_appears_whole_and_never_replaces_one(tmp_path):
    target = tmp_path / "export"
    with replacing(target) as tmp:
        tmp.mkdir()
        write_text(tmp / "RTPLAN.dcm", "plan")
        assert not target.exists()
    assert (target / "RTPLAN.dcm").read_text() == "plan"
    with pytest.raises(FileExistsError), replacing(target) as tmp:
        tmp.mkdir()
        write_text(tmp / "RTPLAN.dcm", "another plan")
    assert (target / "RTPLAN.dcm").read_text() == "plan"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_temporary_names_are_recognised():
    from pathlib import Path

    assert is_temporary(temporary_path(Path("/x/CT_0001.dcm")).name)
    assert is_temporary(".tmpdKYU3H")  # safetensors' own temporary
    assert not is_temporary("CT_0001.dcm")
    assert not is_temporary(".hidden_notes")


def test_no_space_errors_name_the_file_and_keep_the_errno(tmp_path):
    target = write_text(tmp_path / "dose.npy", "old")
    err = NoSpaceError(target, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err).startswith(f"cannot write {target}: no space left on the device")
    assert "dose.npy keeps its previous content" in str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)   # crosses process boundaries
    quota = NoSpaceError(tmp_path / "new.dcm", OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert "disk quota exceeded (nothing was written there)" in str(quota)
    # safetensors (Rust) reports the errno only in its message
    rust = RuntimeError("Error while serializing: I/O error: No space left on device "
                        "(os error 28)")
    assert no_space(rust, tmp_path)
    assert not no_space(ValueError("bad value"), tmp_path)
    assert not no_space(OSError(errno.EACCES, "Permission denied"), tmp_path)
