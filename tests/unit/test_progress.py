"""Progress out of the Train workers: rank 0's step events, throttled, never on other ranks."""

from __future__ import annotations

from types import SimpleNamespace

from tinyqa.progress import StepProgress, worker_callbacks


class ListQueue:
    """What the callbacks need of a ``ray.util.queue.Queue``: ``put_nowait``."""

    def __init__(self):
        self.items: list[dict] = []

    def put_nowait(self, item: dict) -> None:
        self.items.append(item)


def _steps(callback, steps, log_every: int = 5) -> None:
    for step in steps:
        state = SimpleNamespace(global_step=step)
        callback.on_step_end(None, state, None)
        if step % log_every == 0:
            callback.on_log(None, state, None, logs={"loss": 3.0 - step / 100})


def test_rank0_sends_steps_throttled_and_every_logged_loss():
    queue = ListQueue()
    factory = StepProgress(queue, every_s=3600).tagged("trial_00001")
    _steps(factory(None, 0), range(1, 11))
    events = [item["step"] for item in queue.items]
    # The first step goes at once; later ones wait for the throttle unless a loss was logged.
    assert [e["step"] for e in events] == [1, 5, 10]
    assert events[1] == {"tag": "trial_00001", "step": 5, "metrics": {"loss": 2.95}}
    assert events[0]["metrics"] == {}


def test_other_ranks_send_nothing():
    queue = ListQueue()
    _steps(StepProgress(queue, every_s=0)(None, 1), range(1, 11))
    assert queue.items == []


def test_a_broken_queue_never_stops_training():
    class GoneQueue:
        def put_nowait(self, item):
            raise ConnectionError("queue actor is gone")

    _steps(StepProgress(GoneQueue(), every_s=0)(None, 0), range(1, 6))  # no exception


def test_no_sink_no_worker_callbacks():
    assert worker_callbacks() == []
