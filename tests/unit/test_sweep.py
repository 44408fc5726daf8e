"""Sweep planning and outputs without Ray: validation, trial naming, resources, result files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tinyqa import cluster, tune
from tinyqa.config import NAME_PATTERN, load_config
from tinyqa.errors import ConfigError
from tinyqa.tune import sweep
from tinyqa.tune.trial import _absolute_paths

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL = [
    "train.num_workers=1",
    "train.max_steps=20",
    "train.eval_steps=5",
    "train.save_steps=5",
]


def cfg_with(*overrides: str, tmp_path: Path | None = None):
    extra = [f"storage_path={tmp_path}"] if tmp_path else []
    return load_config(None, [*SMALL, *extra, *overrides])


# ----- validation ---------------------------------------------------------------------------


def test_default_and_shipped_sweeps_are_valid():
    tune.validate_sweep(load_config(None))
    for name in ("tiny-cpu.yaml", "tinyllama-qlora.yaml"):
        path = REPO / "jobs" / "configs" / name
        if path.is_file():
            tune.validate_sweep(load_config(path))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tune.search.r=[]"], "tune.search.r is empty"),
        (["tune.search.r=[0,8]"], "ranks <= 0 ([0])"),
        (["tune.search.r=[-4]"], "ranks <= 0 ([-4])"),
        (["tune.search.r=[8,128]"], "above tune.max_rank=64 ([128])"),
        (["tune.search.r=[16]", "tune.max_rank=8"], "above tune.max_rank=8 ([16])"),
        (["tune.search.r=[8,8]"], "duplicates"),
        (["tune.search.lr=[]"], "tune.search.lr is empty"),
        (["tune.search.lr=[0,1.0e-3]"], "values <= 0"),
        (["tune.search.lr=[-1.0e-4]"], "values <= 0"),
        (
            ["tune.search.lr=[1.0e-3,1.0e-4]", "tune.search.lr_log_uniform=true"],
            "range [0.001, 0.0001] is reversed",
        ),
        (
            ["tune.search.lr=[1.0e-4,1.0e-4]", "tune.search.lr_log_uniform=true"],
            "is reversed or empty",
        ),
        (["tune.search.lr=[1.0e-4]", "tune.search.lr_log_uniform=true"], "must be [low, high]"),
        (["tune.search.alpha_ratio=[]"], "alpha_ratio is empty"),
        (["tune.search.alpha_ratio=[0]"], "alpha_ratio has values <= 0"),
        (["tune.search.dropout=[1.0]"], "outside [0, 1)"),
        (["tune.metric=accuracy"], "tune.metric 'accuracy' is not reported by trials"),
        (["tune.metric=grad_norm"], "has no natural direction; set tune.mode"),
        (["tune.searcher=optuna", "tune.metric=train_loss"], "reported only at the end"),
        # 20 steps / 5 per checkpoint = 4 checkpoints: a stop at the 4th would only skip the export
        (["tune.grace_period=4"], "tune.grace_period (4) must be below the 4 checkpoints"),
        (["tune.grace_period=9"], "or ASHA can never stop a trial early"),
    ],
)
def test_bad_sweeps_are_one_clear_config_error(overrides, expected):
    with pytest.raises(ConfigError) as err:
        tune.validate_sweep(cfg_with(*overrides))
    assert expected in str(err.value)
    assert str(err.value).startswith("sweep config: ")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tune.num_samples=0"], "tune.num_samples"),
        (["tune.searcher=hyperopt"], "tune.searcher"),
        (["tune.reduction_factor=1"], "tune.reduction_factor"),
        (["tune.grace_period=0"], "tune.grace_period"),
    ],
)
def test_bad_scalars_fail_when_the_config_loads(overrides, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)
    assert expected in str(err.value)


def test_every_problem_reported_at_once():
    cfg = cfg_with("tune.search.r=[0]", "tune.search.lr=[-1]", "tune.metric=nope")
    with pytest.raises(ConfigError) as err:
        tune.validate_sweep(cfg)
    msg = str(err.value)
    assert "tune.search.r" in msg and "tune.search.lr" in msg and "tune.metric" in msg


def test_asha_never_stops_a_trial_at_its_last_checkpoint():
    from ray.tune.schedulers import TrialScheduler

    cfg = cfg_with("tune.grace_period=1", "tune.reduction_factor=2")  # 4 checkpoints + final
    tune.validate_sweep(cfg)
    asha = sweep._scheduler(cfg, tune.expected_iterations(cfg))
    good, bad, late = (SimpleNamespace(trial_id=t) for t in ("good", "bad", "late"))
    for trial in (good, bad, late):
        asha.on_trial_add(None, trial)

    def report(trial, iteration, loss):
        result = {"training_iteration": iteration, "eval_loss": loss}
        return asha.on_trial_result(None, trial, result)

    for i in range(1, 6):
        assert report(good, i, 3.0 - 0.1 * i) == TrialScheduler.CONTINUE
    assert report(bad, 1, 4.0) == TrialScheduler.STOP  # worse than good at the first rung
    # Keeps up until checkpoint 3, then falls behind at the last checkpoint: too late to stop.
    for i in range(1, 6):
        loss = 3.0 - 0.1 * i if i < 4 else 9.0
        assert report(late, i, loss) == TrialScheduler.CONTINUE, i


def test_grace_period_checked_only_when_max_steps_known():
    # By epochs the number of reports depends on the data: run_sweep checks it after preparing.
    tune.validate_sweep(cfg_with("train.max_steps=-1", "tune.grace_period=50"))
    tune.validate_sweep(cfg_with("tune.scheduler=none", "tune.grace_period=50"))


def test_explicit_mode_and_metric_choices():
    cfg = cfg_with("tune.metric=grad_norm", "tune.mode=min")
    tune.validate_sweep(cfg)
    assert tune.sweep_mode(cfg) == "min"
    assert tune.sweep_mode(cfg_with("tune.metric=eval_mean_token_accuracy")) == "max"
    # ASHA judges on a metric every checkpoint carries
    assert tune.scheduler_metric(cfg_with("tune.metric=train_loss")) == ("eval_loss", "min")
    assert tune.scheduler_metric(cfg_with("tune.metric=eval_mean_token_accuracy")) == (
        "eval_mean_token_accuracy",
        "max",
    )


@pytest.mark.parametrize("metric", ["keyword_recall", "exact_match", "token_f1", "rougeL", "bleu"])
def test_generation_metrics_select_the_best_trial(metric):
    cfg = cfg_with(f"tune.metric={metric}")
    tune.validate_sweep(cfg)
    assert tune.sweep_mode(cfg) == "max"
    # Scored after training ends: early stopping still ranks trials by eval loss.
    assert tune.scheduler_metric(cfg) == ("eval_loss", "min")


# ----- planning -----------------------------------------------------------------------------


def test_expected_iterations():
    assert tune.expected_iterations(cfg_with()) == 5  # 4 checkpoints + final
    assert tune.expected_iterations(cfg_with("train.max_steps=22")) == 6  # HF saves the last step
    by_epochs = cfg_with("train.max_steps=-1", "train.epochs=2", "train.batch_size=8")
    assert tune.expected_iterations(by_epochs) is None
    # 100 records / 8 per batch = 13 batches per epoch, 26 steps, 6 checkpoints + final
    assert tune.expected_iterations(by_epochs, n_train=100) == 7


def test_count_trials():
    assert tune.count_trials(cfg_with("tune.search.r=[4,8]", "tune.search.lr=[1,2]")) == 4
    grid3 = cfg_with("tune.search.r=[4,8]", "tune.search.lr=[1,2]", "tune.num_samples=3")
    assert tune.count_trials(grid3) == 12
    mixed = cfg_with(
        "tune.search.r=[4,8]",
        "tune.search.lr=[1.0e-4,1.0e-2]",
        "tune.search.lr_log_uniform=true",
        "tune.num_samples=3",
    )
    assert tune.count_trials(mixed) == 6  # grid over r, 3 sampled learning rates each
    assert tune.count_trials(cfg_with("tune.searcher=random", "tune.num_samples=5")) == 5


def test_adapter_ids_are_valid_unique_and_deterministic():
    pattern = re.compile(NAME_PATTERN)
    ids = set()
    for i, (r, lr) in enumerate([(4, 1e-4), (4, 1e-3), (8, 1e-4), (8, 1e-3), (8, 1e-3)]):
        name = tune.trial_adapter_id({"r": r, "lr": lr}, f"ab12c_{i:05d}")
        assert pattern.match(name), name
        ids.add(name)
    assert len(ids) == 5  # a repeated grid point still gets its own adapter
    assert tune.trial_adapter_id({"r": 8, "lr": 3e-4}, "ab12c_00003") == "trial-03-r8-lr3.0e-04"
    optuna = tune.trial_adapter_id(
        {"r": 64, "lr": 1.2345e-4, "alpha_ratio": 0.5, "dropout": 0.05}, "3f9a2c1b"
    )
    assert optuna == "trial-3f9a2c1b-r64-lr1.2e-04-a0.5-d0.05"
    assert pattern.match(optuna)


def test_trial_config_sets_the_swept_values(tmp_path):
    base = cfg_with("lora.r=16", "lora.alpha=32", tmp_path=tmp_path).to_dict()
    cfg = tune.trial_config(base, {"r": 4, "lr": 3e-4}, "trial-00-r4-lr3.0e-04")
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 8)  # alpha/r of the base kept
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.adapter_id == "trial-00-r4-lr3.0e-04"
    assert cfg.adapters_dir == tmp_path.resolve() / "tinyqa" / "adapters"
    cfg = tune.trial_config(base, {"r": 8, "lr": 1e-3, "alpha_ratio": 1.0, "dropout": 0.2}, "x")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 8, 0.2)
    assert base["lora"]["r"] == 16  # the base is not modified


def test_trial_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _absolute_paths(cfg_with("storage_path=./runs", "data.path=./qa.json"))
    assert data["storage_path"] == str(tmp_path.resolve() / "runs")
    assert data["data"]["path"] == str(tmp_path.resolve() / "qa.json")
    assert data["model"]["name"] == "tiny"  # a preset stays a preset


def test_fingerprint_ignores_settings_a_resume_may_change():
    a = sweep._fingerprint(cfg_with())
    b = sweep._fingerprint(cfg_with("tune.max_concurrent_trials=3", "ray_address=1.2.3.4:6379"))
    assert sweep._diff_keys(a, b) == []
    c = sweep._fingerprint(cfg_with("tune.search.r=[4]", "train.max_steps=30"))
    assert sweep._diff_keys(a, c) == ["train.max_steps", "tune.search.r"]


# ----- cluster resources (Ray's answers faked) ----------------------------------------------


@pytest.fixture
def fake_cluster(monkeypatch):
    import ray

    def install(total, free=None, nodes=None, autoscaler=None):
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
        monkeypatch.setattr(ray, "available_resources", lambda: dict(free or total))
        monkeypatch.setattr(
            ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in (nodes or [total])]
        )
        monkeypatch.setattr(cluster, "_autoscaler_capacity", lambda: autoscaler)

    return install


def test_concurrency_from_free_cpus(fake_cluster):
    fake_cluster({"CPU": 8.0}, free={"CPU": 5.0})
    assert cluster.plan_concurrency(cfg_with(), n_trials=4) == 4  # 1 CPU per trial, 4 trials
    assert cluster.plan_concurrency(cfg_with("train.num_workers=2"), n_trials=4) == 2
    assert cluster.plan_concurrency(cfg_with("tune.max_concurrent_trials=1"), n_trials=4) == 1


def test_concurrency_from_free_gpus(fake_cluster):
    gpu = ["train.use_gpu=true", "train.num_workers=2"]
    fake_cluster({"CPU": 32.0, "GPU": 8.0}, free={"CPU": 32.0, "GPU": 6.0})
    assert cluster.plan_concurrency(cfg_with(*gpu), n_trials=16) == 3


def test_more_gpus_than_the_cluster_has(fake_cluster):
    fake_cluster({"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"a trial needs 2 GPU .* but the cluster has 1"):
        cluster.plan_concurrency(cfg_with("train.use_gpu=true", "train.num_workers=2"), 4)
    fake_cluster({"CPU": 8.0})
    with pytest.raises(ConfigError, match="needs 1 GPU"):
        cluster.plan_concurrency(cfg_with("train.use_gpu=true"), 4)


def test_worker_larger_than_any_node(fake_cluster):
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    fake_cluster({"CPU": 8.0, "GPU": 2.0}, nodes=nodes)
    with pytest.raises(
        ConfigError, match="one Train worker needs 2 GPU but the largest node has 1"
    ):
        cluster.plan_concurrency(cfg_with("train.use_gpu=true", "train.gpus_per_worker=2"), 4)


def test_autoscaling_cluster_counts_what_it_can_grow_to(fake_cluster):
    # A CPU head with 0-4 single-GPU workers (cluster.yaml): no GPU now, 4 at most.
    scaling = ({"CPU": 24.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 1.0})
    fake_cluster({"CPU": 8.0}, autoscaler=scaling)
    assert cluster.plan_concurrency(cfg_with("train.use_gpu=true"), n_trials=8) == 4
    with pytest.raises(ConfigError, match="the cluster can scale to 4"):
        cluster.plan_concurrency(cfg_with("train.use_gpu=true", "train.num_workers=8"), 8)


def test_autoscaler_capacity_from_launcher_config(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HOME", str(tmp_path))
    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(launcher))
    import ray._private.state

    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    total, largest = cluster._autoscaler_capacity()
    assert total["GPU"] == 4 and largest["GPU"] == 1


# ----- outputs --------------------------------------------------------------------------------


def _fake_result(tmp_path, trial_id, r, lr, losses, completed=True, error=None):
    """Something shaped like ray.tune.Result for one trial."""
    adapter_id = tune.trial_adapter_id({"r": r, "lr": lr}, trial_id)
    steps = [5 * (i + 1) for i in range(len(losses))]
    history = pd.DataFrame(
        {"eval_loss": losses, "step": steps, "training_iteration": range(1, len(losses) + 1)}
    )
    last = {
        "trial_id": trial_id,
        "adapter_id": adapter_id,
        "eval_loss": losses[-1],
        "training_iteration": len(losses),
        "time_total_s": 10.0 * len(losses),
        "config": {"r": r, "lr": lr},
    }
    if completed:
        last["train_seconds"] = 9.0
    trial_dir = tmp_path / "trials" / trial_id
    trial_dir.mkdir(parents=True)
    return SimpleNamespace(
        metrics=last,
        config=last["config"],
        path=str(trial_dir),
        error=error,
        metrics_dataframe=history,
    ), adapter_id


def _export(cfg, adapter_id):
    folder = cfg.adapters_dir / adapter_id
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "tinyqa.json").write_text(json.dumps({"adapter_id": adapter_id}))


def test_results_summary_plot_and_best(tmp_path):
    cfg = cfg_with(tmp_path=tmp_path / "runs")
    grid, ids = [], []
    specs = [
        ("x_00000", 4, 1e-4, [3.7], False),  # stopped by ASHA after one report
        ("x_00001", 4, 1e-3, [3.6, 3.5, 3.4, 3.3, 3.3], True),
        ("x_00002", 8, 1e-4, [3.7, 3.65], False),
        ("x_00003", 8, 1e-3, [3.6, 3.4, 3.3, 3.2, 3.1], True),
    ]
    for trial_id, r, lr, losses, done in specs:
        result, adapter_id = _fake_result(tmp_path, trial_id, r, lr, losses, completed=done)
        grid.append(result)
        ids.append(adapter_id)
        if done:
            _export(cfg, adapter_id)
    res = tune.collect_results(cfg, grid, wall_seconds=50.0, concurrency=2, expected=5)

    df = pd.read_csv(res.paths["results_csv"])
    assert len(df) == 4
    assert set(df.columns) >= {
        "trial", "r", "lr", "eval_loss", "best_eval_loss", "iterations", "stopped_early",
        "wall_s", "adapter_id",
    }  # fmt: skip
    assert df["stopped_early"].tolist() == [True, False, True, False]
    assert df["adapter_id"].fillna("").tolist() == ["", ids[1], "", ids[3]]
    best = json.loads(res.paths["best_json"].read_text())
    assert best == {"adapter_id": ids[3], "metric": "eval_loss", "value": 3.1, "trial": "x_00003"}
    assert res.paths["plot_png"].read_bytes()[:8] == PNG_MAGIC
    summary = res.paths["summary_md"].read_text()
    assert ids[3] in summary and "13 run of 20 for the full grid (7 saved" in summary
    assert res.iterations_saved == 7
    assert res.parallel_efficiency == pytest.approx(130 / (50 * 2))
    table = tune.format_table(res)
    assert table.splitlines()[2].startswith("| * | x_00003")
    assert not list(res.paths["best_json"].parent.glob(".*"))  # no temp files left behind


def test_best_metric_without_adapter_promotes_the_next(tmp_path, caplog):
    cfg = cfg_with(tmp_path=tmp_path / "runs")
    a, a_id = _fake_result(tmp_path, "y_00000", 4, 1e-3, [2.0], completed=False)
    b, b_id = _fake_result(tmp_path, "y_00001", 8, 1e-3, [3.0, 2.5], completed=True)
    _export(cfg, b_id)
    with caplog.at_level("INFO", logger="tinyqa.tune"):
        res = tune.collect_results(cfg, [a, b], wall_seconds=10.0, concurrency=1, expected=2)
    assert res.best["adapter_id"] == b_id
    assert "no exported adapter" in caplog.text and "no exported adapter" in res.notes[0]


def test_no_adapter_at_all_is_a_sweep_failure(tmp_path):
    cfg = cfg_with(tmp_path=tmp_path / "runs")
    a, _ = _fake_result(tmp_path, "z_00000", 4, 1e-3, [2.0], completed=False, error=None)
    b, _ = _fake_result(
        tmp_path, "z_00001", 8, 1e-3, [3.0], completed=False, error=RuntimeError("boom\nOOM")
    )
    with pytest.raises(tune.SweepFailed, match="first error: OOM"):
        tune.collect_results(cfg, [a, b], wall_seconds=10.0, concurrency=1, expected=2)
    assert (cfg.run_dir / "results.csv").is_file() and not (cfg.run_dir / "best.json").exists()


# ----- the job entrypoint -------------------------------------------------------------------


def test_job_help():
    out = subprocess.run(
        [sys.executable, "jobs/tune.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "--fresh" in out.stdout


def test_job_bad_sweep_exits_2_before_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, "jobs/tune.py", f"storage_path={tmp_path}", "tune.search.r=[]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: sweep config: tune.search.r")
    assert "Traceback" not in out.stderr
    # Nothing written, nothing started: only the command's log folder (issue 11) exists.
    run = tmp_path / "tinyqa"
    assert not run.exists() or [p.name for p in run.iterdir()] == ["logs"]
