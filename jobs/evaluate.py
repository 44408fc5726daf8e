"""Score the base model and adapters on held-out questions (writes eval.json, predictions, eval.md).

ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/tiny-cpu.yaml
python jobs/evaluate.py --config jobs/configs/tiny-cpu.yaml eval.split=train eval.adapters=[ID]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402


def main() -> int:
    return run_job("eval")


if __name__ == "__main__":
    sys.exit(main())
