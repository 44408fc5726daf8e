"""The whole flow on a cluster: prepare -> sweep -> evaluate -> deploy on Serve -> query.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/tinyllama-qlora.yaml

Rerunning the same command resumes: finished stages are skipped. `--stages tune,eval` runs a subset.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from tinyqa.cli import run_job  # noqa: E402
from tinyqa.pipeline import format_report, run_pipeline  # noqa: E402


def main() -> int:
    def add_args(parser):
        parser.add_argument(
            "--stages", help="comma-separated subset of prepare,tune,eval,serve,query"
        )
        parser.add_argument("--fresh", action="store_true", help="redo every stage")

    def pipeline(cfg, args):
        from serving.deploy import deploy

        stages = args.stages.split(",") if args.stages else None
        return format_report(run_pipeline(cfg, stages=stages, fresh=args.fresh, deploy=deploy))

    return run_job("pipeline", pipeline, add_args)


if __name__ == "__main__":
    sys.exit(main())
