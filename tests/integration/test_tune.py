"""Ray Tune sweeps on a real local Ray cluster with the offline `tiny` model.

The cluster is this module's own `ray start --head` with 2 CPUs (see conftest.py for why its
processes get RAY_ADDRESS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Small trials: 10 steps, a checkpoint (= one Tune iteration) every 5, plus the final report.
TINY = [
    "train.num_workers=1",
    "train.max_steps=10",
    "train.eval_steps=5",
    "train.save_steps=5",
    "train.logging_steps=5",
    "train.batch_size=4",
    "data.max_length=128",
]


@pytest.fixture(scope="module")
def cluster(ray_cluster_factory):
    """`ray start --head` with 2 CPUs; yields the environment drivers need to join it."""
    import ray

    ray_cluster = ray_cluster_factory(num_cpus=2)
    env = ray_cluster.env()
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray_cluster.address  # in-process drivers join this cluster
    try:
        yield env
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        ray_cluster.stop()


def test_grid_sweep_with_asha_promotes_best_adapter(cluster, make_config):
    import ray

    from tinyqa import tune
    from tinyqa.adapters import base_settings_from_manifest, read_manifest
    from tinyqa.model import load_adapter, load_base_model

    cfg = make_config(
        *TINY,
        "experiment=sweep-grid",
        "tune.search.r=[4,8]",
        "tune.search.lr=[1.0e-4,3.0e-3]",
        "tune.scheduler=asha",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "tune.max_concurrent_trials=2",
        f"ray_address={cluster['RAY_ADDRESS']}",
    )
    try:
        result = tune.run_sweep(cfg)
    finally:
        ray.shutdown()

    assert not result.notes or "ASHA early stopping is off" not in result.notes[0]
    df = pd.read_csv(result.paths["results_csv"])
    assert len(df) == 4
    assert sorted(zip(df["r"], df["lr"], strict=True)) == [
        (4, 1e-4),
        (4, 3e-3),
        (8, 1e-4),
        (8, 3e-3),
    ]
    assert (df["status"] != "error").all(), df.to_string()
    exported = df[df["adapter_id"].notna()]
    assert len(exported) >= 1
    # Stopped trials never reach the export; completed ones always do.
    assert (exported["status"] == "completed").all()
    assert df[df["stopped_early"]]["adapter_id"].isna().all()

    best = json.loads(result.paths["best_json"].read_text())
    assert set(best) == {"adapter_id", "metric", "value", "trial"}
    top = exported.sort_values("eval_loss").iloc[0]
    assert best["adapter_id"] == top["adapter_id"] and best["trial"] == top["trial"]
    assert best["value"] == pytest.approx(top["eval_loss"])
    assert best["metric"] == "eval_loss"

    adapter_dir = cfg.adapters_dir / best["adapter_id"]
    manifest = read_manifest(adapter_dir)
    assert manifest["config"]["lora"]["r"] == int(top["r"])
    assert manifest["config"]["train"]["learning_rate"] == pytest.approx(top["lr"])
    base = load_base_model(base_settings_from_manifest(manifest), "cpu")
    model = load_adapter(base, adapter_dir)
    assert model.peft_config["default"].r == int(top["r"])

    assert result.paths["plot_png"].read_bytes()[:8] == PNG_MAGIC
    assert best["adapter_id"] in result.paths["summary_md"].read_text()
    assert result.iterations_full == 4 * result.expected_iterations == 12
    assert 0 < result.iterations_run <= result.iterations_full
    assert result.wall_seconds > 0 and result.parallel_efficiency > 0
    assert "| * |" in tune.format_table(result)


def test_killed_driver_resumes_without_retraining_finished_trials(cluster, tmp_path, tune_statuses):
    storage = tmp_path / "runs"
    cmd = [
        sys.executable,
        "jobs/tune.py",
        "--config",
        "jobs/configs/tiny-cpu.yaml",
        *TINY,
        f"storage_path={storage}",
        "experiment=sweep-resume",
        "tune.search.r=[4]",
        "tune.search.lr=[1.0e-3,3.0e-3]",
        "tune.scheduler=none",
        "tune.max_concurrent_trials=1",
    ]
    exp_dir = storage / "sweep-resume" / "ray" / "tune" / "sweep"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=REPO, env=cluster, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "TERMINATED" not in tune_statuses(exp_dir):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished within 300 s"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)  # the driver dies mid-sweep, no cleanup
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    statuses = tune_statuses(exp_dir)
    assert statuses.count("TERMINATED") == 1, statuses  # max_concurrent_trials=1

    adapters = storage / "sweep-resume" / "adapters"
    finished = {p.name: json.loads((p / "tinyqa.json").read_text()) for p in adapters.iterdir()}
    assert len(finished) == 1
    (finished_id, manifest_before) = next(iter(finished.items()))
    mtime_before = (adapters / finished_id / "tinyqa.json").stat().st_mtime_ns

    second = subprocess.run(cmd, cwd=REPO, env=cluster, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # The library's log lines go to the command's log file (tinyqa/console.py), not the console.
    logs = "".join(p.read_text() for p in (storage / "sweep-resume" / "logs").glob("*.log"))
    assert "resuming the sweep" in logs

    manifest_after = json.loads((adapters / finished_id / "tinyqa.json").read_text())
    assert manifest_after["created"] == manifest_before["created"]  # not trained again
    assert (adapters / finished_id / "tinyqa.json").stat().st_mtime_ns == mtime_before
    df = pd.read_csv(storage / "sweep-resume" / "results.csv")
    assert len(df) == 2 and (df["status"] == "completed").all(), df.to_string()
    assert finished_id in set(df["adapter_id"])
    assert len(list(adapters.iterdir())) == 2
    best = json.loads((storage / "sweep-resume" / "best.json").read_text())
    assert best["adapter_id"] in set(df["adapter_id"])
    assert tune_statuses(exp_dir) == ["TERMINATED", "TERMINATED"]

    # A changed search space is refused rather than silently resumed with the old one.
    changed = subprocess.run(
        [*cmd, "tune.search.r=[8]"], cwd=REPO, env=cluster, capture_output=True, text=True
    )
    assert changed.returncode == 2
    assert "different settings (tune.search.r)" in changed.stderr
    assert "--fresh" in changed.stderr


def test_more_gpus_than_the_cluster_has_fails_before_any_trial(cluster, make_config):
    import ray

    from tinyqa import tune
    from tinyqa.errors import ConfigError

    cfg = make_config(
        *TINY,
        "experiment=sweep-gpu",
        "train.use_gpu=true",
        "tune.scheduler=none",
        f"ray_address={cluster['RAY_ADDRESS']}",
    )
    try:
        with pytest.raises(ConfigError, match="a trial needs 1 GPU .* the cluster has 0"):
            tune.run_sweep(cfg)
    finally:
        ray.shutdown()
    assert not tune.experiment_dir(cfg).exists()
