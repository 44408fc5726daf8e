"""Answer metrics: how good is one answer, and how sure is a mean over many.

Per answer: keyword recall (the dataset's native measure: share of a record's answer keywords found
in the answer, case-insensitive), exact match and token F1 (SQuAD-style normalization), ROUGE-L F1
(``rouge-score``) and BLEU (``sacrebleu``). Per model: the mean of each (corpus BLEU for BLEU) with a
95 % percentile-bootstrap confidence interval, and the paired difference to a base model (same
resampled questions for both, so the interval is about the difference, not two overlapping bars).
No model code here: :mod:`tinyqa.evaluation` generates the answers and calls these.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tinyqa.data import QARecord

METRICS = ("keyword_recall", "exact_match", "token_f1", "rougeL", "bleu")
METRIC_LABELS = {
    "keyword_recall": "keyword recall",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU",
}
CONFIDENCE = 0.95
_ARTICLES = frozenset({"a", "an", "the"})
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


def word_count(text: str) -> int:
    """Words (runs of letters and digits of any script) in ``text``: answer length for reports."""
    return len(_WORD_RE.findall(text))


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
class ScoredAnswers:
    """Per-question metric columns of one model (NaN = undefined for that question)."""

    columns: dict[str, np.ndarray]  # metric -> (N,)
    bleu_stats: np.ndarray  # (N, 10)

    @classmethod
    def from_answers(
        cls, predictions: list[str], records: list[QARecord]
    ) -> tuple[ScoredAnswers, list[dict]]:
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


def bootstrap(
    scored: dict[str, ScoredAnswers], base: str | None, samples: int, seed: int
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
