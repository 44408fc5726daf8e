"""storage_path in an S3 bucket, against a real S3 API (moto's server on 127.0.0.1): the whole
pipeline (prepare -> tune -> eval -> serve -> ask) writes every artifact into the bucket and
nothing to local disk outside the caches; a server stopped mid-run is a clear error naming the
URI, and a rerun after it is back resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# Slow on a shared 2-core machine: a whole pipeline plus a training run twice.
pytestmark = [pytest.mark.integration, pytest.mark.s3_e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tinyqa-test"
SMALL = [
    "tune.search.r=[4,8]",
    "tune.search.lr=[3.0e-3]",
    "train.num_workers=1",
    "train.max_steps=20",
    "train.eval_steps=10",
    "train.save_steps=10",
    "eval.max_questions=12",
    "serve.max_replicas=1",
    "tune.scheduler=none",
]


@pytest.fixture(scope="module")
def s3_cluster(ray_cluster_factory, s3_server_factory):
    """A moto S3 server with a bucket, and a Ray cluster started after AWS_* point at it (its
    workers and replicas inherit the environment)."""
    server = s3_server_factory()
    # Ray's 60 s wait for its dashboard is too short on a loaded shared machine.
    extra = {**server.env(), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    server.start()
    server.create_bucket(BUCKET)
    cluster = ray_cluster_factory()
    try:
        yield server, cluster
    finally:
        cluster.stop()
        server.close()  # moto's store lives on in this process: leave no bucket to later tests
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cli(cluster, cwd: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**cluster.env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("TINYQA_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "tinyqa.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_pipeline_in_a_bucket(s3_cluster, tmp_path, get_free_port):
    server, cluster = s3_cluster
    work, cache = tmp_path / "cwd", tmp_path / "cache"
    work.mkdir()
    port = get_free_port()
    started = time.perf_counter()
    proc = _cli(
        cluster,
        work,
        "demo",
        "--quick",  # the tiny model: the demo's default is the real SmolLM2 (issue 10)
        f"storage_path=s3://{BUCKET}/runs",
        f"storage.cache_dir={cache}",
        f"serve.port={port}",
        *SMALL,
    )
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    keys = server.keys(BUCKET)
    run = "runs/tiny-demo/"
    best = json.loads(server.read(BUCKET, f"{run}best.json"))
    for rel in (
        "data/stats.json",
        "data/train.jsonl",
        "data/eval.jsonl",
        "results.csv",
        "sweep.md",
        "sweep.png",
        "best.json",
        f"adapters/{best['adapter_id']}/tinyqa.json",
        f"adapters/{best['adapter_id']}/adapter_model.safetensors",
        "eval/eval.json",
        "eval/eval.md",
        "eval/predictions.jsonl",
        "pipeline.json",
    ):
        assert run + rel in keys, rel
    assert any(k.startswith(run + "ray/tune/") and "checkpoint" in k for k in keys)
    # TensorBoard's events, written on the worker's node, uploaded when the trial ended.
    events = f"{run}tensorboard/{best['adapter_id']}/"
    assert any(k.startswith(events) and "tfevents" in k for k in keys), events
    # Nothing written to local disk outside the caches: the working folder stays empty.
    assert list(work.iterdir()) == []
    # The endpoint answers with the best adapter, downloaded once into the replica's cache.
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/ask", json={"question": "What does `len` do?"}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == best["adapter_id"]
    cached = [p.name for p in (cache / "adapters").iterdir() if not p.name.startswith(".")]
    assert any(name.startswith(best["adapter_id"] + "-") for name in cached), cached
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/ask",
        json={"question": "x?", "adapter": "no-such-adapter"},
        timeout=60,
    )
    assert r.status_code == 404 and "no-such-adapter" in r.json()["error"]["message"]
    print(f"\nS3 demo: {wall:.1f} s wall, {len(keys)} objects in the bucket")


def _registered_under(server, prefix: str, registered_checkpoint) -> bool:
    """Whether a Ray Train run under ``prefix`` in the bucket has persisted a checkpoint."""
    return any(
        registered_checkpoint(lambda key=key: server.read(BUCKET, key))
        for key in server.keys(BUCKET)
        if key.startswith(prefix) and key.endswith("/checkpoint_manager_snapshot.json")
    )


def test_server_stopped_mid_run_then_rerun_resumes(s3_cluster, tmp_path, registered_checkpoint):
    server, cluster = s3_cluster
    storage = f"s3://{BUCKET}/fault"
    args = [
        "train",
        f"storage_path={storage}",
        "experiment=fault",
        "storage.connect_timeout_s=1",
        "storage.request_timeout_s=5",
        "storage.max_attempts=2",
        "train.max_steps=60",
        "train.eval_steps=10",
        "train.save_steps=10",
        "train.max_failures=0",
    ]
    env = {**cluster.env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyqa.cli", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # Stop the server once Ray Train has registered the first checkpoint (its snapshot in the
    # bucket names it). A checkpoint folder whose upload the outage cuts short is not one: the
    # rerun would rightly start from step 0.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if _registered_under(server, "fault/fault/ray/", registered_checkpoint):
            break
        time.sleep(1)
    assert proc.poll() is None, "training ended before its first checkpoint"
    server.stop()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    message = err.strip().splitlines()[-1]
    assert "s3://tinyqa-test/fault" in message, message
    assert "Traceback" not in err
    server.start()  # the in-process store keeps its objects, like a bucket after an outage
    rerun = _cli(cluster, tmp_path, *args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = json.loads(server.read(BUCKET, "fault/fault/adapters/fault/tinyqa.json"))["metrics"]
    assert metrics["resumed_from_step"] >= 10 and metrics["steps"] == 60
    print(f"\nstopped mid-run: {message}\nrerun: {rerun.stdout.strip().splitlines()[-1]}")
