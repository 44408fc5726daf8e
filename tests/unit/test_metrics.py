"""Answer metrics on hand-made cases, agreement with rouge-score / sacrebleu, bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from tinyqa.data import QARecord
from tinyqa.metrics import (
    METRICS,
    ScoredAnswers,
    bootstrap,
    corpus_bleu_from_stats,
    exact_match,
    keyword_recall,
    normalize_answer,
    rouge_l,
    score_answer,
    token_f1,
)

# (prediction, reference): ASCII answers of the kind the bundled dataset has, plus edge cases.
PAIRS = [
    ("Return a JSON string.", "Serialize obj to a JSON formatted str."),
    (
        "Decode the Base16 encoded bytes-like object.",
        "Decode the Base16 encoded bytes-like object or ASCII string s.",
    ),
    (
        "Return True if the year is a leap year.",
        "Return True for leap years, False for non-leap years.",
    ),
    ("the cat sat on the mat", "the cat sat on the mat"),
    (
        "Scan through string looking for a match.",
        "Scan through string looking for a match to the pattern.",
    ),
    ("", "Return the number of items."),
    ("Completely unrelated words here", "Return the current process id."),
    (
        "Split the string at the first occurrence of sep, and return a 3-tuple.",
        "Split the string at the first occurrence of sep.",
    ),
]


# ----- keyword recall -----
def test_keyword_recall_counts_keywords_found_case_insensitively():
    assert keyword_recall("Decode the BASE16 string", ["decode", "base16", "ascii", "bytes"]) == 0.5
    assert keyword_recall("nothing relevant", ["json"]) == 0.0
    assert keyword_recall("", ["json", "dumps"]) == 0.0


def test_keyword_recall_handles_unicode_and_punctuation():
    # Case folding: German sharp s folds to "ss"; NFKC: the "ﬁ" ligature is "fi".
    assert keyword_recall("DIE GRÖSSE der Datei", ["größe"]) == 1.0
    assert keyword_recall("Open the ﬁle for reading.", ["file", "reading"]) == 1.0
    assert keyword_recall("Return a bytes-like object.", ["bytes-like", "object"]) == 1.0
    assert keyword_recall("日本語のテキストを返す", ["テキスト", "数値"]) == 0.5


def test_keyword_recall_is_undefined_without_keywords():
    assert keyword_recall("anything", []) is None


# ----- exact match / token F1 -----
def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("The `os.path` Module!") == "os path module"
    assert normalize_answer("  An   apple, a day. ") == "apple day"
    assert normalize_answer("¿Qué tal?") == "qué tal"


def test_exact_match_after_normalization():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("ANSWER!!", "an answer") == 1.0
    assert exact_match("answers", "answer") == 0.0
    assert exact_match("", "answer") == 0.0
    assert exact_match("Größe", "GRÖSSE") == 1.0


def test_token_f1_known_values():
    assert token_f1("the cat sat on the mat", "a cat sat on the mat") == 1.0
    # pred {return, list}, ref {return, sorted, list, of, items}: P = 1, R = 2/5.
    assert token_f1("Return a list.", "Return a sorted list of items.") == pytest.approx(
        2 * 0.4 / 1.4
    )
    # Repeated tokens count once per occurrence on both sides: overlap min(3, 1) = 1.
    assert token_f1("json json json", "json") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("", "answer") == 0.0
    assert token_f1("...", "the") == 1.0  # both empty after normalization
    assert token_f1("日本 語", "日本 語 です") == pytest.approx(0.8)


# ----- ROUGE-L -----
def test_rouge_l_agrees_with_rouge_score_on_ascii_answers():
    reference_scorer = RougeScorer(["rougeL"])  # its default tokenizer
    for pred, ref in PAIRS:
        expected = reference_scorer.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12), (pred, ref)


def test_rouge_l_known_value_and_unicode():
    # LCS of 5 tokens: precision 5/5, recall 5/6.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(
        2 * (5 / 6) / (1 + 5 / 6)
    )
    assert rouge_l("", "the cat") == 0.0
    # rouge-score's default tokenizer keeps only [a-z0-9]; ours keeps every script's letters.
    assert rouge_l("Grüße aus München", "grüße aus münchen") == 1.0
    assert rouge_l("Привет мир", "привет большой мир") == pytest.approx(0.8)


# ----- BLEU -----
def test_sentence_bleu_agrees_with_sacrebleu():
    for pred, ref in PAIRS:
        record = QARecord("q", ref, [])
        expected = sacrebleu.sentence_bleu(pred, [ref]).score
        assert score_answer(pred, record)["bleu"] == pytest.approx(expected, abs=1e-9), (pred, ref)


def test_corpus_bleu_from_summed_stats_equals_sacrebleu_corpus_bleu():
    preds = [p for p, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    scored, _ = ScoredAnswers.from_answers(preds, [QARecord("q", r, []) for r in refs])
    ours = corpus_bleu_from_stats(scored.bleu_stats.sum(axis=0))
    assert ours == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    assert scored.aggregate()["bleu"][0] == pytest.approx(ours)


def test_score_answer_gives_every_metric():
    rec = QARecord(
        "What does json.dumps do?", "Serialize obj to a JSON formatted str.", ["serialize", "json"]
    )
    perfect = score_answer("Serialize obj to a JSON formatted str.", rec)
    assert set(perfect) == set(METRICS)
    assert (
        perfect["keyword_recall"]
        == perfect["exact_match"]
        == perfect["token_f1"]
        == perfect["rougeL"]
        == 1.0
    )
    assert perfect["bleu"] == pytest.approx(100.0)
    empty = score_answer("", rec)
    assert (
        empty["keyword_recall"]
        == empty["exact_match"]
        == empty["token_f1"]
        == empty["rougeL"]
        == 0.0
    )
    assert empty["bleu"] == 0.0


# ----- aggregates and bootstrap intervals -----
def _records(n: int, with_keywords: bool = True) -> list[QARecord]:
    return [
        QARecord(f"q{i}", f"answer number {i}", ["answer"] if with_keywords else [], i)
        for i in range(n)
    ]


def test_aggregate_means_and_skips_undefined_keyword_recall():
    records = _records(4)
    records[3] = QARecord("q3", "answer number 3", [], 3)  # no keywords: no recall for it
    scored, rows = ScoredAnswers.from_answers(["answer", "answer", "nothing", "nothing"], records)
    assert [r["keyword_recall"] for r in rows] == [1.0, 1.0, 0.0, None]
    agg = scored.aggregate()
    assert agg["keyword_recall"][0] == pytest.approx(2 / 3)
    assert agg["exact_match"][0] == 0.0


def test_bootstrap_interval_brackets_the_mean_and_paired_delta_is_exact_for_a_constant_shift():
    records = _records(40)
    rng = np.random.default_rng(0)
    hits = rng.random(40) < 0.3
    base_answers = ["answer" if h else "nope" for h in hits]
    better = [f"answer number {i}" for i in range(40)]  # every one exact
    scored = {
        "base": ScoredAnswers.from_answers(base_answers, records)[0],
        "adapter": ScoredAnswers.from_answers(better, records)[0],
        "same": ScoredAnswers.from_answers(base_answers, records)[0],
    }
    metrics, deltas = bootstrap(scored, "base", samples=500, seed=1)
    kr = metrics["base"]["keyword_recall"]
    lo, hi = kr["ci95"]
    assert lo < kr["mean"] < hi
    assert kr["mean"] == pytest.approx(hits.mean())
    assert metrics["adapter"]["exact_match"] == {"mean": 1.0, "ci95": [1.0, 1.0]}
    # Paired resampling: the same questions for both, so the change in exact match is exactly +1.
    assert deltas["adapter"]["exact_match"]["mean"] == 1.0
    assert deltas["adapter"]["exact_match"]["ci95"] == [1.0, 1.0]
    assert deltas["same"]["token_f1"]["ci95"] == [0.0, 0.0]
    assert "base" not in deltas
    assert deltas["adapter"]["keyword_recall"]["ci95"][0] > 0
    assert all(not math.isnan(v) for v in metrics["adapter"]["bleu"]["ci95"])


def test_bootstrap_reports_none_for_a_metric_nothing_defines():
    scored = {"base": ScoredAnswers.from_answers(["a", "b"], _records(2, with_keywords=False))[0]}
    metrics, deltas = bootstrap(scored, "base", samples=50, seed=0)
    assert metrics["base"]["keyword_recall"] == {"mean": None, "ci95": [None, None]}
    assert deltas == {}
