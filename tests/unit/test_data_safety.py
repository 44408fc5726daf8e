"""Data safety: a sweep's identity covers what its inputs point at, sweeps never reuse adapter
ids, half-written adapter folders are never listed, one command per experiment at a time, and a
missing dataset is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tinyqa import tune
from tinyqa.adapters import MANIFEST, list_adapters
from tinyqa.locking import ExperimentBusy, experiment_lock, lock_paths

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _dataset(path, answer="a"):
    path.write_text(json.dumps([{"question": f"q{i}?", "answer": answer} for i in range(20)]))
    return path


def test_sweep_identity_changes_with_the_dataset_bytes(make_config, tmp_path, tiny_dir):
    from tinyqa.tune.sweep import _diff_keys, _fingerprint

    data = _dataset(tmp_path / "qa.json")
    cfg = make_config(f"data.path={data}")
    before = _fingerprint(cfg)
    assert before["dataset_sha256"] and before["model_path"] == str(tiny_dir)
    _dataset(data, answer="edited")  # same path, same settings, other bytes
    assert _diff_keys(before, _fingerprint(cfg)) == ["dataset_sha256"]


def test_sweep_identity_of_a_missing_dataset_is_a_dataset_error(make_config, tmp_path):
    from tinyqa.errors import DatasetError
    from tinyqa.tune.sweep import _fingerprint

    with pytest.raises(DatasetError, match="does not exist"):
        _fingerprint(make_config(f"data.path={tmp_path / 'missing.json'}"))


def test_each_fresh_sweep_gets_new_adapter_ids_and_a_resume_keeps_them(make_config):
    from tinyqa.tune.sweep import _sweep_id

    cfg = make_config()
    tune.tune_dir(cfg).mkdir(parents=True)
    first = _sweep_id(cfg, resuming=False)
    assert _sweep_id(cfg, resuming=True) == first
    second = _sweep_id(cfg, resuming=False)  # tune --fresh
    assert second != first
    params = {"r": 8, "lr": 3e-4}
    a = tune.trial_adapter_id(params, "ab12c_00003", first)
    b = tune.trial_adapter_id(params, "ab12c_00003", second)
    assert a == f"{first}-trial-03-r8-lr3.0e-04" and a != b


def test_folders_being_written_or_replaced_are_never_listed(tmp_path):
    for name in ("good", ".good-1a2b3c4d.tmp", ".old-deadbeef.tmp", "no-manifest"):
        (tmp_path / name).mkdir()
        if name != "no-manifest":
            (tmp_path / name / MANIFEST).write_text("{}")
    assert list_adapters(tmp_path) == ["good"]


def test_adapter_swap_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    from tinyqa.fileio import atomic_folder

    target = tmp_path / "adapters" / "a"
    with atomic_folder(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "w").write_text("half")
        assert list_adapters(target.parent) == []  # no manifest yet anywhere
        raise RuntimeError("crash while writing")
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]


def test_a_second_command_on_the_experiment_fails_fast_naming_the_holder(make_config):
    cfg = make_config()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from tinyqa.config import load_config
                from tinyqa.locking import experiment_lock
                cfg = load_config(None, ["storage_path={cfg.storage_path}", "experiment={cfg.experiment}"])
                with experiment_lock(cfg, "tune"):
                    print("held", flush=True)
                    time.sleep(60)
                """
            ),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(ExperimentBusy) as err, experiment_lock(cfg, "eval"):
            pass
        assert time.perf_counter() - started < 2  # fails at once, does not wait
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "`tune`" in message and "started 20" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder: the experiment is free again, whatever the stale file says.
    holder_file = lock_paths(cfg)[1]
    assert holder_file.is_file()
    with experiment_lock(cfg, "eval"):
        assert json.loads(holder_file.read_text())["command"] == "eval"


def test_cli_commands_that_write_an_experiment_take_its_lock(make_config, monkeypatch):
    from tinyqa.commands import COMMANDS

    commands = COMMANDS if isinstance(COMMANDS, dict) else {c.name: c for c in COMMANDS}
    writers = {name for name, c in commands.items() if c.locks}
    assert {"prepare", "train", "tune", "eval", "demo", "pipeline"} <= writers
    assert not writers & {"ask", "chat"}


def test_pipeline_job_with_a_missing_dataset_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "jobs" / "pipeline.py"),
            "--config",
            str(REPO_ROOT / "jobs" / "configs" / "tiny-cpu.yaml"),
            f"data.path={tmp_path / 'missing.json'}",
            f"storage_path={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json: file does not exist" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_replacing_an_adapter_folder_never_leaves_its_name_absent(tmp_path):
    """A reader (a Serve replica loading the adapter) polling the folder during 100 replacements
    always finds a complete one: Linux swaps old and new in one step."""
    import threading

    from tinyqa.fileio import _exchange, atomic_folder

    target = tmp_path / "adapters" / "a"
    with atomic_folder(target) as tmp:
        (tmp / MANIFEST).write_text("0")
    assert _exchange(tmp_path / "adapters", tmp_path / "adapters")  # renameat2 works here
    misses: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                (target / MANIFEST).read_text()
            except FileNotFoundError as e:
                misses.append(str(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 101):
            with atomic_folder(target) as tmp:
                (tmp / MANIFEST).write_text(str(i))
    finally:
        stop.set()
        thread.join()
    assert not misses, misses[:3]
    assert (target / MANIFEST).read_text() == "100"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]  # no old or temp left
