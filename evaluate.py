"""Evaluate a checkpoint: `python evaluate.py checkpoint=PATH [save_outputs=[...]]` (also under torchrun).

Design choices:
- Same configuration system as pretrain.py: Hydra overrides on a schema registered in code (no
  extra YAML file), validated into the typed `EvalConfig`; bad input is one line on stderr, exit 2.
- The run's `all_config.yaml` beside the checkpoint rebuilds data loaders and model exactly as
  training did; `data_path=` points at the dataset when it has moved since training.
- Reads our `step_N` files, the reference's (keys with the `_orig_mod.` prefix of a compiled
  module) and our train-state files; the step comes from a `step_N` name (0 otherwise) or from the
  train state. A checkpoint that does not fit the configured model is a one-line error naming the key.
  A train state of an `ema` run is evaluated with its averaged parameters, as its `step_N` files are.
- `eval_halting=fixed|learned` overrides the run's setting (README "Research options").
- Evaluation itself is utils/evaluation.py's, the same as training's (SPEC §6); outputs are saved per rank as
  `step_{N}_all_preds.{rank}` beside the checkpoint. When the dataset's identifiers are ARC
  variants (`<id>_t<k>_<perm>`), rank 0 then scores them (utils/arc_scoring) and prints pass@K.
"""

import os
import sys
from typing import Any, Literal, Optional

import hydra
import torch
import torch.distributed as dist
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError

from utils import arc_scoring
from utils import checkpointing as ckpt
from utils.build import create_dataloader, create_model, print_backends, use_compile
from utils.cli import bad_input_exits, run_hydra_entry
from utils.config import PretrainConfig, config_from_dict, format_validation_error
from utils.distributed import DistInfo, distributed_context
from utils.evaluation import evaluate, flatten_eval_metrics
from utils.train_state import TrainState, read_checkpoint

DEFAULT_SAVE_OUTPUTS = ["inputs", "labels", "puzzle_identifiers", "logits", "q_halt_logits", "q_continue_logits"]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    save_outputs: list[str] = DEFAULT_SAVE_OUTPUTS
    data_path: Optional[str] = None  # None: the data_path recorded in all_config.yaml
    device: str = "auto"
    compile: Optional[bool] = False  # compiling costs more than it saves for a single evaluation pass
    dist_timeout_s: float = 600.0  # process-group timeout under torchrun (README "Reliability")
    eval_halting: Optional[Literal["fixed", "learned"]] = None  # None: the run's own setting


ConfigStore.instance().store(
    name="cfg_eval",
    node={
        "defaults": ["_self_", {"override hydra/job_logging": "none"}, {"override hydra/hydra_logging": "none"}],
        "hydra": {"output_subdir": None, "run": {"dir": "."}},
        **{k: (v.default if k != "checkpoint" else "???") for k, v in EvalConfig.model_fields.items()},
    },
)


def eval_config_from_hydra(cfg: DictConfig) -> EvalConfig:
    from omegaconf.errors import MissingMandatoryValue

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ValueError(f"config key '{e.full_key}' is required (e.g. checkpoint=checkpoints/.../step_1000)") from None
    try:
        return EvalConfig(**values)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ValueError(format_validation_error(e)) from None


def load_run_config(checkpoint: str, saved: Optional[dict[str, Any]]) -> dict[str, Any]:
    if saved is not None:
        return saved
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "all_config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"all_config.yaml not found beside the checkpoint: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return values


def build_config(eval_cfg: EvalConfig, saved: Optional[dict[str, Any]]) -> PretrainConfig:
    values = load_run_config(eval_cfg.checkpoint, saved)
    try:
        config = config_from_dict(values)
    except ValueError as e:
        raise ValueError(f"config of {eval_cfg.checkpoint}: {e}") from None
    update: dict[str, Any] = {
        "eval_save_outputs": list(eval_cfg.save_outputs),
        "checkpoint_path": os.path.dirname(os.path.abspath(eval_cfg.checkpoint)),
        "device": eval_cfg.device,
        "compile": eval_cfg.compile,
        "resume": None,
    }
    if eval_cfg.data_path is not None:
        update["data_path"] = eval_cfg.data_path
    if eval_cfg.eval_halting is not None:
        update["eval_halting"] = eval_cfg.eval_halting
    return config.model_copy(update=update)


def score_arc_outputs(config: PretrainConfig, step: int, world_size: int) -> Optional[arc_scoring.ArcScore]:
    """pass@K over every rank's saved outputs, when the dataset is ARC and the needed outputs were saved."""
    saved = set(config.eval_save_outputs)
    if not {"inputs", "labels", "puzzle_identifiers", "q_halt_logits"} <= saved or not {"logits", "preds"} & saved:
        return None
    if not os.path.isfile(os.path.join(config.data_path, "identifiers.json")):
        return None
    names = arc_scoring.load_identifier_names(config.data_path)
    if not arc_scoring.is_arc_dataset(names):
        return None
    assert config.checkpoint_path is not None
    files = [os.path.join(config.checkpoint_path, f"step_{step}_all_preds.{r}") for r in range(world_size)]
    return arc_scoring.score_predictions(arc_scoring.load_prediction_files(files), names)


def evaluate_checkpoint(eval_cfg: EvalConfig, info: DistInfo) -> Optional[dict[str, Any]]:
    """Rebuild loaders and model from the run's config, load the weights, evaluate; results on rank 0."""
    weights, step, saved_config = read_checkpoint(eval_cfg.checkpoint)
    config = build_config(eval_cfg, saved_config)
    torch.manual_seed(config.seed + info.rank)
    print_backends(info)

    train_dataset, _ = create_dataloader(config, "train", info, test_set_mode=False, epochs=1)
    eval_dataset, eval_loader = create_dataloader(config, "test", info, test_set_mode=True, epochs=1)
    head, _ = create_model(config, train_dataset.metadata, info)
    ckpt.load_model_weights(head, weights, eval_cfg.checkpoint)
    forward = torch.compile(head, dynamic=False) if use_compile(config, info.device) else head
    state = TrainState(model=head, forward=forward, optimizers=[], optimizer_lrs=[], total_steps=0, step=step)
    head.eval()

    if info.is_main:
        print(f"evaluating {eval_cfg.checkpoint} (step {step}) on {config.data_path}", file=sys.stderr)
    results = evaluate(config, state, eval_loader, eval_dataset.metadata, info)
    if info.world_size > 1:
        dist.barrier()  # every rank's outputs are on disk before rank 0 scores them
    if not info.is_main or results is None:
        return None
    arc = score_arc_outputs(config, step, info.world_size)
    for key, value in flatten_eval_metrics(results).items():
        print(f"{key}: {value:.6g}")
    if arc is not None:
        print(arc_scoring.format_table(arc))
    return {"metrics": results, "arc": arc}


@hydra.main(config_path=None, config_name="cfg_eval", version_base=None)
def main(cfg: DictConfig) -> None:
    with bad_input_exits():
        eval_cfg = eval_config_from_hydra(cfg)
        with distributed_context(eval_cfg.device, eval_cfg.dist_timeout_s) as info:
            evaluate_checkpoint(eval_cfg, info)


if __name__ == "__main__":
    run_hydra_entry(main, EvalConfig.model_fields)  # every key is listed in its registered schema
