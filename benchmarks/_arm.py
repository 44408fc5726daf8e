"""Entry point of one benchmark arm in its own process: ``python -m benchmarks._arm KIND SPEC OUT``.

Reads the arm's spec (JSON), runs it, writes its result (JSON). A fresh process per arm gives each
arm its own peak memory and its own import / start-up cost.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    kind, spec_path, out_path = argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(Path(spec_path).read_text())
    if kind == "trl_train":
        from benchmarks.train import measure_trl_arm as run
    elif kind == "ray_train":
        from benchmarks.train import measure_ray_arm as run
    elif kind == "tune_sweep":
        from benchmarks.tune import measure_sweep as run
    elif kind == "serve_baseline":
        from benchmarks.serve import measure_baseline as run
    elif kind == "serve_engines":
        from benchmarks.serve import measure_engines as run
    elif kind == "serve_llamacpp":
        from benchmarks.serve import measure_llamacpp as run
    elif kind == "serve_load":
        from benchmarks.serve import measure_serving as run
    else:
        raise SystemExit(f"unknown arm kind {kind!r}")
    result = run(spec)
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
