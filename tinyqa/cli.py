"""The ``tinyqa`` command line: prepare, train, tune, eval, ask, chat, serve, demo, bench.

Every subcommand takes ``--config FILE`` and dotted ``key=value`` overrides. A user mistake prints
one line to stderr and exits 2; our own bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from tinyqa.config import TinyQAConfig, load_config
from tinyqa.errors import TinyQAError

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see jobs/configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=2"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyqa",
        description="Fine-tune, sweep, evaluate and serve a QA model with LoRA/QLoRA on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="validate, format and split the dataset")
    _common(p)
    p = sub.add_parser("train", help="fine-tune one adapter on Ray Train")
    _common(p)
    p = sub.add_parser("tune", help="sweep LoRA rank / learning rate with Ray Tune")
    p.add_argument(
        "--fresh", action="store_true", help="discard a previous sweep of this experiment"
    )
    _common(p)
    p = sub.add_parser("eval", help="score the base model and adapters on held-out questions")
    _common(p)
    for name, help_ in (("ask", "answer one question"), ("chat", "interactive multi-turn chat")):
        p = sub.add_parser(name, help=help_)
        if name == "ask":
            p.add_argument("question", help="the question to answer")
        p.add_argument("--adapter", help="adapter id (under the experiment) or adapter folder")
        p.add_argument(
            "--endpoint", help="ask a running Serve endpoint, e.g. http://127.0.0.1:8000"
        )
        p.add_argument("--api-key", help="Bearer key for the endpoint (default $TINYQA_API_KEY)")
        p.add_argument("--max-new-tokens", type=int, default=None)
        _common(p)
    p = sub.add_parser("serve", help="deploy the Serve endpoint on Ray (local or cluster)")
    p.add_argument("--shutdown", action="store_true", help="remove the deployed app")
    p.add_argument("--blocking", action="store_true", help="stay in the foreground until Ctrl-C")
    _common(p)
    p = sub.add_parser(
        "demo", help="the whole pipeline on SmolLM2-135M-Instruct and the bundled data (2 CPUs)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the fast path: the offline `tiny` model (same as model.name=tiny)",
    )
    p.add_argument("--stages", help="comma-separated subset of: prepare,tune,eval,serve,query")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    _common(p)
    p = sub.add_parser("pipeline", help="prepare -> tune -> eval -> serve -> query, resumable")
    p.add_argument("--stages", help="comma-separated subset of: prepare,tune,eval,serve,query")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    _common(p)
    p = sub.add_parser("bench", help="benchmarks: training, serving, sweep")
    p.add_argument("suite", choices=["train", "serve", "tune", "gpu"], help="what to measure")
    p.add_argument("--out", help="results folder (default <storage>/<experiment>/bench)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--endpoint", help="serve suite: measure this running deployment instead")
    _common(p)
    return parser


def _cmd_prepare(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.data import prepare_dataset

    prepared = prepare_dataset(cfg)
    s = prepared.stats
    print(
        f"prepared {s['train']} train / {s['eval']} eval records from {s['source']} "
        f"(tokens p50 {s['tokens_total'].get('p50')}, max {s['tokens_total'].get('max')}; "
        f"dropped {len(s['dropped'])}, truncated {len(s['truncated'])}) -> {cfg.data_dir}"
    )
    return 0


def _cmd_train(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.training import run_training

    result = run_training(cfg)
    m = result.metrics
    print(
        f"adapter {result.adapter_id}: eval loss {m['eval_loss_initial']:.4f} -> {m['eval_loss']:.4f} "
        f"in {m['steps']} steps ({m['tokens_per_second']:.0f} tokens/s) -> {result.adapter_dir}"
    )
    return 0


def _cmd_tune(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.tuning import format_table, run_sweep

    result = run_sweep(cfg, fresh=args.fresh)
    print(format_table(result))
    best = result.best
    print(
        f"best: {best['adapter_id']} ({best['metric']} = {best['value']:.4f}) -> {result.paths['best_json']}"
    )
    return 0


def _cmd_eval(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.evaluation import format_eval_table, run_eval

    result = run_eval(cfg)
    print(format_eval_table(result))
    print(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    return 0


def _cmd_ask(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.chat import ask

    print(
        ask(
            cfg,
            args.question,
            adapter=args.adapter,
            endpoint=args.endpoint,
            api_key=args.api_key,
            max_new_tokens=args.max_new_tokens,
        )
    )
    return 0


def _cmd_chat(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.chat import run_chat

    return run_chat(
        cfg,
        adapter=args.adapter,
        endpoint=args.endpoint,
        api_key=args.api_key,
        max_new_tokens=args.max_new_tokens,
    )


def _cmd_serve(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    # The Serve app lives in the top-level `serving` package (shipped with tinyqa); only this
    # entrypoint reaches into it, the library never does.
    from serving.deploy import deploy, shutdown

    if args.shutdown:
        shutdown(cfg)
        print(f"removed Serve app {cfg.serve.app_name!r}")
        return 0
    url = deploy(cfg, blocking=args.blocking)
    print(f"serving at {url}  (stop with: tinyqa serve --shutdown)")
    return 0


def _cmd_pipeline(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from serving.deploy import deploy  # entrypoint-level wiring; see _cmd_serve
    from tinyqa.pipeline import format_report, run_pipeline

    stages = args.stages.split(",") if args.stages else None
    report = run_pipeline(cfg, stages=stages, fresh=args.fresh, deploy=deploy)
    print(format_report(report))
    return 0


def _cmd_demo(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    return _cmd_pipeline(cfg, args)


def _cmd_bench(cfg: TinyQAConfig, args: argparse.Namespace) -> int:
    from tinyqa.bench import format_bench, run_bench

    options = {"endpoint": args.endpoint} if args.endpoint else {}
    result = run_bench(cfg, args.suite, out=args.out, quick=args.quick, **options)
    print(format_bench(result))
    return 0


COMMANDS: dict[str, Callable[[TinyQAConfig, argparse.Namespace], int]] = {
    "prepare": _cmd_prepare,
    "train": _cmd_train,
    "tune": _cmd_tune,
    "eval": _cmd_eval,
    "ask": _cmd_ask,
    "chat": _cmd_chat,
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "pipeline": _cmd_pipeline,
    "bench": _cmd_bench,
}


def load_cli_config(args: argparse.Namespace) -> TinyQAConfig:
    """The demo runs on the embedded CPU defaults unless a config file is given: SmolLM2's, or the
    tiny model's with ``--quick`` or ``model.name=tiny``."""
    path = args.config
    if args.command == "demo" and path is None:
        from tinyqa.pipeline import demo_config_path

        quick = args.quick or "model.name=tiny" in [o.replace(" ", "") for o in args.overrides]
        path = demo_config_path(quick=quick)
    return load_config(path, args.overrides)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides also follow options (`ask "q" --config x a.b=1`):
    argparse stops filling a positional at the first option and leaves the rest over."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_cli_config(args)
        return COMMANDS[args.command](cfg, args)
    except TinyQAError as e:
        print(f"tinyqa {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"tinyqa {args.command}: interrupted", file=sys.stderr)
        return 130


def run_job(
    name: str,
    func: Callable[[TinyQAConfig, argparse.Namespace], object],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    description: str | None = None,
) -> int:
    """Shared body of the thin ``jobs/*.py`` entrypoints (parse, load config, run, summarize).

    A user mistake prints ``error: <message>`` on stderr and exits 2.
    """
    parser = argparse.ArgumentParser(
        prog=f"jobs/{name}.py", description=description or f"tinyqa {name} job"
    )
    if add_args:
        add_args(parser)
    _common(parser)
    args = parse_args(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, args.overrides)
        summary = func(cfg, args)
    except TinyQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary is not None:
        print(summary if isinstance(summary, str) else json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
