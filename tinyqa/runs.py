"""`tinyqa runs`: what the storage path holds, read from the files the commands leave.

For each experiment folder under ``storage_path``: the pipeline stages done (``pipeline.json``),
its adapters (``adapters/<id>/tinyqa.json``: base model, key metrics, creation time), the one
``best.json`` names, and whether an endpoint is serving it (``GET /healthz`` of the configured
endpoint and of the URL the pipeline deployed to, with a short timeout). No torch, no Ray.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from tinyqa.adapters import BEST_FILE, MANIFEST, list_adapters
from tinyqa.config import TinyQAConfig

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"  # tinyqa.pipeline.STATE_FILE (that module imports more)
HEALTH_TIMEOUT_S = 2.0
STAGE_ORDER = ("prepare", "tune", "eval", "serve", "query")  # tinyqa.pipeline.STAGES
KEY_METRICS = ("eval_loss", "eval_loss_initial", "train_loss", "steps")


def _read_json(path: Path) -> Any:
    """A JSON file, or None when missing or unreadable (a half-written run must not stop the
    listing; the row says what is missing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def endpoint_url(cfg: TinyQAConfig) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def probe_endpoint(url: str, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any] | None:
    """``/healthz`` of ``url``: its JSON body when it answers 200, else None."""
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else {}


def _is_experiment(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in (PIPELINE_FILE, BEST_FILE, "adapters")
    )


def _adapter_row(adapter_dir: Path, best_id: str | None) -> dict[str, Any]:
    manifest = _read_json(adapter_dir / MANIFEST) or {}
    metrics = manifest.get("metrics") or {}
    return {
        "adapter_id": adapter_dir.name,
        "base_model": manifest.get("base_model"),
        "created": manifest.get("created"),
        "metrics": {k: metrics[k] for k in KEY_METRICS if k in metrics},
        "best": adapter_dir.name == best_id,
        "serving": None,
    }


def _experiment(path: Path) -> dict[str, Any]:
    state = _read_json(path / PIPELINE_FILE) or {}
    best = _read_json(path / BEST_FILE)
    best_id = best.get("adapter_id") if isinstance(best, dict) else None
    stages = {
        name: {"status": entry.get("status"), "seconds": entry.get("seconds")}
        for name, entry in state.items()
        if isinstance(entry, dict)
    }
    serve = state.get("serve") if isinstance(state.get("serve"), dict) else {}
    return {
        "experiment": path.name,
        "path": str(path),
        "stages": stages,
        "best": best,
        "deployed_url": (serve.get("summary") or {}).get("url"),
        "endpoint": None,
        "adapters": [
            _adapter_row(path / "adapters" / a, best_id) for a in list_adapters(path / "adapters")
        ],
    }


def collect_runs(cfg: TinyQAConfig, probe: bool = True) -> dict[str, Any]:
    """Every experiment under ``cfg.storage_path``, with endpoint status when ``probe``."""
    root = Path(cfg.storage_path).expanduser().resolve()
    folders = sorted(p for p in root.iterdir() if _is_experiment(p)) if root.is_dir() else []
    experiments = [_experiment(p) for p in folders]
    configured = endpoint_url(cfg)
    urls = [configured] + [e["deployed_url"] for e in experiments if e["deployed_url"]]
    endpoints: dict[str, dict[str, Any] | None] = {}
    if probe:
        for url in dict.fromkeys(urls):
            endpoints[url] = probe_endpoint(url)
    for e in experiments:
        # The endpoint serves this experiment when the pipeline deployed it there, or when it is
        # the configured experiment and the configured endpoint answers.
        url = e["deployed_url"] if endpoints.get(e["deployed_url"] or "") else None
        if url is None and e["experiment"] == cfg.experiment and endpoints.get(configured):
            url = configured
        e["endpoint"] = url
        info = endpoints.get(url) if url else None
        if info is None:
            continue
        loaded = set(info.get("loaded_adapters") or ())
        for a in e["adapters"]:
            if a["adapter_id"] == info.get("default_adapter"):
                a["serving"] = "default"
            elif a["adapter_id"] in loaded:
                a["serving"] = "loaded"
            else:
                a["serving"] = "available"
    return {"storage_path": str(root), "endpoints": endpoints, "experiments": experiments}


def format_runs(runs: dict[str, Any], width: int = 120) -> str:
    """The listing as text: one table of experiments, one of adapters (rich, no colour codes)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    if not runs["experiments"]:
        return f"no experiments under {runs['storage_path']} (run `tinyqa demo` or `tinyqa tune`)"
    exps = Table(
        box=box.SIMPLE_HEAD, title=f"experiments in {runs['storage_path']}", title_justify="left"
    )
    for name in ("experiment", "stages done", "best adapter", "endpoint"):
        exps.add_column(name)
    for e in runs["experiments"]:
        done = [s for s in STAGE_ORDER if (e["stages"].get(s) or {}).get("status") == "done"]
        best = e["best"] or {}
        best_text = best.get("adapter_id") or "-"
        if isinstance(best.get("value"), (int, float)):
            best_text += f" ({best.get('metric')} {best['value']:.4g})"
        exps.add_row(e["experiment"], ",".join(done) or "-", best_text, e["endpoint"] or "-")
    console.print(exps)
    if not any(e["adapters"] for e in runs["experiments"]):
        return _strip(buf.getvalue()) + "\n\nno adapters yet"
    adapters = Table(box=box.SIMPLE_HEAD, title="adapters", title_justify="left", pad_edge=False)
    for name in ("experiment", "adapter", "base model", "eval loss", "steps", "created"):
        # Ids are what a user copies into `--adapter` / eval.adapters: never cut them short. A
        # local base path may be long (it folds); the time goes onto two lines when space is short.
        wraps = name in ("base model", "created")
        adapters.add_column(
            name,
            no_wrap=not wraps,
            overflow="fold",
            min_width={"base model": 12, "created": 10}.get(name),
        )
    adapters.add_column("best", no_wrap=True)
    adapters.add_column("serving", no_wrap=True)
    for e in runs["experiments"]:
        for a in e["adapters"]:
            m = a["metrics"]
            loss = m.get("eval_loss")
            initial = m.get("eval_loss_initial")
            loss_text = "-" if loss is None else f"{loss:.3f}"
            if loss is not None and initial is not None:
                loss_text = f"{initial:.3f} -> {loss:.3f}"
            adapters.add_row(
                e["experiment"],
                a["adapter_id"],
                str(a["base_model"] or "?"),
                loss_text,
                str(m.get("steps", "-")),
                _minute(a["created"]),
                "*" if a["best"] else "",
                a["serving"] or "",
            )
    console.print()
    console.print(adapters)
    return _strip(buf.getvalue())


def _minute(created: Any) -> str:
    """``2026-12-07T02:53:51.123+00:00`` -> ``2026-12-07 02:53`` (the table's width is for ids)."""
    text = str(created or "?")
    return text[:16].replace("T", " ") if len(text) >= 16 and text[10:11] == "T" else text


def _strip(text: str) -> str:
    # rich pads every row to the table width; trailing spaces are noise in logs and pipes.
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def run_runs(cfg: TinyQAConfig, as_json: bool = False) -> str:
    """`tinyqa runs`: the listing as a table, or as JSON with ``as_json``."""
    runs = collect_runs(cfg)
    if as_json:
        return json.dumps(runs, indent=2, sort_keys=True, default=str)
    return format_runs(runs)
