"""Sweeps on Ray Tune: one Ray Train run per trial, ASHA early stopping, the best adapter promoted.

- :mod:`tinyqa.tune.space`: the search space, the metrics trials report, counts, validation (no Ray).
- :mod:`tinyqa.tune.trial`: one trial's config, adapter id, and the Tune trainable that runs it.
- :mod:`tinyqa.tune.results`: results.csv, sweep.md, sweep.png and best.json from Tune's results.
- :mod:`tinyqa.tune.sweep`: :func:`run_sweep`, resuming, the scheduler and the searcher.

What the cluster can hold (trial resources, concurrency) is in :mod:`tinyqa.cluster`.
Importing this package imports neither Ray nor pandas; they load when a sweep runs.
"""

from tinyqa.tune.results import (
    BEST_FILE,
    PLOT_PNG,
    RESULTS_CSV,
    SUMMARY_MD,
    SweepFailed,
    SweepResult,
    collect_results,
    format_table,
)
from tinyqa.tune.space import (
    CHECKPOINT_METRICS,
    FINAL_METRICS,
    GENERATION_METRICS,
    count_trials,
    expected_iterations,
    expected_steps,
    known_metrics,
    param_space,
    scheduler_metric,
    sweep_mode,
    validate_sweep,
)
from tinyqa.tune.sweep import run_sweep
from tinyqa.tune.trial import experiment_dir, trial_adapter_id, trial_config, tune_dir

__all__ = [
    "BEST_FILE",
    "CHECKPOINT_METRICS",
    "FINAL_METRICS",
    "GENERATION_METRICS",
    "PLOT_PNG",
    "RESULTS_CSV",
    "SUMMARY_MD",
    "SweepFailed",
    "SweepResult",
    "collect_results",
    "count_trials",
    "expected_iterations",
    "expected_steps",
    "experiment_dir",
    "format_table",
    "known_metrics",
    "param_space",
    "run_sweep",
    "scheduler_metric",
    "sweep_mode",
    "trial_adapter_id",
    "trial_config",
    "tune_dir",
    "validate_sweep",
]
