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


@pytest.mark.parametrize(
    ("argv", "model", "experiment"),
    [
        (["demo"], "smollm2", "smollm2-demo"),
        (["demo", "--quick"], "tiny", "tiny-demo"),
        (["demo", "model.name=tiny"], "tiny", "tiny-demo"),
        (["demo", "--quick", "train.max_steps=5"], "tiny", "tiny-demo"),
        (
            ["demo", "--config", "jobs/configs/tiny-cpu.yaml", "model.name=smollm2"],
            "smollm2",
            "tiny-demo",
        ),
    ],
)
def test_demo_defaults_to_real_weights_and_quick_keeps_tiny(argv, model, experiment, repo_root):
    from tinyqa.cli import build_parser, load_cli_config, parse_args

    args = parse_args(build_parser(), argv)
    if args.config:
        args.config = str(repo_root / args.config)
    cfg = load_cli_config(args)
    assert (cfg.model.name, cfg.experiment) == (model, experiment)
    if model == "smollm2" and experiment == "smollm2-demo":
        # Sized for 2 cores: one worker owning both, one trial at a time, two trials.
        assert (cfg.train.num_workers, cfg.train.cpus_per_worker) == (1, 2)
        assert cfg.tune.max_concurrent_trials == 1
        assert len(cfg.tune.search.r) * len(cfg.tune.search.lr) == 2
