"""Evaluation: every test batch run to the end of its ACT steps, per-set metrics, saved outputs.

Used by both launchers: pretrain.py after each training iteration and evaluate.py on a checkpoint.

Design choices:
- Each test batch starts from a fresh carry and calls the loss head until every row halted. An ACT
  model in eval mode halts only at `halt_max_steps`, so the calls before that one are issued without
  asking the host whether all rows halted, and the device never idles.
- `eval_halting: learned` (a research option) leaves the model untouched: the outputs of each row are
  frozen at its first step with q_halt > q_continue, and the loss head then computes its usual
  metrics on the frozen outputs through a `ReplayModel`, so the metric definitions stay in one place.
- Metrics are summed per set in sorted-key order, reduced to rank 0 and divided by `count`;
  requested outputs are concatenated and saved per rank as `step_{N}_all_preds.{rank}`
  (utils/saved_outputs.py), after the metrics are known (and handed to `report`), so a failed write
  never loses them.
- What an evaluation can save and report is known before any work: the metrics from the loss head's
  `metric_names` (and the evaluators' `result_names`), the outputs by running the loss head once on a blank
  example (`probe_eval_outputs`: the model's outputs are what it returns, declared nowhere else). A misspelled
  output name or `keep_best` metric is one error line listing the valid ones, before the first step rather
  than after the first evaluation.
- Evaluators (TRM's protocol: `required_outputs`, `begin_eval()`, `update_batch(batch, outputs)`,
  `result(save_path, rank, world_size, group)`) see the batches of their own test dataset, with its
  puzzle identifiers as its identifiers.json numbers them; their results are reported as the set
  named by the metric's prefix (`ARC/pass@2`; `ARC1/...` for a second test dataset's evaluator).
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.config import PretrainConfig
from training.train_state import EvalState, TrainState
from utils import checkpointing as ckpt
from utils.distributed import DistInfo
from utils.saved_outputs import write_saved_outputs


def eval_batch(
    config: PretrainConfig,
    state: EvalState | TrainState,
    batch: dict[str, torch.Tensor],
    info: DistInfo,
    return_keys: Sequence[str] | None = None,
):
    """One test batch from a fresh carry, the head called until every row halted: (batch, metrics, outputs).

    `return_keys`: the outputs to return (default: `eval_save_outputs`). Asking whether all rows halted
    is a host synchronisation. An ACT model in eval mode halts only at `halt_max_steps`, so the calls
    before that one are issued without asking and the device never idles.
    """
    return_keys = list(config.eval_save_outputs if return_keys is None else return_keys)
    if config.eval_halting == "learned":
        return eval_batch_learned_halting(config, state, batch, info, return_keys)
    model_config = getattr(state.model.model, "config", None)
    calls_before_check = 0 if state.model.training else max(0, getattr(model_config, "halt_max_steps", 1) - 1)
    with torch.inference_mode():
        batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
        with torch.device(info.device):
            carry = state.model.initial_carry(batch)
        calls = 0
        while True:
            carry, _, metrics, preds, all_halted = state.call(carry, batch, return_keys)
            calls += 1
            if calls > calls_before_check and all_halted:
                return batch, metrics, preds


class ReplayModel(nn.Module):
    """Stands in for the model inside a loss head: returns a recorded `(carry, outputs)` pair, so the head
    computes its metrics (and the outputs to save) for predictions recorded earlier."""

    def __init__(self, carry: Any, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.recorded = (carry, outputs)

    def forward(self, **_):
        return self.recorded


def eval_batch_learned_halting(
    config: PretrainConfig,
    state: EvalState | TrainState,
    batch: dict[str, torch.Tensor],
    info: DistInfo,
    return_keys: Sequence[str] | None = None,
):
    """`eval_halting: learned`: each row stops at its first step with q_halt > q_continue (q_halt > 0 for TRM
    with `no_ACT_continue`, its training rule), or at the model's own halt; like `eval_batch`, returns (batch,
    metrics, outputs), all taken at each row's stopping step.

    An ACT model in eval mode keeps every row running to halt_max_steps (lockstep batches), so the model
    is left as it is: after each step the outputs of rows stopping now are frozen, and their step is
    recorded. Then the loss head computes its usual metrics on the frozen outputs through a `ReplayModel`
    (steps = each row's stopping step, every row halted), so metric definitions stay in one place. The
    batch ends as soon as every row has stopped, saving the remaining steps.
    """
    from utils.functions import load_model_class

    return_keys = list(config.eval_save_outputs if return_keys is None else return_keys)
    keys = sorted(set(return_keys) | {"logits", "q_halt_logits", "q_continue_logits"})
    halt_alone = bool(getattr(getattr(state.model.model, "config", None), "no_ACT_continue", False))
    with torch.inference_mode():
        batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
        with torch.device(info.device):
            carry = state.model.initial_carry(batch)
        frozen: dict[str, torch.Tensor] = {}
        while True:
            carry, _, metrics, outputs, all_halted = state.call(carry, batch, keys)
            stop = carry.halted
            if halt_alone:  # TRM's no_ACT_continue: its training halts on q_halt > 0 (q_continue is untrained)
                stop = stop | (outputs["q_halt_logits"] > 0)
            elif "q_continue_logits" in outputs:
                stop = stop | (outputs["q_halt_logits"] > outputs["q_continue_logits"])
            if not frozen:  # first step: every row's outputs, replaced below for rows stopping later
                frozen, stop_steps, stopped = dict(outputs), carry.steps.clone(), stop
            else:
                new = stop & ~stopped
                for k, v in outputs.items():
                    frozen[k] = torch.where(new.view((-1,) + (1,) * (v.ndim - 1)), v, frozen[k])
                stop_steps = torch.where(new, carry.steps, stop_steps)
                stopped = stopped | stop
            if all_halted or bool(stopped.all()):
                break
        if all_halted and bool((stop_steps == carry.steps).all()):
            # Nobody stopped early (e.g. a single-step model): the head's own results are the answer.
            return batch, metrics, {k: v for k, v in outputs.items() if k in return_keys}
        final_carry = dataclasses.replace(carry, steps=stop_steps, halted=torch.ones_like(carry.halted))
        head = load_model_class(config.arch.loss.name)(
            ReplayModel(final_carry, frozen), **(config.arch.loss.model_extra or {})
        )
        _, _, metrics, preds, _ = head(return_keys=return_keys)
    return batch, metrics, preds


def dataset_identifiers(batch: dict[str, torch.Tensor], offset: int, blank: int) -> dict[str, torch.Tensor]:
    """The batch with its puzzle identifiers as the dataset numbers them (undoing the loader's shift)."""
    if not offset:
        return batch
    ids = batch["puzzle_identifiers"]
    return {**batch, "puzzle_identifiers": torch.where(ids == blank, ids, ids - offset)}


def identifier_feed(mode: str, metadata: Any, seed: int):
    """What the model is fed as puzzle identifiers: `as_is` (None), `blank` (every row the blank id), or
    `shuffled` (a fixed random permutation of the non-blank ids, so each puzzle gets another one's row)."""
    if mode == "as_is":
        return None
    blank = metadata.blank_identifier_id
    if mode == "blank":
        return lambda ids: torch.full_like(ids, blank)
    if mode != "shuffled":
        raise ValueError(f"puzzle identifiers: expected as_is, blank or shuffled, got {mode!r}")
    others = torch.tensor([i for i in range(metadata.num_puzzle_identifiers) if i != blank], dtype=torch.long)
    table = torch.arange(metadata.num_puzzle_identifiers)
    table[others] = others[torch.randperm(others.numel(), generator=torch.Generator().manual_seed(seed))]
    return lambda ids: table.to(ids.device)[ids.long()].to(ids.dtype)


def probe_eval_outputs(head: nn.Module, metadata: Any, device: torch.device) -> set[str]:
    """The output names of one evaluation call of the loss head, for the configured model: the head run once in
    eval mode on one blank example, the RNG states and the head's mode kept, so nothing is hard-coded and nothing
    the run computes changes. Outputs: the batch's keys, the model's and what the head adds (`preds`)."""
    shape = (1, metadata.seq_len)
    batch = {  # the loader's keys and dtypes (puzzle_dataset.py)
        "inputs": torch.full(shape, metadata.pad_id, dtype=torch.int32, device=device),
        "labels": torch.zeros(shape, dtype=torch.int32, device=device),
        "puzzle_identifiers": torch.full((1,), metadata.blank_identifier_id, dtype=torch.int32, device=device),
    }
    seen: dict[str, dict] = {}

    def keep_outputs(_module, _args, result) -> None:  # the model's outputs dict, which the head extends in place
        seen["outputs"] = result[1]

    hook = head.model.register_forward_hook(keep_outputs)
    was_training = head.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            head.eval()
            head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
    finally:
        hook.remove()
        head.train(was_training)
    return set(batch) | set(seen["outputs"])


def evaluator_metric(key: str, index: int) -> tuple[str, str]:
    """(set, metric) under which an evaluator of test dataset `index` reports its result `key`: `ARC/pass@2` is
    ("ARC", "pass@2"), ("ARC1", "pass@2") for the second test dataset's; a key without a set goes to "evaluator"."""
    prefix, _, name = key.partition("/")
    return (f"{prefix}{index or ''}", name) if name else ("evaluator", key)


def check_eval_requests(
    config: PretrainConfig,
    head: nn.Module,
    metadata: Any,
    evaluators: Sequence[tuple[int, Any]],
    device: torch.device,
    save_key: str = "eval_save_outputs",
) -> None:
    """Before any work: each output `config.eval_save_outputs` names (`save_key` on the command line) is one the
    evaluation has, and `keep_best` names a metric it reports (the loss head's eval-mode `metric_names()` per test
    set, and the evaluators' declared `result_names()`); otherwise one ValueError line listing the valid names. A
    metric of a head or an evaluator that declares none is checked after the first evaluation instead."""
    if config.eval_save_outputs:
        output_names = probe_eval_outputs(head, metadata, device)
        unknown = [k for k in config.eval_save_outputs if k not in output_names]
        if unknown:
            raise ValueError(
                f"config key '{save_key}': {unknown[0]!r} is not an output of this evaluation "
                f"(have {', '.join(sorted(output_names))})"
            )
    if config.keep_best is None:
        return
    head_names = getattr(head, "metric_names", None)
    head_declared = callable(head_names)
    known = (
        {f"{s}/{m}" for s in metadata.sets for m in head_names(training=False) if m != "count"}
        if head_declared
        else set()
    )
    declared = head_declared and all(callable(getattr(ev, "result_names", None)) for _, ev in evaluators)
    for index, evaluator in evaluators if declared else ():
        known.update("/".join(evaluator_metric(key, index)) for key in evaluator.result_names())
    in_sets = config.keep_best.split("/")[0] in metadata.sets
    if config.keep_best not in known and (declared or (in_sets and head_declared)):
        raise ValueError(
            f"config key 'keep_best': {config.keep_best!r} is not an eval metric (have {', '.join(sorted(known))})"
        )


def evaluate(
    config: PretrainConfig,
    state: EvalState | TrainState,
    loader: DataLoader,
    metadata: Any,
    info: DistInfo,
    evaluators: Sequence[tuple[int, Any]] = (),
    identifiers: str = "as_is",
    report: Callable[[dict[str, dict[str, float]]], None] | None = None,
):
    """Run every test batch to the end of its ACT steps; per-set metrics (divided by count) on rank 0.

    `evaluators`: (test dataset index, evaluator) pairs, see the module docstring; their results join the
    per-set metrics on rank 0. `identifiers`: what the model is fed as puzzle identifiers
    (`identifier_feed`); saved outputs and evaluators keep the true ones. `report` (rank 0) gets the results
    before the saved outputs are written, so a failing write (a full disk) does not lose them.
    """
    feed = identifier_feed(identifiers, metadata, config.seed)
    set_ids = {name: i for i, name in enumerate(metadata.sets)}
    sources = getattr(getattr(loader, "dataset", None), "set_sources", None) or {n: (0, n, 0) for n in metadata.sets}
    save_keys = set(config.eval_save_outputs)
    return_keys = sorted(save_keys.union(*(ev.required_outputs for _, ev in evaluators)))
    for _, evaluator in evaluators:
        evaluator.begin_eval()
    saved: dict[str, list[torch.Tensor]] = {}
    metric_keys: list[str] = []
    metric_sums: torch.Tensor | None = None
    with torch.inference_mode():
        for set_name, batch, _global_size in tqdm(loader, desc="eval", disable=not info.is_main, leave=False):
            true_ids = batch["puzzle_identifiers"]
            if feed is not None:
                batch = {**batch, "puzzle_identifiers": feed(true_ids)}
            batch, metrics, preds = eval_batch(config, state, batch, info, return_keys)
            if feed is not None:
                batch = {**batch, "puzzle_identifiers": true_ids.to(info.device)}
            for collection in (batch, preds):
                for k, v in collection.items():
                    if k in save_keys:
                        saved.setdefault(k, []).append(v.cpu())
            index, _, offset = sources[set_name]
            for ev_index, evaluator in evaluators:
                if ev_index == index:
                    evaluator.update_batch(dataset_identifiers(batch, offset, metadata.blank_identifier_id), preds)
            if metric_sums is None:
                metric_keys = sorted(metrics)
                metric_sums = torch.zeros((len(set_ids), len(metric_keys)), dtype=torch.float32, device=info.device)
            metric_sums[set_ids[set_name]] += torch.stack([metrics[k].to(torch.float32) for k in metric_keys])

    results = None
    if metric_sums is not None:
        if info.world_size > 1:
            dist.reduce(metric_sums, dst=0)
        if info.is_main:
            sums = metric_sums.cpu().numpy()
            results = {}
            for set_name, set_id in set_ids.items():
                values = dict(zip(metric_keys, sums[set_id].tolist()))
                count = values.pop("count")
                results[set_name] = {k: v / max(count, 1) for k, v in values.items()}
        for index, evaluator in evaluators:  # collective: each gathers its predictions on rank 0
            save_path = None
            if config.checkpoint_path is not None:
                name = f"evaluator_{type(evaluator).__name__}_step_{state.step}"
                save_path = os.path.join(config.checkpoint_path, name)
                ckpt.writable_folder(save_path, "evaluator outputs")
            scores = evaluator.result(save_path, rank=info.rank, world_size=info.world_size, group=None)
            if results is not None and scores:
                for key, value in scores.items():
                    set_name, metric = evaluator_metric(key, index)
                    results.setdefault(set_name, {})[metric] = value
    if results is not None and report is not None:
        report(results)

    if saved:
        assert config.checkpoint_path is not None
        write_saved_outputs(config.checkpoint_path, state.step, info.rank, saved)
    return results


def flatten_eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{set_name}/{k}": v for set_name, metrics in results.items() for k, v in metrics.items()}


# What the console line after an evaluation shows of each set, in this order.
SUMMARY_METRICS = ("exact_accuracy", "accuracy", "lm_loss", "pass@1", "pass@2")


def eval_summary(results: dict[str, dict[str, float]], step: int) -> str:
    """One line of an evaluation's main metrics per set, e.g. `step 500 eval | all: exact_accuracy 0.882
    accuracy 0.945 lm_loss 0.213 | ARC: pass@1 0.31 pass@2 0.4`; a set with none of them (another
    evaluator's) shows all of its metrics."""
    parts = [f"step {step} eval"]
    for set_name, metrics in results.items():
        shown = [k for k in SUMMARY_METRICS if k in metrics] or list(metrics)
        parts.append(f"{set_name}: " + " ".join(f"{k} {metrics[k]:.4g}" for k in shown))
    return " | ".join(parts)
