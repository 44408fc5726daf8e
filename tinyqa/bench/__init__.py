"""Benchmarks: training, serving and sweep performance against baselines (``tinyqa bench``).

Each suite writes ``<suite>.json`` and ``<suite>.md`` into ``out`` (default
``<storage>/<experiment>/bench``). Suites import their heavy dependencies lazily: the ``gpu``
suite imports no Ray (the lent GPU machines have none), and nothing here imports ``serving``
at module level.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tinyqa.bench.common import SUITES, BenchError, format_bench, out_dir, write_result
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
    folder = out_dir(cfg, out)
    if suite == "train":
        from tinyqa.bench.train import bench_train as fn
    elif suite == "tune":
        from tinyqa.bench.tune import bench_tune as fn
    elif suite == "serve":
        from tinyqa.bench.serve import bench_serve as fn
    else:
        from tinyqa.bench.gpu import bench_gpu as fn
    logger.info("bench %s%s -> %s", suite, " (quick)" if quick else "", folder)
    result = fn(cfg, folder, quick=quick, **options)
    return write_result(result, folder)
