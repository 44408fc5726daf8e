"""What a long command shows a person: a live view on a terminal, plain lines elsewhere, and the
full stream in a log file.

:func:`session` wraps one command run (``tinyqa demo``, ``train``, ``tune``, ``eval``, ``serve``,
``bench``, ``pipeline`` and their ``jobs/*.py``):

- Everything written to the process's stdout / stderr file descriptors (Ray's own log lines,
  worker output streamed to the driver, Tune's reporter, Serve and ``httpx`` logs, transformers /
  datasets warnings and progress bars) goes to ``<storage>/<experiment>/logs/<command>-<time>.log``.
  Redirecting the descriptors, not ``sys.stdout``, is what catches Ray's C++ lines and child
  processes too. The path is printed once.
- The console gets what a person acts on: the stage, a progress bar (steps done / total, elapsed,
  ETA, latest train / eval loss), the trials of a sweep, tinyqa's own warnings, and every failure
  in one line with the log path. On a terminal this is a ``rich`` live view refreshed in place;
  otherwise (pipes, CI, ``ray job submit``) plain timestamped lines, at most one progress line per
  :data:`PLAIN_EVERY` seconds and no control characters.
- ``verbose`` keeps the full stream on the console (no redirect, debug logging, Tune's reporter).

This module is for entrypoints (``tinyqa.cli``): the library reports through callbacks
(:mod:`tinyqa.progress`) and never imports it. It imports neither Ray nor torch at load time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tinyqa.config import TinyQAConfig

logger = logging.getLogger(__name__)

PLAIN_EVERY = 30.0
"""Seconds between two plain progress lines (stage changes and trial ends always print)."""
HEARTBEAT_EVERY = 60.0
"""Plain mode: after this long without a line, say which stage is still running (slow starts).
The wait doubles after each such line within a stage, so a slow machine adds few lines."""
LIVE_REFRESH = 2.0  # live view redraws per second
MAX_TRIAL_ROWS = 12  # a bigger sweep shows its running trials first, then the best finished ones
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_path(cfg: TinyQAConfig, command: str, now: float | None = None) -> Path:
    """``<storage>/<experiment>/logs/<command>-<YYYYmmdd-HHMMSS>.log`` (local time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return cfg.run_dir / "logs" / f"{command}-{stamp}.log"


def is_interactive(stream: TextIO) -> bool:
    """A person watching a terminal (not a pipe, a CI log or ``ray job logs``)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def fmt_seconds(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or seconds < 0 or seconds != seconds:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str = "PENDING"
    iteration: int = 0
    step: int = 0
    metric: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        tail = self.trial_id.rsplit("_", 1)[-1]
        return str(int(tail)) if tail.isdigit() else tail[:8]

    @property
    def finished(self) -> bool:
        return self.status in ("TERMINATED", "ERROR")

    @property
    def shown_status(self) -> str:
        """Tune's status, except that a running trial with no step yet is ``starting``: Tune
        calls a trial running once its driver starts, while its Train workers may still wait
        for CPUs / GPUs that another trial holds."""
        if self.status == "RUNNING" and self.step == 0 and self.iteration == 0:
            return "starting"
        return self.status.lower()


@dataclass
class _Bar:
    """The current stage's measurable work (steps, answers) and when it started."""

    unit: str
    total: int | None
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    # (time, done) when work was first seen done: the rate counts from there, not from the
    # stage's start, which includes starting Ray and loading the model (an ETA of 39 min at
    # step 1 of a one-minute run).
    origin: tuple[float, int] | None = None
    seen: int = 0  # done at the last estimate

    def eta(self, now: float) -> float | None:
        if not self.total or self.done <= 0:
            return None
        if self.origin is None or self.done < self.seen:  # first sight, or restarted
            self.origin = (now, self.done)
        self.seen = self.done
        since, first = self.origin
        if self.done <= first or now <= since:
            return None
        return (now - since) * (self.total - self.done) / (self.done - first)


class ConsoleView:
    """The console of one command run; also the :class:`tinyqa.progress.ProgressSink`.

    Hooks (called from Tune's loop, a queue thread or the main thread, hence the lock):
    :meth:`on_stage`, :meth:`train_report`, :meth:`train_error`, :meth:`trial_event`,
    :meth:`eval_progress`, :meth:`message`.
    """

    def __init__(
        self,
        command: str,
        cfg: TinyQAConfig,
        out: TextIO,
        live: bool = False,
        log_file: Path | None = None,
        verbose: bool = False,
        width: int | None = None,
        plain_every: float = PLAIN_EVERY,
    ):
        self.command, self.cfg, self.out = command, cfg, out
        self.live, self.log_file, self.verbose = live, log_file, verbose
        self.plain_every = plain_every
        self.started = time.monotonic()
        self.stage: str | None = None
        self.stage_started = self.started
        self.stages: dict[str, str] = {}
        self.bar: _Bar | None = None
        self.metrics: dict[str, float] = {}
        self.trials: dict[str, TrialRow] = {}
        self._lock = threading.RLock()
        self._last_plain = 0.0  # any plain line (the heartbeat waits for silence)
        self._last_progress: float | None = None  # this stage's last progress line
        self._per_trial_steps: int | None = None
        self._live: Any = None
        self._drains: list[Any] = []
        self._stopped = threading.Event()
        self._heartbeat_every = HEARTBEAT_EVERY
        self._rich: Any = None
        if live:
            from rich.console import Console

            self._rich = Console(file=out, force_terminal=True, width=width, highlight=False)

    # ------------------------------------------------------------------ output primitives
    def _elapsed(self) -> str:
        return fmt_seconds(time.monotonic() - self.started)

    def message(self, text: str) -> None:
        """A line a person must see (a warning, a failure, where the log is), in both modes."""
        with self._lock:
            self._last_plain = time.monotonic()
            if self._rich is not None:
                self._rich.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.out.write(f"[{self._elapsed():>6}] {text}\n")
                self.out.flush()

    def _progress_line(self, text: str, force: bool = False) -> None:
        """Plain mode only: a throttled progress line (the live view redraws instead)."""
        if self._rich is not None:
            return
        now = time.monotonic()
        # The first progress line of a stage prints at once, later ones every plain_every.
        last = self._last_progress
        if force or last is None or now - last >= self.plain_every:
            self._last_progress = now
            self.message(text)

    def _heartbeat(self) -> None:
        while not self._stopped.wait(min(5.0, HEARTBEAT_EVERY)):
            with self._lock:
                if time.monotonic() - self._last_plain >= self._heartbeat_every:
                    self._heartbeat_every *= 2
                    status = self._bar_text(compact=True) if self.bar is not None else ""
                    stage = self.stage or self.command
                    took = fmt_seconds(time.monotonic() - self.stage_started)
                    self._last_plain = time.monotonic()
                    self.message(
                        f"{stage}: still running ({took})" + (f"; {status}" if status else "")
                    )

    def start(self) -> None:
        self._last_plain = time.monotonic()
        if self._rich is None:
            threading.Thread(target=self._heartbeat, name="tinyqa-heartbeat", daemon=True).start()
            return
        from rich.live import Live

        # transient: once settled, the command's own summary replaces the view.
        self._live = Live(
            console=self._rich,
            get_renderable=self.render,
            refresh_per_second=LIVE_REFRESH,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------------ hooks
    def on_stage(self, stage: str, event: str) -> None:
        """Pipeline hook: ``event`` is running, done, skipped or failed."""
        with self._lock:
            now = time.monotonic()
            if event == "running":
                self.stage, self.stage_started = stage, now
                self.bar, self.metrics, self._last_progress = None, {}, None
                self._heartbeat_every = HEARTBEAT_EVERY
                self.stages[stage] = "running"
                if self._rich is None:
                    self.message(f"stage {stage}: running")
            elif event == "skipped":
                self.stages[stage] = "skipped"
                if self._rich is None:
                    self.message(f"stage {stage}: done before, skipped")
            else:
                self.stages[stage] = event
                took = fmt_seconds(now - self.stage_started)
                if event == "done" and self._rich is not None:
                    pass  # the live view shows it; the command's report has the stage table
                elif event == "done":
                    extra = ""
                    if stage == "tune" and self.trials:
                        extra = f" ({len(self.trials)} trials)"
                    self.message(f"stage {stage}: done in {took}{extra}")
                else:
                    self.message(f"stage {stage}: FAILED after {took}")
                self.bar = None

    def begin(self, stage: str) -> None:
        """A command that is one stage (train, tune, eval, serve, bench)."""
        self.on_stage(stage, "running")

    def _total_steps_per_run(self) -> int | None:
        if self._per_trial_steps is None:
            from tinyqa.tune.space import expected_steps

            n_train = None
            with contextlib.suppress(OSError, ValueError, KeyError):
                n_train = int(json.loads((self.cfg.data_dir / "stats.json").read_text())["train"])
            self._per_trial_steps = expected_steps(self.cfg, n_train)
        return self._per_trial_steps

    def train_report(self, metrics: dict[str, float]) -> None:
        with self._lock:
            step = metrics.get("step", metrics.get("steps"))
            if self.bar is None:
                self.bar = _Bar("steps", self._total_steps_per_run(), started=self.stage_started)
            if step is not None:
                self.bar.done = int(step)
            for key in ("loss", "eval_loss"):
                if key in metrics:
                    self.metrics[key] = float(metrics[key])
            self._progress_line(f"{self.stage or 'train'}: {self._bar_text()}")

    def step_progress(self, tag: str | None, step: int, metrics: dict[str, float]) -> None:
        """Rank 0's step, as it trains (between checkpoints, when Train and Tune report)."""
        with self._lock:
            if "loss" in metrics:
                self.metrics["loss"] = float(metrics["loss"])
            row = self.trials.get(tag) if tag is not None else None
            if row is not None:
                if row.finished:
                    return  # a late event from a trial already stopped
                row.step = max(row.step, int(step))
                self._update_sweep_bar()
                self._progress_line(f"tune: {self._bar_text()}; {self._sweep_counts()}")
                return
            if tag is not None or self.trials:
                return  # a trial not announced yet: its start event comes first
            if self.bar is None or self.bar.unit != "steps":
                self.bar = _Bar("steps", self._total_steps_per_run(), started=self.stage_started)
            self.bar.done = max(self.bar.done, int(step))
            self._progress_line(f"{self.stage or 'train'}: {self._bar_text()}")

    def train_error(self, summary: str) -> None:
        log = f"; full log: {self.log_file}" if self.log_file else ""
        self.message(f"training worker failed: {summary}{log}")

    def trial_event(
        self,
        kind: str,
        trial_id: str,
        params: dict[str, Any],
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        with self._lock:
            row = self.trials.setdefault(trial_id, TrialRow(trial_id, dict(params)))
            # Tune calls on_trial_start just before it marks the trial RUNNING.
            row.status = "RUNNING" if kind == "start" else status
            metric = self.cfg.tune.metric
            if result is not None:
                row.iteration = int(result.get("training_iteration", row.iteration) or 0)
                step = result.get("step", result.get("steps"))
                if step is not None:  # the workers' step events may be ahead of the checkpoint
                    row.step = max(row.step, int(step))
                if isinstance(result.get(metric), (int, float)):
                    row.metric = float(result[metric])
                for key in ("loss", "eval_loss"):
                    if isinstance(result.get(key), (int, float)):
                        self.metrics[key] = float(result[key])
            if kind == "complete":
                row.status = "TERMINATED"
            self._update_sweep_bar()
            if kind == "error":
                row.status, row.error = "ERROR", error
                log = f"; full log: {self.log_file}" if self.log_file else ""
                self.message(f"trial {row.label} ({self._params(row)}) failed: {error}{log}")
            elif kind == "complete" and self._rich is None:  # live: the table shows it
                value = f", {metric} {_fmt_metric(row.metric)}" if row.metric is not None else ""
                self.message(
                    f"trial {row.label} ({self._params(row)}) finished at iteration "
                    f"{row.iteration}, step {row.step}{value}"
                )
            elif kind == "result":
                self._progress_line(f"tune: {self._bar_text()}; {self._sweep_counts()}")

    def eval_progress(self, done: int, total: int) -> None:
        with self._lock:
            if self.bar is None or self.bar.unit != "answers":
                self.bar = _Bar("answers", total, started=time.monotonic())
            self.bar.done, self.bar.total = done, total
            self._progress_line(f"{self.stage or 'eval'}: {self._bar_text()}", done >= total)

    # ------------------------------------------------------------------ sweep state
    @staticmethod
    def _params(row: TrialRow) -> str:
        parts = []
        if "r" in row.params:
            parts.append(f"r={row.params['r']}")
        if "lr" in row.params:
            parts.append(f"lr={float(row.params['lr']):.1e}")
        return ", ".join(parts)

    def _update_sweep_bar(self) -> None:
        from tinyqa.tune.space import count_trials

        per = self._total_steps_per_run()
        n = max(count_trials(self.cfg), len(self.trials))
        if self.bar is None or self.bar.unit != "steps":
            self.bar = _Bar("steps", None, started=self.stage_started)
        self.bar.total = per * n if per else None
        # A trial that ended (early stop, error) has no steps left to wait for.
        self.bar.done = sum(
            (per or r.step) if r.finished else min(r.step, per or r.step)
            for r in self.trials.values()
        )

    def _sweep_counts(self) -> str:
        counts = Counter(row.shown_status for row in self.trials.values())
        text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        best = self._best()
        if best is not None:
            text += f"; best {self.cfg.tune.metric} {_fmt_metric(best.metric)} (trial {best.label})"
        return text

    def _best(self) -> TrialRow | None:
        from tinyqa.tune.space import sweep_mode

        scored = [r for r in self.trials.values() if r.metric is not None]
        if not scored:
            return None
        pick = min if sweep_mode(self.cfg) == "min" else max
        return pick(scored, key=lambda r: r.metric)

    def _bar_text(self, compact: bool = False) -> str:
        """``45/240 steps (18%) · elapsed 1m02s · ETA 4m40s · loss 3.2000 · eval_loss 3.3000``;
        ``compact`` (the live view, whose header shows the time) drops the elapsed time."""
        bar, now = self.bar, time.monotonic()
        parts = []
        if bar is not None:
            total = f"/{bar.total}" if bar.total else ""
            pct = f" ({100 * bar.done // bar.total}%)" if bar.total else ""
            parts.append(f"{bar.done}{total} {bar.unit}{pct}")
            if not compact:
                parts.append(f"elapsed {fmt_seconds(now - bar.started)}")
            parts.append(f"ETA {fmt_seconds(bar.eta(now))}")
        digits = 3 if compact else 4
        parts += [f"{k} {v:.{digits}f}" for k, v in self.metrics.items()]
        return " · ".join(parts)

    # ------------------------------------------------------------------ live view
    def render(self) -> Any:
        """The live view: header, stage strip, progress bar, trial table (rich renderables)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = time.monotonic()
            head = Text.assemble(
                (f"tinyqa {self.command}", "bold"),
                f" · {self.cfg.experiment} · ",
                (self.stage or "starting", "bold cyan"),
                f" · {fmt_seconds(now - self.stage_started)} in stage"
                f" · {fmt_seconds(now - self.started)} total",
            )
            parts: list[Any] = [head]
            if len(self.stages) > 1 or self.command in ("demo", "pipeline"):
                marks = {"done": "✓", "skipped": "✓", "running": "…", "failed": "✗"}
                strip = "  ".join(f"{s} {marks.get(v, '')}" for s, v in self.stages.items())
                parts.append(Text(strip, style="dim"))
            bar = self.bar
            if bar is not None:
                grid = Table.grid(padding=(0, 1))
                grid.add_column(no_wrap=True)
                grid.add_column(no_wrap=True, overflow="ellipsis")
                grid.add_row(
                    ProgressBar(total=bar.total or None, completed=bar.done, width=24),
                    Text(self._bar_text(compact=True)),
                )
                parts.append(grid)
            elif self.metrics:
                parts.append(Text(self._bar_text(compact=True)))
            if self.trials:
                parts.append(self._trial_table())
            return Group(*parts)

    def _trial_table(self) -> Any:
        from rich.table import Table

        metric = self.cfg.tune.metric
        table = Table(box=None, padding=(0, 1), header_style="bold")
        for name in ("trial", "r", "lr", "status", "iter", "step", metric):
            table.add_column(name, justify="left" if name == "status" else "right")
        rows = sorted(self.trials.values(), key=lambda r: (r.finished, r.label))
        best = self._best()
        for row in rows[:MAX_TRIAL_ROWS]:
            style = "bold green" if best is row else ("red" if row.status == "ERROR" else None)
            table.add_row(
                row.label,
                str(row.params.get("r", "")),
                f"{float(row.params['lr']):.1e}" if "lr" in row.params else "",
                row.shown_status,
                str(row.iteration),
                str(row.step),
                _fmt_metric(row.metric),
                style=style,
            )
        if len(rows) > MAX_TRIAL_ROWS:
            table.caption = f"... {len(rows) - MAX_TRIAL_ROWS} more"
        return table

    # ------------------------------------------------------------------ for the command table
    def tune_callbacks(self) -> list[Any]:
        """Tune callbacks feeding this view; none when verbose (Tune's own reporter shows)."""
        if self.verbose:
            return []
        from tinyqa.progress import TuneProgress, set_sink

        set_sink(self)
        return [TuneProgress()]

    def train_callbacks(self) -> list[Any]:
        """Train ``UserCallback``s feeding this view; call once Ray is connected."""
        from tinyqa.progress import QueueDrain, set_sink

        set_sink(self)
        drain = QueueDrain()
        self._drains.append(drain)
        return [drain.callback()]

    def close(self) -> None:
        """Stop the queue threads and detach from the progress callbacks."""
        for drain in self._drains:
            drain.close()
        self._drains = []
        _unset_sink()


class _ConsoleLogHandler(logging.Handler):
    """tinyqa's own warnings and errors also reach the console, as one line each."""

    def __init__(self, view: ConsoleView):
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()[0][:300]
            self.view.message(f"{record.levelname.lower()}: {text}")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _redirect_fds(target: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Point file descriptors 1 and 2 at ``target``; yield a stream on the original stdout and
    the log stream."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    old_stdout, old_stderr = sys.stdout, sys.stderr
    with open(target, "a", buffering=1, encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python-level writers too, where sys.stdout is not descriptor 1 (pytest, notebooks).
        sys.stdout = sys.stderr = log
        try:
            yield console, log
        finally:
            with contextlib.suppress(Exception):
                log.flush()
            sys.stdout, sys.stderr = old_stdout, old_stderr
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()


def _open_log(cfg: TinyQAConfig, command: str) -> Path:
    """The command's log file; under the system temp folder when the storage path is a bucket or
    not writable (the command then fails with its own error about the storage)."""
    path = log_path(cfg, command)
    if isinstance(path, Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            return path
        except OSError:
            pass
    # Unwritable, or a bucket (s3:// / gs://: a log is appended line by line, which an object
    # store cannot do): the log stays on this machine.
    import tempfile

    local = Path(tempfile.gettempdir()) / "tinyqa-logs" / path.name
    local.parent.mkdir(parents=True, exist_ok=True)
    return local


@contextlib.contextmanager
def session(cfg: TinyQAConfig, command: str, verbose: bool = False) -> Iterator[ConsoleView]:
    """One long command's console (see the module docstring); the view is also the process's
    progress sink. On an exception the view prints how long it ran and the log path, then the
    exception propagates (the caller prints the error itself)."""
    live = not verbose and is_interactive(sys.stdout)
    width = shutil.get_terminal_size((100, 40)).columns if live else None
    if verbose:
        view = ConsoleView(command, cfg, sys.stdout, live=False, verbose=True)
        try:
            yield view
        finally:
            view.close()
        return

    path = _open_log(cfg, command)
    root = logging.getLogger()
    console_streams = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    with _redirect_fds(path) as (out, log):
        view = ConsoleView(command, cfg, out, live=live, log_file=path, width=width)
        # The log file gets every logger at INFO, through one handler of ours (console handlers
        # set up before, e.g. basicConfig's, step aside); tinyqa's warnings also reach the console.
        parked = [
            h
            for h in root.handlers
            if type(h) is logging.StreamHandler and h.stream in console_streams
        ]
        for h in parked:
            root.removeHandler(h)
        file_handler = logging.StreamHandler(log)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)
        handler = _ConsoleLogHandler(view)
        logging.getLogger("tinyqa").addHandler(handler)
        logging.captureWarnings(True)
        old_level = root.level
        root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
        view.message(f"tinyqa {command}: full log in {path}")
        view.start()
        ok = False
        try:
            yield view
            ok = True
        finally:
            view.close()
            view.stop()
            _disconnect_ray()
            logging.getLogger("tinyqa").removeHandler(handler)
            root.removeHandler(file_handler)
            for h in parked:
                root.addHandler(h)
            logging.captureWarnings(False)
            root.setLevel(old_level)
            if not ok:
                view.message(
                    f"tinyqa {command}: failed after {view._elapsed()}; full log in {path}"
                )


def _disconnect_ray() -> None:
    """Leave Ray while the descriptors still point at the log: Ray keeps streaming worker output
    to the driver until it disconnects. (An endpoint lives on its detached cluster; a local Ray
    ends with this process anyway.)"""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:
            logger.debug("ray.shutdown failed", exc_info=True)


def _unset_sink() -> None:
    # tinyqa.progress imports Ray: only touch it when the command loaded it.
    progress = sys.modules.get("tinyqa.progress")
    if progress is not None:
        progress.set_sink(None)
