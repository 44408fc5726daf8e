"""The console of long commands: plain lines (throttled, no control characters), the live view's
content, the log file that takes the descriptors' stream, and failures that always show."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time

import pytest
from rich.console import Console

from tinyqa import console as console_mod
from tinyqa.config import load_config
from tinyqa.console import ConsoleView, fmt_seconds, log_path, session

PARAMS = {"r": 4, "lr": 1.0e-3}


@pytest.fixture
def cfg(tmp_path, repo_root):
    c = load_config(repo_root / "jobs/configs/tiny-cpu.yaml", [f"storage_path={tmp_path}"])
    c.data_dir.mkdir(parents=True)
    (c.data_dir / "stats.json").write_text(json.dumps({"train": 80}))
    return c


def _result(it: int, step: int, loss: float) -> dict:
    return {"training_iteration": it, "step": step, "eval_loss": loss, "loss": loss + 0.1}


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (5, 65, 3725, None, -1)] == ["5s", "1m05s", "1h02m", "?", "?"]


def test_log_path_is_per_command_and_time(cfg):
    path = log_path(cfg, "demo", now=0)
    assert path.parent == cfg.run_dir / "logs"
    assert re.fullmatch(r"demo-\d{8}-\d{6}\.log", path.name)


def test_plain_mode_throttles_progress_and_always_prints_trial_ends(cfg):
    out = io.StringIO()
    view = ConsoleView("tune", cfg, out, live=False, log_file=cfg.run_dir / "x.log")
    view.begin("tune")
    for it in range(1, 6):  # five results within the same second: one progress line
        view.trial_event("result", "a_00000", PARAMS, "RUNNING", _result(it, 15 * it, 3.0), None)
    view.trial_event("complete", "a_00000", PARAMS, "TERMINATED", None, None)
    view.trial_event("error", "a_00001", {"r": 8, "lr": 3e-3}, "ERROR", None, "ValueError: boom")
    view.on_stage("tune", "done")
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    progress = [line for line in lines if "steps" in line]
    assert len(progress) == 1
    # max_steps 60 x 4 grid trials; the first progress line came at iteration 1.
    assert "15/240 steps" in progress[0] and "best eval_loss 3" in progress[0]
    assert any("trial 0 (r=4, lr=1.0e-03) finished at iteration 5, step 75" in x for x in lines)
    failed = [x for x in lines if "trial 1" in x]
    assert failed and "failed: ValueError: boom" in failed[0] and "x.log" in failed[0]
    assert lines[-1].endswith("stage tune: done in 0s (2 trials)")


def test_sweep_bar_counts_ended_trials_as_done(cfg):
    view = ConsoleView("tune", cfg, io.StringIO())
    view.begin("tune")
    view.trial_event("result", "a_00000", PARAMS, "RUNNING", _result(2, 30, 3.0), None)
    view.trial_event("complete", "a_00000", PARAMS, "TERMINATED", None, None)  # ASHA stop
    view.trial_event("result", "a_00001", PARAMS, "RUNNING", _result(1, 15, 3.2), None)
    assert (view.bar.done, view.bar.total) == (60 + 15, 240)


def test_train_reports_fill_the_bar_and_losses(cfg):
    out = io.StringIO()
    view = ConsoleView("train", cfg, out, plain_every=0)
    view.begin("train")
    view.train_report({"step": 30, "loss": 2.5, "eval_loss": 2.75, "epoch": 1.0})
    view.train_error("worker 0: RuntimeError: injected failure at step 30")
    text = out.getvalue()
    assert "30/60 steps (50%)" in text and "loss 2.5000" in text and "eval_loss 2.7500" in text
    assert "training worker failed: worker 0: RuntimeError: injected failure" in text


def test_steps_between_checkpoints_move_the_bar(cfg):
    """Rank 0's step events move the bar every step (Train / Tune report only at checkpoints),
    so the ETA does not grow while a run trains between two checkpoints."""
    out = io.StringIO()
    view = ConsoleView("train", cfg, out, plain_every=0)
    view.begin("train")
    view.step_progress(None, 7, {})
    view.step_progress(None, 12, {"loss": 3.25})
    assert (view.bar.done, view.bar.total) == (12, 60)
    assert "12/60 steps (20%)" in out.getvalue() and "loss 3.2500" in out.getvalue()
    view.train_report({"step": 10, "eval_loss": 3.5})  # a checkpoint's report, caught up
    assert view.bar.done == 10


def test_eta_counts_from_the_first_step_not_the_stage_start():
    """The stage's first minute (Ray, model load) is not a step's cost."""
    from tinyqa.console import _Bar

    bar = _Bar("steps", 60, started=0.0)
    bar.done = 1
    assert bar.eta(100.0) is None  # one sighting: no rate yet
    bar.done = 11
    assert bar.eta(110.0) == pytest.approx(49.0)  # 10 steps in 10 s, 49 to go
    bar.done = 3  # a run restarted from a checkpoint: the rate starts over
    assert bar.eta(120.0) is None


def test_trial_steps_fill_the_trial_row_and_the_sweep_bar(cfg):
    view = ConsoleView("tune", cfg, io.StringIO(), plain_every=0)
    view.begin("tune")
    view.trial_event("start", "a_00000", PARAMS, "PENDING", None, None)
    view.step_progress("a_00000", 9, {"loss": 3.0})
    assert view.trials["a_00000"].step == 9 and view.bar.done == 9
    # The checkpoint's report at step 5 arrives after the step events: the row stays at 9.
    view.trial_event("result", "a_00000", PARAMS, "RUNNING", _result(1, 5, 3.1), None)
    assert view.trials["a_00000"].step == 9
    view.trial_event("complete", "a_00000", PARAMS, "TERMINATED", None, None)
    view.step_progress("a_00000", 11, {})  # late, from a stopped trial: ignored
    view.step_progress("unknown", 3, {})  # a trial not announced yet: ignored
    assert view.trials["a_00000"].step == 9 and set(view.trials) == {"a_00000"}
    assert view.bar.done == 60  # an ended trial counts as done


def test_live_view_shows_stage_bar_and_trial_table(cfg):
    view = ConsoleView("demo", cfg, io.StringIO(), live=True, width=100)
    view.on_stage("prepare", "running")
    view.on_stage("prepare", "done")
    view.on_stage("tune", "running")
    view.trial_event("result", "a_00000", PARAMS, "RUNNING", _result(2, 30, 3.1), None)
    view.trial_event(
        "result", "a_00001", {"r": 8, "lr": 3e-3}, "RUNNING", _result(1, 15, 3.3), None
    )
    # Tune calls a trial running while its Train workers still wait for the CPUs: "starting".
    view.trial_event("start", "a_00002", {"r": 16, "lr": 1e-3}, "RUNNING", None, None)
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=False).print(view.render())
    text = buf.getvalue()
    assert "tinyqa demo · tiny-demo · tune" in text
    assert "prepare ✓" in text and "45/240 steps" in text and "eval_loss 3.300" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["trial", "r", "lr", "status", "iter", "step", "eval_loss"] in rows
    assert ["0", "4", "1.0e-03", "running", "2", "30", "3.1"] in rows
    assert ["1", "8", "3.0e-03", "running", "1", "15", "3.3"] in rows
    assert ["2", "16", "1.0e-03", "starting", "0", "0"] in rows
    assert view._sweep_counts().startswith("2 running, 1 starting")


def test_eval_progress_prints_the_last_batch(cfg):
    out = io.StringIO()
    view = ConsoleView("eval", cfg, out)
    view.begin("eval")
    for done in (16, 32, 48):
        view.eval_progress(done, 48)
    assert "48/48 answers (100%)" in out.getvalue()


def test_session_sends_the_stream_to_the_log_file(cfg, capfd):
    """Writes to the descriptors (Ray's C++ lines, child processes) and third-party logging land in
    the log file; tinyqa's warnings and the view's lines reach the console."""
    with session(cfg, "train") as view:
        os.write(1, b"raw fd noise\n")
        os.write(2, b"core_worker.cc noise\n")
        print("print noise")
        logging.getLogger("some.thirdparty").warning("serve access log")
        logging.getLogger("tinyqa.training").warning("a warning the user must see")
        view.message("a console line")
    out, err = capfd.readouterr()
    logs = list((cfg.run_dir / "logs").glob("train-*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    for noise in ("raw fd noise", "core_worker.cc noise", "print noise", "serve access log"):
        assert noise not in out + err
        assert noise in log
    assert f"full log in {logs[0]}" in out
    assert "warning: a warning the user must see" in out and "a console line" in out
    assert "\x1b" not in out
    # The descriptors are back.
    print("after")
    assert "after" in capfd.readouterr().out


def test_session_failure_prints_the_log_path_and_reraises(cfg, capfd):
    with pytest.raises(RuntimeError), session(cfg, "tune"):
        raise RuntimeError("boom")
    out, _ = capfd.readouterr()
    assert "tinyqa tune: failed after" in out and str(cfg.run_dir / "logs") in out


def test_verbose_session_keeps_the_stream(cfg, capfd):
    with session(cfg, "train", verbose=True):
        os.write(1, b"raw fd noise\n")
    assert "raw fd noise" in capfd.readouterr().out
    assert not (cfg.run_dir / "logs").exists()


def test_unwritable_storage_logs_to_temp(tmp_path, repo_root, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load_config(repo_root / "jobs/configs/tiny-cpu.yaml", [f"storage_path={blocker}/runs"])
    with session(cfg, "train"):
        pass
    assert "tinyqa-logs" in capfd.readouterr().out


def test_console_module_stays_light():
    # The CLI imports it: Ray loads only when a long command asks for its callbacks.
    assert "ray" not in console_mod.__dict__
    assert console_mod.is_interactive(io.StringIO()) is False
    assert isinstance(sys.modules["tinyqa.console"], type(sys))


def test_plain_heartbeat_backs_off(cfg, monkeypatch):
    """A stage with nothing to report says it is alive, ever less often (60 s, 120 s, 240 s...)."""
    monkeypatch.setattr(console_mod, "HEARTBEAT_EVERY", 0.05)
    out = io.StringIO()
    view = ConsoleView("tune", cfg, out)
    view.start()
    view.begin("tune")
    time.sleep(1.0)
    view.stop()
    beats = [line for line in out.getvalue().splitlines() if "still running" in line]
    # 0.05 + 0.1 + 0.2 + 0.4 s fit in one second; a fixed interval would give far more.
    assert 2 <= len(beats) <= 5
