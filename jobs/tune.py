"""Sweep LoRA rank and learning rate on Ray Tune and promote the best adapter.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tiny-cpu.yaml
    python jobs/tune.py --config jobs/configs/tiny-cpu.yaml tune.search.r=[4,8] --fresh

Re-running the same command resumes the sweep; ``--fresh`` starts it over.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402


def main() -> int:
    return run_job("tune")


if __name__ == "__main__":
    sys.exit(main())
