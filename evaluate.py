"""Evaluate a checkpoint: `python evaluate.py checkpoint=PATH [save_outputs=[...]]` (also under torchrun;
installed: `hrm-evaluate`; `--help` lists every key).

Design choices:
- Same configuration system as pretrain.py: Hydra overrides on a schema registered in code (no
  extra YAML file), validated into the typed `EvalConfig`; bad input is one line on stderr, exit 2.
- The run's `all_config.yaml` beside the checkpoint rebuilds data loaders and model exactly as
  training did; `data_path=` points at the dataset when it has moved since training.
- Reads our `step_N` files, the reference's (keys with the `_orig_mod.` prefix of a compiled
  module) and our train-state files; the step comes from a `step_N` name, from `best.json` beside a
  `keep_best` checkpoint (`best`), from the train state, or is 0. A checkpoint that does not fit the
  configured model is a one-line error naming the key. A train state of an `ema` run is evaluated with its averaged parameters, as its `step_N` files are.
- Reads TRM's run folders as TRM writes them: its all_config.yaml (`data_paths`, `evaluators`, ...),
  its `_orig_mod.`-prefixed `step_N` files, its datasets (`total_puzzles` in dataset.json).
- `eval_halting=fixed|learned` overrides the run's setting (README "Research options").
- Inference-time compute: `arch.<key>=value` overrides the run's model config for this evaluation
  (e.g. `arch.halt_max_steps=64`: more ACT steps than in training); `step_accuracy=true` also reports
  token and exact accuracy after each ACT step (tools/visualize.py's `act_step_accuracy`), so one sees
  where more steps stop helping.
- `puzzle_identifiers=blank|shuffled` feeds the model every test example with the blank identifier, or
  with another puzzle's (a fixed random permutation of the identifiers), to measure how much the model
  leans on its puzzle embedding; scoring still uses the true identifiers.
- Evaluation itself is training/evaluation.py's, the same as training's; outputs are saved per
  rank as `step_{N}_all_preds.{rank}` in the output folder. The run's evaluators run too (by default
  the ARC evaluator, left out with a notice where the dataset is not ARC): ARC/pass@K by the ARC
  Prize's rule and a submission.json in `evaluator_ARC_step_{N}/`.
- `checkpoint=hf://owner/name[@revision][/path/in/repo]` evaluates a checkpoint on the Hugging Face hub
  (utils/hub.py: downloaded into, or read from, the hub cache). Evaluation needs only the dataset's test
  split: without `train/`, the model is built from the test split's metadata (same vocabulary, sequence
  length and identifier count). A puzzle embedding whose row count differs from the dataset's identifier
  count is a one-line error: the data was not built as the checkpoint's was.
- `output_dir=` receives the saved outputs, evaluator outputs, step accuracy and `eval_results.json`
  (metrics, checkpoint and revision, step, datasets, overrides, date). By default it is the checkpoint's
  folder for a local checkpoint, where the reference's workflow (its ARC notebook, `tools.visualize`,
  `evaluators.arc_scoring`) looks for `step_N_all_preds.*`, and `evaluations/<owner>--<name>[...]` under the
  current folder for a hub checkpoint, whose folder is the hub cache and never written to.
- `tta=sudoku|maze tta_views=N` adds test-time augmentation (training/tta.py): N symmetric views of each test
  puzzle, answers mapped back and voted, reported as `tta_exact_accuracy` and `tta_accuracy` per set.
- Nothing is lost to a bad request or an unwritable folder: `save_outputs` names are checked against the
  model's outputs, and the output folder is checked writable (exit 4), before the model runs; the metrics
  are printed before any file is written.
"""

import datetime
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.build import (
    PUZZLE_TABLE_KEY,
    create_dataloader,
    create_evaluators,
    create_model,
    print_backends,
    use_compile,
)
from training.config import (
    CONFIG_DIR,
    EvaluatorConfig,
    PretrainConfig,
    config_from_dict,
    format_validation_error,
    test_data_paths,
    train_data_paths,
)
from training.evaluation import check_eval_requests, evaluate, flatten_eval_metrics, probe_eval_outputs
from training.train_state import EvalState, read_checkpoint
from training.training_options import read_best_record
from training.tta import make_views, tta_accuracy
from utils import checkpointing as ckpt
from utils.cli import bad_input_exits, field_entries, format_help, run_hydra_entry
from utils.distributed import DistInfo, distributed_context
from utils.hub import parse_hub_checkpoint, resolve_hub_checkpoint

DEFAULT_SAVE_OUTPUTS = ["inputs", "labels", "puzzle_identifiers", "logits", "q_halt_logits", "q_continue_logits"]
HUB_OUTPUT_ROOT = "evaluations"  # hub checkpoints' default output folders, under the current folder
RESULTS_FILE = "eval_results.json"


class EvalConfig(BaseModel):
    """The keys of `evaluate.py`; their descriptions are what `--help` shows."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(
        description="a step_N weights file or a train state, with the run's all_config.yaml beside it, or "
        "hf://owner/name[@revision][/path/in/repo] on the Hugging Face hub"
    )
    output_dir: Optional[str] = Field(
        None,
        description="where outputs and eval_results.json go; null: the checkpoint's folder (hub: evaluations/<repo>)",
    )
    save_outputs: Optional[list[str]] = Field(
        None,
        description="outputs saved as step_N_all_preds.{rank}; null: those of "
        f"[{', '.join(DEFAULT_SAVE_OUTPUTS)}] the model returns",
    )
    data_path: Optional[str] = Field(None, description="the dataset, where it moved since training; null: the run's")
    device: str = Field("auto", description="auto (CUDA if available, else CPU), cuda, mps or cpu")
    # Compiling costs more than it saves for a single evaluation pass.
    compile: Optional[bool] = Field(False, description="torch.compile the model (null: on for CUDA)")
    dist_timeout_s: float = Field(600.0, description="process-group timeout under torchrun")
    eval_halting: Optional[Literal["fixed", "learned"]] = Field(
        None, description="fixed (every sequence runs halt_max_steps) or learned (q_halt > q_continue); null: the run's"
    )
    arch: dict[str, Any] = Field(
        {}, description="arch.KEY=value overrides the run's model config, e.g. arch.halt_max_steps=64"
    )
    step_accuracy: bool = Field(False, description="also report token and exact accuracy after each ACT step")
    puzzle_identifiers: Literal["as_is", "blank", "shuffled"] = Field(
        "as_is", description="what the model is fed: the true identifiers, the blank one, or another puzzle's"
    )
    evaluators: Optional[list[dict[str, Any]]] = Field(
        None, description="evaluators run on the outputs; null: the run's, else the ARC evaluator; [] for none"
    )
    tta: Optional[Literal["sudoku", "maze"]] = Field(
        None, description="test-time augmentation of Sudoku or Maze puzzles: views answered, mapped back and voted"
    )
    tta_views: int = Field(8, description="views per puzzle with tta, the puzzle itself included")

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
        "checkpoint_path": eval_cfg.output_dir or os.path.dirname(os.path.abspath(eval_cfg.checkpoint)),
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


def step_accuracy(state: EvalState, loader, info: DistInfo) -> dict[str, Any]:
    """Token and exact accuracy after each ACT step over the test split, summed over ranks."""
    from tools.visualize import act_step_accuracy

    local = act_step_accuracy(state.model, loader, device=info.device)
    sums = torch.tensor(
        [local["count"], *(a * local["count"] for a in local["accuracy"] + local["exact_accuracy"])],
        dtype=torch.float64,  # on the host: Apple GPUs (MPS) have no float64
    )
    if info.world_size > 1:  # every rank runs the same number of steps (eval halts at halt_max_steps)
        sums = sums.to(info.device)
        dist.all_reduce(sums)
    count, values = sums[0].item(), sums[1:].tolist()
    steps = len(local["steps"])
    return {
        "steps": local["steps"],
        "accuracy": [v / count for v in values[:steps]],
        "exact_accuracy": [v / count for v in values[steps:]],
        "count": int(count),
    }


def resolve_checkpoint(eval_cfg: EvalConfig) -> tuple[EvalConfig, dict[str, Any]]:
    """A hub checkpoint fetched (or found in the hub cache) and named by its file there, its output folder under
    the current folder unless given; also what eval_results.json records of the checkpoint."""
    hub = parse_hub_checkpoint(eval_cfg.checkpoint)
    if hub is None:
        return eval_cfg, {"checkpoint": eval_cfg.checkpoint}
    resolved = resolve_hub_checkpoint(hub)
    output_dir = eval_cfg.output_dir or os.path.join(HUB_OUTPUT_ROOT, hub.folder_name())
    record = {"checkpoint": str(hub), "repo_id": hub.repo_id, "revision": resolved.commit, "file": resolved.file}
    return eval_cfg.model_copy(update={"checkpoint": resolved.file, "output_dir": output_dir}), record


def checkpoint_step(checkpoint: str, step: int) -> int:
    """The step of the weights: `read_checkpoint`'s, except for a `keep_best` checkpoint (`best`, whose name has
    no step), whose step is recorded in best.json beside it."""
    if os.path.basename(checkpoint) != "best":
        return step
    record = read_best_record(os.path.dirname(os.path.abspath(checkpoint)))
    return step if record is None else record["step"]


def model_metadata(config: PretrainConfig, info: DistInfo, eval_dataset) -> Any:
    """What the model is built from: the train split's metadata, as in training, or the test split's where the
    datasets have no train/ (a released checkpoint evaluated on the test data alone)."""
    if all(os.path.isdir(os.path.join(path, "train")) for path in train_data_paths(config)):
        return create_dataloader(config, "train", info, test_set_mode=False, epochs=1)[0].metadata
    return eval_dataset.metadata


def check_puzzle_rows(weights: dict[str, torch.Tensor], head: torch.nn.Module, checkpoint: str, config) -> None:
    """Puzzle-embedding rows are indexed by identifier: a table of another length means other data."""
    table, expected = weights.get(PUZZLE_TABLE_KEY), head.state_dict().get(PUZZLE_TABLE_KEY)
    if table is not None and expected is not None and table.shape[0] != expected.shape[0]:
        data = ", ".join(test_data_paths(config))
        raise ValueError(
            f"checkpoint {checkpoint}: its puzzle embedding has {table.shape[0]} rows, but {data} has "
            f"{expected.shape[0]} puzzle identifiers (num_puzzle_identifiers): the dataset was not built as the "
            "checkpoint's training data was (same builder, raw files, seed and augmentation count)"
        )


def write_eval_results(config: PretrainConfig, record: dict[str, Any], step: int, **results: Any) -> None:
    """`eval_results.json` in the output folder: the checkpoint, its step, the datasets, the date and `results`."""
    summary = {
        **record,
        "step": step,
        "data_paths": test_data_paths(config),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **results,
    }
    path = os.path.join(config.checkpoint_path or ".", RESULTS_FILE)
    ckpt.atomic_write(path, lambda f: json.dump(summary, f, indent=1), mode="w")
    print(f"results: {path}", file=sys.stderr)


def print_metrics(results: dict[str, dict[str, float]]) -> None:
    for key, value in flatten_eval_metrics(results).items():
        print(f"{key}: {value:.6g}", flush=True)


def evaluate_checkpoint(eval_cfg: EvalConfig, info: DistInfo) -> Optional[dict[str, Any]]:
    """Rebuild loaders and model from the run's config, load the weights, evaluate; results on rank 0."""
    overrides = {
        k: v for k, v in eval_cfg.model_dump().items() if k != "checkpoint" and v != EvalConfig.model_fields[k].default
    }
    if eval_cfg.tta:  # the views behind tta_* metrics, even at their default count
        overrides["tta_views"] = eval_cfg.tta_views
    eval_cfg, record = resolve_checkpoint(eval_cfg)
    weights, step, saved_config = read_checkpoint(eval_cfg.checkpoint)
    step = checkpoint_step(eval_cfg.checkpoint, step)
    config = build_config(eval_cfg, saved_config)
    torch.manual_seed(config.seed + info.rank)
    print_backends(info)

    eval_dataset, eval_loader = create_dataloader(config, "test", info, test_set_mode=True, epochs=1)
    views = make_views(eval_cfg.tta, eval_cfg.tta_views, eval_dataset.metadata, config.seed) if eval_cfg.tta else None
    evaluators = create_evaluators(config, eval_dataset.metadata, info)
    ckpt.writable_folder(config.checkpoint_path or ".", "evaluation outputs")  # eval_results.json at least
    head, _ = create_model(config, model_metadata(config, info, eval_dataset), info)
    check_puzzle_rows(weights, head, record["checkpoint"], config)
    ckpt.load_model_weights(head, weights, eval_cfg.checkpoint)
    if eval_cfg.save_outputs is None:  # the defaults this model has (the three-level model: no q_continue_logits)
        outputs = probe_eval_outputs(head, eval_dataset.metadata, info.device)
        config = config.model_copy(update={"eval_save_outputs": [k for k in config.eval_save_outputs if k in outputs]})
    else:
        check_eval_requests(config, head, eval_dataset.metadata, evaluators, info.device, save_key="save_outputs")
    forward = torch.compile(head, dynamic=False) if use_compile(config, info.device) else head
    state = EvalState(model=head, forward=forward, step=step)
    head.eval()

    if info.is_main:
        where = ", ".join(test_data_paths(config))
        print(f"evaluating {record['checkpoint']} (step {step}) on {where}", file=sys.stderr)
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
    voted = tta_accuracy(config, state, eval_loader, eval_dataset.metadata, info, views) if views else None
    if not info.is_main or results is None:
        return None
    if voted:
        print_metrics(voted)
    for set_name, metrics in (voted or {}).items():
        results.setdefault(set_name, {}).update(metrics)
    flat = flatten_eval_metrics(results)
    if per_step is not None:
        print("ACT step  token accuracy  exact accuracy")
        for s, tok, exact in zip(per_step["steps"], per_step["accuracy"], per_step["exact_accuracy"]):
            print(f"{s:8d}  {100 * tok:13.2f}%  {100 * exact:13.2f}%")
        path = os.path.join(config.checkpoint_path or ".", f"step_{step}_step_accuracy.json")
        ckpt.atomic_write(path, lambda f: json.dump(per_step, f), mode="w")
        print(f"per-step accuracy: {path}", file=sys.stderr)
    write_eval_results(config, record, step, overrides=overrides, metrics=flat, step_accuracy=per_step)
    return {"metrics": results, "step_accuracy": per_step}


# The library's config folder as the search path, as pretrain.py's: Hydra needs one when this module is imported
# (the console command `hrm-evaluate`) rather than run as a file. The schema is `cfg_eval`, registered above.
@hydra.main(config_path=CONFIG_DIR, config_name="cfg_eval", version_base=None)
def main(cfg: DictConfig) -> None:
    with bad_input_exits():
        eval_cfg = eval_config_from_hydra(cfg)
        with distributed_context(eval_cfg.device, eval_cfg.dist_timeout_s) as info:
            evaluate_checkpoint(eval_cfg, info)


def eval_help() -> str:
    summary = (
        "Evaluate a checkpoint of this library, HRM's or TRM's code (also under torchrun): the run's loaders and "
        "model are rebuilt from its all_config.yaml, and the metrics are printed per set."
    )
    return format_help("checkpoint=PATH [key=value ...]", summary, [("keys (key=default)", field_entries(EvalConfig))])


def command_line() -> None:
    """`python evaluate.py ...` and `hrm-evaluate ...`: `main` with one-line errors and `--help`."""
    # Every key is listed in its registered schema; `arch.<key>=` overrides add to its empty `arch`.
    run_hydra_entry(main, EvalConfig.model_fields, open_sections=("arch",), help_text=eval_help)


if __name__ == "__main__":
    command_line()
