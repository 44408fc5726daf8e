"""`tinyqa eval` / `jobs/evaluate.py` as a user runs them, and `ask` / `chat` against the real Serve app."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = "jobs/configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, adapter_helpers):
    """Storage with a tiny adapter fine-tuned in-process on 22 questions (24-record subset)."""
    from tinyqa.config import load_config
    from tinyqa.data import bundled_dataset_path

    helper = adapter_helpers
    root = tmp_path_factory.mktemp("evalcli")
    subset = helper.write_subset(bundled_dataset_path(), root / "subset.json", 24)
    overrides = [f"storage_path={root / 'runs'}", f"data.path={subset}"]
    cfg = load_config(REPO / CONFIG, overrides)
    helper.train_tiny_adapter(cfg, steps=60)
    return {"cfg": cfg, "overrides": overrides, "root": root}


def _run(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_eval_cli_writes_all_outputs_and_prints_the_table(run):
    proc = _run(
        "-m", "tinyqa.cli", "eval", "--config", CONFIG, *run["overrides"], "eval.split=train"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = run["cfg"].run_dir / "eval"
    for name in ("eval.json", "predictions.jsonl", "eval.md"):
        assert (out_dir / name).is_file(), name
        assert str(out_dir / name) in proc.stdout
    assert "| base (tiny) |" in proc.stdout and "| tiny-demo |" in proc.stdout
    data = json.loads((out_dir / "eval.json").read_text())
    base, tuned = data["models"]
    assert tuned["metrics"]["keyword_recall"]["mean"] > base["metrics"]["keyword_recall"]["mean"]
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 2 * 22


def test_evaluate_job_runs_and_reports(run):
    assert _run("jobs/evaluate.py", "--help").returncode == 0
    proc = _run(
        "jobs/evaluate.py",
        "--config",
        CONFIG,
        *run["overrides"],
        "eval.split=train",
        "eval.max_questions=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Questions: 3 (train split of" in proc.stdout and "| tiny-demo |" in proc.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.adapters=[nope]", "unknown adapter 'nope'"),
        ("eval.path={bad}", "record 0: 'answer_keywords' is empty"),
    ],
)
def test_eval_cli_bad_input_is_one_line_and_exit_2(run, tmp_path, override, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q?", "answer_keywords": []}]))
    proc = _run(
        "-m", "tinyqa.cli", "eval", "--config", CONFIG, *run["overrides"], override.format(bad=bad)
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyqa eval: error:") and expected in lines[0]


@pytest.fixture
def serve_cluster(request):
    """A local Ray cluster, only once the Serve app is there to deploy."""
    pytest.importorskip("serving.app")
    return request.getfixturevalue("ray_cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ask_and_chat_against_the_real_serve_app(run, serve_cluster):
    from tinyqa.chat import ask

    port = _free_port()
    cfg = run["cfg"]
    (cfg.run_dir / "best.json").write_text(
        json.dumps({"adapter_id": "tiny-demo", "metric": "eval_loss", "value": 0.0, "trial": "t"})
    )
    serve_args = [*run["overrides"], "serve.host=127.0.0.1", f"serve.port={port}"]
    env = serve_cluster.env()
    proc = _run("-m", "tinyqa.cli", "serve", "--config", CONFIG, *serve_args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        question = "What does `json.dumps` do?"
        proc = _run(
            "-m",
            "tinyqa.cli",
            "ask",
            question,
            *run["overrides"],
            "--config",
            CONFIG,
            "--endpoint",
            url,
            "--adapter",
            "tiny-demo",
            "--max-new-tokens",
            "16",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        remote = proc.stdout.strip()
        # One request is a batch of one: the same greedy answer as the local engine gives.
        assert remote == ask(cfg, question, adapter="tiny-demo", max_new_tokens=16)

        proc = _run(
            "-m",
            "tinyqa.cli",
            "chat",
            "--config",
            CONFIG,
            "--endpoint",
            url,
            "--adapter",
            "tiny-demo",
            *run["overrides"],
            stdin=f"{question}\nAnd `json.loads`?\n/reset\n{question}\n/exit\n",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers = [x for x in proc.stdout.splitlines() if x.startswith("assistant> ")]
        assert len(answers) == 3 and all(len(a) > len("assistant> ") for a in answers)
        assert "(history cleared)" in proc.stdout
        assert answers[2] == answers[0]  # same fresh history after /reset, greedy

        proc = _run(
            "-m",
            "tinyqa.cli",
            "ask",
            "q",
            *run["overrides"],
            "--config",
            CONFIG,
            "--endpoint",
            url,
            "--adapter",
            "nope",
        )
        assert proc.returncode == 2 and "404" in proc.stderr
    finally:
        _run("-m", "tinyqa.cli", "serve", "--shutdown", "--config", CONFIG, *serve_args, env=env)
