"""Progress events out of Ray Train and Ray Tune, for whoever draws them (``tinyqa.console``).

The library never prints: it takes these callbacks through small hooks (``run_training(...,
callbacks=)``, ``run_sweep(..., callbacks=)``) and forwards what they see to the process's
:class:`ProgressSink`, set by the entrypoint with :func:`set_sink`. No sink set: they do nothing.

- :class:`TuneProgress` is a Tune callback; Tune calls it on the driver, so it calls the sink
  directly. It holds no state, so the copy Tune pickles into ``tuner.pkl`` and brings back on
  ``Tuner.restore`` reaches the sink of the process that resumes the sweep.
- :class:`TrainProgress` is a Train V2 ``UserCallback``; it runs in the Train controller actor,
  not on the driver, so it puts small dicts on a ``ray.util.queue.Queue`` that
  :class:`QueueDrain` empties into the sink on a driver thread.
- :class:`StepProgress` is a Trainer callback factory for the Train workers (see
  :data:`tinyqa.training.CallbackFactory`): rank 0 puts its step and loss on such a queue as it
  trains, so a bar moves every step instead of once per checkpoint (Train and Tune only hear of
  checkpoints). :func:`worker_callbacks` hands them out while a sink is set.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Protocol

from ray.train import UserCallback
from ray.tune import Callback

logger = logging.getLogger(__name__)

_sink: ProgressSink | None = None
_step_drain: QueueDrain | None = None  # opened by worker_callbacks(), closed by set_sink(None)


class ProgressSink(Protocol):
    def train_report(self, metrics: dict[str, float]) -> None:
        """A Train run reported (one per checkpoint, plus the final report)."""

    def train_error(self, summary: str) -> None:
        """A Train worker raised (Ray may retry the run)."""

    def step_progress(self, tag: str | None, step: int, metrics: dict[str, float]) -> None:
        """Rank 0 of a Train run finished ``step`` (``tag``: the Tune trial id in a sweep,
        None for a plain training run); ``metrics`` holds ``loss`` when it was just logged."""

    def trial_event(
        self,
        kind: str,
        trial_id: str,
        params: dict[str, Any],
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        """A Tune trial started, reported, completed or failed (``kind``: start, result,
        complete, error); ``status`` is Tune's (RUNNING, TERMINATED, ERROR, ...)."""


def set_sink(sink: ProgressSink | None) -> None:
    """Where this process's progress callbacks send their events (None: nowhere; this also
    stops the queue that :func:`worker_callbacks` opened)."""
    global _sink, _step_drain
    _sink = sink
    if sink is None and _step_drain is not None:
        _step_drain.close()
        _step_drain = None


def worker_callbacks() -> list[StepProgress]:
    """Trainer callback factories that send rank 0's steps to this process's sink; none when no
    sink is set (a library caller, a test). Call once Ray is connected: the first call starts
    the queue actor that carries the steps."""
    global _step_drain
    if _sink is None:
        return []
    if _step_drain is None:
        _step_drain = QueueDrain()
    return [StepProgress(_step_drain.queue)]


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _error_line(error: BaseException | str | None) -> str:
    text = str(error or "").strip()
    return text.splitlines()[-1][:200] if text else type(error).__name__


class TuneProgress(Callback):
    """Forwards trial starts, results, completions and errors to the sink (driver side)."""

    def _send(self, kind: str, trial: Any, result: dict | None, error: str | None = None) -> None:
        if _sink is None:
            return
        params = {k: trial.config[k] for k in ("r", "lr") if k in (trial.config or {})}
        try:
            _sink.trial_event(kind, trial.trial_id, params, trial.status, result, error)
        except Exception:  # drawing progress must never break a sweep
            logger.debug("progress sink failed", exc_info=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send("start", trial, None)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._send("result", trial, dict(result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send("complete", trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        message = None
        path = getattr(trial, "error_file", None)
        if path:
            try:
                with open(path) as f:
                    message = _error_line(f.read())
            except OSError:
                message = None
        self._send("error", trial, None, message or "the trial raised (see the log)")


class TrainProgress(UserCallback):
    """Puts each Train report (rank 0's numbers) and worker errors on a Ray queue."""

    def __init__(self, queue: Any):
        self._queue = queue

    def _put(self, item: dict[str, Any]) -> None:
        # A full or gone queue only costs a progress update.
        with contextlib.suppress(Exception):
            self._queue.put_nowait(item)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        self._put({"report": _numbers(metrics[0] if metrics else {})})

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]):
        rank, error = min(worker_exceptions.items())
        self._put({"error": f"worker {rank}: {_error_line(error)}"})


class StepProgress:
    """Trainer callback factory (picklable: it travels to the Train workers): rank 0's callback
    puts ``{"step": ...}`` on the queue after each step, at most once per ``every_s`` seconds
    unless a loss was just logged. Nothing on the other ranks."""

    def __init__(self, queue: Any, tag: str | None = None, every_s: float = 1.0):
        self._queue, self._tag, self._every_s = queue, tag, every_s

    def tagged(self, tag: str) -> StepProgress:
        """The same factory, its events tagged (a sweep tags them with the trial id)."""
        return StepProgress(self._queue, tag, self._every_s)

    def __call__(self, cfg: Any, rank: int) -> Any:
        import time

        from transformers import TrainerCallback

        queue, tag, every_s = self._queue, self._tag, self._every_s

        class StepToQueue(TrainerCallback):
            last: float | None = None

            def _put(self, step: int, metrics: dict[str, float], force: bool) -> None:
                now = time.monotonic()
                due = force or self.last is None or now - self.last >= every_s
                if rank != 0 or not due:
                    return
                self.last = now
                with contextlib.suppress(Exception):  # progress never stops training
                    queue.put_nowait({"step": {"tag": tag, "step": step, "metrics": metrics}})

            def on_step_end(self, args, state, control, **kwargs):
                self._put(state.global_step, {}, force=False)

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if isinstance(loss, (int, float)):
                    self._put(state.global_step, {"loss": float(loss)}, force=True)

        return StepToQueue()


class QueueDrain:
    """Driver side of :class:`TrainProgress` and :class:`StepProgress`: a Ray queue and a
    thread that empties it into the sink. Create it after Ray is connected; :meth:`close` stops the thread and the queue actor."""

    def __init__(self, maxsize: int = 1000):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tinyqa-progress", daemon=True)
        self._thread.start()

    def callback(self) -> TrainProgress:
        return TrainProgress(self.queue)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (shutdown): nothing more will come
                return
            self._deliver(item)

    def _deliver(self, item: dict[str, Any]) -> None:
        if _sink is None:
            return
        try:
            if "report" in item:
                _sink.train_report(item["report"])
            elif "step" in item:
                _sink.step_progress(**item["step"])
            elif "error" in item:
                _sink.train_error(item["error"])
        except Exception:
            logger.debug("progress sink failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            # What arrived after the thread's last look (the final report) still counts.
            while not self.queue.empty():
                self._deliver(self.queue.get_nowait())
            self.queue.shutdown()
        except Exception:
            logger.debug("progress queue shutdown failed", exc_info=True)
