"""`ray job submit` of jobs/train.py on a real local cluster: adapter + manifest, reload, resume."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

CONFIG = "jobs/configs/tiny-cpu.yaml"


def _job(cluster, storage, *overrides):
    proc = cluster.submit(
        "python",
        "jobs/train.py",
        "--config",
        CONFIG,
        f"storage_path={storage}",
        "train.num_workers=2",
        *overrides,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    return proc


def test_train_job_exports_a_working_adapter(ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    proc = _job(ray_cluster, storage, "train.max_steps=45")
    adapter = storage / "tiny-demo" / "adapters" / "tiny-demo"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tinyqa.json",
        "tokenizer.json",
    ):
        assert (adapter / name).is_file(), name
    manifest = json.loads((adapter / "tinyqa.json").read_text())
    m = manifest["metrics"]
    assert m["steps"] == 45 and m["world_size"] == 2 and m["resumed_from_step"] == 0
    # Fine-tuning clearly beats the untrained adapter on held-out questions.
    assert m["eval_loss"] < 0.9 * m["eval_loss_initial"], m
    assert manifest["base_model"] == "tiny"
    assert len(manifest["dataset"]["sha256"]) == 64
    assert manifest["versions"]["ray"] and manifest["config"]["lora"]["r"] == 8
    assert "eval loss" in proc.stdout

    from tinyqa.inference import QAEngine

    engine, name = QAEngine.for_adapter_dir(adapter)
    answer = engine.ask("What does `json.dumps` do?", adapter=name, max_new_tokens=16)
    assert answer.completion_tokens > 0 and answer.text


def test_worker_failure_resumes_from_checkpoint(ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    # Checkpoints every 10 steps; rank 0 crashes at step 15 on the first attempt only.
    _job(
        ray_cluster,
        storage,
        "train.max_steps=25",
        "train.eval_steps=10",
        "train.save_steps=10",
        "train.fail_at_step=15",
        "train.max_failures=1",
    )
    manifest = json.loads((storage / "tiny-demo/adapters/tiny-demo/tinyqa.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 10  # not restarted from step 0
    assert manifest["metrics"]["steps"] == 25


def test_bad_config_fails_the_job_with_exit_2(ray_cluster, tmp_path):
    proc = ray_cluster.submit(
        "python",
        "jobs/train.py",
        "--config",
        CONFIG,
        f"storage_path={tmp_path}",
        "lora.r=0",
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "lora.r" in out and "Traceback" not in out


def test_extra_callbacks_cross_the_ray_boundary_to_every_worker(ray_cluster, make_config, tmp_path):
    """run_training's public hook: callback factories travel in the loop config and their
    callbacks run on every worker (the benchmarks time steps through it)."""
    import ray

    from tinyqa.training import run_training

    marks = tmp_path / "marks"
    marks.mkdir()

    def step_marker(cfg, rank):
        from transformers import TrainerCallback

        class Marker(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                with open(marks / f"rank{rank}.txt", "a") as f:
                    f.write(f"{state.global_step}\n")

        return Marker()

    cfg = make_config(
        f"ray_address={ray_cluster.address}",
        "train.num_workers=2",
        "train.max_steps=3",
        "train.eval_steps=3",
        "train.save_steps=3",
    )
    try:
        result = run_training(cfg, extra_callbacks=[step_marker])
    finally:
        ray.shutdown()
    assert result.metrics["steps"] == 3
    for rank in (0, 1):
        assert (marks / f"rank{rank}.txt").read_text().split() == ["1", "2", "3"], rank
