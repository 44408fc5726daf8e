"""QA datasets: load, validate, chat-format, tokenize with answer-only labels, split, write.

Dataset format: a JSON array, or JSON Lines, of objects with ``question`` (non-empty string) and
``answer_keywords`` (non-empty list of non-empty strings, or one string). An optional ``answer``
string wins over the keywords as the training target. Other keys are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tinyqa.config import DataSettings, TinyQAConfig
from tinyqa.errors import DatasetError, StorageError
from tinyqa.storage import Location, atomic_folder, location

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "eval")
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class QARecord:
    question: str
    answer: str
    keywords: list[str] = field(default_factory=list)
    index: int = 0  # position in the source file, for error messages and predictions


def bundled_dataset_path() -> Path:
    """The stdlib QA dataset shipped with the package."""
    return Path(str(resources.files("tinyqa").joinpath("resources/stdlib_qa.json")))


def dataset_path(settings: DataSettings) -> Path:
    return Path(settings.path).expanduser() if settings.path else bundled_dataset_path()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dataset_sha256(settings: DataSettings) -> str:
    """The sha256 of the configured dataset file; raises :class:`DatasetError` (one line) when it
    cannot be read, so identity checks done before validation fail like validation would."""
    path = dataset_path(settings)
    try:
        return file_sha256(path)
    except FileNotFoundError as e:
        raise DatasetError(
            str(path), ["file does not exist; set data.path to a JSON or JSONL file"]
        ) from e
    except OSError as e:
        raise DatasetError(str(path), [f"cannot be read ({e.strerror}); check the path"]) from e


def _read_raw(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetError(
            str(path), ["file does not exist; set data.path to a JSON or JSONL file"]
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            str(path), [f"not UTF-8 (bad byte at offset {e.start}); save the file as UTF-8"]
        ) from e
    if not text.strip():
        raise DatasetError(str(path), ["file is empty; give a JSON array of QA records"])
    if path.suffix.lower() in (".jsonl", ".ndjson") or not text.lstrip().startswith(("[", "{")):
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):
            # A first line that is an object: JSON Lines without the .jsonl suffix.
            return _read_jsonl(path, text)
        raise DatasetError(
            str(path),
            [f"not valid JSON at line {e.lineno} column {e.colno}: {e.msg} (truncated file?)"],
        ) from e
    if isinstance(data, dict):
        raise DatasetError(
            str(path), ["top level is an object; expected a JSON array of records (or JSON Lines)"]
        )
    if not isinstance(data, list):
        raise DatasetError(
            str(path), [f"top level is {type(data).__name__}; expected a JSON array"]
        )
    return data


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
    if problems:
        raise DatasetError(str(path), problems)
    return records


def _check_record(i: int, rec: Any, max_question_chars: int) -> tuple[QARecord | None, list[str]]:
    where = f"record {i}"
    if not isinstance(rec, dict):
        got = "null" if rec is None else type(rec).__name__
        return None, [
            f"{where}: expected an object with 'question' and 'answer_keywords', got {got}"
        ]
    problems = []
    q = rec.get("question")
    if "question" not in rec:
        problems.append(f"{where}: 'question' is missing; add the question text")
    elif not isinstance(q, str):
        problems.append(f"{where}: 'question' must be a string, got {type(q).__name__}")
    elif not q.strip():
        problems.append(f"{where}: 'question' is empty; write the question text")
    elif len(q) > max_question_chars:
        problems.append(
            f"{where}: 'question' has {len(q)} characters, over data.max_question_chars "
            f"({max_question_chars}); shorten it or raise the limit"
        )
    answer = rec.get("answer")
    if "answer" in rec and (not isinstance(answer, str) or not answer.strip()):
        problems.append(f"{where}: 'answer' must be a non-empty string when given")
        answer = None
    kws = rec.get("answer_keywords")
    keywords: list[str] = []
    if "answer_keywords" not in rec:
        if answer is None:
            problems.append(
                f"{where}: 'answer_keywords' is missing; give a list of answer keywords"
            )
    elif isinstance(kws, str):
        if kws.strip():
            keywords = [kws.strip()]
        else:
            problems.append(
                f"{where}: 'answer_keywords' is an empty string; give at least one keyword"
            )
    elif isinstance(kws, list):
        if not kws:
            problems.append(f"{where}: 'answer_keywords' is empty; give at least one keyword")
        for j, kw in enumerate(kws):
            if not isinstance(kw, str):
                problems.append(
                    f"{where}: 'answer_keywords'[{j}] must be a string, got {type(kw).__name__}"
                )
            elif not kw.strip():
                problems.append(
                    f"{where}: 'answer_keywords'[{j}] is empty; remove it or fill it in"
                )
            else:
                keywords.append(kw.strip())
    else:
        problems.append(
            f"{where}: 'answer_keywords' must be a list of strings, got {type(kws).__name__}"
        )
    if problems:
        return None, problems
    text = answer.strip() if isinstance(answer, str) else ", ".join(keywords)
    return QARecord(question=q.strip(), answer=text, keywords=keywords, index=i), []


def load_records(path: str | Path, max_question_chars: int = 4000) -> list[QARecord]:
    """Read and validate a dataset file; every problem is reported at once in :class:`DatasetError`."""
    path = Path(path)
    raw = _read_raw(path)
    if not raw:
        raise DatasetError(str(path), ["no records; the array is empty"])
    records, problems = [], []
    for i, rec in enumerate(raw):
        ok, bad = _check_record(i, rec, max_question_chars)
        problems.extend(bad)
        if ok is not None:
            records.append(ok)
    if problems:
        raise DatasetError(str(path), problems)
    return records


def build_messages(question: str, answer: str | None = None, system_prompt: str | None = None):
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text the model sees before it answers (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_example(
    tokenizer, record: QARecord, system_prompt: str | None = None
) -> dict[str, Any]:
    """Chat-format one record and label only the answer and its closing eos.

    The answer span is found in characters (the prompt rendering must be a prefix of the full
    conversation, true of TinyLlama's template) and mapped to tokens by offsets, so masking does not
    depend on how the tokenizer merges across the boundary.
    """
    prompt = render_prompt(tokenizer, build_messages(record.question, None, system_prompt))
    full = tokenizer.apply_chat_template(
        build_messages(record.question, record.answer, system_prompt), tokenize=False
    )
    if not full.startswith(prompt):
        raise DatasetError(
            "chat template",
            [
                "the prompt rendering is not a prefix of the conversation; use a model whose chat "
                "template renders '<prompt><answer>' (e.g. TinyLlama's Zephyr template)"
            ],
        )
    start = len(prompt)
    end = full.index(record.answer, start) + len(record.answer)
    eos = tokenizer.eos_token or ""
    if eos and full.startswith(eos, end):
        end += len(eos)
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    labels = [
        tok if start <= s < end else IGNORE_INDEX
        for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return {"input_ids": enc["input_ids"], "labels": labels}


def split_records(records: list[QARecord], eval_fraction: float, seed: int):
    """Seeded shuffle, then the first ``eval_fraction`` (at least one record) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise DatasetError(
            "split",
            [
                f"{len(records)} records leave nothing to train on with eval_fraction={eval_fraction}"
            ],
        )
    eval_idx = set(order[:n_eval])
    train = [records[i] for i in range(len(records)) if i not in eval_idx]
    held = [records[i] for i in range(len(records)) if i in eval_idx]
    return train, held


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> float:
        return float(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))])

    return {"min": float(s[0]), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": float(s[-1])}


@dataclass
class PreparedData:
    """Tokenized splits plus the stats written beside them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: dict[str, Any]

    def questions(self, split: str) -> list[QARecord]:
        rows = self.train if split == "train" else self.eval
        return [QARecord(r["question"], r["answer"], list(r["keywords"]), r["index"]) for r in rows]


def tokenize_records(
    records: list[QARecord], tokenizer, settings: DataSettings, source: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, too_long, dropped, truncated = [], [], [], []
    for rec in records:
        ex = tokenize_example(tokenizer, rec, settings.system_prompt)
        n = len(ex["input_ids"])
        if n > settings.max_length:
            if settings.overlong == "error":
                too_long.append(
                    f"record {rec.index}: {n} tokens > data.max_length ({settings.max_length})"
                )
                continue
            if settings.overlong == "drop":
                dropped.append(rec.index)
                continue
            ex = {k: v[: settings.max_length] for k, v in ex.items()}
            if all(label == IGNORE_INDEX for label in ex["labels"]):
                dropped.append(rec.index)  # nothing of the answer survives truncation
                continue
            truncated.append(rec.index)
        rows.append({**asdict(rec), **ex})
    if too_long:
        too_long.append(
            "raise data.max_length, or set data.overlong=drop or data.overlong=truncate"
        )
        raise DatasetError(source, too_long)
    return rows, {"dropped": dropped, "truncated": truncated}


def prepare_dataset(cfg: TinyQAConfig, tokenizer=None, write: bool = True) -> PreparedData:
    """Validate, format, tokenize and split the dataset; write ``<run>/data/`` atomically.

    Nothing is written when validation fails.
    """
    from tinyqa.model import load_tokenizer

    path = dataset_path(cfg.data)
    records = load_records(path, cfg.data.max_question_chars)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    rows, handled = tokenize_records(records, tokenizer, cfg.data, str(path))
    if len(rows) < 2:
        raise DatasetError(str(path), [f"only {len(rows)} usable records; need at least 2"])
    kept = [QARecord(r["question"], r["answer"], r["keywords"], r["index"]) for r in rows]
    train_recs, eval_recs = split_records(kept, cfg.data.eval_fraction, cfg.data.seed)
    by_index = {r["index"]: r for r in rows}
    train = [by_index[r.index] for r in train_recs]
    held = [by_index[r.index] for r in eval_recs]
    lengths = [len(r["input_ids"]) for r in rows]
    answer_tokens = [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows]
    stats = {
        "source": str(path),
        "sha256": file_sha256(path),
        "records": len(records),
        "train": len(train),
        "eval": len(held),
        "dropped": handled["dropped"],
        "truncated": handled["truncated"],
        "max_length": cfg.data.max_length,
        "tokens_total": _percentiles(lengths),
        "tokens_answer": _percentiles(answer_tokens),
        "tokenizer": cfg.model.name,
    }
    prepared = PreparedData(train=train, eval=held, stats=stats)
    if write:
        write_prepared(prepared, cfg.data_dir)
    logger.info(
        "prepared %d records (%d train / %d eval) from %s", len(rows), len(train), len(held), path
    )
    return prepared


def write_prepared(prepared: PreparedData, out_dir: Location) -> None:
    """Write the splits and stats into ``out_dir``, replacing it as a whole (atomically; on cloud
    storage ``stats.json`` is uploaded last and marks the folder complete)."""
    out_dir = location(out_dir)
    try:
        with atomic_folder(out_dir, STATS_FILE) as tmp:
            for split, rows in (("train", prepared.train), ("eval", prepared.eval)):
                with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            (tmp / STATS_FILE).write_text(json.dumps(prepared.stats, indent=2) + "\n")
    except OSError as e:
        raise StorageError(
            f"cannot write under {out_dir.parent}: {e.strerror or e}; set storage_path to a writable folder"
        ) from e


def read_prepared(data_dir: Location) -> PreparedData:
    """Read splits written by :func:`prepare_dataset` (a local folder or a cloud prefix)."""
    data_dir = location(data_dir)
    if not (data_dir / STATS_FILE).is_file():
        raise DatasetError(str(data_dir), ["no prepared data here; run `tinyqa prepare` first"])
    splits = {}
    for split in SPLITS:
        text = (data_dir / f"{split}.jsonl").read_text(encoding="utf-8")
        splits[split] = [json.loads(line) for line in text.splitlines() if line.strip()]
    stats = json.loads((data_dir / STATS_FILE).read_text())
    return PreparedData(train=splits["train"], eval=splits["eval"], stats=stats)
