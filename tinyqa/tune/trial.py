"""One trial: its config (the sweep's base plus this trial's hyper-parameters), its adapter id,
where its Train run lives, and the Tune trainable that runs it.

Each trial is a function that builds and fits a ``TorchTrainer`` (Train V2 rejects
``Tuner(trainer)``); its metrics reach Tune through a ``TuneReportCallback`` in the Train run's
callbacks, one Tune iteration per checkpoint plus a final report after the adapter is exported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyqa.adapters import read_manifest
from tinyqa.config import TinyQAConfig, build_config
from tinyqa.tune.space import GENERATION_METRICS

EXPERIMENT = "sweep"  # the Tune experiment's folder name under <run>/ray/tune/
_TRIAL_RUNS = "trials"  # the trials' Train runs, beside the experiment
# A trial driver only waits on its Train run; Tune cannot place a bundle that asks for nothing.
_TRIAL_DRIVER_MEMORY = 256 * 1024**2


def tune_dir(cfg: TinyQAConfig) -> Path:
    """``<run>/ray/tune``: the Tune experiment plus its trials' Train runs."""
    return cfg.ray_storage / "tune"


def experiment_dir(cfg: TinyQAConfig) -> Path:
    return tune_dir(cfg) / EXPERIMENT


def _trial_runs_dir(cfg: TinyQAConfig) -> Path:
    return tune_dir(cfg) / _TRIAL_RUNS


def trial_adapter_id(params: dict[str, Any], trial_id: str, sweep_id: str = "") -> str:
    """Deterministic, unique adapter name, e.g. ``s3f9a2c-trial-03-r8-lr3.0e-04``.

    The index is the trial counter Tune puts at the end of its ids (``ab12c_00003``); a searcher
    without one (Optuna) gets its 8-character trial id. Both survive a restore. ``sweep_id``
    (see :func:`tinyqa.tune.sweep.run_sweep`) is new for every fresh sweep, so a rerun never
    writes over an adapter of an earlier sweep that an endpoint may be serving.
    """
    tail = trial_id.rsplit("_", 1)[-1]
    index = f"{int(tail):02d}" if tail.isdigit() else tail[:8]
    prefix = f"{sweep_id}-" if sweep_id else ""
    name = f"{prefix}trial-{index}-r{int(params['r'])}-lr{float(params['lr']):.1e}"
    if "alpha_ratio" in params:
        name += f"-a{float(params['alpha_ratio']):g}"
    if "dropout" in params:
        name += f"-d{float(params['dropout']):g}"
    return name[:64]


def _params_digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]


def trial_config(base: dict[str, Any], params: dict[str, Any], adapter_id: str) -> TinyQAConfig:
    """The trial's config: the base with rank, alpha, dropout, learning rate and adapter id set.

    Without an alpha/r ratio in the search space, alpha keeps the base's ratio (lora.alpha /
    lora.r), so the LoRA scale, and with it the useful learning rate, does not move with the rank.
    """
    data = json.loads(json.dumps(base))  # a deep copy that stays JSON-plain
    lora, train = data.setdefault("lora", {}), data.setdefault("train", {})
    base_cfg = build_config(base, "sweep base config")
    r = int(params["r"])
    ratio = params.get("alpha_ratio", base_cfg.lora.alpha / base_cfg.lora.r)
    lora["r"] = r
    lora["alpha"] = max(1, round(float(ratio) * r))
    if "dropout" in params:
        lora["dropout"] = float(params["dropout"])
    train["learning_rate"] = float(params["lr"])
    train["adapter_id"] = adapter_id
    return build_config(data, f"trial {adapter_id}")


def _absolute_paths(cfg: TinyQAConfig) -> dict[str, Any]:
    """The config as a dict with its local paths made absolute: Tune runs trials in their own
    folders, where a relative storage path or model folder would point elsewhere."""
    data = cfg.to_dict()
    data["storage_path"] = str(cfg.storage_root)
    if cfg.data.path:
        data["data"]["path"] = str(Path(cfg.data.path).expanduser().resolve())
    model = Path(cfg.model.name).expanduser()
    if cfg.model.name.startswith((".", "/", "~")) or (model / "config.json").is_file():
        data["model"]["name"] = str(model.resolve())
    return data


def _report_callback():
    """Tune's Train-to-Tune report callback, carrying metrics forward so that every result holds
    the latest value of everything reported so far (the final report lacks the Hugging Face log
    keys, e.g. eval_mean_token_accuracy), tagged with the trial's adapter id.

    The worker's ``done`` key is dropped: Tune reads ``done`` as "stop this trial now" and would
    kill the trial while its Train run is still shutting down, leaking the run's workers.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        def __init__(self, adapter_id: str, first: list[str]):
            super().__init__()
            # Tune's console table shows the first four numeric keys: put the useful ones first.
            self._latest: dict[str, Any] = dict.fromkeys(first)
            self._adapter_id = adapter_id

        def after_report(self, run_context, metrics, checkpoint):
            self._latest.update({k: v for k, v in metrics[0].items() if k != "done"})
            result = {k: v for k, v in self._latest.items() if v is not None}
            result["adapter_id"] = self._adapter_id
            super().after_report(run_context, [result], checkpoint)

    return SweepReportCallback


def _run_trial(
    config: dict[str, Any], base: dict[str, Any], sweep_id: str = "", steps: Sequence[Any] = ()
) -> None:
    """Tune trainable: one Ray Train run with this trial's hyper-parameters.

    A crash propagates so Tune retries the trial (FailureConfig); the retry's Train run has the
    same name, so it resumes from the trial's last checkpoint instead of starting over.
    ``steps``: :class:`tinyqa.progress.StepProgress` factories, tagged here with the trial id.
    """
    from ray import tune

    from tinyqa.training import build_trainer

    params = {k: config[k] for k in ("r", "lr", "alpha_ratio", "dropout") if k in config}
    trial_id = tune.get_context().get_trial_id()
    adapter_id = trial_adapter_id(params, trial_id, sweep_id)
    cfg = trial_config(base, params, adapter_id)
    first = list(dict.fromkeys([cfg.tune.metric, "eval_loss", "loss", "step"]))
    callback = _report_callback()(adapter_id, first)
    trainer = build_trainer(
        cfg,
        name=f"{adapter_id}-{_params_digest(params)}",
        callbacks=[callback],
        storage_path=_trial_runs_dir(cfg),
        extra_callbacks=[factory.tagged(trial_id) for factory in steps],
    )
    trainer.fit()
    if cfg.tune.metric in GENERATION_METRICS:
        # The final training metrics as exported with the adapter, plus the generation scores.
        final = read_manifest(cfg.adapters_dir / adapter_id)["metrics"]
        final = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        tune.report({**final, **_generation_scores(cfg), "adapter_id": adapter_id})


def _generation_scores(cfg: TinyQAConfig) -> dict[str, float]:
    """Generation metrics of a trial's exported adapter on the held-out split, computed in a Ray
    task with the trial's accelerator (a fresh model load, not the one that trained)."""
    import ray

    from tinyqa.data import read_prepared
    from tinyqa.evaluation import evaluate_adapter_dir

    records = read_prepared(cfg.data_dir).questions("eval")[: cfg.eval.max_questions]
    gpus = cfg.train.gpus_per_worker if cfg.train.use_gpu else 0
    # "DEFAULT": outside the trial's placement group, which only reserves the trial driver.
    task = ray.remote(num_cpus=1, num_gpus=gpus, scheduling_strategy="DEFAULT")(
        evaluate_adapter_dir
    )
    adapter_dir = cfg.adapters_dir / cfg.adapter_id
    return ray.get(task.remote(adapter_dir, records, cfg.eval.max_new_tokens, cfg.eval.batch_size))


def trainable(cfg: TinyQAConfig, sweep_id: str = "", steps: Sequence[Any] = ()):
    """The Tune trainable for this sweep: :func:`_run_trial` with the sweep's base config, id
    and step-progress factories bound, and a trial driver's resources (its Train workers reserve
    their own).

    Tune records the trainable's name (``_run_trial``) in the experiment and ``Tuner.restore``
    refuses another one, so renaming that function breaks resuming existing sweeps.
    """
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(
            _run_trial, base=_absolute_paths(cfg), sweep_id=sweep_id, steps=list(steps)
        ),
        {"cpu": 0, "memory": _TRIAL_DRIVER_MEMORY},
    )
