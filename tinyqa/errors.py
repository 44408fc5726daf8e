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
