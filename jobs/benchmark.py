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

from tinyqa.cli import run_job  # noqa: E402


def main() -> int:
    return run_job("bench")


if __name__ == "__main__":
    sys.exit(main())
