"""The whole flow on a cluster: prepare -> sweep -> evaluate -> deploy on Serve -> query.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/tinyllama-qlora.yaml

Rerunning the same command resumes: finished stages are skipped. `--stages tune,eval` runs a subset.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402


def main() -> int:
    return run_job("pipeline")


if __name__ == "__main__":
    sys.exit(main())
