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
    def add_args(parser):
        parser.add_argument(
            "--fresh", action="store_true", help="discard a previous sweep of this experiment"
        )

    def tune(cfg, args):
        from tinyqa.tune import format_table, run_sweep

        result = run_sweep(cfg, fresh=args.fresh)
        best, saved, eff = result.best, result.iterations_saved, result.parallel_efficiency
        return (
            f"{format_table(result)}\n"
            f"best adapter {best['adapter_id']} ({best['metric']}={best['value']:.4g}, trial "
            f"{best['trial']}); {len(result.results)} trials in {result.wall_seconds:.1f} s"
            + (
                f", ASHA saved {saved}/{result.iterations_full} trial-iterations"
                if saved is not None
                else ""
            )
            + (f", parallel efficiency {eff:.2f}" if eff is not None else "")
            + f"; {result.paths['best_json']}"
        )

    return run_job(
        "tune",
        tune,
        add_args,
        description="Sweep LoRA rank and learning rate on Ray Tune; write results.csv, sweep.md, "
        "sweep.png and best.json under <storage>/<experiment>/.",
    )


if __name__ == "__main__":
    sys.exit(main())
