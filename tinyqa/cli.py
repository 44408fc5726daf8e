"""The ``tinyqa`` command line: prepare, train, tune, eval, ask, chat, serve, demo, pipeline, bench.

The subcommands come from the command table in :mod:`tinyqa.commands`, which the ``jobs/*.py``
entrypoints share through :func:`run_job`. Every subcommand takes ``--config FILE`` and dotted
``key=value`` overrides. A user mistake prints one line to stderr and exits 2; our own bugs keep
their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tinyqa.commands import COMMANDS, Command, load
from tinyqa.config import TinyQAConfig, load_config
from tinyqa.console import LOG_FORMAT, session
from tinyqa.errors import TinyQAError

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see jobs/configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=2"
    )
    # SUPPRESS: not given after the command, the top-level flag (``tinyqa -v demo``) stands.
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the full stream on the console: Ray, workers, third-party logs, debug logging",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyqa",
        description="Fine-tune, sweep, evaluate and serve a QA model with LoRA/QLoRA on Ray.",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="the full stream on the console: Ray, workers, third-party logs, debug logging",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        _common(p)
    return parser


def build_job_parser(command: Command) -> argparse.ArgumentParser:
    """The parser of ``jobs/<command.job>.py``: the command's own arguments, nothing else."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{command.job or command.name}.py",
        description=command.description or command.help,
    )
    command.add_arguments(parser)
    _common(parser)
    parser.set_defaults(command=command.name)
    return parser


def load_cli_config(args: argparse.Namespace) -> TinyQAConfig:
    """Load ``--config`` plus overrides; a command may name a function choosing the config file
    used without ``--config`` (the demo's embedded CPU defaults: SmolLM2, or tiny with --quick)."""
    path = args.config
    default = COMMANDS[args.command].default_config
    if path is None and default is not None:
        path = load(default)(args)
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


def _run(args: argparse.Namespace, prefix: str) -> int:
    """Load the config and run the parsed command; a user mistake becomes one stderr line
    (``<prefix>error: <message>``) and exit 2.

    A long command runs inside a console session (:mod:`tinyqa.console`): a live view or plain
    progress lines, the full stream in a log file; errors and the summary print after it ends.
    """
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    if not verbose:
        # One INFO line per HTTP request (ask, runs, the pipeline's health checks) is noise.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    command = COMMANDS[args.command]
    try:
        cfg = load_cli_config(args)
        if command.console and not getattr(args, "shutdown", False):
            with session(cfg, command.name, verbose=verbose) as view:
                args.console = view
                code, summary = command.execute(cfg, args)
        else:
            code, summary = command.execute(cfg, args)
    except TinyQAError as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    if summary is not None:
        print(summary)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return _run(args, f"tinyqa {args.command}: ")


def run_job(command: str, argv: list[str] | None = None) -> int:
    """The whole body of a ``jobs/*.py`` entrypoint: run ``command`` from the command table with
    the job's own parser (same arguments, same summary, same exit codes as ``tinyqa <command>``).
    """
    # A job's log already names the job, so its errors read plain ``error: <message>``.
    return _run(parse_args(build_job_parser(COMMANDS[command]), argv), "")


if __name__ == "__main__":
    sys.exit(main())
