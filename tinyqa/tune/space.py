"""The sweep's search space and its checks, without Ray: which metrics trials report (and which
way is better), how many trials and Tune iterations a sweep runs, and :func:`validate_sweep`, which
lists every problem of a sweep config at once."""

from __future__ import annotations

import math
from typing import Any

from tinyqa.config import TinyQAConfig
from tinyqa.errors import ConfigError

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
COMPLETION_KEY = "train_seconds"


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


def grace_problem(cfg: TinyQAConfig, n_train: int | None = None) -> str | None:
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
        if t.grace_period >= 1 and (problem := grace_problem(cfg)):
            problems.append(problem)
    if problems:
        raise ConfigError("sweep config: " + "; ".join(problems))


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
