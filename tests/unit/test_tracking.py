"""The `tracking` config section and where tracking writes (no MLflow store is created here;
tests/integration/test_tracking_runs.py reads real runs back)."""

from __future__ import annotations

import pytest

from tinyqa import tracking
from tinyqa.config import load_config
from tinyqa.errors import ConfigError


def test_defaults_track_to_a_local_store_and_tensorboard_inside_the_experiment(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}", "experiment=exp", "train.adapter_id=a1"])
    assert cfg.tracking.mlflow and cfg.tracking.report_to == ["tensorboard"]
    assert tracking.mlflow_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/exp/mlflow.db"
    assert tracking.ui_command(cfg) == f"mlflow ui --backend-store-uri {tracking.mlflow_uri(cfg)}"
    assert tracking.mlflow_experiment(cfg) == "exp"
    assert tracking.report_to(cfg) == ["tensorboard"]
    assert tracking.worker_env(cfg) == {
        "TENSORBOARD_LOGGING_DIR": str(tmp_path.resolve() / "exp" / "tensorboard" / "a1")
    }


def test_a_bucket_run_writes_tensorboard_on_the_node_then_uploads_it(s3):
    """tensorboardX's own s3:// writer needs boto3 (not a dependency) on every worker; events go
    to the worker's disk and into the bucket when training ends."""
    cfg = load_config(
        None, ["storage_path=s3://tinyqa-test/runs", "experiment=exp", "train.adapter_id=a1"]
    )
    local = tracking.tensorboard_logging_dir(cfg)
    assert tracking.worker_env(cfg) == {"TENSORBOARD_LOGGING_DIR": str(local)}
    assert not str(local).startswith("s3:")
    (local / "run").mkdir(parents=True)
    (local / "run" / "events.out.tfevents.1.host").write_bytes(b"\x00events")
    tracking.publish_tensorboard(cfg)
    assert s3.keys("tinyqa-test") == ["runs/exp/tensorboard/a1/run/events.out.tfevents.1.host"]
    assert not local.exists()  # the node's copy is gone once uploaded
    tracking.publish_tensorboard(cfg)  # nothing left to upload: no error


def test_tracking_can_be_pointed_elsewhere_or_switched_off(tmp_path):
    cfg = load_config(
        None,
        [
            "tracking.mlflow_uri=http://mlflow.internal:5000",
            "tracking.mlflow_experiment=team-qa",
            "tracking.report_to=[tensorboard,wandb]",
        ],
    )
    assert tracking.mlflow_uri(cfg) == "http://mlflow.internal:5000"
    assert tracking.mlflow_experiment(cfg) == "team-qa"
    assert tracking.report_to(cfg) == ["tensorboard", "wandb"]

    off = load_config(
        None, [f"storage_path={tmp_path}", "tracking.mlflow=false", "tracking.report_to=[]"]
    )
    assert tracking.mlflow_uri(off) is None
    assert tracking.prepare_experiment(off) is None
    assert tracking.train_callbacks(off, "run") == []
    assert tracking.report_to(off) == "none" and tracking.worker_env(off) == {}
    assert not (tmp_path / "tinyqa").exists()  # nothing created when off
    assert load_config(None, ["tracking.report_to=none"]).tracking.report_to == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking.report_to=[mlflow]", "'mlflow' is not allowed here"),
        ("tracking.report_to=all", "'all' is not allowed here"),
        ("tracking.mlflow_uri=https://me:pw@mlflow.example.com", "holds credentials"),
        ("tracking.mlfow=true", "unknown key 'tracking.mlfow'"),
    ],
)
def test_bad_tracking_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match="tracking") as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_params_are_the_flattened_config_without_secrets():
    cfg = load_config(None, ["serve.api_key=sk-secret-value-1", "lora.r=4"])
    params = tracking.flat_params(cfg.to_dict())
    assert params["lora.r"] == "4" and params["tracking.report_to"] == "['tensorboard']"
    assert "serve.api_key" not in params
    assert "sk-secret-value-1" not in repr(params)


def test_the_trainer_reports_to_the_configured_integrations(tmp_path):
    from tinyqa.training import sft_config

    cfg = load_config(None, [f"storage_path={tmp_path}"])
    assert sft_config(cfg, str(tmp_path), on_cpu=True, rank=0).report_to == ["tensorboard"]
    off = load_config(None, ["tracking.report_to=[]"])
    assert sft_config(off, str(tmp_path), on_cpu=True, rank=0).report_to in ([], "none", ["none"])


def test_an_unusable_mlflow_store_fails_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    bad = f"sqlite:///{tmp_path}/a-file/mlflow.db"  # its folder cannot be created
    cfg = load_config(None, [f"storage_path={tmp_path}", f"tracking.mlflow_uri={bad}"])
    with pytest.raises(tracking.TrackingError, match="tracking.mlflow=false") as err:
        tracking.prepare_experiment(cfg)
    assert f"MLflow tracking store {bad} is not usable" in str(err.value)
    assert "\n" not in str(err.value)
