"""MLflow tracking through Ray's integrations, read back with mlflow's client API: a 2-trial sweep
(one run per trial with its params and metric histories, nested under the sweep run with the plot
and tables), TensorBoard event files from the Trainer, and an eval run."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration

# Two short trials: 10 steps, a checkpoint (one Tune iteration) every 5, plus the final report.
SWEEP = [
    "train.num_workers=1",
    "train.max_steps=10",
    "train.eval_steps=5",
    "train.save_steps=5",
    "train.logging_steps=5",
    "train.batch_size=4",
    "data.max_length=128",
    "experiment=tracked",
    "tune.search.r=[4]",
    "tune.search.lr=[1.0e-3,3.0e-3]",
    "tune.scheduler=none",
    "tune.max_concurrent_trials=2",
    "tracking.mlflow=true",  # the make_config fixture turns it off by default
]


@pytest.fixture(scope="module")
def cluster(ray_cluster_factory):
    import ray

    ray_cluster = ray_cluster_factory(num_cpus=2)
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray_cluster.address
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        ray_cluster.stop()


def test_sweep_writes_one_mlflow_run_per_trial_with_params_and_histories(cluster, make_config):
    import ray
    from mlflow import MlflowClient

    from tinyqa import tracking, tune

    cfg = make_config(*SWEEP, f"ray_address={cluster.address}")
    try:
        result = tune.run_sweep(cfg)
    finally:
        ray.shutdown()

    uri = tracking.mlflow_uri(cfg)
    assert uri == f"sqlite:///{cfg.run_dir / 'mlflow.db'}"  # the default: inside the experiment
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked")
    assert experiment.artifact_location.startswith((cfg.run_dir / "mlartifacts").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get(tracking.KIND_TAG), []).append(run)
    assert set(by_kind) == {"sweep", "trial"}, [r.data.tags for r in runs]
    [sweep] = by_kind["sweep"]
    trials = by_kind["trial"]
    assert len(trials) == 2

    assert sorted(float(r.data.params["lr"]) for r in trials) == [1.0e-3, 3.0e-3]
    assert {r.data.params["r"] for r in trials} == {"4"}
    adapters = set(result.results["adapter_id"])
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.PARENT_TAG] == sweep.info.run_id  # nested in the UI
        assert run.data.tags[tracking.ADAPTER_TAG] in adapters
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        # A point per Tune iteration: checkpoints at steps 5 and 10, then the final report.
        assert len(history) >= 2, history
        assert [m.step for m in history] == sorted(m.step for m in history)
        assert all(m.value > 0 for m in history)

    assert sweep.info.status == "FINISHED"
    assert sweep.data.tags[tracking.ADAPTER_TAG] == result.best["adapter_id"]
    assert sweep.data.metrics["best_eval_loss"] == pytest.approx(result.best["value"])
    assert sweep.data.params["tune.search.lr"] == "[0.001, 0.003]"
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"sweep.png", "results.csv", "sweep.md", "best.json"} <= artifacts

    # TensorBoard: the Trainer's own event files, one folder per trial's adapter.
    for adapter_id in adapters:
        events = list((tracking.tensorboard_dir(cfg) / adapter_id).glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events for {adapter_id}"

    # The eval run of the best adapter: scores per model and the report files.
    from tinyqa.evaluation import run_eval

    cfg_eval = make_config(
        *SWEEP, "eval.max_questions=3", "eval.bootstrap_samples=10", "eval.max_new_tokens=8"
    )
    run_eval(cfg_eval)
    [eval_run] = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tinyqa.kind` = 'eval'"
    )
    best = result.best["adapter_id"]
    assert {"base.token_f1", f"{best}.token_f1", f"{best}.token_f1.delta_vs_base"} <= set(
        eval_run.data.metrics
    )
    eval_files = {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval")}
    assert {"eval/eval.md", "eval/eval.json"} <= eval_files


def test_training_run_logs_step_metrics_on_rank_zero_and_finishes_with_the_adapter(
    cluster, make_config
):
    import ray
    from mlflow import MlflowClient

    from tinyqa import tracking
    from tinyqa.training import run_training

    cfg = make_config(
        *SWEEP[:7], "experiment=tracked-train", "train.num_workers=2", "tracking.mlflow=true"
    )
    try:
        result = run_training(cfg)
    finally:
        ray.shutdown()

    client = MlflowClient(tracking.mlflow_uri(cfg))
    experiment = client.get_experiment_by_name("tracked-train")
    [run] = client.search_runs([experiment.experiment_id])  # 2 workers, one run: rank 0's
    assert run.info.status == "FINISHED" and run.info.run_name == result.adapter_id
    assert run.data.tags[tracking.KIND_TAG] == "train"
    assert run.data.params["lora.r"] == str(cfg.lora.r)
    assert run.data.params["train.max_steps"] == "10"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [5, 10]  # every logging_steps, at the optimizer step
    # Step 0: the base's eval loss (the untrained adapter), then every eval_steps, then the final.
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in evals][:3] == [0, 5, 10]
    assert evals[0].value == pytest.approx(result.metrics["eval_loss_initial"])
    assert run.data.metrics["final.eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/tinyqa.json", "adapter/README.md"} <= files
    events = tracking.tensorboard_dir(cfg) / result.adapter_id
    assert list(events.glob("events.out.tfevents.*"))
