"""Sweeps on Ray Tune: one Ray Train run per trial, ASHA early stopping, the best adapter promoted.

:func:`run_sweep`: validate the sweep (no Ray), check storage, prepare the dataset once, connect,
check that the cluster can hold a trial (:mod:`tinyqa.cluster`), then run (or restore) a ``Tuner``
and write the outputs (:mod:`tinyqa.tune.results`).

Everything lands under ``<storage>/<experiment>/`` (``cfg.run_dir``): ``results.csv``, ``sweep.md``,
``sweep.png`` and ``best.json``; the Tune experiment and the trials' Train runs live in
``<run>/ray/tune/`` so that ``fresh=True`` can remove them together.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from tinyqa import tracking
from tinyqa.cluster import connect, early_stopping_problem, plan_concurrency, trial_resources
from tinyqa.config import TinyQAConfig
from tinyqa.errors import ConfigError
from tinyqa.storage import ray_storage, remove_tree, write_json, write_text
from tinyqa.tune.results import (
    BEST_FILE,
    PLOT_PNG,
    RESULTS_CSV,
    SUMMARY_MD,
    SweepResult,
    collect_results,
)
from tinyqa.tune.space import (
    count_trials,
    expected_iterations,
    grace_problem,
    param_space,
    scheduler_metric,
    sweep_mode,
    validate_sweep,
)
from tinyqa.tune.trial import EXPERIMENT, experiment_dir, trainable, tune_dir

logger = logging.getLogger(__name__)

_FINGERPRINT = "sweep-config.json"  # beside the experiment: the settings it was started with
_SWEEP_ID = "sweep-id.txt"  # beside it: this sweep's id, the prefix of its trials' adapter ids
# Keys that may change between a sweep and its resumption (they do not change what a trial does).
_RESUMABLE_CHANGES = (
    ("storage_path",),
    ("ray_address",),
    ("serve",),
    ("eval",),
    ("tracking",),  # where runs are logged, not what a trial does
    ("tune", "max_concurrent_trials"),
    ("tune", "max_failures"),
    ("train", "max_failures"),
)


def _fingerprint(cfg: TinyQAConfig) -> dict[str, Any]:
    """What identifies a sweep: its settings, plus what the dataset path and model name point
    at (an edited dataset, a rebuilt preset or another model folder is another sweep, never a
    silent resume that would promote adapters trained on the old inputs)."""
    from tinyqa.data import dataset_sha256
    from tinyqa.model import resolve_model_path

    data = cfg.to_dict()
    for path in _RESUMABLE_CHANGES:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    data["dataset_sha256"] = dataset_sha256(cfg.data)
    data["model_path"] = resolve_model_path(cfg.model.name)
    return data


def _sweep_id(cfg: TinyQAConfig, resuming: bool) -> str:
    """A resumed sweep keeps its id (its trials keep their adapter ids); a new one gets a new id.
    Sweeps started before ids existed resume with none."""
    path = tune_dir(cfg) / _SWEEP_ID
    if resuming:
        return path.read_text().strip() if path.is_file() else ""
    sweep_id = f"s{secrets.token_hex(3)}"
    write_text(path, sweep_id + "\n")
    return sweep_id


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
        remove_tree(tune_dir(cfg))
    for name in (RESULTS_CSV, SUMMARY_MD, PLOT_PNG, BEST_FILE):
        (cfg.run_dir / name).unlink(missing_ok=True)


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


def run_sweep(cfg: TinyQAConfig, fresh: bool = False, callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or resume) the sweep and promote the best trial's adapter.

    Re-running the same experiment restores it: finished trials are kept, unfinished ones
    continue, errored ones restart. ``fresh`` removes the previous sweep first. Raises
    :class:`ConfigError` for a bad sweep or one the cluster cannot hold (before any trial starts),
    other :class:`TinyQAError` subclasses for data / storage problems, and :class:`SweepFailed`
    when no trial exported an adapter. ``callbacks``: Tune callbacks (e.g.
    :class:`tinyqa.progress.TuneProgress`); a caller that passes them draws progress itself, so
    Tune's own console reporter is silenced.
    """
    validate_sweep(cfg)

    from ray import tune

    from tinyqa import progress
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
    if problem := grace_problem(cfg, n_train):  # by epochs: known only now
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
    exp_path, exp_fs = ray_storage(exp_dir)
    restored = not fresh and tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs)
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

    if not restored:
        tune_dir(cfg).mkdir(parents=True, exist_ok=True)
    sweep_id = _sweep_id(cfg, restored)
    trial_fn = trainable(cfg, sweep_id, progress.worker_callbacks())
    sweep_run = tracking.start_sweep_run(cfg, exp_dir, restored)  # MLflow: trials nest under it
    if restored:
        logger.info("resuming the sweep in %s (finished trials are kept)", exp_dir)
        tuner = tune.Tuner.restore(
            exp_path,
            trainable=trial_fn,
            resume_unfinished=True,
            restart_errored=True,
            storage_filesystem=exp_fs,
        )
    else:
        tune_dir(cfg).mkdir(parents=True, exist_ok=True)
        write_json(fingerprint_path, fingerprint, sort_keys=True)
        tuner = tune.Tuner(
            trial_fn,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(cfg, expected),
                search_alg=_searcher(cfg, mode, concurrency),
                num_samples=cfg.tune.num_samples,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=ray_storage(tune_dir(cfg))[0],
                storage_filesystem=ray_storage(tune_dir(cfg))[1],
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                callbacks=[*tracking.tune_callbacks(cfg, sweep_run), *callbacks] or None,
                verbose=0 if callbacks else None,
            ),
        )
    started = time.perf_counter()
    try:
        grid = tuner.fit()
        wall = time.perf_counter() - started
        result = collect_results(cfg, grid, wall, concurrency, expected, restored, notes)
    except BaseException:
        tracking.finish_sweep_run(cfg, sweep_run, None)
        raise
    tracking.finish_sweep_run(cfg, sweep_run, result)
    return result
