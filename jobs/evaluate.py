"""Score the base model and adapters on held-out questions (writes eval.json, predictions, eval.md).

ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/tiny-cpu.yaml
python jobs/evaluate.py --config jobs/configs/tiny-cpu.yaml eval.split=train eval.adapters=[ID]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402
from tinyqa.evaluation import format_eval_table, run_eval  # noqa: E402


def main() -> int:
    def evaluate(cfg, args):
        result = run_eval(cfg)
        return (
            f"{format_eval_table(result)}\nwrote {', '.join(str(p) for p in result.paths.values())}"
        )

    return run_job("evaluate", evaluate)


if __name__ == "__main__":
    sys.exit(main())
