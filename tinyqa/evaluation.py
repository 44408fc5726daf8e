"""Score the base model and LoRA adapters on a QA set: what did fine-tuning buy, and how sure are we.

The metrics (keyword recall, exact match, token F1, ROUGE-L, BLEU, each with a bootstrap interval
and the paired change against the base) live in :mod:`tinyqa.metrics`; this module answers the
questions and writes the run.

One :class:`~tinyqa.inference.QAEngine` answers for every model: the base with adapters disabled,
each adapter switched in turn, greedy, batched. Outputs (``<run>/eval/``): ``eval.json``,
``predictions.jsonl`` (one line per question and model) and ``eval.md`` (the table).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyqa import tracking
from tinyqa.adapters import (
    base_settings_from_manifest,
    configure_adapter_cache,
    default_adapter_dir,
    locate_adapter,
    read_manifest,
)
from tinyqa.config import TinyQAConfig
from tinyqa.data import QARecord, build_messages, load_records, prepare_dataset, read_prepared
from tinyqa.errors import DatasetError, ModelError, StorageError, TinyQAError
from tinyqa.inference import BASE_LABEL, EngineModel, GenerationRequest, QAEngine, build_engine
from tinyqa.metrics import (
    CONFIDENCE,
    METRIC_LABELS,
    METRICS,
    ScoredAnswers,
    bootstrap,
    word_count,
)
from tinyqa.storage import location, write_json, write_text

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
# Held-out questions shown side by side in eval.md: the first ones in the set's order, not picked.
EXAMPLES = 3


# ----------------------------------------------------------------------------------------------
# which adapters, which questions
# ----------------------------------------------------------------------------------------------
def load_eval_records(cfg: TinyQAConfig) -> tuple[list[QARecord], str]:
    """The questions to answer (capped by ``eval.max_questions``) and a description of where from."""
    if cfg.eval.path:
        path = Path(cfg.eval.path).expanduser()
        records = load_records(path, cfg.data.max_question_chars)
        source = str(path)
    else:
        if (cfg.data_dir / "stats.json").is_file():
            prepared = read_prepared(cfg.data_dir)
        else:
            logger.info("no prepared data under %s; preparing it now", cfg.data_dir)
            prepared = prepare_dataset(cfg)
        records = prepared.questions(cfg.eval.split)
        source = f"{cfg.eval.split} split of {cfg.data_dir}"
        if not records:
            raise DatasetError(
                source,
                [
                    f"the {cfg.eval.split!r} split is empty; raise data.eval_fraction and rerun "
                    "`tinyqa prepare`, or pick another one with eval.split / eval.path"
                ],
            )
    if cfg.eval.max_questions:
        records = records[: cfg.eval.max_questions]
    return records, source


def _answer_all(
    engine: QAEngine,
    model: EngineModel,
    records: list[QARecord],
    max_new_tokens: int,
    batch_size: int,
    progress=None,
) -> list[Any]:
    """Greedy answers in the records' order; batches hold prompts of similar length."""
    messages = [build_messages(r.question, None, model.system_prompt) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(engine.prompt_ids(messages[i])))
    out: list[Any] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        reqs = [GenerationRequest(messages[i], model.engine_name, max_new_tokens) for i in idx]
        for i, res in zip(idx, engine.generate(reqs), strict=True):
            out[i] = res
        if progress is not None:
            progress.update(len(idx))
    return out


# ----------------------------------------------------------------------------------------------
# the eval run
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelReport:
    name: str
    adapter_dir: Path | None
    metrics: dict[str, dict[str, Any]]  # metric -> {"mean", "ci95": [lo, hi]}
    delta_vs_base: dict[str, dict[str, Any]] | None
    seconds: float  # generation time for all questions


@dataclass
class EvalResult:
    base_model: str
    source: str
    n_questions: int
    models: list[ModelReport]
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    # Mean answer length in words per model (and "reference"): a longer answer hits more keywords.
    answer_words: dict[str, float] = field(default_factory=dict)
    # The first EXAMPLES questions: question, reference and every model's answer.
    examples: list[dict[str, Any]] = field(default_factory=list)

    def model(self, name: str) -> ModelReport:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "questions": {"source": self.source, "count": self.n_questions},
            "confidence": CONFIDENCE,
            "seconds": self.seconds,
            "models": [
                {
                    "name": m.name,
                    "adapter_dir": str(m.adapter_dir) if m.adapter_dir else None,
                    "metrics": m.metrics,
                    "delta_vs_base": m.delta_vs_base,
                    "generation_seconds": m.seconds,
                    "seconds_per_100_questions": 100 * m.seconds / max(self.n_questions, 1),
                }
                for m in self.models
            ],
            "answer_words": self.answer_words,
            "examples": self.examples,
        }


def _eval_models(cfg: TinyQAConfig) -> list[Path]:
    if cfg.eval.adapters:
        return [locate_adapter(cfg, ref) for ref in cfg.eval.adapters]
    found = default_adapter_dir(cfg)
    return [found] if found else []


class _Counted:
    """A tqdm bar that also tells ``on_progress(done, total)`` (the console's hook)."""

    def __init__(self, bar: Any, on_progress: Callable[[int, int], None] | None):
        self.bar, self.on_progress, self.done = bar, on_progress, 0

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.done, self.bar.total)


def run_eval(
    cfg: TinyQAConfig, on_progress: Callable[[int, int], None] | None = None
) -> EvalResult:
    """Answer the eval questions with the base model and the adapters; score, write, return.

    ``on_progress(answers_done, answers_total)`` is called after every generated batch.

    Raises :class:`~tinyqa.errors.TinyQAError` subclasses for an unknown adapter, a bad or empty
    question set, adapters on different bases, or nothing to evaluate.
    """
    from tqdm.auto import tqdm

    e = cfg.eval
    adapter_dirs = _eval_models(cfg)
    if not adapter_dirs and not e.include_base:
        raise ModelError(
            f"nothing to evaluate: no adapter under {cfg.adapters_dir} (no best.json, no "
            f"{cfg.adapter_id!r}) and eval.include_base is false; train one, or set eval.adapters"
        )
    if not adapter_dirs:
        logger.warning(
            "no adapter found under %s: evaluating the base model only", cfg.adapters_dir
        )
    records, source = load_eval_records(cfg)
    configure_adapter_cache(cfg)  # adapters in a bucket are downloaded into cfg's cache
    tracking.prepare_experiment(cfg)  # an unusable MLflow store fails here, before any answer
    engine, models = build_engine(adapter_dirs, cfg.model, cfg.data.system_prompt)
    if not e.include_base:
        models = models[1:]
    logger.info(
        "evaluating %s on %d questions (%s)",
        ", ".join(m.label for m in models),
        len(records),
        source,
    )

    started = time.perf_counter()
    answers: dict[str, list[Any]] = {}
    seconds: dict[str, float] = {}
    with tqdm(total=len(records) * len(models), desc="eval", unit="answer", disable=None) as bar:
        counted = _Counted(bar, on_progress)
        for model in models:
            t0 = time.perf_counter()
            answers[model.label] = _answer_all(
                engine, model, records, e.max_new_tokens, e.batch_size, counted
            )
            seconds[model.label] = time.perf_counter() - t0
            logger.info("%s: %d answers in %.1f s", model.label, len(records), seconds[model.label])

    scored: dict[str, ScoredAnswers] = {}
    rows: list[dict[str, Any]] = []
    for model in models:
        texts = [a.text for a in answers[model.label]]
        scored[model.label], per_question = ScoredAnswers.from_answers(texts, records)
        for rec, ans, scores in zip(records, answers[model.label], per_question, strict=True):
            rows.append(
                {
                    "model": model.label,
                    "index": rec.index,
                    "question": rec.question,
                    "reference": rec.answer,
                    "keywords": rec.keywords,
                    "prediction": ans.text,
                    "finish_reason": ans.finish_reason,
                    "completion_tokens": ans.completion_tokens,
                    **scores,
                }
            )
    base = BASE_LABEL if e.include_base else None
    metrics, deltas = bootstrap(scored, base, e.bootstrap_samples, cfg.seed)
    result = EvalResult(
        base_model=engine.base_id,
        source=source,
        n_questions=len(records),
        models=[
            ModelReport(m.label, m.path, metrics[m.label], deltas.get(m.label), seconds[m.label])
            for m in models
        ],
        seconds=time.perf_counter() - started,
        answer_words=_answer_words(records, answers),
        examples=[
            {
                "question": rec.question,
                "reference": rec.answer,
                "answers": {m.label: answers[m.label][i].text for m in models},
            }
            for i, rec in enumerate(records[:EXAMPLES])
        ],
    )
    result.paths = _write_outputs(cfg.run_dir / EVAL_DIR, result, rows)
    if not cfg.eval.path:  # scores on the experiment's own held-out split
        _refresh_model_cards(cfg, result)
    tracking.log_eval(cfg, result)
    return result


def _refresh_model_cards(cfg: TinyQAConfig, result: EvalResult) -> None:
    """The model card (README.md) of each evaluated adapter of this experiment gains these scores:
    the model-index and the results table, as ``tinyqa export`` writes them. Local storage only
    (a bucket's adapters are evaluated from a download cache)."""
    from tinyqa.card import build_model_card, eval_metrics_for, write_model_card
    from tinyqa.storage import is_remote

    if is_remote(cfg.storage_path):
        return
    own = Path(str(cfg.adapters_dir)).resolve()
    for m in result.models:
        folder = Path(m.adapter_dir).resolve() if m.adapter_dir else None
        if folder is None or folder.parent != own or not (folder / "tinyqa.json").is_file():
            continue
        evaluation = eval_metrics_for(Path(str(cfg.run_dir)), folder, m.name)
        if evaluation is None:
            continue
        try:
            write_model_card(folder, build_model_card(read_manifest(folder), evaluation=evaluation))
        except (OSError, TinyQAError) as e:  # a card is documentation: never fail the eval
            logger.warning("could not update the model card of %s: %s", m.name, e)


def _answer_words(records: list[QARecord], answers: dict[str, list[Any]]) -> dict[str, float]:
    out = {"reference": float(np.mean([word_count(r.answer) for r in records]))}
    out.update(
        {label: float(np.mean([word_count(a.text) for a in got])) for label, got in answers.items()}
    )
    return out


def _cell(text: str, max_chars: int | None = None) -> str:
    """Text for one markdown table cell: one line, pipes escaped, clipped to ``max_chars``."""
    text = " ".join(text.split())
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text.replace("|", "\\|") or "(empty)"


def format_examples(result: EvalResult, max_chars: int | None = None) -> str:
    """The side-by-side section of eval.md: reference and each model's answer per question
    (``max_chars``: clip each cell, for a report that must fit a screen; eval.md has them whole)."""
    if not result.examples:
        return ""
    names = [m.name for m in result.models]
    lines = [
        f"Side by side: the first {len(result.examples)} of the {result.n_questions} questions "
        "(in the set's order, not picked):",
        "",
        "| question | reference | " + " | ".join(names) + " |",
        "|" + "|".join(["---"] * (2 + len(names))) + "|",
    ]
    for ex in result.examples:
        cells = [ex["question"], ex["reference"], *(ex["answers"].get(n, "") for n in names)]
        lines.append("| " + " | ".join(_cell(c, max_chars) for c in cells) + " |")
    return "\n".join(lines)


def _write_outputs(
    out_dir: Path, result: EvalResult, rows: list[dict[str, Any]]
) -> dict[str, Path]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"cannot write evaluation results to {out_dir}: {e.strerror}; set storage_path to a "
            "writable folder"
        ) from e
    paths = {
        "eval_json": out_dir / "eval.json",
        "predictions": out_dir / "predictions.jsonl",
        "table_md": out_dir / "eval.md",
    }
    write_json(paths["eval_json"], result.to_dict())
    write_text(
        paths["predictions"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write_text(paths["table_md"], format_eval_table(result) + "\n")
    return paths


def _fmt(value: float | None, scale: float, digits: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"


def format_eval_table(
    result: EvalResult, max_example_chars: int | None = None, compact: bool = False
) -> str:
    """Markdown table: one row per model, mean [95 % CI], and the change against the base model.

    Scores are shown in percent; BLEU is sacrebleu's corpus BLEU (0-100).
    ``max_example_chars`` clips the side-by-side answers (see :func:`format_examples`).
    ``compact`` (the demo report, which must fit a screen): the legend on one line, no source
    path, and a metric that is 0 for every model (exact match, for generated sentences) named
    once instead of a column of zeros.
    """
    metrics = list(METRICS)
    legend = (
        f"Questions: {result.n_questions} ({result.source}); base model {result.base_model}; "
        f"mean [{CONFIDENCE:.0%} bootstrap CI], all in %, change vs base in parentheses."
    )
    if compact:
        zero = [
            k
            for k in METRICS
            if result.models and all(not m.metrics[k]["mean"] for m in result.models)
        ]
        metrics = [k for k in METRICS if k not in zero]
        split = result.source.split(" of ", 1)[0]
        legend = (
            f"{result.n_questions} questions ({split}), base {result.base_model}: mean "
            f"[{CONFIDENCE:.0%} CI] in %, (change vs base), * = CI excludes 0"
            + "".join(f"; {METRIC_LABELS[k]} 0 for all" for k in zero)
        )
    header = ["model", *(METRIC_LABELS[m] for m in metrics), "s / 100 q"]
    lines = [
        legend,
        *([] if compact else [""]),
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for m in result.models:
        cells = [f"{m.name} ({result.base_model})" if m.adapter_dir is None else m.name]
        for metric in metrics:
            scale = 1.0 if metric == "bleu" else 100.0
            agg = m.metrics[metric]
            lo, hi = agg["ci95"]
            cell = f"{_fmt(agg['mean'], scale, 1)} [{_fmt(lo, scale, 1)}, {_fmt(hi, scale, 1)}]"
            if m.delta_vs_base is not None:
                d = m.delta_vs_base[metric]
                dlo, dhi = d["ci95"]
                sure = dlo is not None and (dlo > 0 or dhi < 0)
                mark = "*" if sure else ""
                cell += f" ({_fmt(d['mean'], scale, 1, signed=True)}{mark})"
            cells.append(cell)
        cells.append(f"{100 * m.seconds / max(result.n_questions, 1):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(m.delta_vs_base for m in result.models) and not compact:
        lines += ["", "\\* the 95 % CI of the paired change excludes 0."]
    if result.answer_words:
        lengths = ", ".join(f"{k} {v:.1f}" for k, v in result.answer_words.items())
        lines += [*([] if compact else [""]), f"Mean answer length in words: {lengths}."]
    if result.examples:
        lines += ["", format_examples(result, max_example_chars)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# for the sweep
# ----------------------------------------------------------------------------------------------
def evaluate_adapter_dir(
    adapter_dir: Path, records: list[QARecord], max_new_tokens: int, batch_size: int
) -> dict[str, float]:
    """Generation metrics of one adapter on ``records``, on a freshly loaded engine.

    A fresh load matters for 4-bit bases on CPU: generating on the model that was just trained
    would repack its weights (see :func:`tinyqa.model.keep_4bit_trainable`). Returns the means
    ``keyword_recall`` (absent when no record has keywords), ``exact_match``, ``token_f1``,
    ``rougeL`` (fractions) and ``bleu`` (corpus BLEU, 0-100).
    """
    if not records:
        raise TinyQAError("evaluate_adapter_dir: no records to answer; give at least one question")
    manifest = read_manifest(adapter_dir)
    engine, models = build_engine(
        [location(adapter_dir)], base_settings_from_manifest(manifest), None
    )
    model = models[1]
    answers = _answer_all(engine, model, records, max_new_tokens, batch_size)
    scored, _ = ScoredAnswers.from_answers([a.text for a in answers], records)
    out = {m: float(v[0]) for m, v in scored.aggregate().items()}
    return {m: v for m, v in out.items() if not np.isnan(v)}
