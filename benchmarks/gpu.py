"""GPU benchmark set, in one process and without Ray (the lent GPU machines have no Ray).

Run by ``benchmarks/gpu.sh`` as ``python -m tinyqa.cli bench gpu model.name=tinyllama-arch``:
the real TinyLlama-1.1B shapes with random weights, nothing from a hub. Measures:

- the bf16 matmul peak of this card (a large ``torch.matmul``), the denominator of MFU;
- LoRA training steps with an NF4 (QLoRA) and a bf16 base at sequence 512, micro-batch 1 (the
  original script's shape) and 8 (tinyqa's default): step time, tokens/s, peak GPU memory
  (``torch.cuda.max_memory_allocated``, weights included) and model FLOPs utilization;
- generation: single-request latency for a 64-token answer (p50 / p95) and batched throughput at
  8 and 32 prompts, for an NF4 and a bf16 base.

On a CPU the same code runs (float32 instead of bf16) so tests can smoke it on the ``tiny`` model;
those figures say nothing about a GPU, and the GPU targets are then left unmeasured.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, new_result, percentile, ratio, target
from tinyqa.config import TinyQAConfig

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 420.0  # gpu.sh gives the whole set 8 minutes; leave room for start-up and writes
SEQ_LEN = 512
TRAIN_BATCHES = (1, 8)
GEN_TOKENS = 64
GEN_BATCHES = (8, 32)


def _sizes(quick: bool, on_gpu: bool) -> dict[str, Any]:
    if quick:
        return {
            "matmul_n": 2048 if on_gpu else 256,
            "matmul_iters": 3,
            "seq": 64 if not on_gpu else SEQ_LEN,
            "warmup": 1,
            "steps": 2,
            "gen_requests": 2,
            "gen_tokens": 8 if not on_gpu else GEN_TOKENS,
            "gen_batches": (4,),
        }
    return {
        "matmul_n": 8192 if on_gpu else 1024,
        "matmul_iters": 20,
        "seq": SEQ_LEN,
        "warmup": 2,
        "steps": 8,
        "gen_requests": 10,
        "gen_tokens": GEN_TOKENS,
        "gen_batches": GEN_BATCHES,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_matmul_peak(device, n: int, iters: int) -> dict[str, Any]:
    """Dense matmul FLOP/s of this device: bf16 on CUDA, float32 on CPU."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    _sync(device)
    seconds = time.perf_counter() - t
    flops = 2 * n**3 * iters / seconds
    del a, b
    _free(device)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "iters": iters,
        "seconds": seconds,
        "tflops": flops / 1e12,
    }


def _token_blocks(cfg: TinyQAConfig, tokenizer, batch: int, seq: int):
    """``(batch, seq)`` ids cut from the prepared QA records laid end to end (dense, as packed)."""
    import torch

    from tinyqa.data import prepare_dataset

    rows = prepare_dataset(cfg, tokenizer, write=False).train
    ids: list[int] = []
    while len(ids) < batch * seq:
        for r in rows:
            ids.extend(r["input_ids"])
    return torch.tensor(ids[: batch * seq]).view(batch, seq)  # (B, T)


def train_flops_per_token(model, seq: int) -> float:
    """Model FLOPs per trained token for LoRA on a frozen base.

    Matmul weights cost 2 FLOPs per parameter forward and 2 backward (gradients to activations
    only: frozen weights get none); LoRA weights the full 6; attention scores and their use
    (QK^T, AV) cost 4·L·T·d forward per token, 12·L·T·d with backward. Embedding lookups are free.
    """
    c = model.config
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 4-bit layers store two weights per byte, so count the Llama shapes rather than the tensors.
    d, i, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * i) + v * d  # attention, MLP, lm_head
    return 4 * matmul + 6 * lora + 12 * layers * seq * d


def measure_training(
    cfg: TinyQAConfig,
    device,
    quantization: str,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    peak_flops: float | None,
) -> dict[str, Any]:
    """LoRA training steps (forward, backward, AdamW) on a fresh base; peak memory includes weights."""
    import torch

    from tinyqa.model import apply_lora, load_base_model, load_tokenizer, trainable_parameter_count

    _free(device)
    t = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device, quantization)
    model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    load_seconds = time.perf_counter() - t
    x = _token_blocks(cfg, tokenizer, batch, seq).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    model.train()
    on_gpu = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        # As SFTTrainer with bf16=True: autocast the forward on CUDA.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = median(times)
    tokens_per_s = ratio(batch * seq, step)
    fpt = train_flops_per_token(model, seq)
    trainable, _ = trainable_parameter_count(model)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if on_gpu else None
    out = {
        "quantization": quantization,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "median_step_seconds": step,
        "step_seconds": times,
        "tokens_per_second": tokens_per_s,
        "peak_gpu_mb": peak,
        "load_seconds": load_seconds,
        "trainable_params": trainable,
        "flops_per_token": fpt,
        "loss": float(loss.detach()),
        "mfu": ratio(fpt * tokens_per_s, peak_flops) if tokens_per_s else None,
        "error": None,
    }
    del model, opt, params, x, loss
    _free(device)
    return out


def measure_generation(
    cfg: TinyQAConfig,
    device,
    quantization: str,
    requests: int,
    new_tokens: int,
    batches: tuple[int, ...],
) -> dict[str, Any]:
    """Greedy answers of exactly ``new_tokens`` tokens through :class:`QAEngine`'s model/prompting.

    Random weights may emit end-of-sequence at any step, so generation is held to the full length
    (``min_new_tokens``): the figure is the cost of a ``new_tokens``-token answer.
    """
    import torch

    from tinyqa.data import build_messages, dataset_path, load_records
    from tinyqa.inference import QAEngine

    _free(device)
    t = time.perf_counter()
    engine = QAEngine(cfg.model, None, quantization=quantization, device=device)
    load_seconds = time.perf_counter() - t
    questions = [r.question for r in load_records(dataset_path(cfg.data))]
    tok = engine.tokenizer
    generated: list[int] = []

    def run(qs: list[str]) -> float:
        encoded = [engine.prompt_ids(build_messages(q)) for q in qs]
        inputs = tok.pad({"input_ids": encoded}, return_tensors="pt").to(engine.device)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        _sync(device)
        generated.append(out.shape[1] - inputs["input_ids"].shape[1])  # (B, T_prompt + T_new)
        return time.perf_counter() - start

    run(questions[:1])  # warm-up: kernels, caches
    latencies = [run([questions[i % len(questions)]]) for i in range(1, requests + 1)]
    batched = {}
    for b in batches:
        seconds = run([questions[i % len(questions)] for i in range(b)])
        batched[str(b)] = {"seconds": seconds, "tokens_per_second": b * new_tokens / seconds}
    p50 = percentile(latencies, 50)
    out = {
        "quantization": quantization,
        "new_tokens": new_tokens,
        "requests": requests,
        "new_tokens_min_max": [min(generated), max(generated)],
        "latency_p50_s": p50,
        "latency_p95_s": percentile(latencies, 95),
        "latencies_s": latencies,
        "tokens_per_second_single": ratio(new_tokens, p50),
        "batched": batched,
        "load_seconds": load_seconds,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda"
        else None,
        "error": None,
    }
    engine = None  # free the weights before the next arm loads its own
    _free(device)
    return out


def bench_gpu(
    cfg: TinyQAConfig, out: Path, quick: bool = False, budget_s: float = DEFAULT_BUDGET_S
) -> dict[str, Any]:
    """The GPU set (see the module docstring). Sections past ``budget_s`` are skipped, with a note."""
    import torch

    from tinyqa.model import resolve_model_path

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    sizes = _sizes(quick, on_gpu)
    # The full-precision arm: bf16 on a GPU; float32 on a CPU (bf16 matmuls there are emulated).
    full = "bf16" if on_gpu else "none"
    quants = ("nf4", full)
    result = new_result(
        "gpu",
        quick,
        {
            "model": cfg.model.name,
            "device": str(device),
            "lora": cfg.lora.model_dump(mode="json"),
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "sizes": sizes,
            "quantizations": list(quants),
            "budget_s": budget_s,
        },
    )
    notes = result["notes"]
    t = time.perf_counter()
    resolve_model_path(cfg.model.name)  # builds an offline preset once, outside the timings
    result["details"]["model_ready_seconds"] = time.perf_counter() - t

    def over_budget(what: str) -> bool:
        if time.perf_counter() - started > budget_s:
            notes.append(f"{what} skipped: past the {budget_s:.0f} s time budget")
            return True
        return False

    mm = measure_matmul_peak(device, sizes["matmul_n"], sizes["matmul_iters"])
    result["details"]["matmul"] = mm
    peak_flops = mm["tflops"] * 1e12
    arms: dict[str, dict[str, Any]] = {}
    for batch in TRAIN_BATCHES:
        for q in quants:
            name = f"train-{q}-b{batch}"
            if over_budget(name):
                arms[name] = {"quantization": q, "batch": batch, "error": "skipped (time budget)"}
                continue
            try:
                arms[name] = measure_training(
                    cfg, device, q, batch, sizes["seq"], sizes["warmup"], sizes["steps"], peak_flops
                )
            except (
                Exception
            ) as e:  # one failed arm (e.g. no bitsandbytes build) must not sink the set
                logger.exception("bench gpu arm %s failed", name)
                arms[name] = {
                    "quantization": q,
                    "batch": batch,
                    "error": f"{type(e).__name__}: {e}",
                }
                _free(device)
    for q in quants:
        name = f"generate-{q}"
        if over_budget(name):
            arms[name] = {"quantization": q, "error": "skipped (time budget)"}
            continue
        try:
            arms[name] = measure_generation(
                cfg, device, q, sizes["gen_requests"], sizes["gen_tokens"], sizes["gen_batches"]
            )
        except Exception as e:
            logger.exception("bench gpu arm %s failed", name)
            arms[name] = {"quantization": q, "error": f"{type(e).__name__}: {e}"}
            _free(device)
    result["arms"] = arms
    _fill_gpu_tables(result, arms, on_gpu, sizes)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _fill_gpu_tables(
    result: dict[str, Any], arms: dict[str, dict], on_gpu: bool, sizes: dict[str, Any]
) -> None:
    rows = []
    for name, a in arms.items():
        if name.startswith("train-"):
            rows.append(
                [
                    name,
                    a.get("quantization"),
                    f"{a.get('batch')} × {sizes['seq']}",
                    a.get("median_step_seconds"),
                    a.get("tokens_per_second"),
                    a.get("peak_gpu_mb"),
                    a.get("mfu"),
                    None,
                    None,
                    a.get("error") or "",
                ]
            )
        else:
            batched = a.get("batched") or {}
            best = max((v["tokens_per_second"] for v in batched.values()), default=None)
            rows.append(
                [
                    name,
                    a.get("quantization"),
                    f"1 × {sizes['gen_tokens']} new",
                    a.get("latency_p50_s"),
                    a.get("tokens_per_second_single"),
                    a.get("peak_gpu_mb"),
                    None,
                    a.get("latency_p95_s"),
                    best,
                    a.get("error") or "",
                ]
            )
    mm = result["details"]["matmul"]
    result["table"] = {
        "title": f"{result['settings']['model']} on {result['settings']['device']} "
        f"(matmul peak {mm['tflops']:.1f} TFLOP/s {mm['dtype']})",
        "columns": [
            "arm",
            "base",
            "shape",
            "median s (step / answer p50)",
            "tokens/s",
            "peak GPU MiB",
            "MFU",
            "answer p95 s",
            "batched tok/s (best)",
            "error",
        ],
        "rows": rows,
    }

    def get(name: str, key: str):
        return (arms.get(name) or {}).get(key)

    full = "bf16" if on_gpu else "none"
    r = {
        "nf4 / bf16 train tokens/s (b1)": ratio(
            get("train-nf4-b1", "tokens_per_second"), get(f"train-{full}-b1", "tokens_per_second")
        ),
        "nf4 / bf16 train tokens/s (b8)": ratio(
            get("train-nf4-b8", "tokens_per_second"), get(f"train-{full}-b8", "tokens_per_second")
        ),
        "nf4 / bf16 peak memory (b1)": ratio(
            get("train-nf4-b1", "peak_gpu_mb"), get(f"train-{full}-b1", "peak_gpu_mb")
        ),
        "b8 / b1 train tokens/s (nf4)": ratio(
            get("train-nf4-b8", "tokens_per_second"), get("train-nf4-b1", "tokens_per_second")
        ),
    }
    result["ratios"] = r
    real = on_gpu and result["settings"]["model"] == "tinyllama-arch" and not result["quick"]
    note = "" if real else "only measured by a full run of tinyllama-arch on a GPU"
    peak_nf4 = get("train-nf4-b1", "peak_gpu_mb")
    result["targets"] = [
        target(
            "QLoRA TinyLlama-1.1B, seq 512, peak GPU memory GB",
            4.0,
            peak_nf4 / 1024 if real and peak_nf4 else None,
            higher_is_better=False,
            note=note,
        ),
        target(
            "serving p50 for a 64-token answer, s (NF4 base)",
            1.0,
            get("generate-nf4", "latency_p50_s") if real else None,
            higher_is_better=False,
            note=note,
        ),
    ]
    result["notes"] += [
        "One process, no Ray. Each arm loads a fresh base; peak GPU memory is "
        "torch.cuda.max_memory_allocated since that load (weights, LoRA, AdamW state, activations).",
        "MFU = model FLOPs per token × tokens/s ÷ the measured matmul peak; model FLOPs per token "
        "= 4·(frozen matmul params) + 6·(LoRA params) + 12·layers·seq·hidden (no recomputation).",
        "Training batches are dense blocks of QA records laid end to end (as packing makes them); "
        "answers are held to exactly the stated number of new tokens (random weights).",
    ]
    if not on_gpu:
        result["notes"].append(
            "No GPU here: a CPU smoke run (float32 instead of bf16); the "
            "figures say nothing about a GPU."
        )
