"""Run one benchmark suite (train, serve, tune or gpu) and write <suite>.json + <suite>.md.

    ray job submit --working-dir . -- python jobs/benchmark.py train --config jobs/configs/tiny-cpu.yaml
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- \
        python jobs/benchmark.py train --config jobs/configs/tinyllama-qlora.yaml model.name=tinyllama-arch
    python jobs/benchmark.py serve --quick --out /tmp/bench serve.port=8231

The training arms other than Ray Train's run where this driver runs: give the job a GPU
(``--entrypoint-num-gpus 1``) to measure them on one. Results go to ``--out`` or
``<storage>/<experiment>/bench``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: import it from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyqa.bench import SUITES, format_bench, run_bench  # noqa: E402
from tinyqa.config import load_config  # noqa: E402
from tinyqa.errors import TinyQAError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/benchmark.py",
        description="Benchmarks: training (seed vs tinyqa, plain TRL vs Ray Train), serving "
        "(sequential vs concurrent clients vs an in-process loop), sweeps (parallel efficiency, "
        "ASHA savings), and the GPU set.",
    )
    parser.add_argument("suite", choices=SUITES, help="what to measure")
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    parser.add_argument("--out", help="results folder (default <storage>/<experiment>/bench)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--endpoint", help="serve suite: measure this running endpoint instead")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. model.name=tinyllama-arch",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    # Intermixed: overrides may follow the options (`train --quick model.name=tiny`).
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = {"endpoint": args.endpoint} if args.endpoint else {}
    if args.endpoint and args.suite != "serve":
        print("error: --endpoint applies to the serve suite only", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_bench(cfg, args.suite, out=args.out, quick=args.quick, **options)
    except TinyQAError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    print(format_bench(result))
    print(f"wrote {result['paths']['json']} and {result['paths']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
