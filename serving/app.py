"""The Ray Serve application of tinyqa: ``build_app(args)`` wires the two deployments.

- ``QAIngress`` (:mod:`serving.ingress`): the HTTP front; ray.serve + FastAPI + the torch-free
  core of tinyqa, on 0.1 CPU.
- ``QAModel`` (:mod:`serving.replica`): the base model with LoRA adapters (torch), autoscaled.

Entry points: ``build_app(args)`` (Serve's pattern: ``serve run serving.app:build_app
config=...`` / ``serving/config.yaml``; :class:`AppArgs` validates the arguments), and
:func:`application` for a config object already in hand (:func:`serving.deploy.deploy`, from
``tinyqa serve``). Either way the config is turned into a plain dict once, here, where it crosses
into the replicas, and validated again on their side.
"""

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from serving.ingress import QAIngress
from serving.replica import QAModel
from tinyqa.adapters import serving_plan
from tinyqa.cluster import worker_env
from tinyqa.config import TinyQAConfig, build_config, load_config, merge_dicts, parse_overrides
from tinyqa.errors import ConfigError
from tinyqa.secrets import KeyDigest, resolve_api_key

logger = logging.getLogger("ray.serve").getChild("tinyqa")

REPO_ROOT = Path(__file__).resolve().parents[1]


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of a Serve config file).

    Give ``config`` (a YAML file) with optional ``overrides``, or ``settings`` (a whole config as
    a dict, e.g. ``TinyQAConfig.to_dict()``) with optional ``overrides``.
    """

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        None,
        description="tinyqa YAML config; a relative path is tried against the working directory, "
        "then the repository root.",
    )
    settings: dict[str, Any] | None = Field(None, description="A whole tinyqa config as a dict.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted key=value overrides, e.g. serve.max_replicas=4."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AppArgs":
        if self.config is not None and self.settings is not None:
            raise ValueError("give either 'config' (a YAML path) or 'settings' (a dict), not both")
        return self

    def config_path(self) -> Path | None:
        if self.config is None:
            return None
        path = Path(self.config).expanduser()
        if path.is_absolute() or path.is_file():
            return path
        in_repo = REPO_ROOT / path
        return in_repo if in_repo.is_file() else path

    def load(self) -> TinyQAConfig:
        """The validated tinyqa config; raises :class:`ConfigError`."""
        if self.settings is None:
            return load_config(self.config_path(), self.overrides)
        data = merge_dicts(self.settings, parse_overrides(self.overrides))
        return build_config(data, "build_app settings" + (" + overrides" if self.overrides else ""))


def resolved(cfg: TinyQAConfig) -> TinyQAConfig:
    """``cfg`` with an absolute storage path: replicas run in other working directories."""
    return cfg.model_copy(update={"storage_path": str(cfg.run_dir.parent)})


def deployment_options(cfg: TinyQAConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve options of (QAModel, QAIngress) from ``cfg.serve``."""
    s = cfg.serve
    autoscaling: dict[str, Any] = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
    }
    if s.initial_replicas is not None:
        autoscaling["initial_replicas"] = s.initial_replicas
    if s.look_back_period_s is not None:
        autoscaling["look_back_period_s"] = s.look_back_period_s
    if s.metrics_interval_s is not None:
        autoscaling["metrics_interval_s"] = s.metrics_interval_s
    env = {"env_vars": worker_env()}
    model = {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": env},
    }
    # The ingress must never be the bottleneck that queues: it admits everything the model
    # deployment could run or queue, so overload is decided (and answered as JSON) downstream.
    queued = s.max_queued_requests if s.max_queued_requests >= 0 else 1000
    ingress = {
        "num_replicas": s.ingress_replicas,
        "max_ongoing_requests": s.max_replicas * s.max_ongoing_requests + queued + 32,
        "ray_actor_options": {"num_cpus": 0.1, "runtime_env": env},
    }
    return model, ingress


def build_app(args: AppArgs | dict[str, Any]) -> serve.Application:
    """The Serve application for a tinyqa config (``args``: :class:`AppArgs` or a plain dict).

    Raises :class:`ConfigError` for a bad config and :class:`~tinyqa.errors.ModelError` when the
    default adapter cannot be served.
    """
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(args)
        except Exception as e:
            raise ConfigError(f"build_app arguments: {e}") from e
    return application(resolved(args.load()))


def application(cfg: TinyQAConfig) -> serve.Application:
    """The Serve application for a validated config whose storage path is absolute (see
    :func:`resolved`). Raises :class:`~tinyqa.errors.ModelError` when the default adapter cannot
    be served.
    """
    plan = serving_plan(cfg)
    logger.info(
        "serving plan: %s (base %s, adapters under %s)",
        plan.reason,
        plan.base_id,
        plan.adapter_root,
    )
    model_opts, ingress_opts = deployment_options(cfg)
    # The one place the config becomes a dict: it crosses into the replicas here.
    config, plan_dict = cfg.to_dict(), plan.to_dict()
    model = QAModel.options(**model_opts).bind(config, plan_dict)
    # The key itself never becomes a deployment argument (Serve keeps those in its checkpoint):
    # the ingress gets a salted digest to check tokens against.
    key = resolve_api_key(cfg.serve.api_key)
    digest = KeyDigest.of(key).to_dict() if key else None
    return QAIngress.options(**ingress_opts).bind(model, config, plan_dict, digest)
