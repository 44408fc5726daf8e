"""LoRA / QLoRA fine-tuning on Ray Train: TorchTrainer workers running TRL's SFTTrainer.

Driver side: :func:`run_training` validates and prepares the data (before any Ray work), builds a
:class:`ray.train.torch.TorchTrainer` and, when it finishes, returns the exported adapter. Worker
side: :func:`train_fn_per_worker` loads its own copy of the base model on its own device, applies
LoRA, trains with checkpoints reported to Ray (so a restarted worker group resumes), and rank 0
exports ``<storage>/<experiment>/adapters/<adapter_id>/`` with its ``tinyqa.json`` manifest.

Extra Trainer callbacks (instrumentation, e.g. the benchmarks' step timer) go in through
``extra_callbacks``: factories ``(cfg, rank) -> transformers.TrainerCallback`` that travel to the
workers inside the loop config, so they must be picklable (module-level functions or classes;
Ray pickles closures too, but what they close over is copied, not shared).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyqa import tracking
from tinyqa.config import TinyQAConfig, build_config
from tinyqa.errors import StorageError, TinyQAError, last_line
from tinyqa.storage import check_writable, is_remote, ray_storage

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CallbackFactory = Callable[[TinyQAConfig, int], "TrainerCallback"]
"""Builds one extra Trainer callback on a worker, given the run's config and the worker's rank."""

EXTRA_CALLBACKS_KEY = "extra_callbacks"
"""Loop-config key holding the :data:`CallbackFactory` list (see :func:`train_fn_per_worker`)."""

_VERSIONED = (
    "tinyqa",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "ray",
    "datasets",
    "accelerate",
)


class TrainingFailed(TinyQAError):
    """Ray Train gave up (after retries); the message names the run folder to resume from."""


@dataclass
class TrainResult:
    adapter_id: str
    adapter_dir: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_name(cfg: TinyQAConfig, prefix: str = "train") -> str:
    """Deterministic Ray run name: same training inputs resume, changed inputs start fresh."""
    from tinyqa.data import dataset_sha256
    from tinyqa.model import resolve_model_path

    relevant = {k: cfg.to_dict()[k] for k in ("model", "lora", "data", "train", "seed")}
    relevant["train"].pop("fail_at_step", None)
    relevant["train"].pop("max_failures", None)
    # What the names point at, too: a rebuilt preset or an edited dataset is a new run.
    relevant["model_path"] = resolve_model_path(cfg.model.name)
    relevant["dataset_sha256"] = dataset_sha256(cfg.data)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{cfg.adapter_id}-{digest}"


def check_storage(cfg: TinyQAConfig) -> None:
    """Fail early (before Ray starts) when the storage path cannot be written."""
    if is_remote(cfg.run_dir):
        check_writable(cfg.run_dir)
        return
    root = Path(cfg.storage_path).expanduser()
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cfg.run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise StorageError(
            f"storage_path {root} is not writable ({e.strerror}); choose a folder you can write to"
        ) from e


def sft_config(cfg: TinyQAConfig, output_dir: str, on_cpu: bool, rank: int):
    """TRL SFTConfig with every default that matters set explicitly (TRL's bf16 / lr / checkpointing
    defaults differ from ours)."""
    from trl import SFTConfig

    t = cfg.train
    bf16 = not on_cpu and cfg.model.dtype in ("auto", "fastest", "bfloat16")
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        # transformers >= 5 dropped `warmup_ratio`; `warmup_steps` takes a float in [0, 1) as a
        # share of the total steps (TrainingArguments docs). TrainSettings.warmup_ratio is < 1 by
        # validation, so this is always read as a ratio, never as a step count.
        warmup_steps=float(t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=bf16,
        fp16=not on_cpu and cfg.model.dtype == "float16",
        use_cpu=on_cpu,
        gradient_checkpointing=t.gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        logging_steps=t.logging_steps,
        report_to=tracking.report_to(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        packing=t.packing,
        packing_strategy="bfd",
        padding_free=t.packing,
        eval_packing=t.packing,
        max_length=cfg.data.max_length,
        completion_only_loss=t.completion_only_loss,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=rank != 0,
        dataset_num_proc=None,
    )


def rows_to_dataset(rows: list[dict[str, Any]], completion_only: bool):
    """A ``datasets.Dataset`` of ``input_ids`` / ``labels`` from prepared rows (see
    :func:`tinyqa.data.read_prepared`); with ``completion_only`` the loss covers answers only."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r["input_ids"] for r in rows],
            # Labels come from prepare (prompt = -100); without completion-only loss, train on all.
            "labels": [r["labels"] if completion_only else r["input_ids"] for r in rows],
        }
    )


def _callbacks(cfg: TinyQAConfig, rank: int, resumed: bool):
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import TrainerCallback

    from tinyqa.model import keep_4bit_trainable

    class Keep4bitTrainable(TrainerCallback):
        """Undo bitsandbytes' CPU inference repack after every evaluation (see model.py)."""

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            if model is not None:
                keep_4bit_trainable(model)

    class FailureDrill(TrainerCallback):
        """Crash rank 0 once at ``train.fail_at_step`` to exercise checkpoint resume."""

        def on_step_end(self, args, state, control, **kwargs):
            if rank == 0 and not resumed and state.global_step == cfg.train.fail_at_step:
                raise RuntimeError(
                    f"injected failure at step {state.global_step} (train.fail_at_step)"
                )

    callbacks = [Keep4bitTrainable(), RayTrainReportCallback()]
    if cfg.train.fail_at_step:
        callbacks.append(FailureDrill())
    return callbacks


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (one per worker; rank 0 exports the adapter).

    ``loop_config``: ``{"config": <resolved config dict>}`` plus, optionally,
    ``"extra_callbacks"``: a list of :data:`CallbackFactory`; their callbacks run after tinyqa's own
    (so their ``on_save`` etc. see Ray's checkpoint report already done).
    """
    import ray.train
    import ray.train.torch
    import torch
    from ray.train.huggingface.transformers import prepare_trainer
    from trl import SFTTrainer

    from tinyqa.data import read_prepared
    from tinyqa.model import (
        apply_lora,
        is_quantized,
        keep_4bit_trainable,
        load_base_model,
        load_tokenizer,
        save_adapter,
        trainable_parameter_count,
    )

    cfg = build_config(loop_config["config"], "train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_cpu = device.type == "cpu"
    if on_cpu:
        # Exactly the CPUs this worker reserved: Ray's OMP_NUM_THREADS only counts when torch had
        # not started its thread pool yet, and more threads than CPUs oversubscribe the node.
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    prepared = read_prepared(cfg.data_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device)
    model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    trainable, total = trainable_parameter_count(model)

    checkpoint = ray.train.get_checkpoint()
    resume_dir, resumed_step = None, 0
    if checkpoint is not None:
        # Copy out of Ray's checkpoint so HF can read (and later rotate) it locally.
        local = tempfile.mkdtemp(prefix="tinyqa-resume-")
        checkpoint.to_directory(local)
        resume_dir = os.path.join(local, "checkpoint")
        state_file = Path(resume_dir, "trainer_state.json")
        resumed_step = json.loads(state_file.read_text())["global_step"]

    output_dir = tempfile.mkdtemp(prefix=f"tinyqa-train-r{rank}-")
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, output_dir, on_cpu, rank),
        train_dataset=rows_to_dataset(prepared.train, cfg.train.completion_only_loss),
        eval_dataset=rows_to_dataset(prepared.eval, cfg.train.completion_only_loss),
        processing_class=tokenizer,
        callbacks=[
            *_callbacks(cfg, rank, resumed=resume_dir is not None),
            *(factory(cfg, rank) for factory in loop_config.get(EXTRA_CALLBACKS_KEY, ())),
        ],
    )
    trainer = prepare_trainer(trainer)

    # A fresh LoRA adapter is the identity (lora_B = 0), so the base model's eval loss is the
    # untrained adapter's; measuring it with adapters disabled also works after a resume.
    with trainer.model.disable_adapter():
        initial_eval = trainer.evaluate()["eval_loss"]
    if is_quantized(model):
        keep_4bit_trainable(model)
    started = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_dir)
    wall = time.perf_counter() - started
    state = trainer.state
    # When the last step was just evaluated (max_steps a multiple of eval_steps), that loss is the
    # final one: evaluating the same weights again costs about a training step for nothing.
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    final = last if last and last.get("step") == state.global_step else trainer.evaluate()
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    metrics = {
        "eval_loss": final["eval_loss"],
        "eval_loss_initial": initial_eval,
        "train_loss": out.training_loss,
        "steps": state.global_step,
        "epochs": state.epoch,
        "resumed_from_step": resumed_step,
        "train_seconds": wall,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "world_size": world,
        "trainable_params": trainable,
        "total_params": total,
    }
    if rank == 0:
        manifest = {
            "adapter_id": cfg.adapter_id,
            "base_model": cfg.model.name,
            "config": cfg.to_dict(),
            "dataset": prepared.stats,
            "metrics": metrics,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": str(device.type),
        }
        save_adapter(trainer.model, tokenizer, cfg.adapters_dir / cfg.adapter_id, manifest)
        tracking.publish_tensorboard(cfg)
        logger.info(
            "adapter %s: eval loss %.4f -> %.4f", cfg.adapter_id, initial_eval, final["eval_loss"]
        )
    ray.train.report(
        {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"done": 1}
    )


def build_trainer(
    cfg: TinyQAConfig,
    name: str | None = None,
    callbacks: list | None = None,
    storage_path: str | Path | None = None,
    extra_callbacks: Sequence[CallbackFactory] = (),
    train_loop_per_worker: Callable[[dict[str, Any]], None] | None = None,
):
    """A TorchTrainer for ``cfg``; ``callbacks`` are Ray Train ``UserCallback``s (e.g. Tune's).

    ``storage_path`` (default ``cfg.ray_storage``) lets a sweep keep its trials' runs inside its
    own folder, so starting the sweep over removes them too. ``extra_callbacks`` are Trainer
    callback factories for the workers (see :func:`train_fn_per_worker`). ``train_loop_per_worker``
    replaces the worker loop with a wrapper that must call :func:`train_fn_per_worker` with the
    loop config it gets (the benchmarks wrap it to measure the worker process).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tinyqa.cluster import worker_env

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    loop_config: dict[str, Any] = {"config": cfg.to_dict()}
    ray_path, ray_fs = ray_storage(storage_path or cfg.ray_storage)
    if extra_callbacks:
        loop_config[EXTRA_CALLBACKS_KEY] = list(extra_callbacks)
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker or train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name or run_name(cfg),
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": {**worker_env(), **tracking.worker_env(cfg)}},
            callbacks=callbacks,
        ),
    )


def run_training(
    cfg: TinyQAConfig,
    extra_callbacks: Sequence[CallbackFactory] = (),
    callbacks: Callable[[], Sequence[Any]] | None = None,
) -> TrainResult:
    """Prepare the data, train on Ray, and return the exported adapter.

    ``extra_callbacks``: Trainer callback factories run on every worker after tinyqa's own (see
    :func:`train_fn_per_worker`; they must be picklable). ``callbacks``: returns Ray Train
    ``UserCallback``s (e.g. :class:`tinyqa.progress.TrainProgress`); called once Ray is
    connected, so it may create Ray objects.

    Raises :class:`~tinyqa.errors.TinyQAError` subclasses for user mistakes (bad data, storage) and
    :class:`TrainingFailed` when Ray Train gives up.
    """
    from tinyqa import progress
    from tinyqa.adapters import read_manifest
    from tinyqa.cluster import connect
    from tinyqa.data import prepare_dataset

    check_storage(cfg)
    prepare_dataset(cfg)  # validation errors surface here, before any Ray work
    connect(cfg)
    name = run_name(cfg)
    logger.info("training %s (Ray run %s under %s)", cfg.adapter_id, name, cfg.ray_storage)
    user_callbacks = list(callbacks()) if callbacks else None
    tracked = tracking.train_callbacks(cfg, name)  # MLflow: rank 0 opens the run
    steps = progress.worker_callbacks()  # a console's bar moves every step
    trainer = build_trainer(
        cfg, name, callbacks=user_callbacks, extra_callbacks=[*tracked, *steps, *extra_callbacks]
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors in TrainingFailedError
        tracking.finish_train_run(cfg, name, None, None)
        raise TrainingFailed(
            f"training {cfg.adapter_id} failed: {last_line(e)}; "
            f"rerun the same command to resume from the last checkpoint in {cfg.ray_storage / name}"
        ) from e
    adapter_dir = cfg.adapters_dir / cfg.adapter_id
    manifest = read_manifest(adapter_dir)
    tracking.finish_train_run(cfg, name, adapter_dir, manifest)
    return TrainResult(cfg.adapter_id, adapter_dir, manifest)
