"""Experiment tracking: MLflow through Ray's own integrations, TensorBoard / W&B through the Trainer.

- ``tinyqa train``: rank 0 of the Ray Train worker group opens the run with
  :func:`ray.air.integrations.mlflow.setup_mlflow` (params = the resolved config) and logs every
  Trainer log line (loss, learning rate, grad norm, eval loss ...) at its optimizer step; the driver
  adds the final metrics and the manifest / model card when the adapter is exported.
- ``tinyqa tune``: :class:`ray.air.integrations.mlflow.MLflowLoggerCallback` on the Tune run makes one
  run per trial (params = the trial's hyper-parameters, one metric point per Tune iteration), nested
  under a sweep run that gets the sweep's plot, tables and best metric.
- ``tinyqa eval``: one run with every model's scores and the eval report.

MLflow goes to ``tracking.mlflow_uri``, by default a SQLite store ``<run>/mlflow.db`` with artifacts
in ``<run>/mlartifacts`` (offline; MLflow 3 keeps its plain-folder store in maintenance mode and
refuses it by default). TensorBoard event files (on by default) and W&B are the Hugging Face
Trainer's own integrations, switched on through ``tracking.report_to``; nothing here talks to them.

Only the driver may fail because of tracking, and only before any work starts
(:func:`prepare_experiment`); later logging problems are warnings, so an MLflow hiccup never costs a
trained adapter. ``mlflow`` is imported inside the functions: it is an optional side channel whose
import alone takes seconds, and ``tracking.mlflow=false`` should not pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyqa.config import TinyQAConfig
from tinyqa.errors import TinyQAError, first_line

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
TENSORBOARD_DIR = "tensorboard"

# Run tags: what a run is, and what ties it to tinyqa's own artifacts.
KIND_TAG = "tinyqa.kind"  # "train" | "trial" | "sweep" | "eval"
EXPERIMENT_TAG = "tinyqa.experiment"
ADAPTER_TAG = "tinyqa.adapter_id"
RAY_RUN_TAG = (
    "tinyqa.ray_run"  # the Ray Train run name (train) or the Tune experiment folder (sweep)
)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests trial runs under the sweep run


class TrackingError(TinyQAError):
    """The configured MLflow tracking store cannot be used."""


# ----------------------------------------------------------------------------------------------
# where things go
# ----------------------------------------------------------------------------------------------
def mlflow_uri(cfg: TinyQAConfig) -> str | None:
    """The MLflow tracking URI, or None when MLflow tracking is off."""
    if not cfg.tracking.mlflow:
        return None
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if not isinstance(cfg.run_dir, Path):
        # The default SQLite store needs a local file; a bucket storage_path needs an MLflow
        # server (tracking.mlflow_uri) to track runs.
        logger.info("MLflow tracking off: storage is a bucket and tracking.mlflow_uri is empty")
        return None
    return f"sqlite:///{cfg.run_dir / MLFLOW_DB}"


def mlflow_experiment(cfg: TinyQAConfig) -> str:
    return cfg.tracking.mlflow_experiment or cfg.experiment


def ui_command(cfg: TinyQAConfig) -> str | None:
    """How a person looks at the runs."""
    uri = mlflow_uri(cfg)
    if uri is None:
        return None
    if cfg.tracking.mlflow_uri is None:
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"


def tensorboard_dir(cfg: TinyQAConfig) -> Path:
    """TensorBoard event files of all runs of the experiment (one folder per adapter below)."""
    return cfg.run_dir / TENSORBOARD_DIR


def report_to(cfg: TinyQAConfig) -> list[str] | str:
    """The Trainer's ``report_to``: the configured integrations, or "none"."""
    return list(cfg.tracking.report_to) or "none"


def tensorboard_logging_dir(cfg: TinyQAConfig) -> Path:
    """Where a Train worker's TensorBoard callback writes ``cfg``'s run: ``<run>/tensorboard/<adapter>``,
    or, when the run lives in a bucket, a folder on the worker's own node that
    :func:`publish_tensorboard` uploads there when training ends. (tensorboardX writes ``s3://``
    only where boto3 is installed and ``gs://`` only with google-cloud-storage, neither of them a
    tinyqa dependency, so a plain install would fail as training starts; and it
    uploads the whole event file again, through a new boto3 client, at every flush.)"""
    if isinstance(cfg.run_dir, Path):
        return tensorboard_dir(cfg) / cfg.adapter_id
    return Path(tempfile.gettempdir()) / "tinyqa-tensorboard" / cfg.experiment / cfg.adapter_id


def worker_env(cfg: TinyQAConfig) -> dict[str, str]:
    """Environment for the Train workers of ``cfg``'s run: where the Trainer's TensorBoard callback
    writes (transformers 5 reads it from ``TENSORBOARD_LOGGING_DIR``; without it the events would
    land in the worker's temporary output folder and vanish)."""
    if "tensorboard" not in cfg.tracking.report_to:
        return {}
    return {"TENSORBOARD_LOGGING_DIR": str(tensorboard_logging_dir(cfg))}


def publish_tensorboard(cfg: TinyQAConfig) -> None:
    """Rank 0, when training ends: a bucket run's event files go from the node into
    ``<run>/tensorboard/<adapter>/`` (a local run's are there already). A failure is a warning:
    tracking never costs a trained adapter."""
    local = tensorboard_logging_dir(cfg)
    if isinstance(cfg.run_dir, Path) or not local.is_dir():
        return
    from tinyqa.storage import upload_folder

    try:
        n = upload_folder(local, tensorboard_dir(cfg) / cfg.adapter_id)
    except Exception as e:  # a storage hiccup: the adapter is already saved
        logger.warning("TensorBoard events not uploaded to %s: %s", tensorboard_dir(cfg), e)
        return
    shutil.rmtree(local, ignore_errors=True)
    logger.info("TensorBoard: %d event file(s) uploaded to %s", n, tensorboard_dir(cfg))


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict as MLflow params: dotted keys, string values (``lora.r`` -> ``"8"``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@contextlib.contextmanager
def _best_effort(what: str) -> Iterator[None]:
    """Tracking is a side channel: a failure to log is a warning, never a lost run."""
    try:
        yield
    except Exception as e:  # MLflow raises its own, requests' and sqlite's errors
        logger.warning("MLflow: could not %s (%s); the run's own outputs are unaffected", what, e)


def _client(cfg: TinyQAConfig):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri(cfg))


# ----------------------------------------------------------------------------------------------
# driver: the experiment
# ----------------------------------------------------------------------------------------------
def prepare_experiment(cfg: TinyQAConfig) -> str | None:
    """Create (or find) the MLflow experiment; returns its id, or None when tracking is off.

    The local default store keeps artifacts beside the database, in the run folder (MLflow would
    otherwise put them under the current directory). Raises :class:`TrackingError` when the store
    cannot be reached or written, before any training starts.
    """
    uri = mlflow_uri(cfg)
    if uri is None:
        return None
    from mlflow.exceptions import MlflowException

    name = mlflow_experiment(cfg)
    try:
        if cfg.tracking.mlflow_uri is None:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        client = _client(cfg)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if cfg.tracking.mlflow_uri is None:
                location = (cfg.run_dir / MLFLOW_ARTIFACTS).as_uri()
            try:
                experiment_id = client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by a concurrent driver
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
    except Exception as e:
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable ({first_line(e)}); start the server or fix "
            "tracking.mlflow_uri, or set tracking.mlflow=false"
        ) from e
    logger.info("MLflow: experiment %r in %s; view it with: %s", name, uri, ui_command(cfg))
    return experiment_id


# ----------------------------------------------------------------------------------------------
# tinyqa train: the worker's run (Ray's setup_mlflow) and the driver's final touches
# ----------------------------------------------------------------------------------------------
class TrainRunLogger:
    """A Train worker callback factory (:data:`tinyqa.training.CallbackFactory`): opens the run with
    Ray's ``setup_mlflow`` (rank 0 only; the other ranks get its no-op module) and returns a Trainer
    callback that logs every Trainer log line at its optimizer step.

    A plain class so it pickles into the Train loop config.
    """

    def __init__(self, uri: str, experiment_id: str, run_name: str, tags: dict[str, str]):
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.tags = tags

    def __call__(self, cfg: TinyQAConfig, rank: int) -> TrainerCallback:
        from ray.air.integrations.mlflow import setup_mlflow
        from transformers import TrainerCallback

        mlflow = None
        with _best_effort("open the training run"):
            mlflow = setup_mlflow(
                config=flat_params(cfg.to_dict()),
                tracking_uri=self.uri,
                experiment_id=self.experiment_id,
                run_name=self.run_name,
                tags=self.tags,
            )

        class MLflowStepLogger(TrainerCallback):
            """Every Trainer log (train and eval) as MLflow metrics at the global step."""

            def on_log(self, args, state, control, logs=None, **kwargs):
                values = _numeric(logs or {})
                if mlflow is not None and values:
                    with _best_effort("log training metrics"):
                        mlflow.log_metrics(values, step=state.global_step)

        return MLflowStepLogger()


def train_callbacks(cfg: TinyQAConfig, ray_run: str) -> list[TrainRunLogger]:
    """The worker callback factories that track the training run ``ray_run`` (none when off)."""
    experiment_id = prepare_experiment(cfg)
    if experiment_id is None:
        return []
    tags = {
        KIND_TAG: "train",
        EXPERIMENT_TAG: cfg.experiment,
        ADAPTER_TAG: cfg.adapter_id,
        RAY_RUN_TAG: ray_run,
    }
    if "tensorboard" in cfg.tracking.report_to:
        logger.info(
            "TensorBoard: events in %s; view them with: tensorboard --logdir %s",
            tensorboard_dir(cfg) / cfg.adapter_id,
            tensorboard_dir(cfg),
        )
    return [TrainRunLogger(str(mlflow_uri(cfg)), experiment_id, cfg.adapter_id, tags)]


def _runs_tagged(cfg: TinyQAConfig, tags: dict[str, str]):
    """Runs of the experiment carrying all ``tags``, newest first."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(mlflow_experiment(cfg))
    if experiment is None:
        return client, []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )
    return client, runs


def finish_train_run(
    cfg: TinyQAConfig, ray_run: str, adapter_dir: Path | None, manifest: dict[str, Any] | None
) -> None:
    """Driver, after the Train run: final metrics and the adapter's manifest and model card on the
    worker's run, which is then closed. Runs of earlier worker groups of the same Ray run (a
    restart after a failure) are marked killed. ``manifest`` None = the training failed."""
    if mlflow_uri(cfg) is None:
        return
    with _best_effort("finish the training run"):
        client, runs = _runs_tagged(cfg, {KIND_TAG: "train", RAY_RUN_TAG: ray_run})
        runs = [r for r in runs if r.info.status == "RUNNING"]
        if not runs:
            return
        latest, *older = runs
        for run in older:
            client.set_terminated(run.info.run_id, "KILLED")
        run_id = latest.info.run_id
        if manifest is None:
            client.set_terminated(run_id, "FAILED")
            return
        metrics = _numeric(manifest.get("metrics", {}))
        step = int(metrics.get("steps", 0))
        for key, value in metrics.items():
            client.log_metric(run_id, f"final.{key}", value, step=step)
        if adapter_dir is not None:
            for name in ("tinyqa.json", "README.md", "adapter_config.json"):
                if (adapter_dir / name).is_file():
                    client.log_artifact(run_id, str(adapter_dir / name), "adapter")
        client.set_terminated(run_id, "FINISHED")
        logger.info("MLflow: training run %s (%s) finished", latest.info.run_name, run_id)


# ----------------------------------------------------------------------------------------------
# tinyqa tune: one run per trial (Ray's MLflowLoggerCallback) under a sweep run
# ----------------------------------------------------------------------------------------------
def start_sweep_run(cfg: TinyQAConfig, sweep_dir: Path, restored: bool) -> str | None:
    """The sweep's parent run (a resumed sweep continues its own); returns its id or None."""
    experiment_id = prepare_experiment(cfg)
    if experiment_id is None:
        return None
    tags = {KIND_TAG: "sweep", EXPERIMENT_TAG: cfg.experiment, RAY_RUN_TAG: str(sweep_dir)}
    try:
        client, runs = _runs_tagged(cfg, tags)
        if restored and runs:
            return runs[0].info.run_id
        run = client.create_run(experiment_id, run_name=f"sweep-{cfg.experiment}", tags=tags)
        for key, value in flat_params(cfg.to_dict()).items():
            client.log_param(run.info.run_id, key, value)
    except Exception as e:
        raise TrackingError(
            f"MLflow tracking store {mlflow_uri(cfg)}: cannot start the sweep run ({first_line(e)}); "
            "fix the store or set tracking.mlflow=false"
        ) from e
    return run.info.run_id


def tune_callbacks(cfg: TinyQAConfig, sweep_run_id: str | None) -> list:
    """Ray Tune callbacks: an ``MLflowLoggerCallback`` writing one run per trial (params and a metric
    history point per Tune iteration), nested under the sweep run. Empty when tracking is off."""
    if sweep_run_id is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [
        MLflowLoggerCallback(
            tracking_uri=mlflow_uri(cfg),
            experiment_name=mlflow_experiment(cfg),
            tags={KIND_TAG: "trial", EXPERIMENT_TAG: cfg.experiment, PARENT_TAG: sweep_run_id},
        )
    ]


def finish_sweep_run(cfg: TinyQAConfig, sweep_run_id: str | None, result: Any | None) -> None:
    """The sweep's outcome on its run: best metric, timing, the plot and tables as artifacts, and
    each trial run tagged with its adapter id. ``result`` None = the sweep failed."""
    if sweep_run_id is None:
        return
    with _best_effort("finish the sweep run"):
        client = _client(cfg)
        if result is None:
            client.set_terminated(sweep_run_id, "FAILED")
            return
        metrics = {
            "wall_seconds": result.wall_seconds,
            "trials": len(result.results),
            "iterations_run": result.iterations_run,
        }
        if result.best:
            metrics[f"best_{result.metric}"] = result.best["value"]
            client.set_tag(sweep_run_id, ADAPTER_TAG, result.best["adapter_id"])
        if result.parallel_efficiency is not None:
            metrics["parallel_efficiency"] = result.parallel_efficiency
        for key, value in _numeric(metrics).items():
            client.log_metric(sweep_run_id, key, value)
        for path in result.paths.values():
            if Path(path).is_file():
                client.log_artifact(sweep_run_id, str(path))
        # Tune names a trial's run after the trial (``_run_trial_<id>``); tag it with its adapter.
        adapters = {
            str(row["trial"]): str(row["adapter_id"])
            for _, row in result.results.iterrows()
            if row["adapter_id"]
        }
        _, trials = _runs_tagged(cfg, {KIND_TAG: "trial", PARENT_TAG: sweep_run_id})
        for run in trials:
            name = run.data.tags.get("trial_name", run.info.run_name or "")
            for trial_id, adapter_id in adapters.items():
                if name.endswith(trial_id):
                    client.set_tag(run.info.run_id, ADAPTER_TAG, adapter_id)
        client.set_terminated(sweep_run_id, "FINISHED")


# ----------------------------------------------------------------------------------------------
# tinyqa eval
# ----------------------------------------------------------------------------------------------
def log_eval(cfg: TinyQAConfig, result: Any) -> str | None:
    """One run for an evaluation: each model's mean scores and CI bounds (``<model>.<metric>``), the
    change against the base, and the report files. Returns the run id (None when off)."""
    experiment_id = prepare_experiment(cfg)
    if experiment_id is None:
        return None
    with _best_effort("log the evaluation"):
        client = _client(cfg)
        tags = {KIND_TAG: "eval", EXPERIMENT_TAG: cfg.experiment}
        run = client.create_run(experiment_id, run_name=f"eval-{cfg.experiment}", tags=tags)
        run_id = run.info.run_id
        params = {
            "base_model": result.base_model,
            "questions": result.n_questions,
            "source": result.source,
            "models": ",".join(m.name for m in result.models),
            "max_new_tokens": cfg.eval.max_new_tokens,
        }
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        for model in result.models:
            for metric, agg in model.metrics.items():
                values = {f"{model.name}.{metric}": agg.get("mean")}
                lo, hi = agg.get("ci95") or (None, None)
                values |= {
                    f"{model.name}.{metric}.ci_low": lo,
                    f"{model.name}.{metric}.ci_high": hi,
                }
                if model.delta_vs_base:
                    values[f"{model.name}.{metric}.delta_vs_base"] = model.delta_vs_base[metric][
                        "mean"
                    ]
                for key, value in _numeric(
                    {k: v for k, v in values.items() if v is not None}
                ).items():
                    client.log_metric(run_id, key, value)
            client.log_metric(run_id, f"{model.name}.generation_seconds", float(model.seconds))
        for path in result.paths.values():
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), "eval")
        client.set_terminated(run_id, "FINISHED")
        return run_id
    return None
