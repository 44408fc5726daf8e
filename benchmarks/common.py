"""Shared pieces of the benchmark suites: machine facts, timing statistics, arm subprocesses,
and writing ``<suite>.json`` + ``<suite>.md``.

Every suite returns one plain dict (JSON-safe) with the same top-level keys, so one formatter
renders all of them:

- ``suite``, ``quick``, ``created``, ``machine``, ``settings``: what ran where;
- ``table``: ``{"title", "columns", "rows"}`` — the side-by-side figures;
- ``ratios``: named ratios (the figures a reader should compare across machines);
- ``targets``: ``[{"name", "target", "measured", "met", "note"}]``;
- ``arms`` / ``details``: the raw measurements behind the table;
- ``notes``: method remarks and anything skipped (with the reason);
- ``paths``: where the JSON and markdown went.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinyqa.config import TinyQAConfig
from tinyqa.errors import StorageError, TinyQAError
from tinyqa.training import package_versions

logger = logging.getLogger(__name__)

SUITES = ("train", "serve", "tune", "gpu")
_RAY_NICENESS_ENV = "RAY_worker_niceness"  # Ray's own (case-sensitive) config override


class BenchError(TinyQAError):
    """A benchmark cannot run as configured (the message says what to change)."""


def set_ray_worker_niceness(niceness: int | None) -> None:
    """Niceness of the workers of a Ray started after this call in this process (None: Ray's
    default, 15). Ray workers otherwise lose the cores to any ordinary process on a busy machine,
    and a benchmark comparing them with one would measure that, not Ray."""
    if niceness is not None:
        os.environ[_RAY_NICENESS_ENV] = str(int(niceness))


def out_dir(cfg: TinyQAConfig, out: str | os.PathLike | None) -> Path:
    """The results folder: ``out`` or ``<storage>/<experiment>/bench``; created, checked writable."""
    path = Path(out).expanduser().resolve() if out else cfg.run_dir / "bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise StorageError(
            f"benchmark results folder {path} is not writable ({e.strerror}); pass --out to a "
            "folder you can write to"
        ) from e
    return path


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` / ``/proc/cpuinfo`` reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a figure came from: host, CPU, cores, memory, GPU, package versions, load."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "load_average": _loadavg(),
        "gpu": None,
        "versions": package_versions(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": props.name,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
            }
    except ImportError:
        pass
    return info


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM) in MiB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None


def percentile(values: Iterable[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100); None for no values."""
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Iterable[float]) -> float | None:
    v = list(values)
    return statistics.median(v) if v else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def target(
    name: str, goal: float, measured: float | None, higher_is_better: bool = True, note: str = ""
) -> dict[str, Any]:
    """One target line: the goal, the measured value and whether it was met (None = not measured)."""
    met = None
    if measured is not None:
        met = measured >= goal if higher_is_better else measured <= goal
    return {
        "name": name,
        "target": goal,
        "measured": measured,
        "met": met,
        "higher_is_better": higher_is_better,
        "note": note,
    }


def new_result(suite: str, quick: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """The skeleton every suite fills in (every key present, so consumers need no guards)."""
    return {
        "suite": suite,
        "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "settings": settings,
        "table": {"title": "", "columns": [], "rows": []},
        "ratios": {},
        "targets": [],
        "arms": {},
        "details": {},
        "notes": [],
        "wall_seconds": None,
        "paths": {},
    }


def run_arm(kind: str, spec: dict[str, Any], timeout_s: float, work: Path) -> dict[str, Any]:
    """Run one measured arm in a fresh Python process (so its peak RSS is its own).

    ``kind`` names a function in :mod:`benchmarks._arm`. Returns its result dict, plus
    ``process_seconds`` (start of the interpreter to exit, imports included). Raises
    :class:`BenchError` when the arm fails, with the tail of its log.
    """
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / f"{spec['name']}.spec.json"
    result_file = work / f"{spec['name']}.result.json"
    log_file = work / f"{spec['name']}.log"
    spec_file.write_text(json.dumps(spec, default=str))
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The interpreter must find these very benchmarks (and tinyqa), installed or run from a checkout.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    cmd = [sys.executable, "-m", "benchmarks._arm", kind, str(spec_file), str(result_file)]
    logger.info("bench arm %s: running in a fresh process", spec["name"])
    load_before = _loadavg()
    started = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(
                f"bench arm {spec['name']} ran past {timeout_s:.0f} s; see {log_file}"
            ) from e
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or not result_file.is_file():
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"bench arm {spec['name']} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_seconds"] = elapsed
    # Shared machines are noisy: keep what else was running next to each arm's figures.
    result["load_average_before"], result["load_average_after"] = load_before, _loadavg()
    return result


def fmt(value: Any) -> str:
    """A table cell: numbers rounded to 3 significant figures, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def format_bench(result: dict[str, Any]) -> str:
    """Markdown for one suite's result: the table, ratios, targets, machine and notes."""
    m = result["machine"]
    gpu = m.get("gpu")
    where = f"{m['cpu_model']}, {m['cpu_count']} cores, {m.get('memory_gb')} GB RAM"
    if gpu:
        where += f"; GPU {gpu['name']} ({gpu['memory_gb']} GB)"
    lines = [
        f"## tinyqa bench {result['suite']}{' (quick)' if result['quick'] else ''}",
        "",
        f"- machine: {where}; load average at start {m.get('load_average')}",
        f"- created: {result['created']}; wall {fmt(result.get('wall_seconds'))} s",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    table = result["table"]
    if table["rows"]:
        lines += ["", f"**{table['title']}**" if table["title"] else "", ""]
        lines.append("| " + " | ".join(table["columns"]) + " |")
        lines.append("|" + "---|" * len(table["columns"]))
        for row in table["rows"]:
            lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    if result["ratios"]:
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in result["ratios"].items()]
    if result["targets"]:
        lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            op = "≥" if t["higher_is_better"] else "≤"
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(
                f"| {t['name']}{note} | {op} {fmt(t['target'])} | {fmt(t['measured'])} | {met} |"
            )
    if result["notes"]:
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def json_safe(value: Any) -> Any:
    """Plain JSON types only: NaN / infinity become None, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


def write_result(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``<suite>.json`` and ``<suite>.md`` into ``out``; returns ``result`` with ``paths``.

    The JSON is strict (no NaN): a missing figure is ``null``.
    """
    suite = result["suite"]
    json_path, md_path = out / f"{suite}.json", out / f"{suite}.md"
    result["paths"] = {"json": str(json_path), "markdown": str(md_path)}
    result = json_safe(result)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    tmp.replace(json_path)
    md_path.write_text(format_bench(result))
    logger.info("bench %s: wrote %s and %s", suite, json_path, md_path)
    return result
