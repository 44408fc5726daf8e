"""Config loading: defaults < YAML < overrides, readable errors, every shipped YAML valid."""

from __future__ import annotations

import pytest

from tinyqa.config import TinyQAConfig, build_config, load_config, parse_overrides
from tinyqa.errors import ConfigError


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  r: 4\ntrain:\n  learning_rate: 3.0e-4\n  epochs: 2\n")
    cfg = load_config(f, ["train.epochs=7", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.r == 4  # file beats default
    assert cfg.train.epochs == 7  # override beats file
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == TinyQAConfig().lora.alpha  # default kept


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 3e-4\n")  # PyYAML reads this as a string
    assert load_config(f).train.learning_rate == pytest.approx(3e-4)
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == pytest.approx(
        1e-3
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.rank=8"], "unknown key 'lora.rank'"),
        (["trian.epochs=1"], "unknown key 'trian'"),
        (["lora.r=0"], "lora.r: Input should be greater than 0 (got 0)"),
        (["lora.r=-3"], "lora.r"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.learning_rate=-1e-4"], "train.learning_rate"),
        (["data.eval_fraction=0"], "data.eval_fraction"),
        (["data.eval_fraction=1.5"], "data.eval_fraction"),
        (["model.quantization=fp4"], "model.quantization"),
        (["train.eval_steps=10", "train.save_steps=15"], "must be a multiple of eval_steps"),
        (["experiment=../etc"], "experiment name '../etc' must match"),
        (["storage_path=ftp://bucket/x"], "scheme 'ftp://' is not supported"),
        (["storage_path=s3://"], "names no bucket"),
        (["lora.target_modules=[]"], "give at least one module name"),
        (["train"], "is not key=value"),
        (["train.epochs.x=1"], "train.epochs: Input should be a valid number"),
        (["seed=1", "seed.x=2"], "is a value, not a section"),
    ],
)
def test_bad_values_name_key_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.r=0", "train.learning_rate=0", "bogus=1"])
    msg = str(err.value)
    assert "lora.r" in msg and "train.learning_rate" in msg and "bogus" in msg


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)


def test_every_shipped_yaml_is_valid(repo_root):
    files = sorted((repo_root / "jobs" / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny-cpu.yaml", "tinyllama-qlora.yaml"}
    for f in files:
        load_config(f)


def test_reference_config_has_the_seed_settings(repo_root):
    cfg = load_config(repo_root / "jobs/configs/tinyllama-qlora.yaml")
    assert cfg.model.name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.model.quantization == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 32)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (1, 4)
    assert cfg.train.epochs == 5 and cfg.data.max_length == 512 and cfg.train.use_gpu


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["lora.r=4", "tune.search.r=[2,4]"])
    again = build_config(cfg.to_dict())
    assert again == cfg


def test_parse_overrides_types():
    tree = parse_overrides(["a.b=1", "a.c=true", "d=null", "e=[1, 2]", "f=hello"])
    assert tree == {"a": {"b": 1, "c": True}, "d": None, "e": [1, 2], "f": "hello"}


def test_readme_config_reference_is_in_sync(repo_root):
    """README's reference is generated from the models: `python -m tinyqa.config README.md`."""
    from tinyqa.config import config_reference_markdown

    assert config_reference_markdown() in (repo_root / "README.md").read_text(), (
        "README config reference is stale; run `python -m tinyqa.config README.md`"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://bucket/runs/", "s3://bucket/runs"),
        ("gs://bucket", "gs://bucket"),
        ("file:///tmp/x", "/tmp/x"),
    ],
)
def test_cloud_storage_paths_accepted(value, expected):
    from tinyqa.storage import RemotePath

    cfg = load_config(None, [f"storage_path={value}", "storage.region=eu-west-1"])
    assert cfg.storage_path == expected
    if value.startswith(("s3", "gs")):
        assert isinstance(cfg.run_dir, RemotePath)
        assert str(cfg.adapters_dir) == f"{expected}/tinyqa/adapters"
        assert cfg.run_dir.options.region == "eu-west-1"
