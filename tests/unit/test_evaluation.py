"""`run_eval` on the tiny model with an in-process fine-tuned adapter; bad inputs; the sweep hook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinyqa.adapters import locate_adapter
from tinyqa.config import load_config
from tinyqa.data import bundled_dataset_path, load_records
from tinyqa.errors import DatasetError, ModelError, TinyQAError, UnknownAdapter
from tinyqa.evaluation import (
    EvalResult,
    ModelReport,
    evaluate_adapter_dir,
    format_eval_table,
    run_eval,
)
from tinyqa.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, adapter_helpers):
    """A tiny adapter fine-tuned on 22 training questions (a 24-record subset of the bundled set)."""
    helper = adapter_helpers
    root = tmp_path_factory.mktemp("eval")
    subset = helper.write_subset(bundled_dataset_path(), root / "subset.json", 24)
    overrides = [
        f"storage_path={root / 'runs'}",
        f"data.path={subset}",
        "eval.bootstrap_samples=200",
        "tracking.mlflow=false",  # tests/integration/test_tracking_runs.py covers the eval run
    ]
    cfg = load_config(CONFIG, overrides)
    adapter = helper.train_tiny_adapter(cfg, steps=60)
    return {"root": root, "overrides": overrides, "cfg": cfg, "adapter": adapter, "subset": subset}


def _cfg(trained, *extra: str, storage: Path | None = None):
    overrides = list(trained["overrides"])
    if storage is not None:
        overrides[0] = f"storage_path={storage}"
    return load_config(CONFIG, [*overrides, *extra])


def test_eval_writes_outputs_and_adapter_beats_base_on_training_questions(trained):
    cfg = _cfg(trained, "eval.split=train")  # no eval.adapters: the trained cfg.adapter_id
    result = run_eval(cfg)

    assert set(result.paths) == {"eval_json", "predictions", "table_md"}
    for path in result.paths.values():
        assert path.parent == cfg.run_dir / "eval" and path.is_file()
    names = [m.name for m in result.models]
    assert names == ["base", "tiny-demo"]
    n = result.n_questions
    assert n == 22

    data = json.loads(result.paths["eval_json"].read_text())
    assert [m["name"] for m in data["models"]] == names
    assert data["questions"]["count"] == n and data["base_model"] == "tiny"
    for model in data["models"]:
        assert set(model["metrics"]) == set(METRICS)
        for agg in model["metrics"].values():
            lo, hi = agg["ci95"]
            assert lo <= agg["mean"] <= hi

    rows = [json.loads(line) for line in result.paths["predictions"].read_text().splitlines()]
    assert len(rows) == 2 * n
    assert {r["model"] for r in rows} == set(names)
    assert all(set(METRICS) <= set(r) and isinstance(r["prediction"], str) for r in rows)

    table = result.paths["table_md"].read_text()
    assert "| base (tiny) |" in table and "| tiny-demo |" in table
    assert table.strip() == format_eval_table(result).strip()
    # A reader sees answers, not only numbers: the first held-out questions side by side.
    assert f"Side by side: the first 3 of the {n} questions" in table
    assert len(result.examples) == 3
    for ex in result.examples:
        assert set(ex["answers"]) == set(names)
        assert any(
            ex["question"] in line and ex["reference"] in line for line in table.splitlines()
        )
    assert set(result.answer_words) == {"reference", *names}
    assert data["examples"] == result.examples

    # What fine-tuning bought, on the questions it trained on: clearly more keywords found.
    base = result.model("base").metrics["keyword_recall"]["mean"]
    tuned = result.model("tiny-demo")
    assert tuned.metrics["keyword_recall"]["mean"] > base + 0.3
    assert tuned.delta_vs_base["keyword_recall"]["ci95"][0] > 0
    assert tuned.metrics["token_f1"]["mean"] > result.model("base").metrics["token_f1"]["mean"]

    # The sweep's hook scores the same adapter on the same questions the same way.
    from tinyqa.data import read_prepared

    records = read_prepared(cfg.data_dir).questions("train")
    hook = evaluate_adapter_dir(
        trained["adapter"], records, cfg.eval.max_new_tokens, cfg.eval.batch_size
    )
    assert set(hook) == set(METRICS)
    assert hook["keyword_recall"] == pytest.approx(tuned.metrics["keyword_recall"]["mean"])


def test_eval_by_path_with_best_json_and_question_cap(trained, tmp_path):
    storage = tmp_path / "runs"
    cfg = _cfg(trained, storage=storage)
    dest = cfg.adapters_dir / "best.one"  # a '.' in the id: PEFT would reject it as a module name
    shutil.copytree(trained["adapter"], dest)
    (cfg.run_dir / "best.json").write_text(
        json.dumps({"adapter_id": "best.one", "metric": "eval_loss"})
    )
    cfg = _cfg(
        trained,
        f"eval.path={trained['subset']}",
        "eval.max_questions=5",
        "eval.include_base=false",
        storage=storage,
    )
    result = run_eval(cfg)
    assert [m.name for m in result.models] == ["tiny-demo"]  # the manifest's adapter id
    assert result.models[0].adapter_dir == dest
    assert result.n_questions == 5 and result.models[0].delta_vs_base is None
    assert str(trained["subset"]) in result.source


def test_eval_base_only_when_nothing_is_trained(trained, tmp_path):
    cfg = _cfg(trained, "eval.max_questions=3", storage=tmp_path / "runs")
    result = run_eval(cfg)  # prepares the data itself
    assert [m.name for m in result.models] == ["base"]
    assert (cfg.data_dir / "stats.json").is_file()
    with pytest.raises(ModelError, match="nothing to evaluate"):
        run_eval(_cfg(trained, "eval.include_base=false", storage=tmp_path / "runs"))


def test_unknown_adapter_id_or_path(trained, tmp_path):
    cfg = _cfg(trained, "eval.adapters=[nope]")
    with pytest.raises(UnknownAdapter, match="unknown adapter 'nope'.*available: tiny-demo"):
        run_eval(cfg)
    with pytest.raises(UnknownAdapter, match="no such folder"):
        locate_adapter(cfg, str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="not a tinyqa adapter folder"):
        locate_adapter(cfg, str(tmp_path))
    assert locate_adapter(cfg, "tiny-demo") == cfg.adapters_dir / "tiny-demo"
    assert locate_adapter(cfg, str(trained["adapter"])) == trained["adapter"].resolve()


def test_best_json_naming_a_missing_adapter(trained, tmp_path):
    cfg = _cfg(trained, storage=tmp_path / "runs")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "best.json").write_text(json.dumps({"adapter_id": "gone"}))
    with pytest.raises(ModelError, match="names adapter 'gone'"):
        run_eval(cfg)


def test_adapters_on_different_bases_are_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained["adapter"], other)
    manifest = json.loads((other / "tinyqa.json").read_text())
    manifest["base_model"] = manifest["config"]["model"]["name"] = "tinyllama-arch"
    (other / "tinyqa.json").write_text(json.dumps(manifest))
    cfg = _cfg(trained, f"eval.adapters=[tiny-demo,{other}]")
    with pytest.raises(ModelError, match="different base models"):
        run_eval(cfg)


def test_bad_eval_file_and_empty_split(trained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"question": "ok?", "answer_keywords": []}, {"answer_keywords": ["x"]}])
    )
    with pytest.raises(DatasetError) as err:
        run_eval(_cfg(trained, f"eval.path={bad}"))
    assert "record 0" in str(err.value) and "record 1" in str(err.value)

    cfg = _cfg(trained, storage=tmp_path / "runs")
    cfg.data_dir.mkdir(parents=True)
    (cfg.data_dir / "stats.json").write_text("{}")
    shutil.copy(trained["cfg"].data_dir / "train.jsonl", cfg.data_dir / "train.jsonl")
    (cfg.data_dir / "eval.jsonl").write_text("")
    with pytest.raises(DatasetError, match="'eval' split is empty"):
        run_eval(cfg)


def test_evaluate_adapter_dir_needs_records(trained):
    with pytest.raises(TinyQAError, match="no records"):
        evaluate_adapter_dir(trained["adapter"], [], 8, 4)
    records = load_records(trained["subset"])[:3]
    out = evaluate_adapter_dir(trained["adapter"], records, max_new_tokens=8, batch_size=2)
    assert all(0.0 <= out[m] <= (100.0 if m == "bleu" else 1.0) for m in METRICS)


def test_side_by_side_cells_stay_on_one_line():
    agg = {m: {"mean": 0.5, "ci95": [0.4, 0.6]} for m in METRICS}
    result = EvalResult(
        base_model="tiny",
        source="eval split",
        n_questions=4,
        models=[
            ModelReport("base", None, agg, None, 1.0),
            ModelReport("mine", None, agg, agg, 1.0),
        ],
        seconds=1.0,
        answer_words={"reference": 5.0, "base": 40.0, "mine": 6.0},
        examples=[
            {
                "question": "What is `a|b`?",
                "reference": "Or.",
                "answers": {"base": "Line\n\nbreak", "mine": ""},
            }
        ],
    )
    table = format_eval_table(result)
    assert "Mean answer length in words: reference 5.0, base 40.0, mine 6.0." in table
    row = [line for line in table.splitlines() if line.startswith("| What is")]
    assert row == ["| What is `a\\|b`? | Or. | Line break | (empty) |"]


def test_format_eval_table_marks_sure_changes_and_missing_values():
    agg = {m: {"mean": 0.5, "ci95": [0.4, 0.6]} for m in METRICS}
    agg["keyword_recall"] = {"mean": None, "ci95": [None, None]}
    up = {m: {"mean": 0.2, "ci95": [0.1, 0.3]} for m in METRICS}
    up["bleu"] = {"mean": 1.0, "ci95": [-2.0, 3.0]}
    result = EvalResult(
        base_model="tiny",
        source="eval split",
        n_questions=10,
        models=[
            ModelReport("base", None, agg, None, 2.0),
            ModelReport("mine", Path("/x/mine"), agg, up, 1.0),
        ],
        seconds=3.0,
    )
    table = format_eval_table(result)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| model | keyword recall |")
    assert lines[1].startswith("| base (tiny) | n/a [n/a, n/a] | 50.0 [40.0, 60.0] |")
    assert "50.0 [40.0, 60.0] (+20.0*)" in lines[2]  # token F1 etc.: the CI excludes 0
    assert "0.5 [0.4, 0.6] (+1.0)" in lines[2]  # BLEU is 0-100 already; its CI spans 0
    assert lines[1].endswith("| 20.0 |") and lines[2].endswith("| 10.0 |")  # s per 100 questions


def test_compact_table_for_the_demo_report_fits_fewer_lines():
    """The demo report's form: the legend on one line (no source path), no column that is 0 for
    every model, clipped side-by-side answers; eval.md's full form keeps all of them."""
    agg = {m: {"mean": 0.5, "ci95": [0.4, 0.6]} for m in METRICS}
    agg["exact_match"] = {"mean": 0.0, "ci95": [0.0, 0.0]}
    result = EvalResult(
        base_model="smollm2",
        source="eval split of /a/very/long/path/to/the/prepared/data",
        n_questions=51,
        models=[
            ModelReport("base", None, agg, None, 1.0),
            ModelReport("mine", Path("/x/mine"), agg, agg, 1.0),
        ],
        seconds=2.0,
        answer_words={"reference": 5.0},
        examples=[
            {"question": "Q?", "reference": "r" * 100, "answers": {"base": "b", "mine": "m"}}
        ],
    )
    full = format_eval_table(result)
    compact = format_eval_table(result, max_example_chars=20, compact=True)
    assert "exact match" in full and "/a/very/long/path" in full and "r" * 100 in full
    legend = compact.splitlines()[0]
    assert (
        legend.startswith("51 questions (eval split), base smollm2:")
        and "* = CI excludes 0" in legend
    )
    assert legend.endswith("; exact match 0 for all") and "/a/very" not in compact
    assert "| exact match |" not in compact and "| keyword recall |" in compact
    assert "| Q? | " + "r" * 19 + "… |" in compact
    assert len(compact.splitlines()) < len(full.splitlines())
