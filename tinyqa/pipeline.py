"""The main job: prepare -> tune -> eval -> serve -> query, each stage resumable.

Every stage records what it was run on (a hash of its inputs) in ``<run>/pipeline.json``; a rerun
skips stages whose inputs and outputs are unchanged, so a failed pipeline resumes where it stopped.
The Serve deployment is passed in as a callable (``deploy(cfg) -> url``) by the entrypoint: the
library does not import the ``serving`` package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tinyqa.config import TinyQAConfig
from tinyqa.errors import ConfigError, TinyQAError, first_line
from tinyqa.secrets import resolve_api_key
from tinyqa.storage import location, write_json

logger = logging.getLogger(__name__)

STAGES = ("prepare", "tune", "eval", "serve", "query")
# Side-by-side answers in the report are clipped to this many characters (one screen).
REPORT_ANSWER_CHARS = 60
STATE_FILE = "pipeline.json"
QUERY_QUESTIONS = 3


class StageFailed(TinyQAError):
    """A pipeline stage failed; the message names the stage, the reason and how to resume."""


@dataclass
class PipelineReport:
    cfg: TinyQAConfig
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweep_table: str | None = None
    eval_table: str | None = None
    url: str | None = None
    answers: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    wall_seconds: float | None = None


def demo_config_path(quick: bool = False) -> Path:
    """The embedded CPU defaults `tinyqa demo` runs on: jobs/configs/smollm2-cpu.yaml (real weights),
    or with ``quick`` jobs/configs/tiny-cpu.yaml (the offline tiny model; the same files)."""
    name = "tiny-cpu.yaml" if quick else "smollm2-cpu.yaml"
    return Path(str(resources.files("tinyqa").joinpath(f"resources/{name}")))


def demo_config_for(args: Any) -> Path:
    """The demo's config file for parsed CLI arguments: tiny with ``--quick`` or ``model.name=tiny``."""
    overrides = [o.replace(" ", "") for o in getattr(args, "overrides", None) or []]
    return demo_config_path(
        quick=bool(getattr(args, "quick", False)) or "model.name=tiny" in overrides
    )


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_state(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is corrupt; running every stage again", path)
    return {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    write_json(path, state, sort_keys=True)


def parse_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def _stage_keys(cfg: TinyQAConfig) -> dict[str, str]:
    from tinyqa.data import dataset_sha256

    d = cfg.to_dict()
    prepare = _hash([d["model"], d["data"], dataset_sha256(cfg.data)])
    tune = _hash([prepare, d["lora"], d["train"], d["tune"], d["seed"]])
    evaluate = _hash([tune, d["eval"]])
    serve = _hash([tune, d["serve"]])
    return {"prepare": prepare, "tune": tune, "eval": evaluate, "serve": serve, "query": serve}


def run_pipeline(
    cfg: TinyQAConfig,
    stages: list[str] | None = None,
    fresh: bool = False,
    deploy: Callable[[TinyQAConfig], str] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
    tune_callbacks: Sequence[Any] = (),
    on_eval_progress: Callable[[int, int], None] | None = None,
) -> PipelineReport:
    """Run the selected stages in order; raises :class:`StageFailed` naming the failing stage.

    Progress hooks for a console: ``on_stage(stage, event)`` with event ``running``, ``done``,
    ``skipped`` or ``failed``; ``tune_callbacks`` go to the sweep (:func:`tinyqa.tune.run_sweep`),
    ``on_eval_progress`` to :func:`tinyqa.evaluation.run_eval`.
    """
    from tinyqa.training import check_storage

    selected = parse_stages(stages)
    if "serve" in selected and deploy is None:
        raise ConfigError("the serve stage needs a deploy function (run it through `tinyqa demo`)")
    check_storage(cfg)
    state_path = cfg.run_dir / STATE_FILE
    state = {} if fresh else _load_state(state_path)
    keys = _stage_keys(cfg)
    report = PipelineReport(cfg)
    began = time.perf_counter()

    def tell(stage: str, event: str) -> None:
        if on_stage is not None:
            on_stage(stage, event)

    runners = {
        "prepare": _prepare,
        "tune": lambda c, r: _tune(c, r, fresh, tune_callbacks),
        "eval": lambda c, r: _eval(c, r, on_eval_progress),
        "serve": lambda c, r: _serve(c, r, deploy),
        "query": _query,
    }
    for stage in selected:
        prev = state.get(stage, {})
        if (
            prev.get("key") == keys[stage]
            and prev.get("status") == "done"
            and _still_valid(stage, cfg, prev, report)
        ):
            logger.info("stage %s: already done for these inputs; skipping", stage)
            report.stages[stage] = {**prev, "skipped": True}
            _restore(stage, prev, report)
            tell(stage, "skipped")
            continue
        logger.info("stage %s: running", stage)
        tell(stage, "running")
        started = time.perf_counter()
        try:
            if stage != "prepare" and "serve" in selected:
                from tinyqa.cluster import connect_persistent

                # The endpoint must outlive this process: sweep and serve on a detached cluster
                # (started only after the data validated, so a bad dataset costs no Ray work).
                connect_persistent(cfg)
            summary = runners[stage](cfg, report)
        except TinyQAError as e:
            tell(stage, "failed")
            raise StageFailed(
                f"stage '{stage}' failed: {e}. Fix it and rerun the same command: finished stages "
                f"are skipped (state in {state_path})"
            ) from e
        except Exception as e:
            logger.exception("stage %s crashed", stage)
            tell(stage, "failed")
            raise StageFailed(
                f"stage '{stage}' crashed ({type(e).__name__}: {first_line(e)}); "
                f"see the log above, then rerun the same command to resume (state in {state_path})"
            ) from e
        entry = {
            "status": "done",
            "key": keys[stage],
            "seconds": round(time.perf_counter() - started, 1),
            "summary": summary,
        }
        state[stage] = entry
        report.stages[stage] = {**entry, "skipped": False}
        _save_state(state_path, state)
        tell(stage, "done")
    report.artifacts = _artifacts(cfg)
    report.wall_seconds = round(time.perf_counter() - began, 1)
    return report


def _still_valid(
    stage: str, cfg: TinyQAConfig, prev: dict[str, Any], report: PipelineReport
) -> bool:
    """A recorded stage only counts while its outputs are still there (or, for serve, answering)."""
    s = prev.get("summary") or {}
    if stage == "prepare":
        return (cfg.data_dir / "stats.json").is_file()
    if stage == "tune":
        return (cfg.run_dir / "best.json").is_file() and (
            cfg.adapters_dir / s.get("best_adapter", "?")
        ).is_dir()
    if stage == "eval":
        return all(
            location(p, cfg.storage).is_file() for p in s.get("paths", {}).values()
        ) and bool(s.get("paths"))
    if stage == "serve":
        return _healthy(s.get("url"))
    return False  # query: cheap, always asks the live endpoint again


def _restore(stage: str, prev: dict[str, Any], report: PipelineReport) -> None:
    s = prev.get("summary") or {}
    if stage == "tune":
        report.sweep_table = s.get("table")
        report.best = s.get("best")
    elif stage == "eval":
        report.eval_table = s.get("table")
    elif stage == "serve":
        report.url = s.get("url")


def _prepare(cfg: TinyQAConfig, report: PipelineReport) -> dict[str, Any]:
    from tinyqa.data import prepare_dataset

    stats = prepare_dataset(cfg).stats
    return {k: stats[k] for k in ("records", "train", "eval", "sha256")}


def _tune(
    cfg: TinyQAConfig, report: PipelineReport, fresh: bool, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    from tinyqa.tune import format_table, run_sweep

    result = run_sweep(cfg, fresh=fresh, callbacks=callbacks)
    report.sweep_table = format_table(result)
    report.best = result.best
    return {
        "best": result.best,
        "best_adapter": result.best["adapter_id"],
        "trials": len(result.results),
        "wall_seconds": round(result.wall_seconds, 1),
        "table": report.sweep_table,
    }


def _eval(
    cfg: TinyQAConfig,
    report: PipelineReport,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    from tinyqa.evaluation import format_eval_table, run_eval

    result = run_eval(cfg, on_progress=on_progress)
    # Clipped answers: the report must fit a screen; eval/eval.md has them whole.
    report.eval_table = format_eval_table(
        result, max_example_chars=REPORT_ANSWER_CHARS, compact=True
    )
    return {"paths": {k: str(v) for k, v in result.paths.items()}, "table": report.eval_table}


def _serve(cfg: TinyQAConfig, report: PipelineReport, deploy) -> dict[str, Any]:
    url = deploy(cfg)
    report.url = url
    return {"url": url}


def _healthy(url: str | None) -> bool:
    import httpx

    if not url:
        return False
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _query(cfg: TinyQAConfig, report: PipelineReport) -> dict[str, Any]:
    """Ask a few held-out questions through the live HTTP endpoint."""
    import httpx

    from tinyqa.data import read_prepared

    url = report.url or (report.stages.get("serve", {}).get("summary") or {}).get("url")
    if not url:
        raise TinyQAError("no endpoint to query; run the serve stage first (--stages serve,query)")
    questions = read_prepared(cfg.data_dir).questions("eval")[:QUERY_QUESTIONS]
    headers = {}
    key = resolve_api_key(cfg.serve.api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    answers = []
    for rec in questions:
        try:
            r = httpx.post(
                f"{url}/v1/ask", json={"question": rec.question}, headers=headers, timeout=120
            )
        except httpx.HTTPError as e:
            raise TinyQAError(f"endpoint {url} did not answer ({e})") from e
        if r.status_code != 200:
            raise TinyQAError(f"endpoint {url} answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        answers.append(
            {
                "question": rec.question,
                "answer": body["answer"],
                "adapter": body["adapter"],
                "expected_keywords": rec.keywords,
            }
        )
    report.answers = answers
    return {"answers": answers}


def _artifacts(cfg: TinyQAConfig) -> dict[str, str]:
    run = cfg.run_dir
    candidates = {
        "prepared data": cfg.data_dir,
        "sweep results": run / "results.csv",
        "sweep summary": run / "sweep.md",
        "sweep plot": run / "sweep.png",
        "best adapter": run / "best.json",
        "adapters": cfg.adapters_dir,
        "eval report": run / "eval" / "eval.md",
        "eval metrics": run / "eval" / "eval.json",
        "predictions": run / "eval" / "predictions.jsonl",
        "pipeline state": run / STATE_FILE,
    }
    return {k: str(v) for k, v in candidates.items() if v.exists()}


def format_report(report: PipelineReport) -> str:
    """The final report a person reads: stage timings, tables, endpoint and how to query it."""
    lines = [
        "",
        "== tinyqa pipeline report ==",
        "| stage | status | seconds |",
        "| --- | --- | --- |",
    ]
    for stage, info in report.stages.items():
        status = "skipped (done before)" if info.get("skipped") else "done"
        lines.append(f"| {stage} | {status} | {info.get('seconds', '')} |")
    if report.sweep_table:
        lines += ["", "Sweep:", report.sweep_table]
    if report.best:
        lines.append(
            f"best adapter: {report.best['adapter_id']} ({report.best['metric']} = {report.best['value']:.4f})"
        )
    if report.eval_table:
        lines += ["", "Evaluation (held-out questions):", report.eval_table]
    if report.answers:
        adapters = sorted({a["adapter"] for a in report.answers})
        lines += ["", f"Answers from the live endpoint ({', '.join(adapters)}):"]
        for a in report.answers:
            lines.append(f"  {a['question']} -> {a['answer']}")
    if report.artifacts:
        # One line (wrapped by the terminal): the report must fit a screen with the rest.
        run = str(report.cfg.run_dir)
        names = [
            v[len(run) + 1 :] + ("/" if Path(v).is_dir() else "") if v.startswith(run + "/") else v
            for v in report.artifacts.values()
        ]
        lines += ["", f"Artifacts in {run}/: " + ", ".join(names)]
    if report.url:
        # The OpenAI-client form of the same call is in the README (it is three lines wide).
        lines += [
            "",
            f"Endpoint: {report.url}  (left running; OpenAI-compatible at {report.url}/v1)",
            f"  curl -s {report.url}/v1/ask -H 'Content-Type: application/json' "
            '-d \'{"question": "What does json.dumps do?"}\'',
        ]
    return "\n".join(lines)
