"""Deterministic generator of the bundled stdlib question-answer dataset and corpus.

Two resource files are derived from docstrings of a curated list of stdlib modules:

* ``resources/stdlib_qa.json`` -- records ``{"question", "answer_keywords", "answer"}``, one
  per public function or class, whose answer is the docstring's first sentence.
* ``resources/stdlib_corpus.txt`` -- first paragraphs of docstrings (one per line) from the same
  and additional modules, used to pretrain a tiny offline language model (not in QA form).

Output depends only on the Python build: modules and names are sorted, and question templates
are picked by ``zlib.crc32`` of the qualified name. Rebuild with::

    python -m tinyqa.stdlib_dataset --out-dir tinyqa/resources
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import re
import sys
import warnings
import zlib
from collections.abc import Iterator
from itertools import chain, zip_longest
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

# fmt: off
QA_MODULES: tuple[str, ...] = (
    "base64", "bisect", "calendar", "cmath", "codecs", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "filecmp", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http", "ipaddress",
    "itertools", "json", "math", "operator", "os.path", "pathlib", "pprint",
    "queue", "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct",
    "tempfile", "textwrap", "time", "unicodedata", "urllib.parse", "uuid", "zipfile", "zlib",
)
CORPUS_EXTRA_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "binascii", "builtins", "bz2", "cmd", "code",
    "collections.abc", "concurrent.futures", "configparser", "contextvars", "dis", "doctest",
    "email.message", "email.utils", "fileinput", "ftplib", "getopt", "gettext", "graphlib",
    "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "inspect", "io",
    "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "optparse", "os", "pickle", "platform", "plistlib", "poplib", "pstats", "pydoc",
    "reprlib", "sched", "selectors", "shelve", "signal", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "stat", "subprocess", "sys", "tarfile", "threading", "timeit", "tokenize",
    "trace", "traceback", "tracemalloc", "types", "typing", "unittest", "urllib.request",
    "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zoneinfo",
)
STDLIB = "Python's standard library"
DEFAULT_LIMIT = 600
MAX_ANSWER_CHARS = 200
MIN_SUMMARY_WORDS = 4
CORPUS_MAX_BYTES = 780_000
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"

FUNCTION_TEMPLATES = (
    "What does `{name}` do?",
    "What is `{name}` used for?",
    "Explain the purpose of `{name}`.",
    "In {library}, what does the function `{name}` do?",
)
CLASS_TEMPLATES = (
    "What is the `{name}` class?",
    "What does the class `{name}` represent?",
    "Explain the purpose of the `{name}` class.",
)
STOPWORDS = frozenset((
    "a", "about", "above", "after", "all", "also", "an", "and", "any", "are", "as", "at", "be",
    "been", "being", "but", "by", "can", "could", "does", "each", "either", "else", "for", "from",
    "given", "has", "have", "if", "in", "into", "is", "it", "its", "may", "more", "most", "must",
    "no", "none", "not", "of", "on", "one", "only", "or", "other", "otherwise", "same", "should",
    "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "this",
    "those", "to", "true", "false", "use", "used", "using", "was", "were", "what", "when", "where",
    "whether", "which", "while", "who", "will", "with", "within", "without", "would", "yet", "you",
    "your", "return", "returns", "class", "function", "method", "object", "objects",
))
# fmt: on
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$|^\w[\w.]*\(.*->")
_DASH_SIGNATURE = re.compile(r"^[\w.]+\(.*?\):?\s+-+\s+")  # "D.count(value) -- return ..."
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bvs\.)(?<!\ba\.k\.a\.)(?<=[.!?])\s+")
_MARKUP = re.compile(r"``|:[a-z]+:(?=`)|\s*<https?://[^>\s]*>")  # reST literals, roles, URLs
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*[A-Za-z0-9]")


def _paragraphs(doc: str) -> list[str]:
    """Split a docstring into whitespace-collapsed paragraphs, dropping signature lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if not paragraphs:  # builtin docstrings may start with "name(args) -> result" lines
            while lines and _SIGNATURE.match(lines[0]):
                head = lines.pop(0)
                while lines and head.count("(") > head.count(")"):  # wrapped signature
                    head += lines.pop(0)
        text = " ".join(_MARKUP.sub("", " ".join(lines)).split())
        if text and (paragraphs or not _SIGNATURE.match(text)):
            paragraphs.append(text if paragraphs else _DASH_SIGNATURE.sub("", text))
    return paragraphs


def summarize(doc: str) -> str | None:
    """Return the cleaned first sentence of ``doc``, or None if it is unusable."""
    paragraphs = _paragraphs(doc)
    sentence = _SENTENCE_END.split(paragraphs[0], maxsplit=1)[0] if paragraphs else ""
    if len(sentence.split()) < MIN_SUMMARY_WORDS or sentence.startswith(">>>"):
        return None
    if len(sentence) > MAX_ANSWER_CHARS:
        sentence = sentence[: MAX_ANSWER_CHARS - 1].rsplit(" ", 1)[0].rstrip(",;:-")
    sentence = sentence.rstrip(" .:;,")
    return sentence[0].upper() + sentence[1:] + "."


def keywords(summary: str, qualname: str, max_count: int = 5) -> list[str]:
    """Pick up to ``max_count`` lowercase content words of ``summary`` in order of appearance."""
    skip = STOPWORDS | {part.lower() for part in re.split(r"[._]", qualname)}
    found: list[str] = []
    for word in _WORD.findall(summary):
        word = word.lower()
        if len(word) > 2 and word not in skip and word not in found:
            found.append(word)
            if len(found) == max_count:
                break
    return found


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the Python build
        logger.warning("skipping module %s: not importable", name)
        return None


def _own_doc(obj: object) -> str | None:
    """Return the docstring defined on ``obj`` itself (classes do not inherit one)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _members(module_name: str) -> Iterator[tuple[str, object]]:
    """Yield ``(qualified name, object)`` for public functions and classes of a module."""
    module = _import(module_name)
    names = (getattr(module, "__all__", None) or dir(module)) if module else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for attr in sorted(set(names)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                yield f"{module_name}.{attr}", obj


def _question(qualname: str, is_class: bool, library: str = STDLIB) -> str:
    templates = CLASS_TEMPLATES if is_class else FUNCTION_TEMPLATES
    index = zlib.crc32(qualname.encode("utf-8")) % len(templates)
    return templates[index].format(name=qualname, library=library)


def _library(module_name: str) -> str:
    """How a question names where ``module_name`` comes from."""
    top = module_name.split(".")[0]
    return STDLIB if top in sys.stdlib_module_names else f"the `{top}` library"


def _module_records(module_name: str) -> list[dict]:
    records = []
    for qualname, obj in _members(module_name):
        doc = _own_doc(obj)
        summary = summarize(doc) if doc else None
        words = keywords(summary, qualname) if summary else []
        if len(words) < 2:
            continue
        question = _question(qualname, inspect.isclass(obj), _library(module_name))
        records.append({"question": question, "answer_keywords": words, "answer": summary})
    return records


def build_records(modules: list[str] | None = None, limit: int = DEFAULT_LIMIT) -> list[dict]:
    """Build QA records from docstrings, taking modules round-robin until ``limit`` is reached.

    The result is sorted by qualified name and has no duplicate questions or answers.
    """
    per_module = [_module_records(name) for name in sorted(modules or QA_MODULES)]
    selected: list[dict] = []
    seen: set[str] = set()
    for record in chain.from_iterable(zip_longest(*per_module)):
        if record is None or record["question"] in seen or record["answer"] in seen:
            continue
        seen.update((record["question"], record["answer"]))
        selected.append(record)
        if len(selected) == limit:
            break
    return sorted(selected, key=lambda rec: rec["question"].split("`")[1])


def _corpus_docs(module_name: str) -> Iterator[str | None]:
    """Yield the docstrings of a module, its public members and their public methods."""
    module = _import(module_name)
    yield module.__doc__ if module else None
    for _, obj in _members(module_name):
        yield _own_doc(obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield _own_doc(member)


def build_corpus(modules: list[str] | None = None, max_bytes: int = CORPUS_MAX_BYTES) -> str:
    """Build a corpus of unique docstring first paragraphs, one per line, under ``max_bytes``."""
    names = sorted(modules) if modules is not None else sorted(QA_MODULES + CORPUS_EXTRA_MODULES)
    seen: set[str] = set()
    lines: list[str] = []
    size = 0
    for doc in chain.from_iterable(_corpus_docs(name) for name in names):
        paragraphs = _paragraphs(doc) if doc else []
        text = paragraphs[0] if paragraphs else ""
        if len(text.split()) < MIN_SUMMARY_WORDS or text in seen or text.startswith(">>>"):
            continue
        size += len(text.encode("utf-8")) + 1
        if size > max_bytes:
            break
        seen.add(text)
        lines.append(text)
    return "\n".join(lines) + "\n"


def write_resources(out_dir: Path, limit: int = DEFAULT_LIMIT) -> tuple[Path, Path]:
    """Write ``stdlib_qa.json`` and ``stdlib_corpus.txt`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = build_records(limit=limit)
    qa_path = out_dir / "stdlib_qa.json"
    body = ",\n".join(json.dumps(rec, ensure_ascii=False) for rec in records)
    qa_path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    corpus_path = out_dir / "stdlib_corpus.txt"
    corpus_path.write_text(build_corpus(), encoding="utf-8")
    logger.info("wrote %d records to %s", len(records), qa_path)
    logger.info("wrote %d bytes to %s", corpus_path.stat().st_size, corpus_path)
    return qa_path, corpus_path


def write_qa(path: Path, modules: list[str], limit: int = DEFAULT_LIMIT) -> int:
    """Write a QA set (the bundled format) built from ``modules``' docstrings to ``path``;
    returns the record count. Raises ``ValueError`` when no record could be built."""
    missing = [name for name in modules if _import(name) is None]
    if missing:
        raise ValueError(
            f"cannot import {', '.join(missing)}: install it or drop it from --modules"
        )
    records = build_records(modules, limit=limit)
    if not records:
        raise ValueError(f"no usable docstrings in {', '.join(modules)}")
    body = ",\n".join(json.dumps(rec, ensure_ascii=False) for rec in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    logger.info("wrote %d records from %s to %s", len(records), ", ".join(modules), path)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: regenerate the bundled resource files, or (``--modules``)
    build a QA set of the same shape from any importable package's docstrings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESOURCES_DIR)
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    parser.add_argument(
        "--modules",
        help="comma-separated modules of another library (e.g. numpy,numpy.linalg): write only a "
        "QA set from them to --out, not the bundled resources",
    )
    parser.add_argument("--out", type=Path, help="with --modules: the QA file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.modules:
        if args.out is None:
            parser.error("--modules needs --out FILE")
        try:
            write_qa(
                args.out, [m.strip() for m in args.modules.split(",") if m.strip()], args.limit
            )
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
        return
    write_resources(args.out_dir, limit=args.limit)


if __name__ == "__main__":
    main()
