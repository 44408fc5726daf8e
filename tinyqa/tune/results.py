"""A sweep's outputs under ``<run>/``: one row per trial (``results.csv``), the summary and table
(``sweep.md``), the plot (``sweep.png``) and the promoted adapter (``best.json``, which Serve loads
by default), from Tune's ``ResultGrid``."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyqa.adapters import BEST_FILE, read_manifest
from tinyqa.cluster import ray_error_summary
from tinyqa.config import TinyQAConfig
from tinyqa.errors import ModelError, TinyQAError
from tinyqa.storage import write_file, write_json, write_text
from tinyqa.tune.space import COMPLETION_KEY, scheduler_metric, sweep_mode
from tinyqa.tune.trial import experiment_dir, trial_adapter_id

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
SUMMARY_MD = "sweep.md"
PLOT_PNG = "sweep.png"


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


def _trial_rows(cfg: TinyQAConfig, grid, metric: str, mode: str, expected: int | None):
    """One dict per trial plus its metric history (for the learning curves)."""
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
        completed = COMPLETION_KEY in last and result.error is None
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
                "error": ray_error_summary(result.error) if result.error is not None else "",
            }
        )
        if history is not None and metric in history:
            x = "step" if "step" in history else "training_iteration"
            curve = history[[x, metric]].dropna()
            curves[trial_id] = (x, curve[x].tolist(), curve[metric].tolist())
    return rows, curves


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
    return write_file(path, lambda p: fig.savefig(p, format="png", dpi=100))


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
        "best_json": run / BEST_FILE,
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
    write_file(paths["results_csv"], lambda p: df.to_csv(p, index=False))
    _plot(paths["plot_png"], df, curves, metric, best["trial"] if best else None)
    write_text(paths["summary_md"], _summary(cfg, result))
    if best is None:
        errors = [e for e in df.get("error", []) if e]
        detail = f"first error: {errors[0]}" if errors else "every trial was stopped before the end"
        raise SweepFailed(
            f"sweep {cfg.experiment}: no trial exported an adapter ({detail}); see "
            f"{paths['summary_md']}, fix the cause and rerun to resume from {experiment_dir(cfg)}"
        )
    write_json(paths["best_json"], best)
    logger.info(
        "best trial %s: %s = %.4g, adapter %s (%s)",
        best["trial"],
        metric,
        best["value"],
        best["adapter_id"],
        paths["best_json"],
    )
    return result
