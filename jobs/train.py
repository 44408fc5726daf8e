"""Fine-tune one LoRA/QLoRA adapter on Ray Train.

ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny-cpu.yaml train.epochs=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402


def main() -> int:
    return run_job("train")


if __name__ == "__main__":
    sys.exit(main())
