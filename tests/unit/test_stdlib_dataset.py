"""Tests for the bundled stdlib QA dataset and its deterministic generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyqa import stdlib_dataset

RESOURCES = Path(__file__).resolve().parents[2] / "tinyqa" / "resources"
QA_PATH = RESOURCES / "stdlib_qa.json"
CORPUS_PATH = RESOURCES / "stdlib_corpus.txt"
SMALL_MODULES = ["json", "math", "textwrap"]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads(QA_PATH.read_text(encoding="utf-8"))


def test_bundled_file_is_small_and_large_enough(records: list[dict]) -> None:
    assert QA_PATH.stat().st_size < 2 * 1024 * 1024
    assert 300 <= len(records) <= stdlib_dataset.DEFAULT_LIMIT


def test_bundled_records_have_expected_shape(records: list[dict]) -> None:
    for record in records:
        assert set(record) == {"question", "answer_keywords", "answer"}
        assert isinstance(record["question"], str) and record["question"].strip()
        assert isinstance(record["answer"], str) and record["answer"].strip()
        assert record["answer"].endswith(".")
        assert len(record["answer"]) <= stdlib_dataset.MAX_ANSWER_CHARS
        keywords = record["answer_keywords"]
        assert isinstance(keywords, list) and 1 <= len(keywords) <= 5
        assert all(isinstance(k, str) and k and k == k.lower() for k in keywords)
        assert len(set(keywords)) == len(keywords)


def test_bundled_questions_are_unique(records: list[dict]) -> None:
    questions = [record["question"] for record in records]
    assert len(set(questions)) == len(questions)


def test_bundled_corpus_is_plain_text() -> None:
    text = CORPUS_PATH.read_text(encoding="utf-8")
    assert CORPUS_PATH.stat().st_size < 800 * 1024
    lines = text.splitlines()
    assert len(lines) > 500
    assert all(line.strip() for line in lines)
    assert not any(line.startswith(("What does `", "What is `")) for line in lines)


def test_build_records_is_deterministic() -> None:
    first = stdlib_dataset.build_records(SMALL_MODULES)
    second = stdlib_dataset.build_records(list(reversed(SMALL_MODULES)))
    assert first == second
    assert len(first) >= 10
    dumps = [r for r in first if "`json.dumps`" in r["question"]]
    assert dumps and dumps[0]["answer"] == "Serialize obj to a JSON formatted str."


def test_build_records_respects_limit() -> None:
    records = stdlib_dataset.build_records(SMALL_MODULES, limit=5)
    assert len(records) == 5
    modules = {r["question"].split("`")[1].rsplit(".", 1)[0] for r in records}
    assert modules == set(SMALL_MODULES)  # round-robin over modules


def test_build_corpus_is_deterministic_and_bounded() -> None:
    first = stdlib_dataset.build_corpus(SMALL_MODULES, max_bytes=4000)
    assert first == stdlib_dataset.build_corpus(SMALL_MODULES, max_bytes=4000)
    assert 0 < len(first.encode("utf-8")) <= 4000


def test_summarize_strips_signature_lines() -> None:
    doc = "time() -> floating point number\n\nReturn the current time in seconds. More text."
    assert stdlib_dataset.summarize(doc) == "Return the current time in seconds."
    assert stdlib_dataset.summarize("random() -> x in the interval [0, 1).") is None
    assert stdlib_dataset.summarize("Too short.") is None


def test_summarize_truncates_long_sentences_at_word_boundary() -> None:
    summary = stdlib_dataset.summarize("Compute " + "many words " * 40)
    assert summary is not None and summary.endswith(".")
    assert len(summary) <= stdlib_dataset.MAX_ANSWER_CHARS
    assert not summary.endswith(" .")


def test_keywords_skip_stopwords_and_own_name() -> None:
    words = stdlib_dataset.keywords("Serialize obj to a JSON formatted str.", "json.dumps")
    assert words == ["serialize", "obj", "formatted", "str"]


def test_qa_set_from_another_library(tmp_path: Path) -> None:
    """The generator builds an unseen-domain set from any installed package: questions name the
    library (not the stdlib), and the file passes tinyqa's own dataset validation."""
    from tinyqa.data import load_records

    out = tmp_path / "httpx_qa.json"
    count = stdlib_dataset.write_qa(out, ["httpx"], limit=20)
    records = load_records(out)
    assert len(records) == count == 20
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert all("`httpx." in r["question"] for r in raw)
    assert not any("standard library" in r["question"] for r in raw)
    assert {r["question"] for r in raw}.isdisjoint(
        r["question"] for r in json.loads(QA_PATH.read_text(encoding="utf-8"))
    )


def test_qa_set_from_a_missing_module_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        stdlib_dataset.main(["--modules", "no_such_module_xyz", "--out", str(tmp_path / "q.json")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "q.json").exists()
