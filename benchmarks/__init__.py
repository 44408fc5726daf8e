"""Benchmarks: training, serving and sweep performance against baselines (``tinyqa bench``).

A top-level package beside ``tinyqa``, ``serving`` and ``jobs``: it may import ``tinyqa`` (public
functions only) and ``serving``; ``tinyqa`` reaches it only through the import path in its command
table (``tinyqa.commands``). Each suite writes ``<suite>.json`` and ``<suite>.md`` into ``out``
(default ``<storage>/<experiment>/bench``). Suites import their heavy dependencies inside
functions: the ``gpu`` suite imports no Ray (the lent GPU machines have none), so neither does
this module nor :mod:`benchmarks.common`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from benchmarks.common import SUITES, BenchError, format_bench, out_dir, write_result
from tinyqa.config import TinyQAConfig

logger = logging.getLogger(__name__)

__all__ = ["SUITES", "BenchError", "format_bench", "run_bench"]


def run_bench(
    cfg: TinyQAConfig,
    suite: str,
    out: str | os.PathLike | None = None,
    quick: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run one suite ('train', 'serve', 'tune' or 'gpu'), write its JSON + markdown, return it.

    ``quick`` shrinks every size for a smoke test (figures are then not meaningful). Extra
    ``options`` go to the suite function (e.g. ``arms=`` for train, ``endpoint=`` for serve).
    Raises :class:`~tinyqa.errors.TinyQAError` subclasses for unusable settings.
    """
    if suite not in SUITES:
        raise BenchError(f"unknown bench suite {suite!r}; choose one of {', '.join(SUITES)}")
    for option in ("endpoint", "requests", "concurrency"):
        if options.get(option) is not None and suite != "serve":
            raise BenchError(f"--{option} applies to the serve suite only, not to {suite!r}")
    if options.get("arms") is not None and suite not in ("train", "serve"):
        raise BenchError(f"--arms applies to the train and serve suites, not to {suite!r}")
    folder = out_dir(cfg, out)
    if suite == "train":
        from benchmarks.train import bench_train as fn
    elif suite == "tune":
        from benchmarks.tune import bench_tune as fn
    elif suite == "serve":
        from benchmarks.serve import bench_serve as fn
    else:
        from benchmarks.gpu import bench_gpu as fn
    logger.info("bench %s%s -> %s", suite, " (quick)" if quick else "", folder)
    result = fn(cfg, folder, quick=quick, **options)
    return write_result(result, folder)
