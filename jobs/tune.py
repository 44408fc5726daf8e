"""Sweep LoRA rank and learning rate on Ray Tune and promote the best adapter.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tiny-cpu.yaml
    python jobs/tune.py --config jobs/configs/tiny-cpu.yaml tune.search.r=[4,8] --fresh

Re-running the same command resumes the sweep; ``--fresh`` starts it over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: import it from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyqa.config import load_config  # noqa: E402
from tinyqa.errors import TinyQAError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/tune.py",
        description="Sweep LoRA rank and learning rate on Ray Tune; write results.csv, sweep.md, "
        "sweep.png and best.json under <storage>/<experiment>/.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--fresh", action="store_true", help="discard a previous sweep of this experiment"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. tune.search.r=[4,8]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        from tinyqa.tuning import format_table, run_sweep

        cfg = load_config(args.config, args.overrides)
        result = run_sweep(cfg, fresh=args.fresh)
    except TinyQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    best = result.best
    saved = result.iterations_saved
    eff = result.parallel_efficiency
    print(
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
