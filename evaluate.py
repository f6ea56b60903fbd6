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
- Reads TRM's run folders as TRM writes them: its all_config.yaml (`data_paths`, `evaluators`, ...),
  its `_orig_mod.`-prefixed `step_N` files, its datasets (`total_puzzles` in dataset.json).
- `eval_halting=fixed|learned` overrides the run's setting (README "Research options").
- Inference-time compute: `arch.<key>=value` overrides the run's model config for this evaluation
  (e.g. `arch.halt_max_steps=64`: more ACT steps than in training); `step_accuracy=true` also reports
  token and exact accuracy after each ACT step (utils/visualize.py's `act_step_accuracy`), so one sees
  where more steps stop helping.
- `puzzle_identifiers=blank|shuffled` feeds the model every test example with the blank identifier, or
  with another puzzle's (a fixed random permutation of the identifiers), to measure how much the model
  leans on its puzzle embedding; scoring still uses the true identifiers.
- Evaluation itself is utils/evaluation.py's, the same as training's (SPEC §6); outputs are saved per
  rank as `step_{N}_all_preds.{rank}` beside the checkpoint. The run's evaluators run too (by default
  the ARC evaluator, left out with a notice where the dataset is not ARC): ARC/pass@K by the ARC
  Prize's rule and a submission.json in `evaluator_ARC_step_{N}/`.
- Nothing is lost to a bad request or an unwritable folder: `save_outputs` names are checked against the
  model's outputs, and the folder the outputs go to is checked writable (exit 4), before the model runs;
  the metrics are printed before any file is written.
"""

import json
import math
import os
import sys
from typing import Any, Literal, Optional

import hydra
import torch
import torch.distributed as dist
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from utils import checkpointing as ckpt
from utils.build import create_dataloader, create_evaluators, create_model, print_backends, use_compile
from utils.cli import bad_input_exits, run_hydra_entry
from utils.config import EvaluatorConfig, PretrainConfig, config_from_dict, format_validation_error, test_data_paths
from utils.distributed import DistInfo, distributed_context
from utils.evaluation import check_eval_requests, evaluate, flatten_eval_metrics, probe_eval_call
from utils.train_state import TrainState, read_checkpoint

DEFAULT_SAVE_OUTPUTS = ["inputs", "labels", "puzzle_identifiers", "logits", "q_halt_logits", "q_continue_logits"]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    save_outputs: Optional[list[str]] = None  # None: those of DEFAULT_SAVE_OUTPUTS the model returns
    data_path: Optional[str] = None  # None: the data_path recorded in all_config.yaml
    device: str = "auto"
    compile: Optional[bool] = False  # compiling costs more than it saves for a single evaluation pass
    dist_timeout_s: float = 600.0  # process-group timeout under torchrun (README "Reliability")
    eval_halting: Optional[Literal["fixed", "learned"]] = None  # None: the run's own setting
    arch: dict[str, Any] = {}  # overrides of the run's model config, e.g. halt_max_steps=64
    step_accuracy: bool = False  # also report accuracy after each ACT step
    puzzle_identifiers: Literal["as_is", "blank", "shuffled"] = "as_is"  # what the model is fed
    evaluators: Optional[list[dict[str, Any]]] = None  # None: the run's, else the ARC evaluator; [] for none

    @model_validator(mode="after")
    def _check_values(self) -> "EvalConfig":
        if not 0.0 < self.dist_timeout_s < math.inf:
            raise ValueError(f"config key 'dist_timeout_s': must be a finite number > 0, got {self.dist_timeout_s}")
        return self


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
        "eval_save_outputs": list(DEFAULT_SAVE_OUTPUTS if eval_cfg.save_outputs is None else eval_cfg.save_outputs),
        "checkpoint_path": os.path.dirname(os.path.abspath(eval_cfg.checkpoint)),
        "device": eval_cfg.device,
        "compile": eval_cfg.compile,
        "resume": None,
    }
    if eval_cfg.data_path is not None:  # the dataset moved: evaluate it there
        update.update(data_path=eval_cfg.data_path, data_paths=[], data_paths_test=[])
    if eval_cfg.eval_halting is not None:
        update["eval_halting"] = eval_cfg.eval_halting
    if eval_cfg.arch:  # nested keys (arch.loss.loss_type) merge into the run's, and the result is validated again
        arch = OmegaConf.to_container(OmegaConf.merge(config.arch.model_dump(), eval_cfg.arch))
        update["arch"] = config_from_dict({**config.model_dump(), "arch": arch}).arch
    if eval_cfg.evaluators is not None:
        update["evaluators"] = [EvaluatorConfig(**spec) for spec in eval_cfg.evaluators]
    elif not config.evaluators:  # a run without evaluators (the reference's config): ARC where it applies
        update["evaluators"] = [EvaluatorConfig(name="arc@ARC")]
    return config.model_copy(update=update)


def step_accuracy(state: TrainState, loader, info: DistInfo) -> dict[str, Any]:
    """Token and exact accuracy after each ACT step over the test split, summed over ranks."""
    from utils.visualize import act_step_accuracy

    local = act_step_accuracy(state.model, loader, device=info.device)
    sums = torch.tensor(
        [local["count"], *(a * local["count"] for a in local["accuracy"] + local["exact_accuracy"])],
        dtype=torch.float64,
        device=info.device,
    )
    if info.world_size > 1:  # every rank runs the same number of steps (eval halts at halt_max_steps)
        dist.all_reduce(sums)
    count, values = sums[0].item(), sums[1:].tolist()
    steps = len(local["steps"])
    return {
        "steps": local["steps"],
        "accuracy": [v / count for v in values[:steps]],
        "exact_accuracy": [v / count for v in values[steps:]],
        "count": int(count),
    }


def print_metrics(results: dict[str, dict[str, float]]) -> None:
    for key, value in flatten_eval_metrics(results).items():
        print(f"{key}: {value:.6g}", flush=True)


def evaluate_checkpoint(eval_cfg: EvalConfig, info: DistInfo) -> Optional[dict[str, Any]]:
    """Rebuild loaders and model from the run's config, load the weights, evaluate; results on rank 0."""
    weights, step, saved_config = read_checkpoint(eval_cfg.checkpoint)
    config = build_config(eval_cfg, saved_config)
    torch.manual_seed(config.seed + info.rank)
    print_backends(info)

    train_dataset, _ = create_dataloader(config, "train", info, test_set_mode=False, epochs=1)
    eval_dataset, eval_loader = create_dataloader(config, "test", info, test_set_mode=True, epochs=1)
    evaluators = create_evaluators(config, eval_dataset.metadata, info)
    # What is written is known once the evaluators are (ARC is left out on other data): check before the model.
    if config.eval_save_outputs or eval_cfg.step_accuracy or evaluators:
        ckpt.writable_folder(config.checkpoint_path or ".", "evaluation outputs")
    head, _ = create_model(config, train_dataset.metadata, info)
    ckpt.load_model_weights(head, weights, eval_cfg.checkpoint)
    if eval_cfg.save_outputs is None:  # the defaults this model has (the three-level model: no q_continue_logits)
        _, outputs = probe_eval_call(head, eval_dataset.metadata, info.device)
        config = config.model_copy(update={"eval_save_outputs": [k for k in config.eval_save_outputs if k in outputs]})
    else:
        check_eval_requests(config, head, eval_dataset.metadata, evaluators, info.device, save_key="save_outputs")
    forward = torch.compile(head, dynamic=False) if use_compile(config, info.device) else head
    state = TrainState(model=head, forward=forward, optimizers=[], optimizer_lrs=[], total_steps=0, step=step)
    head.eval()

    if info.is_main:
        where = ", ".join(test_data_paths(config))
        print(f"evaluating {eval_cfg.checkpoint} (step {step}) on {where}", file=sys.stderr)
    results = evaluate(
        config,
        state,
        eval_loader,
        eval_dataset.metadata,
        info,
        evaluators,
        identifiers=eval_cfg.puzzle_identifiers,
        report=print_metrics,  # before any output file is written
    )
    per_step = step_accuracy(state, eval_loader, info) if eval_cfg.step_accuracy else None
    if not info.is_main or results is None:
        return None
    if per_step is not None:
        print("ACT step  token accuracy  exact accuracy")
        for s, tok, exact in zip(per_step["steps"], per_step["accuracy"], per_step["exact_accuracy"]):
            print(f"{s:8d}  {100 * tok:13.2f}%  {100 * exact:13.2f}%")
        path = os.path.join(config.checkpoint_path or ".", f"step_{step}_step_accuracy.json")
        ckpt.atomic_write(path, lambda f: json.dump(per_step, f), mode="w")
        print(f"per-step accuracy: {path}", file=sys.stderr)
    return {"metrics": results, "step_accuracy": per_step}


@hydra.main(config_path=None, config_name="cfg_eval", version_base=None)
def main(cfg: DictConfig) -> None:
    with bad_input_exits():
        eval_cfg = eval_config_from_hydra(cfg)
        with distributed_context(eval_cfg.device, eval_cfg.dist_timeout_s) as info:
            evaluate_checkpoint(eval_cfg, info)


if __name__ == "__main__":
    # Every key is listed in its registered schema; `arch.<key>=` overrides add to its empty `arch`.
    run_hydra_entry(main, EvalConfig.model_fields, open_sections=("arch",))
