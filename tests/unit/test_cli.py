"""CLI behaviour for user mistakes: one readable line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinyqa.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def storage(tmp_path):
    return tmp_path / "runs"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["lora.rank=8"], "unknown key 'lora.rank'"),
        (["lora.r=0"], "lora.r"),
        (["train.learning_rate=-1"], "train.learning_rate"),
        (["data.eval_fraction=1"], "data.eval_fraction"),
        (["data.path=/no/such/file.json"], "/no/such/file.json: file does not exist"),
        (["model.name=./no/such/model"], "model path no/such/model does not exist"),
        (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, storage, args, expected):
    code, out, err = _run(capsys, "prepare", *args, f"storage_path={storage}")
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not storage.exists() or not any(storage.rglob("*.jsonl"))


def test_bad_dataset_reports_every_record(capsys, storage, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps([{"question": "ok?", "answer_keywords": ["y"]}, None, {"question": ""}])
    )
    code, _, err = _run(capsys, "prepare", f"data.path={ds}", f"storage_path={storage}")
    assert code == 2
    assert "record 1: expected an object" in err and "record 2: 'question' is empty" in err
    assert not (storage / "tinyqa" / "data").exists()


def test_storage_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = _run(capsys, "train", f"storage_path={blocker}/runs")
    assert code == 2
    assert "is not writable" in err and "Traceback" not in err


def test_prepare_succeeds_and_summarizes(capsys, storage):
    code, out, _ = _run(capsys, "prepare", f"storage_path={storage}")
    assert code == 0
    assert "train /" in out and (storage / "tinyqa" / "data" / "stats.json").is_file()


def test_console_script_exit_code(storage):
    proc = subprocess.run(
        [sys.executable, "-m", "tinyqa.cli", "prepare", "lora.r=0", f"storage_path={storage}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tinyqa prepare: error:")
    assert "Traceback" not in proc.stderr


def test_job_entrypoints_have_help(repo_root):
    jobs = sorted((repo_root / "jobs").glob("*.py"))
    assert "train.py" in {j.name for j in jobs}
    for job in jobs:
        proc = subprocess.run(
            [sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (job, proc.stderr[-2000:])
        assert "--config" in proc.stdout


def test_overrides_may_follow_options(capsys, storage, repo_root):
    config = str(repo_root / "jobs/configs/tiny-cpu.yaml")
    code, out, _ = _run(
        capsys, "prepare", "--config", config, "data.eval_fraction=0.2", f"storage_path={storage}"
    )
    assert code == 0
    assert (
        json.loads((storage / "tiny-demo/data/stats.json").read_text())["eval"] == 102
    )  # 20 % of 512
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--config", config, "--bogus"])
    assert exit_.value.code == 2
