"""Sweep benchmark: parallel efficiency of trials on Ray Tune, and what ASHA saves.

One :func:`tinyqa.tune.run_sweep` (fresh, in its own process and its own local Ray unless a
cluster is configured) under a scratch experiment. Reported:

- parallel efficiency = sum of trial times / (sweep wall × concurrent trials), and the speedup
  over running the trials one after another (sum of trial times / wall);
- trial-iterations run with ASHA vs the full grid (every trial to its last report).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import new_result, ratio, run_arm
from tinyqa.config import TinyQAConfig, build_config

logger = logging.getLogger(__name__)

# A two-trial sweep of a few steps: exercises every field, measures nothing.
QUICK_OVERRIDES = {
    "train": {
        "max_steps": 4,
        "eval_steps": 2,
        "save_steps": 2,
        "num_workers": 1,
        "cpus_per_worker": 1.0,
        "use_gpu": False,
    },
    "tune": {
        "search": {
            "r": [4],
            "lr": [1.0e-3, 3.0e-3],
            "lr_log_uniform": False,
            "alpha_ratio": None,
            "dropout": None,
        },
        "searcher": "grid",
        "num_samples": 1,
        "scheduler": "asha",
        "grace_period": 1,
        "max_concurrent_trials": 2,
    },
}
_TRIAL_COLUMNS = ("trial", "r", "lr", "iterations", "status", "wall_s")


def measure_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the sweep in this process (spec: name, config, threads) and return its figures."""
    import ray

    from tinyqa.cluster import start_private
    from tinyqa.tune import count_trials, run_sweep

    cfg = build_config(spec["config"], "bench sweep config")
    started = time.perf_counter()
    # A private local Ray: never join a cluster another session started on this machine.
    own = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if own:
        start_private(int(spec["threads"]))
    try:
        res = run_sweep(cfg, fresh=True)
    finally:
        if own:
            ray.shutdown()
    df = res.results
    trials = [
        {
            k: (row[k].item() if hasattr(row[k], "item") else row[k])
            for k in _TRIAL_COLUMNS
            if k in row
        }
        for row in df.to_dict("records")
    ]
    return {
        "name": spec["name"],
        "n_trials": count_trials(cfg),
        "trials": trials,
        "wall_seconds": res.wall_seconds,
        "end_to_end_seconds": time.perf_counter() - started,
        "trial_seconds": res.trial_seconds,
        "concurrency": res.concurrency,
        "parallel_efficiency": res.parallel_efficiency,
        "expected_iterations": res.expected_iterations,
        "iterations_run": res.iterations_run,
        "iterations_full": res.iterations_full,
        "stopped_early": int(df["stopped_early"].sum()) if "stopped_early" in df else None,
        "best": res.best,
    }


def _bench_config(cfg: TinyQAConfig, work: Path, quick: bool) -> dict[str, Any]:
    d = cfg.to_dict()
    d.update(storage_path=str(work), experiment="bench-sweep")
    d["train"].update(fail_at_step=None, adapter_id=None)
    if quick:
        d["train"].update(QUICK_OVERRIDES["train"])
        d["tune"].update({k: v for k, v in QUICK_OVERRIDES["tune"].items() if k != "search"})
        d["tune"]["search"].update(QUICK_OVERRIDES["tune"]["search"])
    return build_config(d, "bench sweep config").to_dict()


def bench_tune(cfg: TinyQAConfig, out: Path, quick: bool = False) -> dict[str, Any]:
    """Run the configured sweep once under a scratch experiment; return the suite's result."""
    started = time.perf_counter()
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="_work-tune-", dir=out))
    config = _bench_config(cfg, work, quick)
    c = build_config(config)
    result = new_result(
        "tune",
        quick,
        {
            "model": c.model.name,
            "searcher": c.tune.searcher,
            "scheduler": c.tune.scheduler,
            "grace_period": c.tune.grace_period,
            "reduction_factor": c.tune.reduction_factor,
            "search": c.tune.search.model_dump(mode="json"),
            "max_concurrent_trials": c.tune.max_concurrent_trials,
            "train": {
                k: getattr(c.train, k)
                for k in ("num_workers", "cpus_per_worker", "max_steps", "save_steps", "batch_size")
            },
            "ray_cpus": threads,
        },
    )
    try:
        sweep = run_arm(
            "tune_sweep",
            {"name": "sweep", "config": config, "threads": threads},
            600.0 if quick else 1800.0,
            work / "arms",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["arms"] = {"sweep": sweep}
    rows = [
        [
            t.get("trial"),
            t.get("r"),
            t.get("lr"),
            t.get("iterations"),
            t.get("status"),
            t.get("wall_s"),
        ]
        for t in sweep["trials"]
    ]
    result["table"] = {
        "title": f"Sweep: {sweep['n_trials']} trials, {sweep['concurrency']} at a time, "
        f"{c.tune.scheduler} (grace {c.tune.grace_period}, reduction {c.tune.reduction_factor:g})",
        "columns": ["trial", "r", "lr", "iterations", "status", "trial wall s"],
        "rows": rows,
    }
    speedup = ratio(sweep["trial_seconds"], sweep["wall_seconds"])
    iters = ratio(sweep["iterations_run"], sweep["iterations_full"])
    result["ratios"] = {
        "sweep wall s": sweep["wall_seconds"],
        "sum of trial times s": sweep["trial_seconds"],
        "speedup over one-at-a-time (sum of trial times / wall)": speedup,
        "parallel efficiency (sum / (wall × concurrency))": sweep["parallel_efficiency"],
        "trial-iterations run (ASHA)": sweep["iterations_run"],
        "trial-iterations, full grid": sweep["iterations_full"],
        "ASHA / full grid trial-iterations": iters,
        "end-to-end s (Ray start, data, sweep, results)": sweep["end_to_end_seconds"],
    }
    trial_cpus = c.train.num_workers * c.train.cpus_per_worker
    fits = int(threads // trial_cpus) if trial_cpus else sweep["concurrency"]
    notes = []
    if c.ray_address is None and sweep["concurrency"] > fits:
        notes.append(
            f"only {fits} trial(s) of {trial_cpus:g} CPUs fit on the {threads} CPUs at once, but "
            f"{sweep['concurrency']} were planned: the efficiency above is understated; lower "
            "train.num_workers or tune.max_concurrent_trials"
        )
    result["notes"] = notes + [
        "Trial time is Tune's time_total_s of the trial's last result (start of the trial to its "
        "last report). The full grid is every trial run to its last report "
        "(expected iterations × trials).",
        f"The sweep ran on a private local Ray with {threads} CPUs unless a cluster was configured.",
    ]
    result["wall_seconds"] = time.perf_counter() - started
    return result
