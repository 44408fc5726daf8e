"""Atomic file and folder writes: all or nothing, no temporaries left, permissions from the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tinyqa import fileio


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    # Only in the test: read the umask by setting and restoring it (the library never does).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_text_json_bytes_replace_the_target(tmp_path):
    target = tmp_path / "sub" / "out.json"  # the parent is created
    fileio.write_text(target, "old")
    fileio.write_json(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    fileio.write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    fileio.write_text(target, "old content\n")

    def half_then_crash(path: Path) -> None:
        path.write_text("half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        fileio.write_file(target, half_then_crash)
    assert target.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_unserialisable_json_leaves_nothing(tmp_path):
    target = tmp_path / "best.json"
    with pytest.raises(TypeError):
        fileio.write_json(target, {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_files_and_folders_get_umask_permissions_not_0600(tmp_path, umask_027):
    f = fileio.write_text(tmp_path / "a.txt", "x")
    assert _mode(f) == 0o666 & ~umask_027 == 0o640
    with fileio.atomic_folder(tmp_path / "d") as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert _mode(tmp_path / "d") == 0o777 & ~umask_027 == 0o750
    # The same as a plain mkdir / open under that umask.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(tmp_path / "plain") == _mode(tmp_path / "d")
    assert _mode(tmp_path / "plain.txt") == _mode(f)


def test_owner_only_files_written_in_a_folder_get_the_umask_read_bits(tmp_path, umask_027):
    """A writer that makes its file 0600 (safetensors >= 0.8 saves through mkstemp) would leave an
    adapter's weights unreadable to the group a shared storage path is for."""
    with fileio.atomic_folder(tmp_path / "adapter") as tmp:
        weights = tmp / "adapter_model.safetensors"
        weights.write_bytes(b"w")
        weights.chmod(0o600)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    assert _mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o640
    assert _mode(tmp_path / "adapter" / "run.sh") == 0o740  # execute bits are not added


def test_writes_do_not_change_the_umask(tmp_path):
    before = _umask()
    fileio.write_text(tmp_path / "a", "x")
    with fileio.atomic_folder(tmp_path / "d"):
        pass
    assert _umask() == before


def test_folder_replaces_the_old_one_as_a_whole(tmp_path):
    target = tmp_path / "adapter"
    with fileio.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.is_dir()
        (tmp / "old.txt").write_text("1")
    with fileio.atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_failure_mid_folder_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data"
    with fileio.atomic_folder(target) as tmp:
        (tmp / "train.jsonl").write_text("old\n")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(target) as tmp:
        (tmp / "train.jsonl").write_text("new, half")
        raise KeyboardInterrupt  # even an interrupt cleans up
    assert (target / "train.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "data"
    with fileio.atomic_folder(target) as tmp:
        (tmp / "stats.json").write_text("{}")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(Path(dst))
        if Path(dst) == target and calls.count(target) == 1:  # the new folder cannot move in
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    # The two-rename path (platforms without renameat2's atomic exchange).
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    with pytest.raises(OSError, match="No space left"), fileio.atomic_folder(target) as tmp:
        (tmp / "other.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["stats.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert calls.count(target) == 2  # the failed move, then the old folder moved back
