"""Exceptions for user mistakes.

Everything derived from :class:`TinyQAError` is a problem the user can fix (bad config, bad dataset,
missing model folder, ...). The CLI and the jobs print its message as one line and exit 2; anything
else is our bug and keeps its traceback.
"""

from __future__ import annotations


class TinyQAError(Exception):
    """A user-fixable problem; the message says what is wrong and how to fix it."""


class ConfigError(TinyQAError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""


class DatasetError(TinyQAError):
    """The dataset file cannot be used; the message lists every bad record."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:20]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{path}: " + "; ".join(shown) + more)


class ModelError(TinyQAError):
    """A model or adapter cannot be found or loaded."""


class StorageError(TinyQAError):
    """The storage path cannot be used (not writable, not a filesystem path, ...)."""


class UnknownAdapter(ModelError):
    """The adapter id is valid but no such adapter exists under the adapter root."""


class AdapterMismatch(ModelError):
    """The adapter exists but was trained on a different base model than the one served."""


class PromptTooLong(TinyQAError):
    """The prompt exceeds the configured token limit."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): the summary line of a
    long upstream error, for a one-line message of our own."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (its type name when empty): where a
    wrapped remote error (Ray, a subprocess) puts the actual cause."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__
