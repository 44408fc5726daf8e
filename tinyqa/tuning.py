"""Sweeps on Ray Tune: one Ray Train run per trial, ASHA early stopping, the best adapter promoted.

Driver side, :func:`run_sweep`: validate the sweep (:func:`validate_sweep`, no Ray), check storage,
prepare the dataset once, connect, check that the cluster can hold a trial, then run (or restore) a
``Tuner``. Each trial is a function that builds and fits a ``TorchTrainer`` (Train V2 rejects
``Tuner(trainer)``); its metrics reach Tune through ``TuneReportCallback`` in the Train run's
callbacks, one Tune iteration per checkpoint plus a final report after the adapter is exported.

Everything lands under ``<storage>/<experiment>/`` (``cfg.run_dir``): ``results.csv``, ``sweep.md``,
``sweep.png`` and ``best.json`` (the adapter Serve loads by default); the Tune experiment and the
trials' Train runs live in ``<run>/ray/tune/`` so that ``fresh=True`` can remove them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyqa.config import TinyQAConfig, build_config
from tinyqa.errors import ConfigError, TinyQAError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

EXPERIMENT = "sweep"  # the Tune experiment's folder name under <run>/ray/tune/
RESULTS_CSV = "results.csv"
SUMMARY_MD = "sweep.md"
PLOT_PNG = "sweep.png"
BEST_JSON = "best.json"
_FINGERPRINT = "sweep-config.json"
_TRIAL_RUNS = "trials"

# Metrics a trial reports at every checkpoint (Hugging Face's log history, aggregated by Ray's
# RayTrainReportCallback), with the direction that is better; None = no natural direction, so
# tune.mode must be given.
CHECKPOINT_METRICS: dict[str, str | None] = {
    "eval_loss": "min",
    "eval_mean_token_accuracy": "max",
    "eval_entropy": None,
    "loss": "min",
    "mean_token_accuracy": "max",
    "entropy": None,
    "grad_norm": None,
}
# Metrics reported once, by the final report that follows the adapter export.
FINAL_METRICS: dict[str, str | None] = {
    "train_loss": "min",
    "tokens_per_second": "max",
    "train_seconds": "min",
}
# Generation metrics (tinyqa.evaluation), computed on the held-out split after a trial's
# training ends, on a freshly loaded model (a 4-bit base must not generate before it trains).
GENERATION_METRICS: dict[str, str | None] = {
    "keyword_recall": "max",
    "exact_match": "max",
    "token_f1": "max",
    "rougeL": "max",
    "bleu": "max",
}
# Only the final report carries this key: a trial whose last result has it ran to the end.
_COMPLETION_KEY = "train_seconds"
# A trial driver only waits on its Train run; Tune cannot place a bundle that asks for nothing.
_TRIAL_DRIVER_MEMORY = 256 * 1024**2
# Keys that may change between a sweep and its resumption (they do not change what a trial does).
_RESUMABLE_CHANGES = (
    ("storage_path",),
    ("ray_address",),
    ("serve",),
    ("eval",),
    ("tune", "max_concurrent_trials"),
    ("tune", "max_failures"),
    ("train", "max_failures"),
)

# Output files get the usual permissions (tempfile.mkstemp alone would make them 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class SweepFailed(TinyQAError):
    """No trial of the sweep produced an adapter; the message names the first error."""


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the best.json content, one row per trial, and the figures."""

    best: dict[str, Any]
    results: pd.DataFrame
    paths: dict[str, Path]
    wall_seconds: float
    metric: str = "eval_loss"
    mode: str = "min"
    concurrency: int = 1
    expected_iterations: int | None = None
    iterations_run: int = 0
    iterations_full: int | None = None
    trial_seconds: float = 0.0
    restored: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def iterations_saved(self) -> int | None:
        """Trial-iterations early stopping saved against running every trial to the end."""
        return None if self.iterations_full is None else self.iterations_full - self.iterations_run

    @property
    def parallel_efficiency(self) -> float | None:
        """Sum of trial times / (wall time x concurrency): 1.0 = every slot busy all the time.
        None after a resume, whose trial times include trials run before it."""
        if self.restored or self.wall_seconds <= 0 or self.concurrency < 1:
            return None
        return self.trial_seconds / (self.wall_seconds * self.concurrency)


# ----------------------------------------------------------------------------------------------
# Validation and planning (no Ray)
# ----------------------------------------------------------------------------------------------


def known_metrics() -> dict[str, str | None]:
    """Every metric a trial reports, with its better direction (None = give tune.mode)."""
    return {**CHECKPOINT_METRICS, **FINAL_METRICS, **GENERATION_METRICS}


def sweep_mode(cfg: TinyQAConfig) -> str:
    """``tune.mode``, or the metric's natural direction."""
    mode = cfg.tune.mode or known_metrics().get(cfg.tune.metric)
    if mode not in ("min", "max"):
        raise ConfigError(
            f"tune.metric {cfg.tune.metric!r} has no natural direction; set tune.mode=min or max"
        )
    return mode


def scheduler_metric(cfg: TinyQAConfig) -> tuple[str, str]:
    """The metric and mode ASHA judges trials by: the selection metric when every checkpoint
    carries it, else eval loss (a final-only metric cannot rank trials mid-training)."""
    if cfg.tune.metric in CHECKPOINT_METRICS:
        return cfg.tune.metric, sweep_mode(cfg)
    return "eval_loss", "min"


def expected_steps(cfg: TinyQAConfig, n_train: int | None = None) -> int | None:
    """Optimizer steps per trial: ``train.max_steps``, or an upper bound from the number of
    training records (packing only ever makes fewer batches). None when neither is known."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    if n_train is None:
        return None
    batches = math.ceil(math.ceil(n_train / t.num_workers) / t.batch_size)
    per_epoch = max(1, math.ceil(batches / t.gradient_accumulation_steps))
    return max(1, math.ceil(t.epochs * per_epoch))


def expected_iterations(cfg: TinyQAConfig, n_train: int | None = None) -> int | None:
    """Tune iterations a trial that runs to the end reports: one per checkpoint (Hugging Face
    also saves at the last step) plus the final report."""
    steps = expected_steps(cfg, n_train)
    if steps is None:
        return None
    return math.ceil(steps / cfg.train.save_steps) + 1


def _grace_problem(cfg: TinyQAConfig, n_train: int | None = None) -> str | None:
    """Why ASHA could never stop a trial early with this grace period, or None.

    Stopping at a trial's last checkpoint saves nothing but its export, so the grace period must
    leave at least one checkpoint after it.
    """
    iters = expected_iterations(cfg, n_train)
    if cfg.tune.scheduler != "asha" or iters is None:
        return None
    checkpoints = iters - 1
    if cfg.tune.grace_period < checkpoints:
        return None
    steps = expected_steps(cfg, n_train)
    return (
        f"tune.grace_period ({cfg.tune.grace_period}) must be below the {checkpoints} checkpoints "
        f"a trial reports ({steps} steps / train.save_steps={cfg.train.save_steps}), or ASHA can "
        "never stop a trial early; lower it, checkpoint more often, or set tune.scheduler=none"
    )


def _grid_sizes(cfg: TinyQAConfig) -> list[int]:
    s = cfg.tune.search
    sizes = [len(s.r)]
    if not s.lr_log_uniform:
        sizes.append(len(s.lr))
    sizes += [len(v) for v in (s.alpha_ratio, s.dropout) if v]
    return sizes


def count_trials(cfg: TinyQAConfig) -> int:
    """How many trials the sweep runs: grid points x num_samples, or num_samples."""
    if cfg.tune.searcher == "grid":
        return math.prod(_grid_sizes(cfg)) * cfg.tune.num_samples
    return cfg.tune.num_samples


def validate_sweep(cfg: TinyQAConfig) -> None:
    """Check the sweep settings without Ray; raise one :class:`ConfigError` listing every problem."""
    t, s = cfg.tune, cfg.tune.search
    problems: list[str] = []

    if not s.r:
        problems.append(
            "tune.search.r is empty; give at least one LoRA rank, e.g. tune.search.r=[8,16]"
        )
    bad = [r for r in s.r if r <= 0]
    if bad:
        problems.append(f"tune.search.r has ranks <= 0 ({bad}); LoRA ranks are positive integers")
    big = [r for r in s.r if r > t.max_rank]
    if big:
        problems.append(
            f"tune.search.r has ranks above tune.max_rank={t.max_rank} ({big}); Serve refuses such "
            "adapters: lower the ranks or raise tune.max_rank"
        )
    if len(set(s.r)) != len(s.r):
        problems.append(f"tune.search.r has duplicates ({s.r}); list each rank once")

    if not s.lr:
        problems.append(
            "tune.search.lr is empty; give learning rates, e.g. tune.search.lr=[1.0e-4,1.0e-3]"
        )
    elif any(lr <= 0 for lr in s.lr):
        problems.append(f"tune.search.lr has values <= 0 ({s.lr}); learning rates are positive")
    elif s.lr_log_uniform:
        if len(s.lr) != 2:
            problems.append(
                f"tune.search.lr must be [low, high] with tune.search.lr_log_uniform=true, got {s.lr}"
            )
        elif s.lr[0] >= s.lr[1]:
            problems.append(
                f"tune.search.lr range [{s.lr[0]:g}, {s.lr[1]:g}] is reversed or empty; "
                "write [low, high] with low < high"
            )
    elif len(set(s.lr)) != len(s.lr):
        problems.append(f"tune.search.lr has duplicates ({s.lr}); list each learning rate once")

    if s.alpha_ratio is not None:
        if not s.alpha_ratio:
            problems.append(
                "tune.search.alpha_ratio is empty; remove it or give ratios, e.g. [1.0,2.0]"
            )
        elif any(a <= 0 for a in s.alpha_ratio):
            problems.append(f"tune.search.alpha_ratio has values <= 0 ({s.alpha_ratio}); use > 0")
    if s.dropout is not None:
        if not s.dropout:
            problems.append(
                "tune.search.dropout is empty; remove it or give values, e.g. [0.0,0.1]"
            )
        elif any(not 0.0 <= d < 1.0 for d in s.dropout):
            problems.append(f"tune.search.dropout has values outside [0, 1) ({s.dropout})")

    if t.num_samples < 1:
        problems.append(f"tune.num_samples must be >= 1, got {t.num_samples}")
    if t.searcher not in ("grid", "random", "optuna"):
        problems.append(f"tune.searcher {t.searcher!r} is unknown; use grid, random or optuna")
    if t.scheduler not in ("asha", "none"):
        problems.append(f"tune.scheduler {t.scheduler!r} is unknown; use asha or none")

    metrics = known_metrics()
    if t.metric not in metrics:
        problems.append(
            f"tune.metric {t.metric!r} is not reported by trials; use one of {', '.join(metrics)}"
        )
    else:
        if t.mode is None and metrics[t.metric] is None:
            problems.append(
                f"tune.metric {t.metric!r} has no natural direction; set tune.mode=min or max"
            )
        if t.searcher == "optuna" and t.metric not in CHECKPOINT_METRICS:
            problems.append(
                f"tune.searcher=optuna needs a metric reported at every checkpoint, and {t.metric!r} "
                f"is reported only at the end; use one of {', '.join(CHECKPOINT_METRICS)}"
            )

    if t.scheduler == "asha":
        if t.grace_period < 1:
            problems.append(f"tune.grace_period must be >= 1, got {t.grace_period}")
        if t.reduction_factor <= 1:
            problems.append(f"tune.reduction_factor must be > 1, got {t.reduction_factor}")
        if t.grace_period >= 1 and (problem := _grace_problem(cfg)):
            problems.append(problem)
    if problems:
        raise ConfigError("sweep config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------


def trial_adapter_id(params: dict[str, Any], trial_id: str) -> str:
    """Deterministic, unique adapter name, e.g. ``trial-03-r8-lr3.0e-04``.

    The index is the trial counter Tune puts at the end of its ids (``ab12c_00003``); a searcher
    without one (Optuna) gets its 8-character trial id. Both survive a restore.
    """
    tail = trial_id.rsplit("_", 1)[-1]
    index = f"{int(tail):02d}" if tail.isdigit() else tail[:8]
    name = f"trial-{index}-r{int(params['r'])}-lr{float(params['lr']):.1e}"
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


def _trial_runs_dir(cfg: TinyQAConfig) -> Path:
    return tune_dir(cfg) / _TRIAL_RUNS


def tune_dir(cfg: TinyQAConfig) -> Path:
    """``<run>/ray/tune``: the Tune experiment plus its trials' Train runs."""
    return cfg.ray_storage / "tune"


def experiment_dir(cfg: TinyQAConfig) -> Path:
    return tune_dir(cfg) / EXPERIMENT


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


def _run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune trainable: one Ray Train run with this trial's hyper-parameters.

    A crash propagates so Tune retries the trial (FailureConfig); the retry's Train run has the
    same name, so it resumes from the trial's last checkpoint instead of starting over.
    """
    from ray import tune

    from tinyqa.training import build_trainer

    params = {k: config[k] for k in ("r", "lr", "alpha_ratio", "dropout") if k in config}
    adapter_id = trial_adapter_id(params, tune.get_context().get_trial_id())
    cfg = trial_config(base, params, adapter_id)
    first = list(dict.fromkeys([cfg.tune.metric, "eval_loss", "loss", "step"]))
    callback = _report_callback()(adapter_id, first)
    trainer = build_trainer(
        cfg,
        name=f"{adapter_id}-{_params_digest(params)}",
        callbacks=[callback],
        storage_path=_trial_runs_dir(cfg),
    )
    trainer.fit()
    if cfg.tune.metric in GENERATION_METRICS:
        from tinyqa.model import read_manifest

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


def _absolute_paths(cfg: TinyQAConfig) -> dict[str, Any]:
    """The config as a dict with its local paths made absolute: Tune runs trials in their own
    folders, where a relative storage path or model folder would point elsewhere."""
    data = cfg.to_dict()
    data["storage_path"] = str(Path(cfg.storage_path).expanduser().resolve())
    if cfg.data.path:
        data["data"]["path"] = str(Path(cfg.data.path).expanduser().resolve())
    model = Path(cfg.model.name).expanduser()
    if cfg.model.name.startswith((".", "/", "~")) or (model / "config.json").is_file():
        data["model"]["name"] = str(model.resolve())
    return data


def param_space(cfg: TinyQAConfig) -> dict[str, Any]:
    """Tune search space: grid axes for 'grid', choices for 'random' / 'optuna'; lr log-uniform
    when ``tune.search.lr_log_uniform``."""
    from ray import tune

    s = cfg.tune.search
    axis = tune.grid_search if cfg.tune.searcher == "grid" else tune.choice
    space: dict[str, Any] = {"r": axis(list(s.r))}
    space["lr"] = tune.loguniform(s.lr[0], s.lr[1]) if s.lr_log_uniform else axis(list(s.lr))
    if s.alpha_ratio:
        space["alpha_ratio"] = axis(list(s.alpha_ratio))
    if s.dropout:
        space["dropout"] = axis(list(s.dropout))
    return space


# ----------------------------------------------------------------------------------------------
# Cluster checks (after connecting)
# ----------------------------------------------------------------------------------------------


def trial_resources(cfg: TinyQAConfig) -> dict[str, float]:
    """What one trial's Train workers reserve in total (its driver reserves no CPU or GPU)."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = t.num_workers * t.gpus_per_worker
    return need


def _autoscaler_capacity() -> tuple[dict[str, float], dict[str, float]] | None:
    """(total, largest node) resources an autoscaling cluster can grow to, or None."""
    import yaml

    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: any failure means "unknown", and we fall back
        config = None
    groups: list[tuple[dict[str, float], int]] = []
    if config is not None and config.node_group_configs:
        groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs]
    else:
        # Clusters from `ray up` keep their launcher config on the head, where jobs run.
        path = Path("~/ray_bootstrap_config.yaml").expanduser()
        if not path.is_file():
            return None
        try:
            launcher = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        head = launcher.get("head_node_type")
        for name, spec in (launcher.get("available_node_types") or {}).items():
            count = 1 if name == head else int(spec.get("max_workers", 0))
            groups.append(({k: float(v) for k, v in (spec.get("resources") or {}).items()}, count))
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for resources, count in groups:
        for key, value in resources.items():
            total[key] = total.get(key, 0.0) + value * (count if count >= 0 else 1e9)
            largest[key] = max(largest.get(key, 0.0), value)
    return (total, largest) if groups else None


def plan_concurrency(cfg: TinyQAConfig, n_trials: int) -> int:
    """Check the cluster can hold one trial and decide how many run at once.

    ``tune.max_concurrent_trials`` wins; else the free GPUs (or CPUs on a CPU cluster) divided by
    one trial's needs, at most the number of trials. On an autoscaling cluster the capacity it can
    grow to counts as free. Raises :class:`ConfigError` when a trial can never be placed.
    """
    import ray

    t = cfg.train
    need = trial_resources(cfg)
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    scaling = _autoscaler_capacity()
    if scaling is not None:
        total, largest = scaling
        free = dict(total)
        where = "the cluster can scale to"
    else:
        total = dict(ray.cluster_resources())
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in per_worker}
        free = dict(ray.available_resources())
        where = "the cluster has"
    problems = []
    for key, amount in need.items():
        have = total.get(key, 0.0)
        if amount > have:
            problems.append(
                f"a trial needs {amount:g} {key} (train.num_workers={t.num_workers} x "
                f"{per_worker[key]:g}) but {where} {have:g}"
            )
        elif per_worker[key] > largest.get(key, 0.0):
            problems.append(
                f"one Train worker needs {per_worker[key]:g} {key} but the largest node has "
                f"{largest.get(key, 0.0):g}"
            )
    if problems:
        hint = (
            "lower train.num_workers / train.gpus_per_worker, set train.use_gpu=false, or use a "
            "bigger cluster"
        )
        raise ConfigError("sweep: " + "; ".join(problems) + f"; {hint}")
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    key = "GPU" if "GPU" in need else "CPU"
    fits = int(free.get(key, 0.0) // need[key]) if need[key] > 0 else n_trials
    if fits < 1:
        logger.info("no free %s for a trial right now; trials will queue, one at a time", key)
    return max(1, min(fits, n_trials))


def _state_api_probe() -> str | None:
    """Runs on the head node like Ray Train's placement-group cleaner: None if the state API
    answers there, else the reason it does not."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10)
    except Exception as e:  # any failure means the cleaner would fail the same way
        return _first_line(e)
    return None


def early_stopping_problem() -> str | None:
    """Why stopping trials early would leak their Train workers here, or None if it is safe.

    A stopped trial's Train controller dies without releasing its workers' placement group;
    Ray Train's cleaner actor frees it, but only through the Ray state API (the dashboard), which
    it reaches without an address: that fails when the dashboard is off, or when several Ray
    clusters run on one machine and ``RAY_ADDRESS`` is not set for the cluster's processes.
    Leaked CPUs / GPUs then stall the rest of the sweep.
    """
    import ray

    probe = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_state_api_probe)
    try:
        return ray.get(probe.remote(), timeout=60)
    except Exception as e:  # a probe that cannot even run says the same
        return _first_line(e)


# ----------------------------------------------------------------------------------------------
# Resume bookkeeping
# ----------------------------------------------------------------------------------------------


def _fingerprint(cfg: TinyQAConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    for path in _RESUMABLE_CHANGES:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return data


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _remove_outputs(cfg: TinyQAConfig) -> None:
    """Start over: the Tune experiment, its trials' Train runs and the previous sweep's outputs."""
    if tune_dir(cfg).exists():
        logger.info("fresh sweep: removing %s", tune_dir(cfg))
        shutil.rmtree(tune_dir(cfg))
    for name in (RESULTS_CSV, SUMMARY_MD, PLOT_PNG, BEST_JSON):
        (cfg.run_dir / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def _trial_rows(cfg: TinyQAConfig, grid, metric: str, mode: str, expected: int | None):
    """One dict per trial plus its metric history (for the learning curves)."""
    from tinyqa.errors import ModelError
    from tinyqa.model import read_manifest

    rows, curves = [], {}
    for result in grid:
        last = dict(result.metrics or {})
        trial_dir = Path(result.path)
        params = result.config
        if not params and (trial_dir / "params.json").is_file():
            params = json.loads((trial_dir / "params.json").read_text())
        params = params or {}
        trial_id = last.get("trial_id") or trial_dir.name
        adapter_id = last.get("adapter_id")
        if not adapter_id and "r" in params and "lr" in params:
            adapter_id = trial_adapter_id(params, trial_id)
        history = result.metrics_dataframe
        best = None
        if history is not None and metric in history:
            series = history[metric].dropna()
            if len(series):
                best = float(series.min() if mode == "min" else series.max())
        completed = _COMPLETION_KEY in last and result.error is None
        exported = False
        if completed and adapter_id:
            try:
                read_manifest(cfg.adapters_dir / adapter_id)
                exported = True
            except ModelError:
                logger.warning("trial %s finished but its adapter folder is unusable", trial_id)
        status = "error" if result.error is not None else ("completed" if completed else "stopped")
        r = params.get("r")
        ratio = params.get("alpha_ratio", cfg.lora.alpha / cfg.lora.r)
        value = last.get(metric)
        rows.append(
            {
                "trial": trial_id,
                "r": r,
                "lr": params.get("lr"),
                "alpha": max(1, round(ratio * r)) if r is not None else None,
                "dropout": params.get("dropout", cfg.lora.dropout),
                metric: float(value) if isinstance(value, (int, float)) else math.nan,
                f"best_{metric}": best if best is not None else math.nan,
                "iterations": int(last.get("training_iteration", 0) or 0),
                "stopped_early": status == "stopped",
                "status": status,
                "wall_s": round(float(last.get("time_total_s", 0.0) or 0.0), 2),
                "adapter_id": adapter_id if exported else "",
                "error": _first_line(result.error) if result.error is not None else "",
            }
        )
        if history is not None and metric in history:
            x = "step" if "step" in history else "training_iteration"
            curve = history[[x, metric]].dropna()
            curves[trial_id] = (x, curve[x].tolist(), curve[metric].tolist())
    return rows, curves


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _pick_best(df: pd.DataFrame, metric: str, mode: str) -> tuple[dict[str, Any] | None, list[str]]:
    notes: list[str] = []
    ranked = df.dropna(subset=[metric]).sort_values(metric, ascending=mode == "min")
    with_adapter = ranked[ranked["adapter_id"] != ""]
    if with_adapter.empty:
        return None, notes
    best = with_adapter.iloc[0]
    top = ranked.iloc[0]
    if top["trial"] != best["trial"]:
        note = (
            f"trial {top['trial']} has the best {metric} ({top[metric]:.4g}) but no exported "
            f"adapter ({top['status']}); promoting {best['adapter_id']} ({best[metric]:.4g})"
        )
        logger.info(note)
        notes.append(note)
    return {
        "adapter_id": str(best["adapter_id"]),
        "metric": metric,
        "value": float(best[metric]),
        "trial": str(best["trial"]),
    }, notes


def _plot(path: Path, df: pd.DataFrame, curves: dict, metric: str, best_trial: str | None) -> Path:
    """Left: final metric against learning rate, one series per rank. Right: learning curves."""
    import matplotlib
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on the Agg canvas, not pyplot: no global backend switch, no GUI, thread-safe.
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    palette = matplotlib.colormaps["tab10"]
    ranks = sorted(df["r"].dropna().unique())
    colors = {r: palette(i % 10) for i, r in enumerate(ranks)}
    for r in ranks:
        part = df[df["r"] == r].dropna(subset=[metric]).sort_values("lr")
        if part.empty:
            continue
        ax1.plot(part["lr"], part[metric], "-", color=colors[r], alpha=0.6, label=f"r={int(r)}")
        done = part[part["status"] == "completed"]
        early = part[part["status"] != "completed"]
        ax1.scatter(done["lr"], done[metric], color=colors[r], zorder=3)
        ax1.scatter(early["lr"], early[metric], facecolors="none", edgecolors=[colors[r]], zorder=3)
    if best_trial is not None:
        row = df[df["trial"] == best_trial].iloc[0]
        ax1.scatter(
            [row["lr"]], [row[metric]], marker="*", s=250, color="crimson", zorder=4, label="best"
        )
    ax1.set_xscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel(f"final {metric}")
    ax1.set_title(f"{metric} vs learning rate (hollow = stopped early)")
    ax1.grid(alpha=0.3)
    if ranks:
        ax1.legend()
    x_label = "Tune iteration"
    for i, (_, row) in enumerate(df.iterrows()):
        if row["trial"] not in curves or pd.isna(row["r"]):
            continue
        x_name, xs, ys = curves[row["trial"]]
        x_label = "step" if x_name == "step" else x_label
        ax2.plot(
            xs,
            ys,
            "-" if row["status"] == "completed" else "--",
            marker=".",
            color=palette(i % 10),
            label=f"r={int(row['r'])} lr={row['lr']:.1e}",
        )
    ax2.set_xlabel(x_label)
    ax2.set_ylabel(metric)
    ax2.set_title("learning curves (dashed = stopped early)")
    ax2.grid(alpha=0.3)
    if curves:
        ax2.legend(fontsize="small")
    fig.tight_layout()
    return _write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))


_TABLE_COLUMNS = (
    "trial",
    "r",
    "lr",
    "alpha",
    "dropout",
    "iterations",
    "status",
    "wall_s",
    "adapter_id",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def format_table(result: SweepResult) -> str:
    """The trials as a markdown table, best metric first, the promoted trial marked ``*``."""
    df = result.results
    metric = result.metric
    columns = [*_TABLE_COLUMNS[:5], metric, f"best_{metric}", *_TABLE_COLUMNS[5:]]
    ranked = df.sort_values(metric, ascending=result.mode == "min", na_position="last")
    best_trial = result.best.get("trial") if result.best else None
    lines = [
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for _, row in ranked.iterrows():
        mark = "*" if row["trial"] == best_trial else ""
        lines.append(f"| {mark} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _summary(cfg: TinyQAConfig, result: SweepResult) -> str:
    t, s = cfg.tune, cfg.tune.search
    lr = f"log-uniform [{s.lr[0]:g}, {s.lr[1]:g}]" if s.lr_log_uniform else str(s.lr)
    sched = (
        f"ASHA (grace period {t.grace_period}, reduction factor {t.reduction_factor:g}, "
        f"on {scheduler_metric(cfg)[0]})"
        if t.scheduler == "asha"
        else "none"
    )
    eff = result.parallel_efficiency
    lines = [
        f"# Sweep `{cfg.experiment}`",
        "",
        f"- searcher: {t.searcher}, trials: {len(result.results)}, concurrency: {result.concurrency}",
        f"- search space: r {s.r}, lr {lr}"
        + (f", alpha/r {s.alpha_ratio}" if s.alpha_ratio else "")
        + (f", dropout {s.dropout}" if s.dropout else ""),
        f"- scheduler: {sched}",
        f"- selection: {result.metric} ({result.mode})",
        f"- wall time: {result.wall_seconds:.1f} s" + (" (resumed)" if result.restored else ""),
    ]
    if result.iterations_full is not None:
        saved = result.iterations_saved or 0
        lines.append(
            f"- trial-iterations: {result.iterations_run} run of {result.iterations_full} for the "
            f"full grid ({saved} saved, {100 * saved / max(1, result.iterations_full):.0f} %)"
        )
    if eff is not None:
        lines.append(
            f"- parallel efficiency: {eff:.2f} (sum of trial times {result.trial_seconds:.1f} s / "
            f"(wall x concurrency))"
        )
    if result.best:
        b = result.best
        lines.append(
            f"- best: adapter `{b['adapter_id']}` ({b['metric']} = {b['value']:.4g}, trial {b['trial']})"
        )
    lines += [f"- note: {n}" for n in result.notes]
    lines += ["", "## Trials", "", format_table(result), "", f"![sweep]({PLOT_PNG})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _scheduler(cfg: TinyQAConfig, expected: int | None):
    """ASHA on Tune iterations (one per checkpoint). Its rungs stop at the second-to-last
    checkpoint: a stop at the last one, or at the final report, would only lose the export.
    Trials past the top rung are left to finish (``stop_last_trials=False``)."""
    from ray.tune.schedulers import ASHAScheduler

    if cfg.tune.scheduler != "asha":
        return None
    metric, mode = scheduler_metric(cfg)
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        max_t=max(cfg.tune.grace_period, expected - 2) if expected else 10_000,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,
    )


def _searcher(cfg: TinyQAConfig, mode: str, concurrency: int):
    """The search algorithm, limited to ``concurrency`` running trials. (Tune applies
    TuneConfig.max_concurrent_trials to a Searcher only; the grid / random generator takes it.)"""
    if cfg.tune.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=cfg.tune.metric, mode=mode, seed=cfg.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed)


def run_sweep(cfg: TinyQAConfig, fresh: bool = False) -> SweepResult:
    """Run (or resume) the sweep and promote the best trial's adapter.

    Re-running the same experiment restores it: finished trials are kept, unfinished ones
    continue, errored ones restart. ``fresh`` removes the previous sweep first. Raises
    :class:`ConfigError` for a bad sweep or one the cluster cannot hold (before any trial starts),
    other :class:`TinyQAError` subclasses for data / storage problems, and :class:`SweepFailed`
    when no trial exported an adapter.
    """
    validate_sweep(cfg)

    from ray import tune

    from tinyqa.cluster import connect
    from tinyqa.data import prepare_dataset
    from tinyqa.training import check_storage

    mode = sweep_mode(cfg)
    check_storage(cfg)
    exp_dir = experiment_dir(cfg)
    fingerprint = _fingerprint(cfg)
    fingerprint_path = tune_dir(cfg) / _FINGERPRINT
    if fresh:
        _remove_outputs(cfg)
    elif fingerprint_path.is_file():
        changed = _diff_keys(json.loads(fingerprint_path.read_text()), fingerprint)
        if changed:
            raise ConfigError(
                f"experiment {cfg.experiment!r} already has a sweep with different settings "
                f"({', '.join(changed[:8])}); rerun with --fresh to start over, or choose another "
                "experiment name"
            )

    prepared = prepare_dataset(cfg)  # dataset errors surface here, before any Ray work
    n_train = len(prepared.train)
    expected = expected_iterations(cfg, n_train)
    if problem := _grace_problem(cfg, n_train):  # by epochs: known only now
        raise ConfigError(f"sweep config: {problem}")
    n_trials = count_trials(cfg)
    if (
        cfg.tune.searcher == "grid"
        and cfg.tune.num_samples > 1
        and not cfg.tune.search.lr_log_uniform
    ):
        logger.warning("tune.num_samples=%d repeats every grid point", cfg.tune.num_samples)

    connect(cfg)
    concurrency = plan_concurrency(cfg, n_trials)
    restored = not fresh and tune.Tuner.can_restore(str(exp_dir))
    notes: list[str] = []
    if cfg.tune.scheduler == "asha" and (problem := early_stopping_problem()) is not None:
        note = (
            "the Ray state API is unreachable from the cluster "
            f"({problem}), so trials stopped early could not release their workers; start Ray "
            "with the dashboard (`ray start --head`) and RAY_ADDRESS set for its processes, or "
            "set tune.scheduler=none"
        )
        if restored:
            logger.warning("resuming a sweep with ASHA, but %s", note)
        else:
            note = "ASHA early stopping is off: " + note
            logger.warning(note)
            notes.append(note)
            cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"scheduler": "none"})})
    logger.info(
        "sweep %s: %d trials (%s), %d at a time, each %s; metric %s (%s); Tune experiment %s",
        cfg.experiment,
        n_trials,
        cfg.tune.searcher,
        concurrency,
        trial_resources(cfg),
        cfg.tune.metric,
        mode,
        exp_dir,
    )

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=_absolute_paths(cfg)),
        {"cpu": 0, "memory": _TRIAL_DRIVER_MEMORY},
    )
    if restored:
        logger.info("resuming the sweep in %s (finished trials are kept)", exp_dir)
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable=trainable, resume_unfinished=True, restart_errored=True
        )
    else:
        tune_dir(cfg).mkdir(parents=True, exist_ok=True)
        _write_text(fingerprint_path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(cfg, expected),
                search_alg=_searcher(cfg, mode, concurrency),
                num_samples=cfg.tune.num_samples,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(tune_dir(cfg)),
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            ),
        )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    return collect_results(cfg, grid, wall, concurrency, expected, restored, notes)


def collect_results(
    cfg: TinyQAConfig,
    grid,
    wall_seconds: float,
    concurrency: int,
    expected: int | None,
    restored: bool = False,
    notes: list[str] | None = None,
) -> SweepResult:
    """Turn Tune's ``ResultGrid`` into results.csv, sweep.md, sweep.png and best.json."""
    import pandas as pd

    metric, mode = cfg.tune.metric, sweep_mode(cfg)
    rows, curves = _trial_rows(cfg, grid, metric, mode, expected)
    df = pd.DataFrame(rows)
    best, best_notes = _pick_best(df, metric, mode)
    notes = [*(notes or []), *best_notes]
    run = cfg.run_dir
    paths = {
        "results_csv": run / RESULTS_CSV,
        "summary_md": run / SUMMARY_MD,
        "plot_png": run / PLOT_PNG,
        "best_json": run / BEST_JSON,
    }
    iterations_run = int(df["iterations"].sum()) if len(df) else 0
    result = SweepResult(
        best=best or {},
        results=df,
        paths=paths,
        wall_seconds=wall_seconds,
        metric=metric,
        mode=mode,
        concurrency=concurrency,
        expected_iterations=expected,
        iterations_run=iterations_run,
        iterations_full=expected * len(df) if expected is not None else None,
        trial_seconds=float(df["wall_s"].sum()) if len(df) else 0.0,
        restored=restored,
        notes=notes,
    )
    _write_atomic(paths["results_csv"], lambda p: df.to_csv(p, index=False))
    _plot(paths["plot_png"], df, curves, metric, best["trial"] if best else None)
    _write_text(paths["summary_md"], _summary(cfg, result))
    if best is None:
        errors = [e for e in df.get("error", []) if e]
        detail = f"first error: {errors[0]}" if errors else "every trial was stopped before the end"
        raise SweepFailed(
            f"sweep {cfg.experiment}: no trial exported an adapter ({detail}); see "
            f"{paths['summary_md']}, fix the cause and rerun to resume from {experiment_dir(cfg)}"
        )
    _write_text(paths["best_json"], json.dumps(best, indent=2) + "\n")
    logger.info(
        "best trial %s: %s = %.4g, adapter %s (%s)",
        best["trial"],
        metric,
        best["value"],
        best["adapter_id"],
        paths["best_json"],
    )
    return result


__all__ = [
    "SweepFailed",
    "SweepResult",
    "count_trials",
    "expected_iterations",
    "format_table",
    "known_metrics",
    "run_sweep",
    "validate_sweep",
]
