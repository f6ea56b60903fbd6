"""The launcher's typed configuration: `PretrainConfig` and its validation (SPEC §6).

Design choices:
- Hydra composes `config/cfg_pretrain.yaml` + `config/arch/*.yaml`; the result is validated at once
  into `PretrainConfig` (unknown keys refused at top level, free-form under `arch`, which is passed
  to the model and its loss head). Both launchers read it: pretrain.py from the command line,
  evaluate.py from a run's `all_config.yaml`, so this module imports nothing of the launchers.
- Every error is one line naming the key (`ValueError`), so the command-line wrappers can print it
  as `error: ...` without a traceback.
"""

from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras (loss_type, ...) go to the loss head

    name: str


class ArchConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras go to the model's own config

    name: str
    loss: LossConfig


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: ArchConfig
    data_path: str

    global_batch_size: int
    epochs: int
    eval_interval: Optional[int] = None
    checkpoint_every_eval: bool = False

    lr: float
    lr_min_ratio: float
    lr_warmup_steps: int

    weight_decay: float
    beta1: float
    beta2: float

    puzzle_emb_lr: float
    puzzle_emb_weight_decay: float

    project_name: Optional[str] = None
    run_name: Optional[str] = None
    checkpoint_path: Optional[str] = None

    seed: int = 0
    eval_save_outputs: list[str] = []

    # Additions beyond the reference (see config/cfg_pretrain.yaml).
    use_wandb: bool = True
    compile: Optional[bool] = None
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    resume: Optional[str] = None
    checkpoint_interval_steps: Optional[int] = None
    stop_at_step: Optional[int] = None
    nonfinite: Literal["skip", "stop"] = "skip"  # README "Reliability"
    dist_timeout_s: float = 600.0
    async_metrics: Optional[bool] = None  # None: on for CUDA unless nonfinite=stop or early stopping

    # Research options beyond the reference, each off by default (README "Research options").
    ema: bool = False
    ema_rate: float = 0.999
    eval_halting: Literal["fixed", "learned"] = "fixed"
    early_stop_train_accuracy: Optional[float] = None
    early_stop_window: int = 100
    keep_best: Optional[str] = None
    grad_accum_steps: int = 1

    @model_validator(mode="after")
    def _check_research_options(self) -> "PretrainConfig":
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"config key 'ema_rate': must be in [0, 1), got {self.ema_rate}")
        for key in ("early_stop_window", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}': must be >= 1, got {getattr(self, key)}")
        if self.early_stop_train_accuracy is not None and not 0.0 < self.early_stop_train_accuracy <= 1.0:
            raise ValueError(
                f"config key 'early_stop_train_accuracy': must be in (0, 1], got {self.early_stop_train_accuracy}"
            )
        if self.async_metrics and (self.nonfinite == "stop" or self.early_stop_train_accuracy is not None):
            raise ValueError(
                "config key 'async_metrics': needs each step's outcome at once, so it cannot be combined with "
                "nonfinite=stop or early_stop_train_accuracy"
            )
        if self.keep_best is not None and "/" not in self.keep_best:
            raise ValueError(
                f"config key 'keep_best': expected an eval metric as '<set>/<metric>', got {self.keep_best!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_values(self) -> "PretrainConfig":
        for key in ("global_batch_size", "epochs", "eval_interval", "checkpoint_interval_steps", "stop_at_step"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"config key '{key}': must be >= 1, got {value}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"config key 'lr_warmup_steps': must be >= 0, got {self.lr_warmup_steps}")
        if self.eval_interval is not None and self.epochs % self.eval_interval != 0:
            raise ValueError(
                f"config key 'eval_interval': epochs ({self.epochs}) must be divisible by eval_interval ({self.eval_interval})"
            )
        return self


def format_validation_error(err: ValidationError) -> str:
    """The first error of a pydantic validation as one line naming the key."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<config>"
    more = f" (and {err.error_count() - 1} more errors)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'{more}"
    if first["type"] == "missing":
        return f"config key '{key}' is required{more}"
    if first["type"] == "value_error":  # our own validators already name the key
        return first["msg"].removeprefix("Value error, ") + more
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r}){more}"


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Validate a plain dict into `PretrainConfig`; raises a one-line ValueError naming the key."""
    try:
        return PretrainConfig(**values)
    except ValidationError as e:
        raise ValueError(format_validation_error(e)) from None


def config_from_hydra(cfg: DictConfig) -> PretrainConfig:
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return config_from_dict(values)  # type: ignore[arg-type]


def epochs_per_iter(config: PretrainConfig) -> int:
    """Training epochs per loader iteration: one iteration, then an evaluation."""
    return config.eval_interval if config.eval_interval is not None else config.epochs
