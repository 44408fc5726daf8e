"""Score the base model and LoRA adapters on a QA set: what did fine-tuning buy, and how sure are we.

Per answer: keyword recall (the dataset's native measure: share of a record's answer keywords found
in the answer, case-insensitive), exact match and token F1 (SQuAD-style normalization), ROUGE-L F1
(``rouge-score``) and BLEU (``sacrebleu``). Per model: the mean of each (corpus BLEU for BLEU) with a
95 % percentile-bootstrap confidence interval, and the paired difference to the base model (same
resampled questions for both, so the interval is about the difference, not two overlapping bars).

One :class:`~tinyqa.inference.QAEngine` answers for every model: the base with adapters disabled,
each adapter switched in turn, greedy, batched. Outputs (``<run>/eval/``): ``eval.json``,
``predictions.jsonl`` (one line per question and model) and ``eval.md`` (the table).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyqa.config import NAME_PATTERN, ModelSettings, TinyQAConfig
from tinyqa.data import QARecord, build_messages, load_records, prepare_dataset, read_prepared
from tinyqa.errors import DatasetError, ModelError, StorageError, TinyQAError
from tinyqa.inference import GenerationRequest, QAEngine, UnknownAdapter, list_adapters, read_best
from tinyqa.model import MANIFEST, base_settings_from_manifest, read_manifest

logger = logging.getLogger(__name__)

METRICS = ("keyword_recall", "exact_match", "token_f1", "rougeL", "bleu")
METRIC_LABELS = {
    "keyword_recall": "keyword recall",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU",
}
BASE_LABEL = "base"
EVAL_DIR = "eval"
CONFIDENCE = 0.95
# Held-out questions shown side by side in eval.md: the first ones in the set's order, not picked.
EXAMPLES = 3
_ARTICLES = frozenset({"a", "an", "the"})
_NAME_RE = re.compile(NAME_PATTERN)
_WORD_RE = re.compile(r"[^\W_]+")  # letters and digits of any script


# ----------------------------------------------------------------------------------------------
# metrics on one answer
# ----------------------------------------------------------------------------------------------
def _fold(text: str) -> str:
    """Unicode-normalized, case-folded, whitespace-collapsed text."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: casefold, punctuation and symbols to spaces, drop a/an/the.

    Punctuation becomes a space rather than vanishing, so ``os.path`` compares as ``os path``.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in folded)
    return " ".join(t for t in spaced.split() if t not in _ARTICLES)


def keyword_recall(prediction: str, keywords: list[str]) -> float | None:
    """Share of ``keywords`` that occur in ``prediction`` (case-insensitive substring match).

    None when the record has no keywords (an ``answer``-only record): it has no such score.
    """
    kws = [_fold(k) for k in keywords if k.strip()]
    if not kws:
        return None
    answer = _fold(prediction)
    return sum(1 for k in kws if k in answer) / len(kws)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalized tokens (multiset overlap)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _UnicodeTokenizer:
    """rouge-score's default tokenizer keeps only ``[a-z0-9]``, so any non-Latin answer scores 0.

    This one keeps letters and digits of every script; on ASCII text it yields the same tokens
    as the default (lowercase, split on anything that is not a letter or digit).
    """

    def tokenize(self, text: str) -> list[str]:
        return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


_rouge_scorer = None
_bleu_sentence = None


def _scorers():
    global _rouge_scorer, _bleu_sentence
    if _rouge_scorer is None:
        from rouge_score.rouge_scorer import RougeScorer
        from sacrebleu.metrics import BLEU

        _rouge_scorer = RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
        # Sentence BLEU with effective order: a short answer is not zeroed by missing 4-grams.
        _bleu_sentence = BLEU(effective_order=True)
    return _rouge_scorer, _bleu_sentence


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence) from ``rouge-score``."""
    return float(_scorers()[0].score(reference, prediction)["rougeL"].fmeasure)


def _bleu_stats(prediction: str, reference: str) -> tuple[float, list[float]]:
    """Sentence BLEU (0-100) and the sufficient statistics corpus BLEU sums over answers."""
    score = _scorers()[1].sentence_score(prediction, [reference])
    return float(score.score), [score.sys_len, score.ref_len, *score.counts, *score.totals]


def corpus_bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100, sacrebleu defaults) from summed sufficient statistics (see _bleu_stats)."""
    from sacrebleu.metrics import BLEU

    s = [int(round(x)) for x in stats]
    return float(
        BLEU.compute_bleu(
            correct=s[2:6], total=s[6:10], sys_len=s[0], ref_len=s[1], smooth_method="exp"
        ).score
    )


def _score(prediction: str, record: QARecord) -> tuple[dict[str, float | None], list[float]]:
    bleu, stats = _bleu_stats(prediction, record.answer)
    scores = {
        "keyword_recall": keyword_recall(prediction, record.keywords),
        "exact_match": exact_match(prediction, record.answer),
        "token_f1": token_f1(prediction, record.answer),
        "rougeL": rouge_l(prediction, record.answer),
        "bleu": bleu,
    }
    return scores, stats


def score_answer(prediction: str, record: QARecord) -> dict[str, float | None]:
    """Every metric for one answer (BLEU here is sentence BLEU, 0-100)."""
    return _score(prediction, record)[0]


# ----------------------------------------------------------------------------------------------
# aggregates with bootstrap intervals
# ----------------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """Per-question metric columns of one model (NaN = undefined for that question)."""

    columns: dict[str, np.ndarray]  # metric -> (N,)
    bleu_stats: np.ndarray  # (N, 10)

    @classmethod
    def from_answers(
        cls, predictions: list[str], records: list[QARecord]
    ) -> tuple[_Scored, list[dict]]:
        rows, stats = [], []
        for pred, rec in zip(predictions, records, strict=True):
            scores, bleu_stats = _score(pred, rec)
            rows.append(scores)
            stats.append(bleu_stats)
        columns = {
            m: np.array([np.nan if r[m] is None else r[m] for r in rows], dtype=float)
            for m in METRICS
        }
        return cls(columns, np.array(stats, dtype=float).reshape(len(rows), 10)), rows

    def aggregate(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Metric values under resampling ``weights`` (B, N) (None = the observed sample)."""
        n = len(self.bleu_stats)
        w = np.ones((1, n)) if weights is None else weights
        out = {}
        for m in METRICS:
            if m == "bleu":
                summed = w @ self.bleu_stats  # (B, 10)
                out[m] = np.array([corpus_bleu_from_stats(row) for row in summed])
                continue
            col = self.columns[m]
            defined = ~np.isnan(col)
            den = w @ defined
            num = w @ np.where(defined, col, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m] = np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)
        return out


def _bootstrap(
    scored: dict[str, _Scored], base: str | None, samples: int, seed: int
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Point estimates with CIs per model, and paired deltas to ``base`` with CIs."""
    names = list(scored)
    n = len(next(iter(scored.values())).bleu_stats)
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[np.ndarray]]] = {k: {m: [] for m in METRICS} for k in names}
    chunk = max(1, min(samples, 2_000_000 // max(n, 1)))  # bound the (B, N) weight matrix
    done = 0
    while done < samples:
        b = min(chunk, samples - done)
        # Multinomial counts = how often each question is drawn; the same draw for every model
        # makes the deltas paired.
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)
        for name in names:
            for m, values in scored[name].aggregate(weights).items():
                draws[name][m].append(values)
        done += b
    lo_q, hi_q = (1 - CONFIDENCE) / 2 * 100, (1 + CONFIDENCE) / 2 * 100

    def interval(values: np.ndarray) -> list[float | None]:
        values = values[~np.isnan(values)]
        if not len(values):
            return [None, None]
        return [float(np.percentile(values, lo_q)), float(np.percentile(values, hi_q))]

    def point(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    metrics, deltas = {}, {}
    for name in names:
        observed = scored[name].aggregate()
        metrics[name] = {
            m: {"mean": point(observed[m][0]), "ci95": interval(np.concatenate(draws[name][m]))}
            for m in METRICS
        }
        if base is not None and name != base:
            base_obs = scored[base].aggregate()
            deltas[name] = {
                m: {
                    "mean": point(observed[m][0] - base_obs[m][0]),
                    "ci95": interval(
                        np.concatenate(draws[name][m]) - np.concatenate(draws[base][m])
                    ),
                }
                for m in METRICS
            }
    return metrics, deltas


# ----------------------------------------------------------------------------------------------
# which adapters, which questions
# ----------------------------------------------------------------------------------------------
def resolve_adapter(cfg: TinyQAConfig, ref: str) -> Path:
    """An adapter id under ``cfg.adapters_dir``, or an adapter folder path; raises ModelError."""
    if _NAME_RE.match(ref) and (cfg.adapters_dir / ref / MANIFEST).is_file():
        return cfg.adapters_dir / ref
    path = Path(ref).expanduser()
    if path.is_dir():
        read_manifest(path)  # names the missing files when it is not an adapter folder
        return path.resolve()
    available = ", ".join(list_adapters(cfg.adapters_dir)) or "none"
    raise UnknownAdapter(
        f"unknown adapter {ref!r}: no adapter with that id under {cfg.adapters_dir} (available: "
        f"{available}) and no such folder; pass a trained adapter id or an adapter folder"
    )


def default_adapter(cfg: TinyQAConfig) -> Path | None:
    """The adapter ``best.json`` names, else the trained ``cfg.adapter_id`` if it exists, else None."""
    best = read_best(cfg.run_dir)
    if best and best.get("adapter_id"):
        path = cfg.adapters_dir / str(best["adapter_id"])
        if not (path / MANIFEST).is_file():
            raise ModelError(
                f"{cfg.run_dir / 'best.json'} names adapter {best['adapter_id']!r}, but {path} "
                "holds no adapter; rerun `tinyqa tune`, or pick one with eval.adapters=[ID]"
            )
        return path
    path = cfg.adapters_dir / cfg.adapter_id
    return path if (path / MANIFEST).is_file() else None


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


@dataclass
class EngineModel:
    """One model an engine can answer with: the base (``engine_name`` None) or an adapter."""

    label: str  # shown in tables and files
    engine_name: str | None  # adapter name inside the engine; None = base
    path: Path | None
    system_prompt: str | None


def _unique(label: str, taken: set[str]) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label}#{i}", i + 1
    taken.add(out)
    return out


def _shared_base(adapters: list[tuple[Path, dict]]) -> ModelSettings:
    bases = {(m.get("base_model"), m["config"]["model"].get("revision")) for _, m in adapters}
    if len(bases) > 1:
        listing = "; ".join(f"{p} -> {m.get('base_model')!r}" for p, m in adapters)
        raise ModelError(
            f"the adapters were trained on different base models ({listing}); "
            "evaluate each base's adapters in a separate run"
        )
    return base_settings_from_manifest(adapters[0][1])


def build_engine(
    adapter_dirs: list[Path], fallback: ModelSettings, system_prompt: str | None
) -> tuple[QAEngine, list[EngineModel]]:
    """One engine on the adapters' shared base (``fallback`` when there are none), and its models:
    the base first, then one per adapter folder.

    Adapters get internal engine names (``adapter_0``...): an id may contain '.', which PEFT
    rejects as a module name. The base answers with the first adapter's system prompt (else
    ``system_prompt``), so base and adapter see the same prompt. Raises ModelError when the
    adapters were trained on different bases.
    """
    adapters = [(p, read_manifest(p)) for p in adapter_dirs]
    settings = _shared_base(adapters) if adapters else fallback
    taken: set[str] = {BASE_LABEL}
    models: list[EngineModel] = []
    extra: dict[str, Path] = {}
    for i, (path, manifest) in enumerate(adapters):
        label = _unique(str(manifest.get("adapter_id") or path.name), taken)
        name = f"adapter_{i}"
        extra[name] = path
        prompt = manifest["config"]["data"].get("system_prompt")
        models.append(EngineModel(label, name, path, prompt))
    engine = QAEngine(
        settings,
        adapter_root=None,
        max_adapters=max(1, len(extra)),
        system_prompt=None,  # every request carries its model's own system prompt
        extra_adapters=extra,
    )
    base_prompt = models[0].system_prompt if models else system_prompt
    return engine, [EngineModel(BASE_LABEL, None, None, base_prompt), *models]


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


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _eval_models(cfg: TinyQAConfig) -> list[Path]:
    if cfg.eval.adapters:
        return [resolve_adapter(cfg, ref) for ref in cfg.eval.adapters]
    found = default_adapter(cfg)
    return [found] if found else []


def run_eval(cfg: TinyQAConfig) -> EvalResult:
    """Answer the eval questions with the base model and the adapters; score, write, return.

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
        for model in models:
            t0 = time.perf_counter()
            answers[model.label] = _answer_all(
                engine, model, records, e.max_new_tokens, e.batch_size, bar
            )
            seconds[model.label] = time.perf_counter() - t0
            logger.info("%s: %d answers in %.1f s", model.label, len(records), seconds[model.label])

    scored: dict[str, _Scored] = {}
    rows: list[dict[str, Any]] = []
    for model in models:
        texts = [a.text for a in answers[model.label]]
        scored[model.label], per_question = _Scored.from_answers(texts, records)
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
    metrics, deltas = _bootstrap(scored, base, e.bootstrap_samples, cfg.seed)
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
    return result


def _words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def _answer_words(records: list[QARecord], answers: dict[str, list[Any]]) -> dict[str, float]:
    out = {"reference": float(np.mean([_words(r.answer) for r in records]))}
    out.update(
        {label: float(np.mean([_words(a.text) for a in got])) for label, got in answers.items()}
    )
    return out


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def format_examples(result: EvalResult) -> str:
    """The side-by-side section of eval.md: reference and each model's answer per question."""
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
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
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
    _atomic_write(paths["eval_json"], json.dumps(result.to_dict(), indent=2) + "\n")
    _atomic_write(
        paths["predictions"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    _atomic_write(paths["table_md"], format_eval_table(result) + "\n")
    return paths


def _fmt(value: float | None, scale: float, digits: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"


def format_eval_table(result: EvalResult) -> str:
    """Markdown table: one row per model, mean [95 % CI], and the change against the base model.

    Scores are shown in percent; BLEU is sacrebleu's corpus BLEU (0-100).
    """
    header = ["model", *(METRIC_LABELS[m] for m in METRICS), "s / 100 q"]
    lines = [
        f"Questions: {result.n_questions} ({result.source}); base model {result.base_model}; "
        f"mean [{CONFIDENCE:.0%} bootstrap CI], all in %, change vs base in parentheses.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for m in result.models:
        cells = [f"{m.name} ({result.base_model})" if m.adapter_dir is None else m.name]
        for metric in METRICS:
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
    if any(m.delta_vs_base for m in result.models):
        lines += ["", "\\* the 95 % CI of the paired change excludes 0."]
    if result.answer_words:
        lengths = ", ".join(f"{k} {v:.1f}" for k, v in result.answer_words.items())
        lines += ["", f"Mean answer length in words: {lengths}."]
    if result.examples:
        lines += ["", format_examples(result)]
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
    engine, models = build_engine([Path(adapter_dir)], base_settings_from_manifest(manifest), None)
    model = models[1]
    answers = _answer_all(engine, model, records, max_new_tokens, batch_size)
    scored, _ = _Scored.from_answers([a.text for a in answers], records)
    out = {m: float(v[0]) for m, v in scored.aggregate().items()}
    return {m: v for m, v in out.items() if not np.isnan(v)}
