"""Model cards and `tinyqa export`: the card's Hub metadata, the merged model answering like the
adapter, the dry run, and bad input. No network: a push is only ever refused or dry-run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from tinyqa.card import CardError, build_model_card, write_model_card
from tinyqa.cli import main
from tinyqa.config import load_config
from tinyqa.data import bundled_dataset_path
from tinyqa.errors import UnknownAdapter
from tinyqa.evaluation import run_eval
from tinyqa.export import ExportError, export_adapter

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"
QUESTIONS = [
    "What does `json.dumps` do?",
    "How do you read a file line by line?",
    "What is a list comprehension?",
    "What does `os.path.join` do?",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, adapter_helpers):
    """A tiny adapter fine-tuned in-process, evaluated once (so export finds its scores)."""
    root = tmp_path_factory.mktemp("export")
    subset = adapter_helpers.write_subset(bundled_dataset_path(), root / "subset.json", 24)
    overrides = [
        f"storage_path={root / 'runs'}",
        f"data.path={subset}",
        "eval.bootstrap_samples=20",
        "eval.max_questions=4",
        "tracking.mlflow=false",
        "serve.api_key=sk-never-in-a-card-123",
    ]
    cfg = load_config(CONFIG, overrides)
    adapter = adapter_helpers.train_tiny_adapter(cfg, steps=40)
    run_eval(cfg)
    return {"root": root, "overrides": overrides, "cfg": cfg, "adapter": adapter}


def _cli(trained, *argv: str) -> int:
    return main(["export", *argv, "--config", str(CONFIG), *trained["overrides"]])


def test_trained_adapter_folder_has_a_hub_model_card(trained):
    adapter = trained["adapter"]
    manifest = json.loads((adapter / "tinyqa.json").read_text())
    card = ModelCard.load(adapter / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"tinyqa", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # the offline `tiny` preset is not a Hub model ...
    assert "`tiny` (not on the Hugging Face Hub" in card.text  # ... and the body says so
    assert manifest["dataset"]["sha256"] in card.text
    assert "PeftModel.from_pretrained" in card.text
    block = card.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block)["lora"]["r"] == 8  # the resolved training config
    assert "sk-never-in-a-card-123" not in (adapter / "README.md").read_text()
    # `run_eval` on the experiment's held-out split put its scores into the card in place.
    index = meta["model-index"][0]["results"]
    types = {m["type"] for r in index for m in r["metrics"]}
    assert {"keyword_recall", "token_f1", "rougeL"} <= types, types


def test_card_names_hub_bases_and_lists_metrics_in_the_model_index():
    manifest = {
        "adapter_id": "qa",
        "base_model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "config": {"model": {"name": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "quantization": "nf4"}},
        "dataset": {"source": "/data/faq.json", "sha256": "ab" * 32, "train": 90, "eval": 10},
        "metrics": {"eval_loss": 1.25, "eval_loss_initial": 2.5, "steps": 60},
        "device": "cuda",
    }
    evaluation = {
        "metrics": {"token_f1": {"mean": 0.41, "ci95": [0.3, 0.5]}},
        "delta_vs_base": {"token_f1": {"mean": 0.2, "ci95": [0.1, 0.3]}},
        "questions": {"count": 10, "source": "eval split"},
    }
    card = build_model_card(manifest, evaluation=evaluation, dataset_id="me/faq")
    meta = card.data.to_dict()
    assert meta["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert meta["datasets"] == ["me/faq"]
    assert "qlora" in meta["tags"]
    [index] = meta["model-index"]
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics == {"loss": 1.25, "token_f1": 0.41}
    assert "| token F1 | 41.0 | [30.0, 50.0] | +20.0 |" in card.text
    # Round trip: what the Hub parses is what we meant.
    assert ModelCard(str(card)).data.base_model == meta["base_model"]

    merged = build_model_card(manifest, merged={"dtype": "bfloat16", "dequantized_from": "nf4"})
    assert merged.data.library_name == "transformers"
    assert "dequantized to bfloat16 first" in merged.text
    assert "AutoModelForCausalLM.from_pretrained" in merged.text


def test_a_card_holding_a_token_from_the_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue12345")
    card = build_model_card({"adapter_id": "x", "dataset": {"source": "hf_secretvalue12345"}})
    with pytest.raises(CardError, match=r"\$HF_TOKEN") as err:
        write_model_card(tmp_path, card)
    assert "hf_secretvalue12345" not in str(err.value)
    assert not (tmp_path / "README.md").exists()


def test_export_adapter_folder_with_its_card_and_eval_scores(trained, tmp_path):
    out = tmp_path / "qa-adapter"
    result = export_adapter(trained["cfg"], "tiny-demo", out=out)
    assert result.out_dir == out and not result.merged
    names = {name for name, _ in result.files}
    assert {"adapter_model.safetensors", "adapter_config.json", "tinyqa.json", "README.md"} <= names
    meta = ModelCard.load(out / "README.md").data.to_dict()
    types = {m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert {"keyword_recall", "token_f1", "rougeL"} <= types  # from the experiment's eval.json
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temporary behind


def test_merged_export_loads_with_plain_transformers_and_answers_like_the_adapter(
    trained, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyqa.adapters import base_settings_from_manifest, read_manifest
    from tinyqa.model import load_adapter, load_base_model

    out = tmp_path / "merged"
    result = export_adapter(trained["cfg"], str(trained["adapter"]), out=out, merged=True)
    assert result.merged and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert ModelCard.load(out / "README.md").data.library_name == "transformers"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain: no tinyqa, no peft
    assert not hasattr(merged, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    manifest = read_manifest(trained["adapter"])
    base = load_base_model(base_settings_from_manifest(manifest), "cpu")
    adapted = load_adapter(base, trained["adapter"]).eval()

    answers = {
        name: [_greedy(model, tokenizer, q, 24) for q in QUESTIONS]
        for name, model in (("merged", merged), ("adapter", adapted))
    }
    assert answers["merged"] == answers["adapter"]
    # Not vacuous: the adapter changes what the base model says.
    with adapted.disable_adapter():
        plain = _greedy(adapted, tokenizer, QUESTIONS[-1], 24)
    assert plain != answers["adapter"][-1]


def test_dry_run_push_lists_the_upload_and_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "never"
    code = _cli(trained, "tiny-demo", "--push-to-hub", "me/qa", "--dry-run", "--out", str(out))
    printed = capsys.readouterr().out
    assert code == 0
    assert "would upload them to https://huggingface.co/me/qa (private)" in printed
    assert "README.md" in printed and "adapter_model.safetensors" in printed
    assert not out.exists()


def test_bad_export_requests_are_one_line_errors(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "x"
    cases = [
        (("no-such-adapter",), "unknown adapter 'no-such-adapter'"),
        (("tiny-demo", "--push-to-hub", "me/qa", "--out", str(out)), "$HF_TOKEN"),
        (("tiny-demo", "--push-to-hub", "../etc", "--out", str(out)), "is not a Hub repo id"),
    ]
    for argv, message in cases:
        assert _cli(trained, *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    out.mkdir()
    assert _cli(trained, "tiny-demo", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"output folder {out} already exists" in err and err.count("\n") == 1
    with pytest.raises(UnknownAdapter):
        export_adapter(trained["cfg"], "nope")
    with pytest.raises(ExportError, match="already exists"):
        export_adapter(trained["cfg"], "tiny-demo", out=out)


def test_merged_export_of_a_qlora_adapter_dequantizes_the_nf4_base(
    tmp_path, tiny_dir, adapter_helpers
):
    """An adapter trained on a 4-bit NF4 base (QLoRA, bitsandbytes on CPU) merges into the
    dequantized base: a plain float model, no quantization_config, the card saying so, and the same
    greedy answers as the adapter on its NF4 base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyqa.adapters import base_settings_from_manifest, read_manifest
    from tinyqa.model import load_adapter, load_base_model

    subset = adapter_helpers.write_subset(bundled_dataset_path(), tmp_path / "subset.json", 24)
    cfg = load_config(
        CONFIG,
        [
            f"storage_path={tmp_path / 'runs'}",
            f"data.path={subset}",
            "model.quantization=nf4",
            "tracking.mlflow=false",
            "train.adapter_id=qlora",
        ],
    )
    adapter = adapter_helpers.train_tiny_adapter(cfg, steps=30)
    manifest = read_manifest(adapter)
    assert manifest["config"]["model"]["quantization"] == "nf4"

    out = tmp_path / "merged"
    result = export_adapter(cfg, str(adapter), out=out, merged=True)
    assert result.merged
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    card = (out / "README.md").read_text()
    assert "nf4-quantized" in card and "dequantized" in card

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype.is_floating_point for p in merged.parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = load_base_model(base_settings_from_manifest(manifest), "cpu")
    assert getattr(base, "is_loaded_in_4bit", False)
    adapted = load_adapter(base, adapter).eval()
    same = sum(
        _greedy(merged, tokenizer, q, 16) == _greedy(adapted, tokenizer, q, 16) for q in QUESTIONS
    )
    # The merged weights are dequant(W) + BA in float32, the adapter computes dequant(W)x + BAx
    # with bitsandbytes' kernels: equal up to rounding, so greedy answers agree.
    assert same == len(QUESTIONS), f"{same}/{len(QUESTIONS)} answers identical"


def _prompt(tokenizer, question: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    return torch.tensor([ids])  # (1, T)


def _greedy(model, tokenizer, question: str, max_new_tokens: int) -> list[int]:
    """The generated token ids of a greedy answer to ``question``."""
    prompt = _prompt(tokenizer, question)
    with torch.no_grad():
        out_ids = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out_ids[0, prompt.shape[1] :].tolist()
