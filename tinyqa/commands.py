"""The one table of tinyqa's commands, shared by the ``tinyqa`` CLI and the ``jobs/*.py`` entrypoints.

Each :class:`Command` says once: its name and help, its extra arguments, the function it calls, how
the parsed arguments map onto that call, and the summary printed when it succeeds. ``tinyqa.cli``
builds its subcommands from :data:`COMMANDS`, and ``jobs/<name>.py`` is ``run_job("<command>")``, so
a job and its CLI command cannot drift apart.

Functions are named by import path (``"module:attribute"``, as Ray Serve's ``import_path``) and
imported with :func:`load` only when the command runs. That keeps this table, and so
``tinyqa --help``, free of torch and Ray, and lets the CLI reach ``serving`` and ``benchmarks``
(packages shipped beside ``tinyqa`` that import it) without ``tinyqa`` importing them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tinyqa.config import TinyQAConfig
from tinyqa.errors import TinyQAError

# Entry points outside the library (top-level packages beside tinyqa).
SERVE_DEPLOY = "serving.deploy:deploy"
SERVE_SHUTDOWN = "serving.deploy:shutdown"
BENCH_RUN = "benchmarks:run_bench"
BENCH_FORMAT = "benchmarks:format_bench"
# Kept here rather than imported from benchmarks (which tinyqa must not import); a test checks
# that it equals benchmarks.SUITES.
BENCH_SUITES = ("train", "serve", "tune", "gpu")
PIPELINE_STAGES = "prepare,tune,eval,serve,query"


class CommandImportError(TinyQAError):
    """A command's import path names a module or attribute that cannot be imported."""


def load(import_path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises :class:`CommandImportError` (a user-facing error) when the module is missing, e.g.
    ``serving`` or ``benchmarks`` in an environment that has only the ``tinyqa`` package.
    """
    module_name, sep, attribute = import_path.partition(":")
    if not sep or not module_name or not attribute:
        raise CommandImportError(
            f"import path {import_path!r} is not of the form 'module:attribute'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # The package itself missing (tinyqa installed without its sibling packages) calls for
        # another fix than one of its dependencies missing.
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            fix = "run from a tinyqa checkout or install the full tinyqa distribution"
        else:
            fix = f"install the package that provides {e.name!r}"
        raise CommandImportError(
            f"cannot import {module_name!r} for {import_path!r} (no module {e.name!r}); {fix}"
        ) from e
    try:
        return getattr(module, attribute)
    except AttributeError as e:
        raise CommandImportError(
            f"{module_name!r} has no attribute {attribute!r} (import path {import_path!r})"
        ) from e


@dataclass(frozen=True)
class Arg:
    """One extra ``argparse`` argument: the flags or name, and ``add_argument``'s keywords."""

    flags: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


def _with_config(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    return fn(cfg)


@dataclass(frozen=True)
class Command:
    """One subcommand. ``call(fn, cfg, args)`` runs ``fn`` (the loaded ``target``) with the parsed
    arguments; ``summary(result, cfg, args)`` is the text printed on success. A command without a
    summary talks to the user itself and its result is the exit code."""

    name: str
    help: str
    target: str
    call: Callable[[Callable[..., Any], TinyQAConfig, argparse.Namespace], Any] = _with_config
    summary: Callable[[Any, TinyQAConfig, argparse.Namespace], str] | None = None
    arguments: tuple[Arg, ...] = ()
    description: str | None = None
    job: str | None = None
    """The ``jobs/<job>.py`` entrypoint that runs this command, if any."""
    default_config: str | None = None
    """Import path of a function of the parsed arguments returning the config file used when
    ``--config`` is not given."""
    locks: bool = False
    """Writes the experiment: holds its lock (:func:`tinyqa.locking.experiment_lock`) while it runs."""
    console: bool = False
    """A long command: runs inside :func:`tinyqa.console.session` (live view or plain lines, the
    full stream in a log file); its call finds the view as ``args.console``."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for a in self.arguments:
            parser.add_argument(*a.flags, **a.options)

    def execute(self, cfg: TinyQAConfig, args: argparse.Namespace) -> tuple[int, str | None]:
        """Run the command; returns its exit code and the summary to print (or None)."""
        from tinyqa.locking import experiment_lock

        with experiment_lock(cfg, self.name) if self.locks else contextlib.nullcontext():
            result = self.call(load(self.target), cfg, args)
        if self.summary is None:
            return int(result or 0), None
        return 0, self.summary(result, cfg, args)


# ----------------------------------------------------------------------------- summaries
def _prepare_summary(prepared: Any, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    s = prepared.stats
    return (
        f"prepared {s['train']} train / {s['eval']} eval records from {s['source']} "
        f"(tokens p50 {s['tokens_total'].get('p50')}, max {s['tokens_total'].get('max')}; "
        f"dropped {len(s['dropped'])}, truncated {len(s['truncated'])}) -> {cfg.data_dir}"
    )


def _train_summary(result: Any, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    m = result.metrics
    speed = m.get("tokens_per_second")
    return (
        f"adapter {result.adapter_id}: eval loss {m['eval_loss_initial']:.4f} -> {m['eval_loss']:.4f} "
        f"in {m['steps']} steps"
        + (f" ({speed:.0f} tokens/s)" if speed is not None else "")
        + f" -> {result.adapter_dir}"
    )


def _tune_summary(result: Any, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    best, saved, eff = result.best, result.iterations_saved, result.parallel_efficiency
    return (
        f"{load('tinyqa.tune:format_table')(result)}\n"
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


def _eval_summary(result: Any, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    table = load("tinyqa.evaluation:format_eval_table")(result)
    return f"{table}\nwrote {', '.join(str(p) for p in result.paths.values())}"


# Overrides that say where a run lives and which endpoint serves it: the follow-up commands a
# report suggests must carry them to reach the same run.
_LOCATING_KEYS = ("storage_path", "experiment", "ray_address", "model.name", "serve.")


def _locating_args(cfg_path: str | None, overrides: list[str]) -> str:
    import shlex

    kept = [o for o in overrides if o.split("=", 1)[0].startswith(_LOCATING_KEYS)]
    words = (["--config", str(cfg_path)] if cfg_path else []) + kept
    return " ".join(shlex.quote(w) for w in words)


def _pipeline_summary(report: Any, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    from tinyqa.console import fmt_seconds

    lines = [load("tinyqa.pipeline:format_report")(report), ""]
    tail = []
    if report.wall_seconds is not None:
        tail.append(f"Total time: {fmt_seconds(report.wall_seconds)}")
    view = getattr(args, "console", None)
    if view is not None and view.log_file is not None:
        tail.append(f"Logs: {view.log_file}")
    if tail:
        lines.append(" · ".join(tail))
    # The config as the user gave it (the demo's embedded default needs no naming): the
    # follow-ups stay short enough to read and to fit the report on one screen.
    where = _locating_args(args.config, list(args.overrides))
    lines.append("Next:")
    if report.url:
        lines += [
            f'  tinyqa ask "What does json.dumps do?" --endpoint {report.url}',
            f"  tinyqa chat --endpoint {report.url}",
        ]
    at = f" {where}" if where else ""
    lines.append(
        f"  tinyqa {args.command} --stages eval{at} eval.path=my_questions.json"
        "   # score on your own QA file"
    )
    lines.append(f"  tinyqa runs{at}")
    if report.url:
        lines.append(f"  tinyqa serve --shutdown{at}   # then `ray stop` for the local Ray cluster")
    return "\n".join(lines)


def _serve_summary(url: str | bool | None, cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    if args.shutdown:  # `url` is shutdown's answer: was the app there
        name = cfg.serve.app_name
        return f"removed Serve app {name!r}" if url else f"Serve app {name!r}: nothing to remove"
    return f"serving at {url}  (stop with: tinyqa serve --shutdown)"


def _bench_summary(result: dict[str, Any], cfg: TinyQAConfig, args: argparse.Namespace) -> str:
    paths = result["paths"]
    return f"{load(BENCH_FORMAT)(result)}\nwrote {paths['json']} and {paths['markdown']}"


# ----------------------------------------------------------------------------- calls
def _view(args: argparse.Namespace, stage: str | None = None) -> Any:
    """The command's console view (None outside a console session), told which stage runs."""
    view = getattr(args, "console", None)
    if view is not None and stage is not None:
        view.begin(stage)
    return view


def _call_train(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    view = _view(args, "train")
    return fn(cfg, callbacks=view.train_callbacks if view else None)


def _call_tune(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    view = _view(args, "tune")
    return fn(cfg, fresh=args.fresh, callbacks=view.tune_callbacks() if view else ())


def _call_eval(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    view = _view(args, "eval")
    return fn(cfg, on_progress=view.eval_progress if view else None)


def _call_ask(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    return fn(
        cfg,
        args.question,
        adapter=args.adapter,
        endpoint=args.endpoint,
        api_key=args.api_key,
        max_new_tokens=args.max_new_tokens,
    )


def _call_chat(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    return fn(
        cfg,
        adapter=args.adapter,
        endpoint=args.endpoint,
        api_key=args.api_key,
        max_new_tokens=args.max_new_tokens,
    )


def _call_serve(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    if args.shutdown:
        return load(SERVE_SHUTDOWN)(cfg)  # True: removed; False: nothing was deployed
    _view(args, "serve")
    return fn(cfg, blocking=args.blocking)


def _call_pipeline(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    stages = args.stages.split(",") if args.stages else None
    view = _view(args)
    hooks: dict[str, Any] = {}
    if view is not None:
        hooks = {
            "on_stage": view.on_stage,
            "tune_callbacks": view.tune_callbacks(),
            "on_eval_progress": view.eval_progress,
        }
    # The deploy step is resolved only when the serve stage runs, so the other stages work in an
    # environment without the serving package.
    return fn(cfg, stages=stages, fresh=args.fresh, deploy=lambda c: load(SERVE_DEPLOY)(c), **hooks)


def _call_export(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    return fn(
        cfg,
        args.adapter,
        out=args.out,
        merged=args.merged,
        push_to_hub=args.push_to_hub,
        public=args.public,
        dry_run=args.dry_run,
        dataset_id=args.dataset,
    )


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected arm names like baseline,static, not {text!r}")
    return names


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected client counts like 1,16, not {text!r}"
        ) from None


def _call_bench(fn: Callable[..., Any], cfg: TinyQAConfig, args: argparse.Namespace) -> Any:
    options: dict[str, Any] = {"endpoint": args.endpoint} if args.endpoint else {}
    if args.requests is not None:
        options["requests"] = args.requests
    if args.concurrency is not None:
        options["concurrency"] = args.concurrency
    if args.arms is not None:
        options["arms"] = args.arms
    _view(args, f"bench {args.suite}")
    return fn(cfg, args.suite, out=args.out, quick=args.quick, **options)


_CLIENT_ARGS = (
    arg("--adapter", help="adapter id (under the experiment) or adapter folder"),
    arg("--endpoint", help="ask a running Serve endpoint, e.g. http://127.0.0.1:8000"),
    arg("--api-key", help="Bearer key for the endpoint (default $TINYQA_API_KEY)"),
    arg("--max-new-tokens", type=int, default=None),
)
_STAGE_ARGS = (
    arg("--stages", help=f"comma-separated subset of: {PIPELINE_STAGES}"),
    arg("--fresh", action="store_true", help="redo every stage"),
)

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "prepare",
            "validate, format and split the dataset",
            "tinyqa.data:prepare_dataset",
            summary=_prepare_summary,
            locks=True,
        ),
        Command(
            "train",
            "fine-tune one adapter on Ray Train",
            "tinyqa.training:run_training",
            call=_call_train,
            summary=_train_summary,
            console=True,
            description="Fine-tune one LoRA/QLoRA adapter on Ray Train; writes "
            "<storage>/<experiment>/adapters/<adapter_id>/ with its tinyqa.json manifest.",
            job="train",
            locks=True,
        ),
        Command(
            "tune",
            "sweep LoRA rank / learning rate with Ray Tune",
            "tinyqa.tune:run_sweep",
            call=_call_tune,
            summary=_tune_summary,
            console=True,
            arguments=(
                arg(
                    "--fresh",
                    action="store_true",
                    help="discard a previous sweep of this experiment",
                ),
            ),
            description="Sweep LoRA rank and learning rate on Ray Tune; write results.csv, "
            "sweep.md, sweep.png and best.json under <storage>/<experiment>/.",
            job="tune",
            locks=True,
        ),
        Command(
            "eval",
            "score the base model and adapters on held-out questions",
            "tinyqa.evaluation:run_eval",
            call=_call_eval,
            summary=_eval_summary,
            console=True,
            description="Score the base model and adapters on held-out questions; writes "
            "eval.json, the predictions and eval.md.",
            job="evaluate",
            locks=True,
        ),
        Command(
            "ask",
            "answer one question",
            "tinyqa.chat:ask",
            call=_call_ask,
            summary=lambda answer, cfg, args: answer,
            arguments=(arg("question", help="the question to answer"), *_CLIENT_ARGS),
        ),
        Command(
            "chat",
            "interactive multi-turn chat",
            "tinyqa.chat:run_chat",
            call=_call_chat,
            arguments=_CLIENT_ARGS,
        ),
        Command(
            "serve",
            "deploy the Serve endpoint on Ray (local or cluster)",
            SERVE_DEPLOY,
            call=_call_serve,
            summary=_serve_summary,
            console=True,
            arguments=(
                arg("--shutdown", action="store_true", help="remove the deployed app"),
                arg("--blocking", action="store_true", help="stay in the foreground until Ctrl-C"),
            ),
        ),
        Command(
            "demo",
            "the whole pipeline on SmolLM2-135M-Instruct and the bundled data (2 CPUs)",
            "tinyqa.pipeline:run_pipeline",
            call=_call_pipeline,
            summary=_pipeline_summary,
            arguments=(
                arg(
                    "--quick",
                    action="store_true",
                    help="the fast path: the offline `tiny` model (same as model.name=tiny)",
                ),
                *_STAGE_ARGS,
            ),
            default_config="tinyqa.pipeline:demo_config_for",
            locks=True,
            console=True,
        ),
        Command(
            "pipeline",
            "prepare -> tune -> eval -> serve -> query, resumable",
            "tinyqa.pipeline:run_pipeline",
            call=_call_pipeline,
            summary=_pipeline_summary,
            console=True,
            arguments=_STAGE_ARGS,
            description="The whole flow on a cluster: prepare -> sweep -> evaluate -> deploy on "
            "Serve -> query. Rerunning resumes: finished stages are skipped.",
            job="pipeline",
            locks=True,
        ),
        Command(
            "runs",
            "list experiments, adapters, metrics and endpoints under the storage path",
            "tinyqa.runs:run_runs",
            call=lambda fn, cfg, args: fn(cfg, as_json=args.json),
            summary=lambda text, cfg, args: text,
            arguments=(arg("--json", action="store_true", help="machine-readable output"),),
            description="What the storage path holds: each experiment's finished pipeline "
            "stages, its adapters (base model, eval loss, steps, creation time), the one "
            "best.json names, and whether the configured endpoint (GET /healthz) serves them.",
        ),
        Command(
            "export",
            "export an adapter (or base + adapter merged) with a model card; push to the Hub",
            "tinyqa.export:export_adapter",
            call=_call_export,
            summary=lambda result, cfg, args: load("tinyqa.export:format_export")(result),
            arguments=(
                arg("adapter", help="adapter id (under the experiment) or adapter folder"),
                arg(
                    "--merged", action="store_true", help="merge into the base: a standalone model"
                ),
                arg("--out", help="output folder (default <storage>/<experiment>/export/<id>)"),
                arg("--push-to-hub", metavar="REPO", help="upload to this Hub repo ($HF_TOKEN)"),
                arg("--public", action="store_true", help="create the Hub repo public"),
                arg("--dry-run", action="store_true", help="show what would be written / uploaded"),
                arg(
                    "--dataset", metavar="HUB_ID", help="Hub id of the training data, for the card"
                ),
            ),
            description="Export an adapter folder with a Hub model card (README.md), or with "
            "--merged the base model with the adapter merged in (safetensors, loads with plain "
            "transformers); --push-to-hub REPO uploads it (HF_TOKEN, private unless --public).",
        ),
        Command(
            "bench",
            "benchmarks: training, serving, sweep",
            BENCH_RUN,
            call=_call_bench,
            summary=_bench_summary,
            console=True,
            arguments=(
                arg("suite", choices=BENCH_SUITES, help="what to measure"),
                arg("--out", help="results folder (default <storage>/<experiment>/bench)"),
                arg("--quick", action="store_true", help="tiny sizes (smoke test)"),
                arg("--endpoint", help="serve suite: measure this running deployment instead"),
                arg("--requests", type=int, help="serve suite: requests per mode (default 96)"),
                arg(
                    "--concurrency",
                    type=_concurrency,
                    help="serve suite: client counts, e.g. 1,16 (default 1,8,16,32)",
                ),
                arg(
                    "--arms",
                    type=_names,
                    help="train / serve suites: the arms to run, e.g. baseline,static "
                    "(train: seed,tinyqa,plain,ray; serve: baseline,static,continuous,engines,"
                    "llamacpp; default all)",
                ),
            ),
            description="Benchmarks: training (seed vs tinyqa, plain TRL vs Ray Train), serving "
            "(sequential vs concurrent clients vs an in-process loop), sweeps (parallel "
            "efficiency, ASHA savings), and the GPU set.",
            job="benchmark",
        ),
    )
}
