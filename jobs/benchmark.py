"""Run one benchmark suite (train, serve, tune or gpu) and write <suite>.json + <suite>.md.

    ray job submit --working-dir . -- python jobs/benchmark.py train --config jobs/configs/tiny-cpu.yaml
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- \
        python jobs/benchmark.py train --config jobs/configs/tinyllama-qlora.yaml model.name=tinyllama-arch
    python jobs/benchmark.py serve --quick --out /tmp/bench serve.port=8231

The training arms other than Ray Train's run where this driver runs: give the job a GPU
(``--entrypoint-num-gpus 1``) to measure them on one. Results go to ``--out`` or
``<storage>/<experiment>/bench``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from benchmarks import SUITES, format_bench, run_bench  # noqa: E402
from tinyqa.cli import run_job  # noqa: E402
from tinyqa.errors import ConfigError  # noqa: E402


def main() -> int:
    def add_args(parser):
        parser.add_argument("suite", choices=SUITES, help="what to measure")
        parser.add_argument("--out", help="results folder (default <storage>/<experiment>/bench)")
        parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
        parser.add_argument("--endpoint", help="serve suite: measure this running endpoint instead")

    def benchmark(cfg, args):
        if args.endpoint and args.suite != "serve":
            raise ConfigError("--endpoint applies to the serve suite only")
        options = {"endpoint": args.endpoint} if args.endpoint else {}
        result = run_bench(cfg, args.suite, out=args.out, quick=args.quick, **options)
        return (
            f"{format_bench(result)}\n"
            f"wrote {result['paths']['json']} and {result['paths']['markdown']}"
        )

    return run_job(
        "benchmark",
        benchmark,
        add_args,
        description="Benchmarks: training (seed vs tinyqa, plain TRL vs Ray Train), serving "
        "(sequential vs concurrent clients vs an in-process loop), sweeps (parallel efficiency, "
        "ASHA savings), and the GPU set.",
    )


if __name__ == "__main__":
    sys.exit(main())
