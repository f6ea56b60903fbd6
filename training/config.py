"""The launcher's typed configuration: `PretrainConfig` and its validation.

Design choices:
- Hydra composes `config/cfg_pretrain.yaml` + `config/arch/*.yaml`; the result is validated at once
  into `PretrainConfig` (unknown keys refused at top level, free-form under `arch`, which is passed
  to the model and its loss head). Both launchers read it: pretrain.py from the command line,
  evaluate.py from a run's `all_config.yaml`, so this module imports nothing of the launchers.
- Every error is one line naming the key (`ValueError`), so the command-line wrappers can print it
  as `error: ...` without a traceback.
"""

import itertools
import math
import os
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras (loss_type, ...) go to the loss head

    name: str


class ArchConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras go to the model's own config

    name: str
    loss: LossConfig


class EvaluatorConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras go to the evaluator's constructor

    name: str  # `module@Class` under the `evaluators` package, e.g. `arc@ARC`


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: ArchConfig
    # The reference's single dataset, or TRM's lists (several datasets trained together; `data_paths_test`
    # empty: evaluate on the training datasets' test splits). `data_paths` wins when given.
    data_path: Optional[str] = None
    data_paths: list[str] = []
    data_paths_test: list[str] = []
    # TRM's evaluators, run on the test outputs after each evaluation (`evaluators: []` for none).
    evaluators: list[EvaluatorConfig] = []

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

    # Not listed in config/cfg_pretrain.yaml (its header says why), so `--help` describes them from here.
    project_name: Optional[str] = Field(None, description='W&B project; null: "{Dataset} ACT-torch" from the dataset')
    run_name: Optional[str] = Field(
        None, description='W&B run and run folder name; null: "{model class} {random slug}"'
    )
    load_checkpoint: Optional[str] = Field(
        None,
        description="TRM's: initial weights (step_N or a train state); a puzzle table of another shape: its mean row",
    )
    checkpoint_path: Optional[str] = Field(None, description="run folder; null: checkpoints/{project_name}/{run_name}")

    seed: int = 0
    eval_save_outputs: list[str] = Field(
        [], description="outputs saved at each evaluation as step_N_all_preds.{rank} (e.g. [inputs,labels,logits])"
    )
    min_eval_interval: Optional[int] = 0  # TRM: first training iteration after which to evaluate (and save step_N)
    freeze_weights: bool = False  # TRM: train only the puzzle embedding

    # Additions beyond the reference (see config/cfg_pretrain.yaml).
    use_wandb: bool = True
    use_tensorboard: bool = False
    compile: Optional[bool] = None
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    resume: Optional[str] = None
    overwrite: bool = False  # start over in a checkpoint_path holding another run (README "Resuming a run")
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
        if self.data_path is None and not self.data_paths:
            raise ValueError("config key 'data_path': no dataset given (set data_path, or data_paths as a list)")
        if self.min_eval_interval is not None and self.min_eval_interval < 0:
            raise ValueError(f"config key 'min_eval_interval': must be >= 0, got {self.min_eval_interval}")
        for key in ("global_batch_size", "epochs", "eval_interval", "checkpoint_interval_steps", "stop_at_step"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"config key '{key}': must be >= 1, got {value}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"config key 'lr_warmup_steps': must be >= 0, got {self.lr_warmup_steps}")
        # 0 is allowed: that part then keeps its weights (puzzle_emb_lr=0: the initial puzzle embedding; lr=0: only
        # the puzzle embedding trains), as with the reference; a negative rate would climb the loss instead.
        for key in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay"):
            if not 0.0 <= getattr(self, key) < math.inf:
                raise ValueError(f"config key '{key}': must be a finite number >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"config key 'lr_min_ratio': must be in [0, 1], got {self.lr_min_ratio}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"config key '{key}': must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 < self.dist_timeout_s < math.inf:
            raise ValueError(f"config key 'dist_timeout_s': must be a finite number > 0, got {self.dist_timeout_s}")
        if self.eval_interval is not None and self.epochs % self.eval_interval != 0:
            raise ValueError(
                f"config key 'eval_interval': epochs ({self.epochs}) must be divisible by eval_interval ({self.eval_interval})"
            )
        return self


def format_validation_error(err: ValidationError) -> str:
    """The first error of a pydantic validation as one line naming the key (our own validators' messages name it
    already)."""
    from utils.cli import validation_error_line

    return validation_error_line(err, lambda loc: f"config key '{'.'.join(loc) or '<config>'}'", count_others=True)


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Validate a plain dict into `PretrainConfig`; raises a one-line ValueError naming the key."""
    try:
        return PretrainConfig(**values)
    except ValidationError as e:
        raise ValueError(format_validation_error(e)) from None


def config_from_hydra(cfg: DictConfig) -> PretrainConfig:
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return config_from_dict(values)  # type: ignore[arg-type]


# config/ of a checkout (or an editable install); a wheel installs it as the data folder `hrm_config` beside
# `training` (pyproject.toml), since a top-level `config` would clash with other distributions' modules.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INSTALLED_CONFIG_DIR = os.path.join(_ROOT, "hrm_config")
CONFIG_DIR = _INSTALLED_CONFIG_DIR if os.path.isdir(_INSTALLED_CONFIG_DIR) else os.path.join(_ROOT, "config")


def compose_config(overrides: list[str], config_dir: str = CONFIG_DIR) -> PretrainConfig:
    """`cfg_pretrain` composed with command-line overrides (either `+key=` spelling) and validated, as
    pretrain.py's command line does it; for tests, benchmarks and notebooks."""
    from hydra import compose, initialize_config_dir

    from utils.cli import normalize_overrides

    listed = listed_keys(os.path.join(config_dir, "cfg_pretrain.yaml"))
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(
            config_name="cfg_pretrain", overrides=normalize_overrides(overrides, listed, PretrainConfig.model_fields)
        )
    return config_from_hydra(cfg)


def listed_values(yaml_path: str) -> dict[str, Any]:
    """Top-level keys a primary config file lists, with their values as written: its config groups
    (`arch: hrm_v1`), then its values."""
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    groups = {
        k: v
        for entry in values.get("defaults", [])
        if isinstance(entry, dict)
        for k, v in entry.items()
        if not k.startswith("override ")
    }
    return {**groups, **{k: v for k, v in values.items() if k not in ("defaults", "hydra")}}


def listed_keys(yaml_path: str) -> set[str]:
    """Top-level keys a primary config file lists: its values and its config groups (`arch`)."""
    return set(listed_values(yaml_path))


def yaml_comments(yaml_path: str) -> dict[str, str]:
    """The trailing `# comment` of each top-level key of a config file, and of each config group of its
    `defaults` list: the keys' descriptions that `--help` shows."""
    import re

    with open(yaml_path, encoding="utf-8") as f:
        found = (re.match(r"(?:  - )?(\w+):[^#]*#\s*(.*\S)", line) for line in f)
        return {m.group(1): m.group(2) for m in found if m}


def pretrain_help(config_dir: str = CONFIG_DIR) -> str:
    """pretrain.py's `--help`: each key with its default and description (the YAML's comment, or the field
    description of a key the YAML does not list), then each architecture with its file's first comment line."""
    from utils.cli import field_entries, format_help, override_text

    path = os.path.join(config_dir, "cfg_pretrain.yaml")
    values, comments = listed_values(path), yaml_comments(path)
    keys = [(f"{k}={override_text(v)}", comments.get(k, "")) for k, v in values.items()]
    keys += field_entries(PretrainConfig, skip=values)
    archs = []
    for name in sorted(n for n in os.listdir(os.path.join(config_dir, "arch")) if n.endswith(".yaml")):
        with open(os.path.join(config_dir, "arch", name), encoding="utf-8") as f:
            header = " ".join(line[1:].strip() for line in itertools.takewhile(lambda line: line.startswith("#"), f))
        archs.append((f"arch={name.removesuffix('.yaml')}", header.split(". ", 1)[0].removesuffix(".")))
    summary = (
        "Train an HRM or TRM model, in one process or under torchrun (one process per GPU). Hydra overrides set "
        "the keys below (key=value, or +key=value as in the references' READMEs); arch=NAME picks an architecture "
        "and arch.KEY=value changes one of its keys. Hydra's --cfg job prints the composed config."
    )
    return format_help("[key=value ...]", summary, [("keys (key=default)", keys), ("architectures", archs)])


def train_data_paths(config: PretrainConfig) -> list[str]:
    """The training datasets: TRM's `data_paths` when given, else the reference's `data_path`."""
    return list(config.data_paths) if config.data_paths else [config.data_path]  # type: ignore[list-item]


def test_data_paths(config: PretrainConfig) -> list[str]:
    """The datasets whose test splits are evaluated: `data_paths_test`, else the training datasets."""
    return list(config.data_paths_test) if config.data_paths_test else train_data_paths(config)


def epochs_per_iter(config: PretrainConfig) -> int:
    """Training epochs per loader iteration: one iteration, then an evaluation."""
    return config.eval_interval if config.eval_interval is not None else config.epochs
