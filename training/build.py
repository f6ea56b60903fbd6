"""A run's pieces built from its config: data loaders and the model (loss head around the ACT model).

Shared by both launchers: pretrain.py builds them to train, evaluate.py to evaluate a checkpoint with
exactly the loaders and model its run trained.

Design choices:
- The model is created on its device and then broadcast from rank 0, so every rank starts identical;
  `vocab_size`, `seq_len` and `num_puzzle_identifiers` come from the train split's metadata, the
  per-rank batch from `global_batch_size / world_size` (and `grad_accum_steps`).
- `torch.compile` is on for CUDA unless disabled (the reference's env `DISABLE_COMPILE` too), off on CPU
  and Apple GPUs (MPS).
- The forward dtype is the config's, except that bfloat16 becomes float32, with a notice, on a device
  without native bfloat16 (a GPU before Ampere, MPS before macOS 14): the one place that decides it.
- Loaders use one worker with prefetching and, on CUDA, pinned memory (as the reference loads); the worker's seed
  comes from a private generator, so building a loader never draws from the global RNG (a resumed
  run's ACT exploration noise would drift otherwise). The worker dies with its parent
  (`utils.distributed.exit_with_parent`), so a killed rank's sockets close at once.
- Several training datasets (TRM's `data_paths`) keep their puzzle identifiers apart: where their
  identifier ranges overlap (each built numbering from 1), each dataset's identifiers are shifted past
  the previous datasets' (`num_puzzle_identifiers` of each); where they are already disjoint (built with
  TRM's `--puzzle-identifiers-start`), they are used as they are, as TRM does, so its checkpoints index
  the same rows. A test dataset that is also a training dataset gets that dataset's shift.
- `load_checkpoint` (TRM's) reads initial weights on rank 0, from a `step_N` file of this library, TRM's
  or the reference's (with or without the `_orig_mod.` prefix), a train state, or one on the hub
  (`hf://owner/name[@revision][/path]`, utils/hub.py); a puzzle table of
  another shape becomes its mean row broadcast to the model's shape (TRM's rule); then every rank gets
  rank 0's weights.
- Evaluators (TRM's `evaluators`, `module@Class` under the `evaluators` package) are built once per
  test dataset, with TRM's constructor arguments; one that does not apply to a dataset (the ARC
  evaluator on Sudoku) says so in a notice and is left out.
- Options that go to a constructor (an evaluator's, the loss head's `arch.loss.*`) are checked against
  its signature and type annotations first (`checked_options`), so `pass_Ks: [two]` or a misspelled
  option is one error line before training, not a traceback at the first evaluation.
- A test split must be encoded as the train split that sizes the model (vocabulary, sequence length,
  pad / ignore / blank ids); one that is not is refused when its loader is built.
"""

import functools
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.config import PretrainConfig, test_data_paths, train_data_paths
from utils import checkpointing as ckpt
from utils.distributed import DistInfo, broadcast_module_state, exit_with_parent
from utils.interrupt import loader_exit_event

if TYPE_CHECKING:
    from evaluators.protocol import Evaluator

PUZZLE_TABLE_KEY = "model.inner.puzzle_emb.weights"


def identifier_ranges(path: str) -> tuple[int, int] | None:
    """(lowest, highest) non-blank puzzle identifier of a dataset over its train and test splits."""
    from pathlib import Path

    from dataset.common import load_metadata, load_npy, split_paths

    lo, hi = None, None
    for split in ("train", "test"):
        split_dir = Path(path) / split
        if not split_dir.is_dir():
            continue
        meta = load_metadata(split_dir)
        for set_name in meta.sets:
            ids = load_npy(split_paths(split_dir, set_name)["puzzle_identifiers"], mmap=False)
            ids = ids[ids != meta.blank_identifier_id]
            if ids.size:
                lo = int(ids.min()) if lo is None else min(lo, int(ids.min()))
                hi = int(ids.max()) if hi is None else max(hi, int(ids.max()))
    return None if lo is None else (lo, hi)


def identifier_offsets(paths: list[str]) -> list[int]:
    """Shift of each training dataset's identifiers (see the module docstring): none where they are disjoint."""
    if len(paths) == 1:
        return [0]
    from pathlib import Path

    from dataset.common import load_metadata

    ranges = sorted(r for r in map(identifier_ranges, paths) if r is not None)
    if all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])):
        return [0] * len(paths)
    sizes = [load_metadata(Path(p) / "train").num_puzzle_identifiers for p in paths]
    return [sum(sizes[:i]) for i in range(len(paths))]


def check_test_encoding(train_path: str, test_paths: list[str], split: str) -> None:
    """The model is sized by the train split (vocab_size, seq_len) and reads its padding ids: a test split encoded
    otherwise (`data_paths_test`, a test/ copied from another dataset) is refused before any step, naming both files.
    Without a train split (a released checkpoint evaluated on test data alone) the test split sizes the model."""
    from pathlib import Path

    from dataset.common import load_metadata
    from puzzle_dataset import ENCODING_FIELDS, check_fields_agree

    train_dir = Path(train_path) / "train"
    if not train_dir.is_dir():
        return
    reference = load_metadata(train_dir)
    for path in test_paths:
        split_dir = Path(path) / split
        why = "a test split must be encoded as the training split, which sizes the model"
        check_fields_agree(load_metadata(split_dir), split_dir, reference, train_dir, ENCODING_FIELDS, why)


def create_dataloader(config: PretrainConfig, split: str, info: DistInfo, *, test_set_mode: bool, epochs: int):
    """(dataset, loader) for one split; the dataset is returned too, for its metadata and `set_position`."""
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

    train_paths = train_data_paths(config)
    train_offsets = identifier_offsets(train_paths)
    if split == "train":
        paths, offsets = train_paths, train_offsets
        if any(train_offsets) and info.is_main:
            print(
                f"data_paths: puzzle identifiers overlap; shifted by {train_offsets} to keep them apart",
                file=sys.stderr,
            )
    else:
        paths = test_data_paths(config)
        by_path = {os.path.realpath(p): o for p, o in zip(train_paths, train_offsets)}
        offsets = [by_path.get(os.path.realpath(p), 0) for p in paths]
        check_test_encoding(train_paths[0], paths, split)
    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_paths=paths,
            identifier_offsets=offsets,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=epochs,
            rank=info.rank,
            num_replicas=info.world_size,
        ),
        split=split,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=1,
        prefetch_factor=8,
        pin_memory=info.device.type == "cuda",
        persistent_workers=True,
        generator=torch.Generator(),
        worker_init_fn=functools.partial(exit_with_parent, os.getpid(), loader_exit_event()),
    )
    return dataset, loader


def use_compile(config: PretrainConfig, device: torch.device) -> bool:
    if "DISABLE_COMPILE" in os.environ:
        return False
    return config.compile if config.compile is not None else device.type == "cuda"


def model_config_dict(config: PretrainConfig, metadata: Any, world_size: int) -> dict[str, Any]:
    if config.global_batch_size % world_size != 0:
        raise ValueError(
            f"config key 'global_batch_size': {config.global_batch_size} is not divisible by the world size {world_size}"
        )
    local_batch_size = config.global_batch_size // world_size
    if local_batch_size % config.grad_accum_steps != 0:
        raise ValueError(
            f"config key 'grad_accum_steps': the per-rank batch {local_batch_size} is not divisible by {config.grad_accum_steps}"
        )
    # The launcher's values win over same-named arch keys (an arch yaml may carry `causal` for other uses).
    return {
        **(config.arch.model_extra or {}),
        "batch_size": local_batch_size // config.grad_accum_steps,  # the model sees one micro-batch at a time
        "vocab_size": metadata.vocab_size,
        "seq_len": metadata.seq_len,
        "num_puzzle_identifiers": metadata.num_puzzle_identifiers,
        "causal": False,  # puzzles are read as a whole
    }


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA from Ampere on, MPS from macOS 14, any CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def fit_forward_dtype(model_cls: type, model_config: dict[str, Any], info: DistInfo) -> None:
    """A bfloat16 forward (set, or the model's default) on a device without native bfloat16 becomes float32,
    with a one-line notice; elsewhere the config is left as it is, so what a run computes does not change."""
    fields = getattr(getattr(model_cls, "config_cls", None), "model_fields", {})
    default = fields["forward_dtype"].default if "forward_dtype" in fields else None
    if model_config.get("forward_dtype", default) != "bfloat16" or bf16_supported(info.device):
        return
    model_config["forward_dtype"] = "float32"
    if info.is_main:
        name = f" ({torch.cuda.get_device_name(info.device)})" if info.device.type == "cuda" else ""
        print(f"notice: {info.device}{name} has no native bfloat16: the model runs in float32", file=sys.stderr)


def create_model(config: PretrainConfig, metadata: Any, info: DistInfo) -> tuple[nn.Module, list[str]]:
    """The loss head wrapping the model, identical on every rank; also returns the source files to archive."""
    from utils.functions import load_model_class

    model_cls = load_model_class(config.arch.name)
    loss_head_cls = load_model_class(config.arch.loss.name)
    loss_options = checked_options(
        loss_head_cls, config.arch.loss.model_extra or {}, "config key 'arch.loss'", given=("model",)
    )
    model_config = model_config_dict(config, metadata, info.world_size)
    fit_forward_dtype(model_cls, model_config, info)
    with torch.device(info.device):
        model = model_cls(model_config)
        head = loss_head_cls(model, **loss_options)
    broadcast_module_state(head)
    sources = [inspect.getsourcefile(model_cls) or "", inspect.getsourcefile(loss_head_cls) or ""]
    return head, sources


def load_initial_weights(head: nn.Module, path: str, info: DistInfo) -> None:
    """TRM's `load_checkpoint` (see the module docstring): rank 0 reads, every rank ends with its weights."""
    if info.is_main:
        from training.train_state import read_checkpoint
        from utils.hub import parse_hub_checkpoint, resolve_hub_checkpoint

        hub = parse_hub_checkpoint(path)
        weights, _, _ = read_checkpoint(resolve_hub_checkpoint(hub).file if hub else path)
        expected = head.state_dict()
        table = weights.get(PUZZLE_TABLE_KEY)
        if table is not None and PUZZLE_TABLE_KEY in expected and table.shape != expected[PUZZLE_TABLE_KEY].shape:
            shape = expected[PUZZLE_TABLE_KEY].shape
            print(
                f"load_checkpoint: puzzle embedding {list(table.shape)} -> {list(shape)}, every row set to its mean row",
                file=sys.stderr,
            )
            weights[PUZZLE_TABLE_KEY] = torch.mean(table, dim=0, keepdim=True).expand(shape).contiguous()
        ckpt.load_model_weights(head, weights, path)
        print(f"load_checkpoint: initial weights from {path}", file=sys.stderr)
    broadcast_module_state(head)


def create_evaluators(config: PretrainConfig, eval_metadata: Any, info: DistInfo) -> list[tuple[int, "Evaluator"]]:
    """(test dataset index, evaluator) for each configured evaluator and test dataset that it applies to."""
    from evaluators.protocol import EvaluatorNotApplicable
    from utils.functions import load_model_class

    evaluators = []
    for spec in config.evaluators:
        cls = load_model_class(spec.name, prefix="evaluators.")
        where = f"config key 'evaluators': {spec.name}"
        options = checked_options(cls, spec.model_extra or {}, where, given=("data_path", "eval_metadata"))
        for index, path in enumerate(test_data_paths(config)):
            try:
                evaluators.append((index, cls(data_path=path, eval_metadata=eval_metadata, **options)))
            except EvaluatorNotApplicable as e:
                if info.is_main:
                    print(f"evaluator {spec.name} left out for {path}: {e}", file=sys.stderr)
    return evaluators


def checked_options(target: Any, options: dict[str, Any], where: str, given: tuple[str, ...] = ()) -> dict[str, Any]:
    """`options` for the keyword parameters of `target` (a class: its constructor), checked against their type
    annotations before anything is built or trained: an unknown name, a missing one or a value of the wrong type
    (`pass_Ks: [two]`) is one ValueError line `{where}: option ...`. `given`: the parameters the launcher passes.
    Returns the options as validated (`"2"` for an int is 2)."""
    from pydantic import ConfigDict, ValidationError, create_model

    from utils.cli import validation_error_line

    params = {n: p for n, p in inspect.signature(target, eval_str=True).parameters.items() if n not in given}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    fields = {
        name: (Any if p.annotation is p.empty else p.annotation, ... if p.default is p.empty else p.default)
        for name, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    config = ConfigDict(extra="allow" if takes_any else "forbid", arbitrary_types_allowed=True, protected_namespaces=())
    schema = create_model(f"{getattr(target, '__name__', 'Target')}Options", __config__=config, **fields)
    try:
        validated = schema(**options)
    except ValidationError as e:

        def option(loc: tuple[str, ...]) -> str:
            return f"option {loc[0]!r}" + (f" (item {loc[1]})" if len(loc) > 1 else "")

        takes = f"unknown {{field}} (it takes {', '.join(fields) or 'none'})"
        raise ValueError(
            validation_error_line(e, option, prefix=f"{where}: ", unknown=takes, own=None, unknown_first=True)
        ) from None
    return {name: getattr(validated, name) for name in options}


def print_backends(info: DistInfo) -> None:
    import models.cutlass_ops as cutlass_ops
    import models.short_attention as short_attention
    import models.token_mix as token_mix
    from models.layers import ATTENTION_BACKEND
    from models.triton_common import describe_kernels
    from utils.optimizers import ADAM_ATAN2_BACKEND, ADAM_ATAN2_SKIP_BACKEND

    adam = ADAM_ATAN2_BACKEND
    if ADAM_ATAN2_SKIP_BACKEND != ADAM_ATAN2_BACKEND:
        adam += f" ({ADAM_ATAN2_SKIP_BACKEND} for steps with a skip flag)"
    kernels = describe_kernels()
    cuda_kernels = cutlass_ops.prepare()  # every rank loads it; the first one on a machine builds it
    if cuda_kernels:
        kernels += f"; {cuda_kernels}"
    if short_attention.TILES != short_attention.Tiles():  # HRM_SHORT_ATTENTION_TILES given: say what the run takes
        kernels += f" (short_attention tiles {short_attention.TILES.spec()})"
    for name, module in (("short_attention", short_attention), ("token_mix", token_mix)):
        if module.OP != module.OP_DEFAULT:  # HRM_SHORT_ATTENTION_OP / HRM_TOKEN_MIX_OP given
            kernels += f" ({name} as {module.OP})"
    if info.is_main:
        print(
            f"device {info.device} x{info.world_size}, attention {ATTENTION_BACKEND}, AdamATan2 {adam}, "
            f"kernels {kernels}",
            file=sys.stderr,
        )
