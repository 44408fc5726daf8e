"""Dataset validation, chat formatting with answer-only labels, splitting and prepare's outputs."""

from __future__ import annotations

import json

import pytest

from tinyqa.config import DataSettings
from tinyqa.data import (
    IGNORE_INDEX,
    QARecord,
    bundled_dataset_path,
    load_records,
    prepare_dataset,
    read_prepared,
    split_records,
    tokenize_example,
    tokenize_records,
)
from tinyqa.errors import DatasetError

GOOD = {"question": "What does `json.dumps` do?", "answer_keywords": ["serialize", "json"]}


def _write(tmp_path, content, name="ds.json"):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "file is empty"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        ('[{"question": "q", "answer_keywords": ["a"]', "not valid JSON at line 1"),
        ("not json at all", "line 1: not valid JSON"),
        ('{"question": "q", "answer_keywords": ["a"]}\n{"question": ', "line 2: not valid JSON"),
        ({"question": "q"}, "top level is an object"),
        (
            '"just a string"',
            "record 0: expected an object with 'question' and 'answer_keywords', got str",
        ),
        ([], "no records"),
        ([None], "record 0: expected an object"),
        ([["q", "a"]], "got list"),
        ([{"answer_keywords": ["a"]}], "'question' is missing"),
        ([{"question": "", "answer_keywords": ["a"]}], "'question' is empty"),
        ([{"question": "   ", "answer_keywords": ["a"]}], "'question' is empty"),
        ([{"question": 3, "answer_keywords": ["a"]}], "'question' must be a string, got int"),
        (
            [{"question": "q" * 5000, "answer_keywords": ["a"]}],
            "5000 characters, over data.max_question_chars",
        ),
        ([{"question": "q"}], "'answer_keywords' is missing"),
        ([{"question": "q", "answer_keywords": []}], "'answer_keywords' is empty"),
        ([{"question": "q", "answer_keywords": ["a", ""]}], "'answer_keywords'[1] is empty"),
        (
            [{"question": "q", "answer_keywords": ["a", 7]}],
            "'answer_keywords'[1] must be a string, got int",
        ),
        ([{"question": "q", "answer_keywords": {"a": 1}}], "must be a list of strings, got dict"),
        ([{"question": "q", "answer_keywords": ""}], "empty string"),
        (
            [{"question": "q", "answer": "", "answer_keywords": ["a"]}],
            "'answer' must be a non-empty string",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(DatasetError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert expected in msg


def test_top_level_object_is_refused(tmp_path):
    path = _write(tmp_path, '{"records": [1, 2]}')  # valid JSON object, not JSONL of records
    with pytest.raises(DatasetError, match="answer_keywords|expected"):
        load_records(path)


def test_every_bad_record_is_reported_at_once(tmp_path):
    records = [GOOD, None, {"question": ""}, GOOD, {"question": "q", "answer_keywords": [1]}]
    with pytest.raises(DatasetError) as err:
        load_records(_write(tmp_path, records))
    assert [p.split(":")[0] for p in err.value.problems] == [
        "record 1",
        "record 2",
        "record 2",
        "record 4",
    ]


def test_good_records_json_and_jsonl(tmp_path):
    rows = [
        GOOD,
        {"question": "Q2", "answer_keywords": "one", "answer": "The full answer."},
        {"question": "Q3", "answer": "Only an answer."},
    ]
    for name, text in (
        ("a.json", json.dumps(rows)),
        ("a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n"),
    ):
        recs = load_records(_write(tmp_path, text, name))
        assert [r.question for r in recs] == ["What does `json.dumps` do?", "Q2", "Q3"]
        assert recs[0].answer == "serialize, json"  # keywords joined when no answer is given
        assert recs[1].answer == "The full answer."  # 'answer' wins over keywords
        assert recs[1].keywords == ["one"]


def test_bundled_dataset_is_valid():
    recs = load_records(bundled_dataset_path())
    assert len(recs) >= 300
    assert bundled_dataset_path().stat().st_size < 2_000_000


def test_labels_cover_answer_and_eos_only(tiny_tokenizer):
    rec = QARecord(
        "What does `json.dumps` do?", "Serialize obj to a JSON formatted str.", ["serialize"]
    )
    ex = tokenize_example(tiny_tokenizer, rec)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tiny_tokenizer.bos_token_id
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    # Everything before the answer is the Zephyr prompt, masked.
    prompt = tiny_tokenizer.decode(ids[:first])
    assert prompt == "<s><|user|>\nWhat does `json.dumps` do?</s>\n<|assistant|>\n"
    assert all(label == IGNORE_INDEX for label in labels[:first])
    # The answer and the closing eos are labelled, contiguously, with their own ids.
    assert labels[first : last + 1] == ids[first : last + 1]
    assert ids[last] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[first:last]) == rec.answer
    # The newline the template puts after the eos is not trained on.
    assert all(label == IGNORE_INDEX for label in labels[last + 1 :])


def test_chatml_labels_decode_to_answer_and_im_end():
    """SmolLM2's ChatML template (default system turn, `<|im_end|>` closing each turn): the loss
    covers exactly the answer and its `<|im_end|>`, for every bundled record. The real tokenizer is
    checked the same way in tests/integration/test_smollm2_pipeline.py."""
    from tinyqa.presets import build_tokenizer
    from tinyqa.smollm2 import CHATML_TEMPLATE

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    records = load_records(bundled_dataset_path())
    for rec in records:
        ex = tokenize_example(tok, rec)
        labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert tok.decode(labelled) == rec.answer + "<|im_end|>", rec.index
    ex = tokenize_example(tok, records[0], system_prompt="Answer briefly.")
    first = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][:first]) == (
        f"<s><|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
        f"{records[0].question}<|im_end|>\n<|im_start|>assistant\n"
    )
    default = tokenize_example(tok, records[0])
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(default["input_ids"])


def test_training_prompt_matches_generation_prompt(tiny_tokenizer):
    """The model is trained on exactly the prefix it sees when asked to answer."""
    from tinyqa.data import build_messages, render_prompt

    rec = QARecord("Q?", "A.", ["a"])
    ex = tokenize_example(tiny_tokenizer, rec)
    first = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
    prompt_ids = tiny_tokenizer(render_prompt(tiny_tokenizer, build_messages("Q?")))["input_ids"]
    assert ex["input_ids"][:first] == prompt_ids


def test_split_is_seeded_and_disjoint():
    recs = [QARecord(f"q{i}", f"a{i}", ["k"], i) for i in range(50)]
    a_train, a_eval = split_records(recs, 0.2, seed=1)
    b_train, b_eval = split_records(recs, 0.2, seed=1)
    c_train, c_eval = split_records(recs, 0.2, seed=2)
    assert a_eval == b_eval and a_train == b_train
    assert a_eval != c_eval
    assert len(a_eval) == 10 and len(a_train) == 40
    assert not {r.index for r in a_train} & {r.index for r in a_eval}


def test_overlong_records(tiny_tokenizer):
    recs = [QARecord("short?", "yes.", ["yes"], 0), QARecord("long " * 60 + "?", "no.", ["no"], 1)]
    with pytest.raises(
        DatasetError, match=r"record 1: \d+ tokens > data.max_length \(32\).*overlong=drop"
    ):
        tokenize_records(recs, tiny_tokenizer, DataSettings(max_length=32), "ds.json")
    rows, handled = tokenize_records(
        recs, tiny_tokenizer, DataSettings(max_length=32, overlong="drop"), "ds"
    )
    assert [r["index"] for r in rows] == [0] and handled["dropped"] == [1]
    long_answer = [QARecord("q?", "word " * 40, ["word"], 0)]
    rows, handled = tokenize_records(
        long_answer, tiny_tokenizer, DataSettings(max_length=32, overlong="truncate"), "ds"
    )
    assert len(rows[0]["input_ids"]) == 32 and handled["truncated"] == [0]


def test_prepare_writes_splits_and_stats(make_config, tiny_tokenizer):
    cfg = make_config()
    prepared = prepare_dataset(cfg, tiny_tokenizer)
    back = read_prepared(cfg.data_dir)
    assert back.stats == prepared.stats
    assert back.stats["train"] + back.stats["eval"] == back.stats["records"]
    assert back.stats["tokens_total"]["p50"] > 0
    assert len(back.train) == back.stats["train"]
    assert sorted(p.name for p in cfg.data_dir.iterdir()) == [
        "eval.jsonl",
        "stats.json",
        "train.jsonl",
    ]


def test_prepare_writes_nothing_when_validation_fails(make_config, tiny_tokenizer, tmp_path):
    bad = _write(tmp_path, [GOOD, {"question": ""}])
    cfg = make_config(f"data.path={bad}")
    with pytest.raises(DatasetError):
        prepare_dataset(cfg, tiny_tokenizer)
    assert not cfg.run_dir.exists() or not any(cfg.run_dir.iterdir())
