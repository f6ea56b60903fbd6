"""Train an HRM or TRM model: `python pretrain.py [overrides]` or `torchrun --nproc-per-node N pretrain.py [overrides]`
(installed: `hrm-train [overrides]`; `--help` lists every key).

The reference's training script, in its shape: configuration, building loaders / model / optimizers, a
train loop that reads top to bottom, and the Hydra entry `launch`. The pieces it calls live in modules
named for what they hold (README "Layout"): `training/config.py` (the typed config), `training/build.py`
(loaders and model, shared with evaluate.py), `training/train_state.py` (TrainState, save / restore /
resume), `training/train_step.py` (one optimisation step and its options), `training/evaluation.py`
(evaluation, shared with evaluate.py), `training/training_options.py` (early stopping, keep-best),
`training/run_folder.py` (the run folder's owner and lock), `utils/interrupt.py` (SIGINT / SIGTERM) and
`utils/cli.py` (one-line errors for every command).

Design choices:
- The training algorithm is the reference's: two optimizers (SignSGD on the sparse puzzle
  embedding, AdamATan2 on everything else), warmup + cosine schedule recomputed every step, loss
  scaled by 1/global batch, gradients summed over ranks, an ACT carry that persists across batches,
  `eval_interval` epochs per loader iteration followed by evaluation and a checkpoint.
- Additions over the reference: CPU/GPU device choice, gloo for CPU multi-process runs, W&B optional
  and never prompting, metrics as JSON lines, and a resumable train state written around every
  evaluation (and on request, and on SIGINT / SIGTERM), so a stopped or killed run continues bit-exactly;
  one run owns its folder, one process at a time.
"""

import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NoReturn, Optional

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from training import run_folder
from training.build import (
    create_dataloader,
    create_evaluators,
    create_model,
    load_initial_weights,
    print_backends,
    use_compile,
)
from training.config import (
    CONFIG_DIR,
    PretrainConfig,
    config_from_dict,
    config_from_hydra,
    epochs_per_iter,
    listed_keys,
    pretrain_help,
    train_data_paths,
)
from training.ema import ModelEMA
from training.evaluation import check_eval_requests, eval_summary, evaluate, flatten_eval_metrics
from training.train_state import (
    TrainState,
    check_resume_compatible,
    dataset_fingerprint,
    load_resume_state_on_every_rank,
    names_from_resume,
    resolve_resume_path_on_every_rank,
    restore_train_state,
    save_train_state,
)
from training.train_step import (
    NonFiniteError,
    PendingStep,
    SparseEmbeddingGradAccumulator,
    cosine_schedule_with_warmup_lr_lambda,
    finish_train_step,
    launch_train_step,
    progress_postfix,
    train_batch,
    use_async_metrics,
)
from training.training_options import BestCheckpoint, EarlyStopping
from utils import checkpointing as ckpt
from utils import interrupt
from utils.cli import bad_input_exits, run_hydra_entry
from utils.distributed import DistInfo, broadcast_object, distributed_context
from utils.logging_utils import MetricLogger, create_logger

__all__ = [  # the reference's names, and what tests and benchmarks use from here
    "PretrainConfig",
    "config_from_dict",
    "config_from_hydra",
    "cosine_schedule_with_warmup_lr_lambda",
    "create_dataloader",
    "create_model",
    "create_optimizers",
    "evaluate",
    "init_train_state",
    "launch",
    "save_train_state",
    "train_batch",
]

# ------------------------------------------------------------------------------------------- config


def derive_names(
    config: PretrainConfig, model_class_name: str, slug: Callable[[], str] | None = None
) -> PretrainConfig:
    """Fill project/run name and checkpoint path the way the reference does, or TRM with `data_paths`
    (its project name joins with a dash); done on rank 0 only."""
    import coolname

    update: dict[str, Any] = {}
    project = config.project_name
    if project is None:
        dataset = os.path.basename(train_data_paths(config)[0].rstrip("/")).capitalize()
        project = f"{dataset}-ACT-torch" if config.data_paths else f"{dataset} ACT-torch"
        update["project_name"] = project
    run = config.run_name
    if run is None:
        run = f"{model_class_name} {(slug or (lambda: coolname.generate_slug(2)))()}"
        update["run_name"] = run
    if config.checkpoint_path is None:
        update["checkpoint_path"] = os.path.join("checkpoints", project, run)
    return config.model_copy(update=update)


def prepare_config(config: PretrainConfig, info: DistInfo) -> PretrainConfig:
    """Names on rank 0, then the same config on every rank."""
    if info.is_main:
        config = names_from_resume(config)
        config = derive_names(config, config.arch.name.split("@")[-1])
    return broadcast_object(config)


# ---------------------------------------------------------------------------- model and optimizers


def compute_total_steps(config: PretrainConfig, total_groups: int, mean_puzzle_examples: float) -> int:
    return int(config.epochs * total_groups * mean_puzzle_examples / config.global_batch_size)


def check_batches_per_iteration(config: PretrainConfig, dataset: Any) -> None:
    """A global batch that one training iteration cannot fill would train nothing (the loader drops the last,
    short batch; with several datasets each is walked on its own): refuse it before any work, naming the numbers."""
    epochs = epochs_per_iter(config)
    interval = f"eval_interval={epochs}" if config.eval_interval is not None else f"epochs={epochs}"
    for split_dir, metadata in zip(dataset.split_dirs, dataset.source_metadata):
        examples = epochs * metadata.total_groups * metadata.mean_puzzle_examples
        if examples < config.global_batch_size:
            where = f" of {split_dir.parent}" if len(dataset.split_dirs) > 1 else ""
            raise ValueError(
                f"config key 'global_batch_size': {config.global_batch_size} is more than one training iteration"
                f"{where} holds ({interval} epochs x {metadata.total_groups} groups x "
                f"{metadata.mean_puzzle_examples:g} examples = {examples:g} examples per iteration), so no step "
                f"would run; lower global_batch_size or raise {interval.split('=')[0]}"
            )


def check_test_identifiers(train_metadata: Any, test_metadata: Any) -> None:
    """Test puzzles index the puzzle-embedding table, which the training datasets size."""
    if test_metadata.num_puzzle_identifiers > train_metadata.num_puzzle_identifiers:
        raise ValueError(
            f"config key 'data_paths_test': the test datasets number {test_metadata.num_puzzle_identifiers} puzzle "
            f"identifiers, more than the {train_metadata.num_puzzle_identifiers} of the training datasets' embedding table"
        )


def create_optimizers(
    config: PretrainConfig,
    head: nn.Module,
    world_size: int,
    sparse_grads: Optional[SparseEmbeddingGradAccumulator] = None,
):
    """[SignSGD on the puzzle embedding (if any)], [AdamATan2 on the parameters], with their base lrs.

    With `sparse_grads` (gradient accumulation) SignSGD reads the accumulated rows and ids of the whole
    per-rank batch instead of the embedding's own micro-batch-sized buffers.
    """
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
    from utils.optimizers import AdamATan2

    optimizers: list[torch.optim.Optimizer] = []
    base_lrs: list[float] = []
    puzzle_emb = getattr(head.model, "puzzle_emb", None)
    if config.freeze_weights and puzzle_emb is None:
        raise ValueError(
            "config key 'freeze_weights': the model has no puzzle embedding (arch.puzzle_emb_ndim=0), so nothing would train"
        )
    if puzzle_emb is not None:
        optimizers.append(
            CastedSparseEmbeddingSignSGD_Distributed(
                puzzle_emb.buffers() if sparse_grads is None else sparse_grads.buffers(),
                world_size=world_size,
                lr=0,
                weight_decay=config.puzzle_emb_weight_decay,
            )
        )
        base_lrs.append(config.puzzle_emb_lr)
    if config.freeze_weights:  # TRM: only the puzzle embedding trains
        return optimizers, base_lrs
    hook = getattr(head.model, "optimizer_param_groups", None)
    params = hook() if callable(hook) else head.parameters()
    optimizers.append(AdamATan2(params, lr=0, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)))
    base_lrs.append(config.lr)
    return optimizers, base_lrs


def init_train_state(config: PretrainConfig, metadata: Any, info: DistInfo) -> tuple[TrainState, list[str]]:
    total_steps = compute_total_steps(config, metadata.total_groups, metadata.mean_puzzle_examples)
    head, sources = create_model(config, metadata, info)
    if config.load_checkpoint is not None:
        load_initial_weights(head, config.load_checkpoint, info)
    if config.freeze_weights:  # no weight gradients to compute; the puzzle embedding's still flow
        head.requires_grad_(False)
    puzzle_emb = getattr(head.model, "puzzle_emb", None)
    sparse_grads = None
    if config.grad_accum_steps > 1 and puzzle_emb is not None:
        sparse_grads = SparseEmbeddingGradAccumulator(puzzle_emb, config.global_batch_size // info.world_size)
    optimizers, base_lrs = create_optimizers(config, head, info.world_size, sparse_grads)
    compiled = use_compile(config, info.device)
    forward = torch.compile(head, dynamic=False, mode=config.compile_mode) if compiled else head
    ema = ModelEMA(head, config.ema_rate) if config.ema else None
    state = TrainState(head, forward, optimizers, base_lrs, total_steps, ema=ema, sparse_grads=sparse_grads)
    state.cuda_graphs = compiled and config.compile_mode in ("reduce-overhead", "max-autotune")
    return state, sources


# --------------------------------------------------------------------------------------------- loop


def averaged_weights(state: TrainState):
    """Context in which the model holds the EMA weights (when `ema` is on; otherwise changes nothing)."""
    return state.ema.swapped_in(state.model) if state.ema is not None else nullcontext()


def should_save_periodic(config: PretrainConfig, state: TrainState) -> bool:
    interval = config.checkpoint_interval_steps
    return interval is not None and state.step <= state.total_steps and state.step % interval == 0


def stop_on_nonfinite(config: PretrainConfig, state: TrainState, info: DistInfo) -> None:
    """Collective: save the train state (the bad update already dropped), then leave with NonFiniteError."""
    save_train_state(config, state, info)
    raise NonFiniteError(
        f"non-finite loss or gradients at step {state.step} (nonfinite=stop): update skipped, "
        f"train state saved in {config.checkpoint_path}"
    )


def stop_on_request(config: PretrainConfig, state: TrainState, info: DistInfo, saved: bool = False) -> NoReturn:
    """Collective: a rank asked to stop (SIGINT / SIGTERM) and every rank knows it at this point: save the train
    state (unless just `saved`), then leave with RunInterrupted (status 130 / 143, one line from rank 0)."""
    if not saved:
        save_train_state(config, state, info)
    signum = interrupt.requested()
    why = interrupt.signal_name(signum) if signum else "a stop requested on another rank"
    pending = " (its evaluation runs first on resume)" if state.pending_eval is not None else ""
    stop = interrupt.RunInterrupted(
        f"{why}: stopped at step {state.step}, train state saved in {config.checkpoint_path}{pending}; "
        "resume=auto continues the run",
        signum or signal.SIGTERM,
    )
    stop.quiet = not info.is_main
    raise stop


def start_or_resume(
    config: PretrainConfig, info: DistInfo, train_dataset: Any, eval_dataset: Any, evaluators: list
) -> tuple[TrainState, list[str], Optional[str]]:
    """The train state to start from: a fresh model, or the saved state of this run (found alike by every rank).

    Everything that can refuse the run does so before the run folder is written: the train state read and
    checked (a damaged newest one falls back to an older one with `resume=auto`), its compatibility with this
    config, the folder's owner (training/run_folder.py), the weights' keys and shapes. Then rank 0 claims the
    folder (`run_id.txt`; with `overwrite=true` the previous run's files go first). Returns (state, the
    model's source files, the train state resumed from or None)."""
    dataset = dataset_fingerprint(train_dataset.metadata)
    resume_path = resolve_resume_path_on_every_rank(config, info)
    payload = None
    if resume_path is not None:
        payload, resume_path = load_resume_state_on_every_rank(config, resume_path, info)
        check_resume_compatible(payload, resume_path, config, info, dataset)
    owner: Any = None
    if info.is_main:
        try:
            owner = run_folder.check_owner(config, resume_path, payload.get("run_id") if payload else None)
        except ValueError as e:
            owner = e
    run_id, clear = run_folder.same_outcome_on_every_rank(owner, info)

    state, sources = init_train_state(config, train_dataset.metadata, info)
    check_eval_requests(config, state.model, eval_dataset.metadata, evaluators, info.device)
    if payload is not None:
        restore_train_state(payload, resume_path, config, state, info)
        del payload
    state.run_id, state.dataset = run_id, dataset

    if info.is_main:  # nothing was written before this point
        removed = run_folder.claim(config.checkpoint_path, run_id, clear)
        if removed:
            print(f"overwrite=true: removed {len(removed)} files of the previous run from {config.checkpoint_path}")
        if resume_path is not None:
            print(f"resumed from {resume_path} at step {state.step}", file=sys.stderr)
        elif config.resume == "auto":
            print(f"resume=auto: no train state in {config.checkpoint_path}, starting fresh", file=sys.stderr)
    train_dataset.set_position(state.data_iters, state.data_batches)
    return state, sources, resume_path


def train(config: PretrainConfig, info: DistInfo, logger: MetricLogger | None = None) -> TrainState:
    """The whole run; `config` must already carry its names (see `prepare_config`).

    SIGINT / SIGTERM stop it at a step boundary with a train state saved (utils/interrupt.py); rank 0 holds
    the run folder's lock from the first check of the folder to the end (training/run_folder.py)."""
    assert config.checkpoint_path is not None
    with interrupt.stop_on_signals():
        torch.manual_seed(config.seed + info.rank)
        print_backends(info)

        # Data: `eval_interval` epochs per loader iteration, each followed by an evaluation.
        train_epochs = epochs_per_iter(config)
        train_dataset, train_loader = create_dataloader(config, "train", info, test_set_mode=False, epochs=train_epochs)
        eval_dataset, eval_loader = create_dataloader(config, "test", info, test_set_mode=True, epochs=1)
        check_batches_per_iteration(config, train_dataset)
        check_test_identifiers(train_dataset.metadata, eval_dataset.metadata)
        evaluators = create_evaluators(config, eval_dataset.metadata, info)

        with run_folder.locked(config.checkpoint_path, info):
            state, sources, resume_path = start_or_resume(config, info, train_dataset, eval_dataset, evaluators)
            loaders = (train_loader, eval_loader, eval_dataset.metadata)
            return train_loop(config, info, state, sources, loaders, evaluators, resume_path, logger)


def train_loop(
    config: PretrainConfig,
    info: DistInfo,
    state: TrainState,
    sources: list[str],
    loaders: tuple[Any, Any, Any],
    evaluators: list,
    resume_path: Optional[str],
    logger: MetricLogger | None = None,
) -> TrainState:
    """Train from `state` to the end: each iteration, then its evaluation and checkpoints."""
    assert config.checkpoint_path is not None
    train_loader, eval_loader, eval_metadata = loaders
    train_epochs = epochs_per_iter(config)
    total_iters = config.epochs // train_epochs

    # Run folder and logging (rank 0).
    num_params = sum(p.numel() for p in state.model.parameters())
    if info.is_main:
        ckpt.save_code_and_config(config.checkpoint_path, config.model_dump(), sources)
        print(f"{config.run_name}: {num_params:,} parameters, {state.total_steps} steps", file=sys.stderr)
    if logger is None:
        # A resumed run drops the records logged after its train state; one started afresh by resume=auto in its
        # folder (no train state yet) drops them all.
        resume_step = state.step if resume_path is not None else (-1 if config.resume == "auto" else None)
        logger = create_logger(
            is_main=info.is_main,
            use_wandb=config.use_wandb,
            project=config.project_name or "",
            run_name=config.run_name or "",
            config=config.model_dump(),
            jsonl_path=os.path.join(config.checkpoint_path, "metrics.jsonl"),
            resume_step=resume_step,
            tensorboard_dir=config.checkpoint_path if config.use_tensorboard else None,
        )
    if state.step == 0:
        logger.log({"num_params": num_params}, step=0)

    early_stop = None
    if config.early_stop_train_accuracy is not None:
        early_stop = EarlyStopping(config.early_stop_train_accuracy, config.early_stop_window)
    best = BestCheckpoint(config.keep_best, config.checkpoint_path) if config.keep_best is not None else None

    progress = tqdm(total=state.total_steps, initial=min(state.step, state.total_steps), disable=not info.is_main)
    # With async metrics, step N's metrics are read (and logged) after step N + 1 has been issued, so the
    # host never waits for the device between steps; every save and evaluation reads them first.
    async_metrics = use_async_metrics(config, info)
    pending: PendingStep | None = None

    def finish_pending() -> dict[str, float] | None:
        nonlocal pending
        if pending is None:
            return None
        done, pending = pending, None
        metrics = finish_train_step(config, state, done, info)
        if metrics is not None:
            logger.log(metrics, step=done.step)
            progress.set_postfix_str(progress_postfix(metrics), refresh=False)
            progress.update(done.step - progress.n)
        return metrics

    def evaluate_and_save(iter_id: int, stopped_early: bool) -> None:
        """The evaluation after iteration `iter_id`, its weights files, then a train state. A train state was
        saved just before it, marked with the pending evaluation: a failure or a stop during the evaluation
        loses no training, and a resume from that state runs the evaluation first."""
        state.model.eval()
        with averaged_weights(state):  # with `ema`, evaluation and the step_N / best files use the average
            results = evaluate(config, state, eval_loader, eval_metadata, info, evaluators)
            if results is not None:
                logger.log(flatten_eval_metrics(results), step=state.step)
                tqdm.write(eval_summary(results, state.step))  # stdout, as evaluate.py's metrics
            if info.is_main and (config.checkpoint_every_eval or iter_id == total_iters - 1 or stopped_early):
                ckpt.save_weights(state.model, config.checkpoint_path, state.step)
            if best is not None:
                best.update(results, state, info)
        state.pending_eval = None
        save_train_state(config, state, info)  # always: a later kill resumes from here at worst

    def report_early_stop() -> None:
        if info.is_main:
            print(
                f"early stop at step {state.step}: mean train/exact_accuracy of the last "
                f"{config.early_stop_window} steps >= {config.early_stop_train_accuracy}; evaluated and "
                f"saved {ckpt.weights_path(config.checkpoint_path, state.step)} and the train state",
                file=sys.stderr,
            )

    try:
        if state.pending_eval is not None:  # resumed from the train state saved just before an evaluation
            early = bool(state.pending_eval.get("early_stop"))
            evaluate_and_save(int(state.pending_eval["iter_id"]), early)
            if early:
                report_early_stop()
                return state
            if interrupt.agreed_on_every_rank(info.device, info.world_size):
                stop_on_request(config, state, info, saved=True)
        for iter_id in range(state.data_iters, total_iters):
            # ---- train one iteration
            if info.is_main:
                tqdm.write(f"epoch {iter_id * train_epochs}", file=sys.stderr)  # not glued to the bar
            state.model.train()
            stopped_early = False
            for _set_name, batch, global_batch_size in train_loader:
                launched = launch_train_step(config, state, batch, global_batch_size, info)
                state.data_batches += 1
                metrics = finish_pending()  # the previous step's, when async
                pending = launched
                at_stop = config.stop_at_step is not None and state.step >= config.stop_at_step
                save_now = should_save_periodic(config, state)
                if not async_metrics or at_stop or save_now or state.stop_agreed:
                    metrics = finish_pending()
                if state.nonfinite_stop:
                    stop_on_nonfinite(config, state, info)
                if save_now:
                    save_train_state(config, state, info)
                if at_stop:
                    save_train_state(config, state, info)
                    if info.is_main:
                        print(f"stopped at step {state.step} (stop_at_step)", file=sys.stderr)
                    return state
                if state.stop_agreed:  # every rank learnt it from the same step's results
                    finish_pending()
                    stop_on_request(config, state, info, saved=save_now)
                if early_stop is not None and early_stop.update(metrics, info):
                    stopped_early = True  # the data position stays mid-iteration, so a resume continues exactly
                    break
            finish_pending()
            if not stopped_early:
                state.data_iters += 1
                state.data_batches = 0

            # ---- evaluate, checkpoint (TRM's min_eval_interval: not before that iteration)
            if iter_id >= (config.min_eval_interval or 0) or stopped_early:
                state.pending_eval = {"iter_id": iter_id, "early_stop": stopped_early}
                save_train_state(config, state, info)
                if interrupt.agreed_on_every_rank(info.device, info.world_size):
                    stop_on_request(config, state, info, saved=True)
                evaluate_and_save(iter_id, stopped_early)
            else:
                save_train_state(config, state, info)
            if stopped_early:
                report_early_stop()
                return state
            if interrupt.agreed_on_every_rank(info.device, info.world_size):
                stop_on_request(config, state, info, saved=True)
    finally:
        progress.close()
        logger.close()
    return state


def run(config: PretrainConfig) -> TrainState:
    with distributed_context(config.device, config.dist_timeout_s) as info:
        return train(prepare_config(config, info), info)


# ------------------------------------------------------------------------------------------ command


@hydra.main(config_path=CONFIG_DIR, config_name="cfg_pretrain", version_base=None)
def launch(cfg: DictConfig) -> None:
    # Errors are handled inside the task: Hydra would log a second line for an exception leaving it.
    with bad_input_exits():
        run(config_from_hydra(cfg))


def main() -> None:
    """The command line: `launch` with one-line errors, `+key=` and `key=` both accepted (utils/cli.py)."""
    listed = listed_keys(os.path.join(CONFIG_DIR, "cfg_pretrain.yaml"))
    run_hydra_entry(launch, listed, PretrainConfig.model_fields, help_text=pretrain_help)


if __name__ == "__main__":
    main()
