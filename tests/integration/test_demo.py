"""`tinyqa demo` end to end on a real local Ray: sweep, eval, Serve, HTTP answers, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.integration

# The tiny model's fast path (the demo's default is smollm2: tests/integration/test_smollm2_pipeline.py), and
# a smaller sweep than its embedded defaults, to fit CI's time (the full demo is the README's).
SMALL = [
    "model.name=tiny",
    "tune.search.r=[4,8]",
    "tune.search.lr=[3.0e-3]",
    "train.num_workers=1",
    "train.max_steps=30",
    "train.eval_steps=10",
    "train.save_steps=10",
    "eval.max_questions=24",
    "serve.max_replicas=1",
]


def _demo(cluster, storage, port, *extra, timeout=900):
    env = {**cluster.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("TINYQA_API_KEY", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyqa.cli",
            "demo",
            f"storage_path={storage}",
            f"serve.port={port}",
            *SMALL,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory, get_free_port):
    storage = tmp_path_factory.mktemp("demo") / "runs"
    port = get_free_port()
    proc = _demo(ray_cluster, storage, port)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return storage / "tiny-demo", port, proc


def test_demo_leaves_every_artifact(demo_run):
    run, _, proc = demo_run
    best = json.loads((run / "best.json").read_text())
    for rel in (
        "data/stats.json",
        "data/train.jsonl",
        "data/eval.jsonl",
        "results.csv",
        "sweep.md",
        "sweep.png",
        "best.json",
        f"adapters/{best['adapter_id']}/tinyqa.json",
        "eval/eval.json",
        "eval/eval.md",
        "eval/predictions.jsonl",
        "pipeline.json",
    ):
        assert (run / rel).is_file(), rel
    assert (run / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((run / "pipeline.json").read_text())
    assert set(state) == {"prepare", "tune", "eval", "serve", "query"}
    assert "Endpoint: http://127.0.0.1:" in proc.stdout
    # How to call it: curl, and the OpenAI-compatible base URL (the client snippet is in the README).
    assert "curl -s http://127.0.0.1:" in proc.stdout
    assert "OpenAI-compatible at http://127.0.0.1:" in proc.stdout


def test_demo_console_is_short_and_plain(demo_run):
    """Not a terminal: plain lines, at most 120 of them; Ray's and the workers' stream is in the
    command's log file, whose path the report names."""
    run, port, proc = demo_run
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(lines) <= 120, "\n".join(lines)
    assert "\x1b" not in proc.stdout + proc.stderr  # no colour or cursor codes
    for noise in ("RayTrainWorker", "core_worker.cc", "HTTP Request:", "Reporting training result"):
        assert noise not in proc.stdout + proc.stderr
    logs = list((run / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and "RayTrainWorker" in logs[0].read_text()
    assert f"Logs: {logs[0]}" in proc.stdout and "Total time:" in proc.stdout
    for follow_up in ("tinyqa ask", "tinyqa chat --endpoint", "--stages eval", "serve --shutdown"):
        assert follow_up in proc.stdout
    assert f"serve.port={port}" in proc.stdout  # the follow-ups reach this run's endpoint


def test_demo_endpoint_answered_and_stays_up(demo_run):
    run, port, proc = demo_run
    answers = json.loads((run / "pipeline.json").read_text())["query"]["summary"]["answers"]
    assert len(answers) == 3 and all(a["answer"] for a in answers)
    best = json.loads((run / "best.json").read_text())["adapter_id"]
    assert all(a["adapter"] == best for a in answers)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    r = httpx.post(f"{url}/v1/ask", json={"question": "What does `json.dumps` do?"}, timeout=60)
    assert r.status_code == 200 and r.json()["adapter"] == best


def test_rerun_skips_finished_stages(demo_run, ray_cluster):
    run, port, _ = demo_run
    storage = run.parent
    before = (run / "results.csv").stat().st_mtime_ns
    proc = _demo(ray_cluster, storage, port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("prepare", "tune", "eval", "serve"):
        assert f"| {stage} | skipped (done before) |" in proc.stdout
    assert "| query | done |" in proc.stdout
    assert (run / "results.csv").stat().st_mtime_ns == before


def test_bad_dataset_stops_at_prepare(ray_cluster, tmp_path, get_free_port):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "ok?", "answer_keywords": ["y"]}, {"question": ""}]))
    proc = _demo(ray_cluster, tmp_path / "runs", get_free_port(), f"data.path={bad}", timeout=300)
    assert proc.returncode == 2
    assert (
        "stage 'prepare' failed" in proc.stderr and "record 1: 'question' is empty" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny-demo" / "ray").exists()
    assert os.path.exists(tmp_path / "runs" / "tiny-demo")  # storage checked, nothing else written
