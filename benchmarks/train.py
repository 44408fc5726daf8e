"""Training benchmark: the seed's configuration vs tinyqa's, and plain TRL vs Ray Train.

Four arms train the same LoRA on the same prepared data for the same number of optimizer steps,
each in a fresh Python process (so its peak memory is its own), one after another:

- ``seed``: the original script's batch shape — micro-batch 1, gradient accumulation 4, every
  sequence padded to 512 tokens, loss on the whole sequence;
- ``tinyqa``: the configuration under test (``cfg.train``: padding-free packing, larger
  micro-batch, loss on answer tokens only);
- ``plain``: the tinyqa arm doing exactly what a Ray Train worker does (evaluate, train with
  mid-run evaluation + checkpoint, evaluate, export the adapter), in a plain process with TRL;
- ``ray``: that same work through :func:`tinyqa.training.build_trainer` with one worker.

Effective tokens are the non-padding tokens of the batches the optimizer saw. Step times are taken
between consecutive optimizer steps, so the end-of-run evaluation / checkpoint is not in them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchError,
    median,
    new_result,
    peak_rss_mb,
    ratio,
    run_arm,
    set_ray_worker_niceness,
    target,
)
from tinyqa.config import TinyQAConfig, build_config

logger = logging.getLogger(__name__)

ARMS = ("seed", "tinyqa", "plain", "ray")
FULL_STEPS = 20
FULL_ROUNDS = 2
QUICK_STEPS = 3
# The original single-GPU script's batch shape (see DESIGN.md): the reference we measure against.
SEED_TRAIN = {
    "batch_size": 1,
    "gradient_accumulation_steps": 4,
    "packing": False,
    "completion_only_loss": False,
    "learning_rate": 2.0e-4,
}
SEED_PAD_TO = 512


# ----------------------------------------------------------------------------- arm processes
def _device(spec: dict[str, Any]):
    import torch

    return torch.device("cuda" if spec.get("use_gpu") and torch.cuda.is_available() else "cpu")


def _gpu_peak_mb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def step_timer(step_seconds: list[float], step_cpu_seconds: list[float] | None = None):
    """A Trainer callback appending each optimizer step's wall seconds to ``step_seconds`` (and
    this process's CPU seconds, all threads, to ``step_cpu_seconds``).

    A step runs from the end of the previous one (or of the evaluation / checkpoint that followed
    it, so those are not counted) to its own end; data loading is in it. Add it after other
    callbacks so their ``on_save`` work (e.g. Ray's checkpoint report) is not counted either.
    """
    from transformers import TrainerCallback

    cpu = step_cpu_seconds if step_cpu_seconds is not None else []

    class StepTimer(TrainerCallback):
        def _restart(self) -> None:
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            self._restart()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.last)
            cpu.append(time.process_time() - self.last_cpu)
            self._restart()

        def on_evaluate(self, args, state, control, **kwargs):
            self._restart()

        def on_save(self, args, state, control, **kwargs):
            self._restart()

    return StepTimer()


def measure_trl_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """One TRL ``SFTTrainer`` run in this process (spec: name, config, threads, use_gpu, pad_to,
    mirror_worker). Returns tokens, step times, walls and peak memory."""
    import torch
    from trl import SFTTrainer

    from tinyqa.data import read_prepared
    from tinyqa.model import (
        apply_lora,
        is_quantized,
        keep_4bit_trainable,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )
    from tinyqa.training import rows_to_dataset, sft_config

    cfg = build_config(spec["config"], f"bench arm {spec['name']}")
    torch.set_num_threads(int(spec["threads"]))
    device = _device(spec)
    on_cpu = device.type == "cpu"
    started = time.perf_counter()
    prepared = read_prepared(cfg.data_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device)
    model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    load_seconds = time.perf_counter() - started

    counts = {"effective": 0, "padded": 0, "loss": 0}
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []

    class CountingTrainer(SFTTrainer):
        """Counts the tokens each micro-batch really holds (padding-free rows hold no padding)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            counts["padded"] += ids.numel()
            counts["effective"] += int(mask.sum()) if mask is not None else ids.numel()
            counts["loss"] += int((inputs["labels"] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    output_dir = tempfile.mkdtemp(prefix=f"tinyqa-bench-{spec['name']}-")
    args = sft_config(cfg, output_dir, on_cpu, rank=0)
    changes: dict[str, Any] = {"disable_tqdm": True}
    if spec.get("pad_to"):
        changes["pad_to_multiple_of"] = int(spec["pad_to"])
    if not spec.get("mirror_worker"):
        changes.update(eval_strategy="no", save_strategy="no")
    args = dataclasses.replace(args, **changes)
    completion_only = cfg.train.completion_only_loss
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=rows_to_dataset(prepared.train, completion_only),
        eval_dataset=rows_to_dataset(prepared.eval, completion_only),
        processing_class=tokenizer,
        callbacks=[step_timer(step_seconds, step_cpu_seconds)],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_seconds = 0.0
    if spec.get("mirror_worker"):
        t = time.perf_counter()
        trainer.evaluate()
        eval_seconds += time.perf_counter() - t
        if is_quantized(model):
            keep_4bit_trainable(model)
    t = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t
    if spec.get("mirror_worker"):
        t = time.perf_counter()
        trainer.evaluate()
        save_adapter(
            trainer.model, tokenizer, Path(output_dir) / "adapter", {"bench": spec["name"]}
        )
        eval_seconds += time.perf_counter() - t
    hf_tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "name": spec["name"],
        "device": device.type,
        "threads": torch.get_num_threads(),
        "steps": trainer.state.global_step,
        "effective_tokens": counts["effective"],
        "padded_tokens": counts["padded"],
        "loss_tokens": counts["loss"],
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "train_wall_seconds": train_wall,
        "load_seconds": load_seconds,
        "eval_seconds": eval_seconds,
        "hf_tokens_seen": hf_tokens,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": _gpu_peak_mb(device),
    }


def worker_report_path(cfg: TinyQAConfig) -> Path:
    """Where rank 0 of the Ray arm writes its own figures for the driver."""
    return cfg.run_dir / "ray-worker.json"


def measured_train_fn(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: tinyqa's own loop with a step timer added through its
    ``extra_callbacks`` hook; rank 0 then writes its step times and peak memory where the driver
    reads them (:func:`worker_report_path`)."""
    import ray.train
    import torch

    from tinyqa.training import EXTRA_CALLBACKS_KEY, train_fn_per_worker

    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    # Built here, on the worker, so the timer appends to these very lists; it comes after every
    # other callback, as step_timer asks.
    timer = step_timer(step_seconds, step_cpu_seconds)
    extra = [*loop_config.get(EXTRA_CALLBACKS_KEY, ()), lambda cfg, rank: timer]
    started = time.perf_counter()
    train_fn_per_worker({**loop_config, EXTRA_CALLBACKS_KEY: extra})
    if ray.train.get_context().get_world_rank() == 0:
        gpu = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report = worker_report_path(build_config(loop_config["config"], "train_loop_config"))
        report.write_text(
            json.dumps(
                {
                    "peak_rss_mb": peak_rss_mb(),
                    "peak_gpu_mb": gpu,
                    "threads": torch.get_num_threads(),
                    "worker_seconds": time.perf_counter() - started,
                    "step_seconds": step_seconds,
                    "step_cpu_seconds": step_cpu_seconds,
                    "niceness": os.nice(0),
                }
            )
        )


def measure_ray_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """The plain arm's work through Ray Train with one worker (spec: name, config, threads).

    Starts a private local Ray (never joins another session's) unless the config or
    ``RAY_ADDRESS`` names a cluster.
    """
    import ray

    from tinyqa.adapters import read_manifest
    from tinyqa.cluster import connect, start_private
    from tinyqa.training import build_trainer

    cfg = build_config(spec["config"], f"bench arm {spec['name']}")
    started = time.perf_counter()
    own = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if own:
        set_ray_worker_niceness(spec.get("worker_niceness"))
        start_private(int(spec["threads"]))
    else:
        connect(cfg)
    ray_init_seconds = time.perf_counter() - started
    report = worker_report_path(cfg)
    # Same loop, wrapped so the worker reports its own peak memory (the driver's says nothing).
    trainer = build_trainer(
        cfg, name=f"bench-{spec['name']}", train_loop_per_worker=measured_train_fn
    )
    t = time.perf_counter()
    try:
        trainer.fit()
    finally:
        fit_seconds = time.perf_counter() - t
        if own:
            ray.shutdown()
    # Ray Train keeps only checkpointed reports in result.metrics; the manifest has them all.
    metrics = read_manifest(cfg.adapters_dir / cfg.adapter_id)["metrics"]
    worker = json.loads(report.read_text()) if report.is_file() else {}
    return {
        "name": spec["name"],
        "steps": metrics.get("steps"),
        "hf_tokens_seen": metrics.get("tokens_seen"),
        "train_wall_seconds": metrics.get("train_seconds"),
        "ray_init_seconds": ray_init_seconds,
        "fit_seconds": fit_seconds,
        "worker_seconds": worker.get("worker_seconds"),
        "threads": worker.get("threads"),
        "step_seconds": worker.get("step_seconds", []),
        "step_cpu_seconds": worker.get("step_cpu_seconds", []),
        "worker_niceness": worker.get("niceness"),
        "peak_rss_mb": worker.get("peak_rss_mb"),
        "peak_gpu_mb": worker.get("peak_gpu_mb"),
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------- driver side
def _arm_configs(cfg: TinyQAConfig, work: Path, steps: int, threads: int) -> dict[str, dict]:
    """Resolved config dicts per arm (all reading the same prepared data under ``work``)."""
    base = cfg.to_dict()
    base.update(storage_path=str(work), experiment="bench", ray_address=cfg.ray_address)
    base["train"].update(
        max_steps=steps,
        eval_steps=steps,
        save_steps=steps,
        adapter_id="bench",
        fail_at_step=None,
        max_failures=0,
        num_workers=1,
    )

    def variant(train: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
        d = json.loads(json.dumps(base))
        d["train"].update(train)
        d["data"].update(data or {})
        return build_config(d, "bench config").to_dict()

    mid = max(1, steps // 2)
    worker_like = {"eval_steps": mid, "save_steps": mid, "cpus_per_worker": float(threads)}
    return {
        "seed": variant(SEED_TRAIN, {"max_length": SEED_PAD_TO}),
        "tinyqa": variant({}),
        "plain": variant(worker_like),
        "ray": variant(worker_like),
    }


def _summarize(arm: dict[str, Any]) -> dict[str, Any]:
    """Throughputs from an arm's counts and step times (the Ray arm has only the HF count).

    Per CPU-second figures divide by the process's CPU time in the steps: they hold up when other
    processes take the cores, where wall-clock figures do not.
    """
    steps = arm.get("step_seconds") or []
    cpu = sum(arm.get("step_cpu_seconds") or []) or None
    total, med = sum(steps), median(steps)
    hf = arm.get("hf_tokens_seen")
    arm["median_step_seconds"] = med
    arm["step_cpu_seconds_total"] = cpu
    arm["hf_tokens_per_second"] = ratio(hf, arm.get("train_wall_seconds"))
    arm["hf_tokens_per_second_median_step"] = ratio(ratio(hf, len(steps)), med)
    arm["hf_tokens_per_cpu_second"] = ratio(hf, cpu)
    if "effective_tokens" in arm:
        eff = arm["effective_tokens"]
        arm["effective_tokens_per_second"] = ratio(eff, total)
        arm["effective_tokens_per_second_median_step"] = ratio(ratio(eff, len(steps)), med)
        arm["effective_tokens_per_cpu_second"] = ratio(eff, cpu)
        padded = arm["padded_tokens"]
        arm["padding_fraction"] = 1 - eff / padded if padded else None
    return arm


_LOWER_IS_BETTER = (
    "median_step_seconds",
    "train_wall_seconds",
    "process_seconds",
    "step_cpu_seconds_total",
    "ray_init_seconds",
)


def _best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure from the round least disturbed by other processes: the lowest time, the
    highest throughput (each round does identical work), the highest memory peak."""
    best = dict(rounds[-1])
    for key, value in best.items():
        values = [r[key] for r in rounds if isinstance(r.get(key), (int, float))]
        if not values or isinstance(value, bool):
            continue
        if key in _LOWER_IS_BETTER:
            best[key] = min(values)
        elif "per_second" in key or "per_cpu_second" in key or key.startswith("peak_"):
            best[key] = max(values)
    best["rounds"] = len(rounds)
    return best


def bench_train(
    cfg: TinyQAConfig,
    out: Path,
    quick: bool = False,
    arms: tuple[str, ...] = ARMS,
    steps: int | None = None,
    ray_worker_niceness: int | None = 0,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run the training arms (a subset with ``arms``) and return the suite's result dict.

    Every arm runs ``rounds`` times (2 by default, 1 quick), the arms taking turns; each figure
    of an arm is its best over the rounds (see :func:`_best`), every round stays in ``details``.

    ``ray_worker_niceness``: niceness of the private Ray's workers (the other arms run at this
    process's); None keeps Ray's default (15). Ignored when joining a configured cluster.
    """
    from tinyqa.data import prepare_dataset
    from tinyqa.model import load_tokenizer

    unknown = set(arms) - set(ARMS)
    if unknown:
        raise BenchError(f"unknown training bench arm(s) {sorted(unknown)}; choose from {ARMS}")
    steps = steps or (QUICK_STEPS if quick else FULL_STEPS)
    rounds = rounds or (1 if quick else FULL_ROUNDS)
    threads = os.cpu_count() or 1
    use_gpu = cfg.train.use_gpu
    timeout = 300.0 if quick else 900.0
    work = Path(tempfile.mkdtemp(prefix="_work-train-", dir=out))
    started = time.perf_counter()
    configs = _arm_configs(cfg, work, steps, threads)
    prep_cfg = build_config(configs["tinyqa"])
    prepare_dataset(prep_cfg, load_tokenizer(prep_cfg.model))
    settings = {
        "model": cfg.model.name,
        "quantization": cfg.model.quantization,
        "lora": cfg.lora.model_dump(mode="json"),
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "use_gpu": use_gpu,
        "arms": list(arms),
        "ray_worker_niceness": ray_worker_niceness,
        "tinyqa_train": {
            k: configs["tinyqa"]["train"][k]
            for k in (
                "batch_size",
                "gradient_accumulation_steps",
                "packing",
                "completion_only_loss",
            )
        }
        | {"max_length": configs["tinyqa"]["data"]["max_length"]},
        "seed_train": SEED_TRAIN | {"pad_to": SEED_PAD_TO},
    }
    result = new_result("train", quick, settings)
    all_rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS if name in arms}
    try:
        for i in range(rounds):
            for name in all_rounds:
                spec = {
                    "name": f"{name}-{i}",
                    "config": configs[name],
                    "threads": threads,
                    "use_gpu": use_gpu,
                    "pad_to": SEED_PAD_TO if name == "seed" else None,
                    "mirror_worker": name == "plain",
                    "worker_niceness": ray_worker_niceness,
                }
                kind = "ray_train" if name == "ray" else "trl_train"
                all_rounds[name].append(_summarize(run_arm(kind, spec, timeout, work / "arms")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = {name: _best(runs) for name, runs in all_rounds.items()}
    result["details"]["rounds"] = all_rounds
    result["arms"] = measured
    _fill_train_tables(result, measured, use_gpu)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _mem(arm: dict[str, Any]) -> float | None:
    return arm.get("peak_gpu_mb") if arm.get("peak_gpu_mb") is not None else arm.get("peak_rss_mb")


def _fill_train_tables(result: dict[str, Any], arms: dict[str, dict], use_gpu: bool) -> None:
    s = result["settings"]
    shapes = {
        "seed": "1 × 4, pad 512, full loss",
        "tinyqa": f"{s['tinyqa_train']['batch_size']} × {s['tinyqa_train']['gradient_accumulation_steps']}, "
        f"{'packed' if s['tinyqa_train']['packing'] else 'padded'} ≤{s['tinyqa_train']['max_length']}, "
        f"{'answer' if s['tinyqa_train']['completion_only_loss'] else 'full'} loss",
    }
    shapes["plain"] = shapes["tinyqa"] + ", + eval/ckpt, TRL in-process"
    shapes["ray"] = shapes["tinyqa"] + ", + eval/ckpt, Ray Train 1 worker"
    mem_col = "peak GPU MiB" if use_gpu else "peak RSS MiB"
    rows = []
    for name in ARMS:
        a = arms.get(name)
        if a is None:
            continue
        # The Ray worker's tokens are Hugging Face's count (non-padding), like the plain arm's.
        tokens = a.get("effective_tokens", a.get("hf_tokens_seen"))
        rows.append(
            [
                name,
                shapes[name],
                a.get("steps"),
                tokens,
                a.get("padding_fraction"),
                a.get(
                    "effective_tokens_per_second_median_step",
                    a.get("hf_tokens_per_second_median_step"),
                ),
                a.get("effective_tokens_per_cpu_second", a.get("hf_tokens_per_cpu_second")),
                a.get("hf_tokens_per_second"),
                a.get("median_step_seconds"),
                a.get("train_wall_seconds"),
                a.get("process_seconds"),
                _mem(a),
            ]
        )
    result["table"] = {
        "title": f"Training, {s['model']}, {s['steps']} optimizer steps per arm",
        "columns": [
            "arm",
            "micro-batch × accum, batch shape",
            "steps",
            "effective tokens",
            "padding share",
            "effective tok/s (median step)",
            "effective tok per CPU-s",
            "tok/s (train wall)",
            "median step s",
            "train wall s",
            "process wall s",
            mem_col,
        ],
        "rows": rows,
    }
    seed, tq, plain, ray_arm = ({} if arms.get(k) is None else arms[k] for k in ARMS)
    r: dict[str, float | None] = {
        "tinyqa / seed effective tokens/s (median step)": ratio(
            tq.get("effective_tokens_per_second_median_step"),
            seed.get("effective_tokens_per_second_median_step"),
        ),
        "tinyqa / seed effective tokens/s (all steps)": ratio(
            tq.get("effective_tokens_per_second"), seed.get("effective_tokens_per_second")
        ),
        "tinyqa / seed effective tokens per CPU-second": ratio(
            tq.get("effective_tokens_per_cpu_second"), seed.get("effective_tokens_per_cpu_second")
        ),
        "tinyqa / seed peak memory": ratio(_mem(tq), _mem(seed)),
        "ray / plain tokens/s (train wall: steps, evals, checkpoints)": ratio(
            ray_arm.get("hf_tokens_per_second"), plain.get("hf_tokens_per_second")
        ),
        "ray / plain tokens/s (median step)": ratio(
            ray_arm.get("hf_tokens_per_second_median_step"),
            plain.get("hf_tokens_per_second_median_step"),
        ),
        "ray / plain tokens per CPU-second (steps)": ratio(
            ray_arm.get("hf_tokens_per_cpu_second"), plain.get("hf_tokens_per_cpu_second")
        ),
        "ray / plain throughput end to end (process wall)": ratio(
            plain.get("process_seconds"), ray_arm.get("process_seconds")
        ),
        "ray startup (ray.init) s": ray_arm.get("ray_init_seconds"),
    }
    result["ratios"] = r
    result["targets"] = [
        target(
            "tinyqa default vs seed configuration, effective tokens/s",
            3.0,
            r["tinyqa / seed effective tokens/s (median step)"],
            note="median step",
        ),
        target(
            "Ray Train 1 worker vs plain TRL, throughput at equal work",
            0.9,
            r["ray / plain tokens/s (train wall: steps, evals, checkpoints)"],
            note="train wall",
        ),
    ]
    result["notes"] = [
        "Each arm runs in a fresh process, one after another; ratios compare arms measured in the "
        "same run. Effective tokens are non-padding tokens of the batches the optimizer saw. "
        "'effective tok/s (median step)' = effective tokens per step / median step time: robust "
        "to another process taking the cores for a few steps (the all-steps ratio is kept too). "
        "'per CPU-s' divides by the arm's own CPU time in those steps (all its threads): the "
        "figure to trust when the load average exceeds the cores. Each figure is the arm's best "
        "over its rounds (lowest time, highest throughput); every round is in details.rounds.",
        "'tok/s (train wall)' counts tokens the way training reports them (HF "
        "num_input_tokens_seen, non-padding) over trainer.train(), as the Ray arm's worker does; "
        "the plain and ray arms both evaluate and checkpoint mid-run and at the end.",
        "'process wall' is interpreter start to exit: imports, model load, Ray start (ray arm), "
        "initial/final evaluation and adapter export (plain and ray arms).",
    ]
    for name in ARMS:
        if name not in arms:
            result["notes"].append(f"arm '{name}' not run (not selected)")
