"""Train a tiny LoRA adapter in-process (no Ray, no TRL), for tests that need a fine-tuned adapter.

The adapter folder has the same shape as the one :mod:`tinyqa.training` exports: PEFT weights,
tokenizer files and a ``tinyqa.json`` manifest with the resolved config and metrics. On the `tiny`
preset, 60 steps over a couple of dozen records take a few seconds on 2 cores and memorize them
well enough that the adapter answers those questions far better than the base model.

Tests get it through the ``adapter_helpers`` fixture (tests/conftest.py), since tests/ is not a
package.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from tinyqa.config import TinyQAConfig
from tinyqa.data import IGNORE_INDEX, prepare_dataset
from tinyqa.model import apply_lora, load_base_model, load_tokenizer, save_adapter


def write_subset(src: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """The first ``n`` records (after a seeded shuffle) of a JSON-array dataset, as a new file."""
    records = json.loads(Path(src).read_text(encoding="utf-8"))
    random.Random(seed).shuffle(records)
    dest.write_text(json.dumps(records[:n], ensure_ascii=False), encoding="utf-8")
    return dest


def _batches(rows: list[dict[str, Any]], batch_size: int, pad_id: int, rng: random.Random):
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[i] for i in order[start : start + batch_size]]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id)  # (B, T)
            labels = torch.full((len(chunk), width), IGNORE_INDEX)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_tiny_adapter(
    cfg: TinyQAConfig, steps: int = 60, batch_size: int = 8, lr: float = 3.0e-3
) -> Path:
    """Prepare ``cfg``'s dataset, train LoRA on its train split, save ``cfg.adapters_dir/<id>``."""
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core box, two spinning threads per process make small steps 10-50x
    # slower once other processes compete for the cores.
    torch.set_num_threads(1)
    try:
        return _train(cfg, steps, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TinyQAConfig, steps: int, batch_size: int, lr: float) -> Path:
    torch.manual_seed(cfg.seed)
    prepared = prepare_dataset(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_base_model(cfg.model, "cpu"), cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = _batches(
        prepared.train,
        min(batch_size, len(prepared.train)),
        tokenizer.pad_token_id,
        random.Random(cfg.seed),
    )
    started = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    model.eval()
    manifest = {
        "adapter_id": cfg.adapter_id,
        "base_model": cfg.model.name,
        "config": cfg.to_dict(),
        "dataset": prepared.stats,
        "metrics": {
            "train_loss": sum(losses[-5:]) / len(losses[-5:]),
            "train_loss_initial": losses[0],
            "steps": steps,
            "train_seconds": time.perf_counter() - started,
        },
        "versions": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu",
    }
    return save_adapter(model, tokenizer, cfg.adapters_dir / cfg.adapter_id, manifest)
