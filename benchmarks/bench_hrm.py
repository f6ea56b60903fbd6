"""Time HRM train steps and evaluation batches on synthetic data, through the launcher's own code.

    python benchmarks/bench_hrm.py [--shapes sudoku,maze,arc] [--steps 30] [--eval-batches 3]
    torchrun --nproc-per-node 2 benchmarks/bench_hrm.py --shapes sudoku   # multi-GPU, same global batch

Design choices:
- The steps timed are issued as the train loop issues them (`train_step.launch_train_step`, with the
  previous step's metrics read back after the next one is launched when `async_metrics` is on, else
  `train_step.train_batch`), and the eval batch is `evaluation.eval_batch`, built by
  `pretrain.init_train_state` from the composed Hydra config: what is measured is what trains.
- Inputs are random tokens (never zeros, which can run faster than real data), drawn afresh for a
  pool of batches that the timed steps rotate through.
- Times are end to end on the host clock between device synchronisations over many steps (so every
  launch gap and host synchronisation inside a step is counted), after warm-up steps that absorb
  `torch.compile`.
- Model FLOPs: one train step = the no-grad block applications of the first inner
  pass, the grad ones times 3 (forward + backward), and the whole target-Q pass; an eval batch =
  `halt_max_steps` inner passes. Matmuls count 2·m·n·k; attention counts QKᵀ and AV.
- `train_host_ms_per_step` is the host's time to issue the steps (before the final device
  synchronisation): close to `train_ms_per_step` when the host, not the GPU, sets the pace.
- Prints a table and one JSON line per shape (rank 0); `--json-out` appends the JSON lines to a file.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pretrain  # noqa: E402
from dataset.common import PuzzleDatasetMetadata  # noqa: E402
from training import build, evaluation, train_step  # noqa: E402
from utils.distributed import distributed_context  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    global_batch_size: int
    arch: str = "hrm_v1"
    overrides: tuple[str, ...] = ()  # Hydra overrides of the shape (TRM's README recipes)


TRM_SUDOKU = ("arch.L_layers=2", "arch.H_cycles=3", "arch.L_cycles=6")


SHAPES = {
    "sudoku": Shape("sudoku", seq_len=81, vocab_size=11, num_puzzle_identifiers=1, global_batch_size=768),
    "maze": Shape("maze", seq_len=900, vocab_size=6, num_puzzle_identifiers=1, global_batch_size=96),
    "arc": Shape("arc", seq_len=900, vocab_size=12, num_puzzle_identifiers=1000, global_batch_size=96),
    "hrm3": Shape(
        "hrm3", seq_len=81, vocab_size=11, num_puzzle_identifiers=1, global_batch_size=768, arch="hrm_3level"
    ),
    # TRM with its README's recipes: Sudoku attention and MLP (mlp_t, no positions), ARC (L_cycles 4).
    "trm": Shape("trm", 81, 11, 1, 768, arch="trm", overrides=TRM_SUDOKU),
    "trm_mlp": Shape(
        "trm_mlp", 81, 11, 1, 768, arch="trm", overrides=(*TRM_SUDOKU, "arch.mlp_t=True", "arch.pos_encodings=none")
    ),
    "trm_arc": Shape(
        "trm_arc", 900, 12, 1000, 96, arch="trm", overrides=("arch.L_layers=2", "arch.H_cycles=3", "arch.L_cycles=4")
    ),
}


def compose_config(shape: Shape, global_batch_size: int, extra: list[str]) -> pretrain.PretrainConfig:
    from training.config import compose_config as compose

    overrides = [
        f"arch={shape.arch}",
        f"global_batch_size={global_batch_size}",
        "use_wandb=false",
        "checkpoint_path=/tmp/hrm-bench",
        "project_name=bench",
        "run_name=bench",
        "evaluators=[]",
        *shape.overrides,
        *extra,
    ]
    return compose(overrides)


def block_flops(tokens: int, seq: int, batch: int, hidden: int, inter: int) -> float:
    """FLOPs of one transformer block application (projections + attention scores and mixing)."""
    matmul = 2 * tokens * hidden * (3 * hidden + hidden + 2 * inter) + 2 * tokens * inter * hidden
    attention = 2 * 2 * batch * seq * seq * hidden
    return float(matmul + attention)


def mlp_t_block_flops(batch: int, seq: int, hidden: int, inter: int, expansion: float) -> float:
    """FLOPs of one TRM mlp_t block: a SwiGLU over the positions of every channel, then the channel SwiGLU."""
    token_inter = -(round(expansion * seq * 2 / 3) // -256) * 256
    token_mix = 2 * batch * hidden * seq * 3 * token_inter  # gate/up (2m) and down (m), per (row, channel)
    channel = 2 * batch * seq * hidden * 3 * inter
    return float(token_mix + channel)


def trm_step_flops(model_cfg, local_batch: int, world_size: int) -> tuple[float, float]:
    """(train-step FLOPs, eval-batch FLOPs) of TRM: per ACT step H_cycles x (L_cycles + 1) L_level calls of
    L_layers blocks, the last cycle with gradient (x3); no target-Q pass with no_ACT_continue."""
    hidden = model_cfg.hidden_size
    inter = -(round(model_cfg.expansion * hidden * 2 / 3) // -256) * 256
    prefix = model_cfg.puzzle_prefix_len
    seq = model_cfg.seq_len + prefix
    batch = local_batch * world_size
    if model_cfg.mlp_t:
        per_block = mlp_t_block_flops(batch, seq, hidden, inter, model_cfg.expansion)
    else:
        per_block = block_flops(batch * seq, seq, batch, hidden, inter)
    per_pass = model_cfg.H_cycles * (model_cfg.L_cycles + 1) * model_cfg.L_layers
    with_grad = (model_cfg.L_cycles + 1) * model_cfg.L_layers
    target_pass = 0 if model_cfg.no_ACT_continue else per_pass
    train_blocks = (per_pass - with_grad) + 3 * with_grad + target_pass
    return train_blocks * per_block, model_cfg.halt_max_steps * per_pass * per_block


def step_flops(model, local_batch: int, world_size: int) -> tuple[float, float]:
    """(train-step FLOPs, eval-batch FLOPs) over the global batch, for HRM ACT-v1 as the module docstring counts
    them (TRM: its own count).

    A model without H/L cycles (the single-step three-level model) is counted as 2·params per token
    forward and 3× that for a train step, attention excluded: an approximation, marked so in the docs.
    """
    model_cfg = model.config
    if hasattr(model_cfg, "mlp_t"):
        return trm_step_flops(model_cfg, local_batch, world_size)
    if not hasattr(model_cfg, "H_cycles"):
        params = sum(p.numel() for p in model.parameters())
        prefix = model.puzzle_emb_len  # the three-level model's prefix rows
        tokens = local_batch * world_size * (model_cfg.seq_len + prefix)
        return 6.0 * params * tokens, 2.0 * params * tokens
    hidden = model_cfg.hidden_size
    inter = -(round(model_cfg.expansion * hidden * 2 / 3) // -256) * 256
    prefix = model_cfg.puzzle_prefix_len
    seq = model_cfg.seq_len + prefix
    batch = local_batch * world_size
    per_block = block_flops(batch * seq, seq, batch, hidden, inter)
    per_pass = model_cfg.H_cycles * model_cfg.L_cycles * model_cfg.L_layers + model_cfg.H_cycles * model_cfg.H_layers
    with_grad = model_cfg.L_layers + model_cfg.H_layers
    train_blocks = (per_pass - with_grad) + 3 * with_grad + per_pass  # no-grad + fwd/bwd + target-Q pass
    eval_blocks = model_cfg.halt_max_steps * per_pass
    return train_blocks * per_block, eval_blocks * per_block


def synthetic_batches(shape: Shape, local_batch: int, count: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        inputs = torch.randint(1, shape.vocab_size, (local_batch, shape.seq_len), generator=gen, dtype=torch.int32)
        labels = torch.randint(1, shape.vocab_size, (local_batch, shape.seq_len), generator=gen, dtype=torch.int32)
        ids = torch.randint(
            min(1, shape.num_puzzle_identifiers - 1), shape.num_puzzle_identifiers, (local_batch,), generator=gen
        ).to(torch.int32)
        batches.append({"inputs": inputs, "labels": labels, "puzzle_identifiers": ids})
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    return batches


def run_train_steps(config, state, batches, gbs, info, count: int, finish_last: bool = True):
    """`count` train steps issued like the train loop does (see the module doc). With async metrics the
    last step is read back here, or returned unread (`finish_last=False`) for the caller to finish."""
    async_metrics = train_step.use_async_metrics(config, info)
    pending = None
    for i in range(count):
        batch = batches[i % len(batches)]
        if not async_metrics:
            pretrain.train_batch(config, state, batch, gbs, info)
            continue
        launched = train_step.launch_train_step(config, state, batch, gbs, info)
        if pending is not None:
            train_step.finish_train_step(config, state, pending, info)
        pending = launched
    if pending is not None and finish_last:
        train_step.finish_train_step(config, state, pending, info)
        pending = None
    return pending


def profile_train_steps(config, state, batches, gbs, info, path: str) -> None:
    """Kernel time table of a few train steps (torch.profiler), written to `path` (plus a Chrome trace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_train_steps(config, state, batches, gbs, info, 3)
        synchronize(info.device)
    prof.export_chrome_trace(path.replace(".txt", ".json"))
    sort_by = "cuda_time_total" if info.device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90))


def report_host_syncs(config, state, batches, gbs, info) -> None:
    """Run 3 train steps with CUDA's sync debug mode on; print where each host synchronisation came from."""
    import traceback
    import warnings

    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames[-6:]))
        key = f"{message} @ {where}"
        seen[key] = seen.get(key, 0) + 1

    previous = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pending = run_train_steps(config, state, batches, gbs, info, 3, finish_last=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = previous
    if pending is not None:
        train_step.finish_train_step(config, state, pending, info)
    print(f"rank {info.rank}: {sum(seen.values())} host synchronisations in 3 train steps", flush=True)
    for key, count in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {count}x {key}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(shape: Shape, args, info) -> dict | None:
    gbs = args.global_batch_size or shape.global_batch_size
    config = compose_config(shape, gbs, args.override)
    metadata = PuzzleDatasetMetadata(
        pad_id=0,
        ignore_label_id=0,
        blank_identifier_id=0,
        vocab_size=shape.vocab_size,
        seq_len=shape.seq_len,
        num_puzzle_identifiers=shape.num_puzzle_identifiers,
        total_groups=1000,
        mean_puzzle_examples=1000.0,
        sets=["all"],
    )
    torch.manual_seed(config.seed + info.rank)
    state, _ = pretrain.init_train_state(config, metadata, info)
    state.total_steps = 10**9  # the schedule never ends inside the benchmark
    local_batch = gbs // info.world_size
    batches = synthetic_batches(shape, local_batch, 4, info.device, seed=1234 + info.rank)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    state.model.train()
    run_train_steps(config, state, batches, gbs, info, args.warmup)
    synchronize(info.device)
    start = time.perf_counter()
    pending = run_train_steps(config, state, batches, gbs, info, args.steps, finish_last=False)
    host_ms = (time.perf_counter() - start) * 1000 / args.steps
    synchronize(info.device)
    train_ms = (time.perf_counter() - start) * 1000 / args.steps
    if pending is not None:
        train_step.finish_train_step(config, state, pending, info)

    if args.sync_debug and info.device.type == "cuda":
        report_host_syncs(config, state, batches, gbs, info)

    if args.profile_dir and info.is_main:
        profile_train_steps(
            config, state, batches, gbs, info, os.path.join(args.profile_dir, f"profile_{shape.name}.txt")
        )

    eval_batch = evaluation.eval_batch
    eval_ms = float("nan")
    if args.eval_batches > 0:
        state.model.eval()
        for i in range(1 + args.eval_batches):  # the first one absorbs compilation of the eval graph
            if i == 1:
                synchronize(info.device)
                start = time.perf_counter()
            eval_batch(config, state, batches[i % len(batches)], info)
        synchronize(info.device)
        eval_ms = (time.perf_counter() - start) * 1000 / args.eval_batches
        state.model.train()

    replicas_identical = None
    if info.world_size > 1:
        # Every rank must hold the same weights after training: compare exact float64 checksums.
        import torch.distributed as dist

        checksum = torch.stack([p.detach().double().sum() for p in state.model.parameters()]).sum().reshape(1)
        gathered = [torch.empty_like(checksum) for _ in range(info.world_size)]
        dist.all_gather(gathered, checksum)
        replicas_identical = all(torch.equal(g, gathered[0]) for g in gathered)
    peak_gib = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else float("nan")
    train_flops, eval_flops = step_flops(state.model.model, local_batch, info.world_size)
    if not info.is_main:
        return None
    return {
        "bench": "hrm_train_eval",
        "shape": shape.name,
        "arch": shape.arch,
        "global_batch": gbs,
        "world_size": info.world_size,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "compile": build.use_compile(config, info.device),
        "train_ms_per_step": round(train_ms, 2),
        "train_host_ms_per_step": round(host_ms, 2),
        "async_metrics": train_step.use_async_metrics(config, info),
        "train_examples_per_s": round(gbs / train_ms * 1000, 1),
        "train_tflops": round(train_flops / train_ms / 1e9, 1),
        "eval_ms_per_batch": round(eval_ms, 2),
        "eval_tflops": round(eval_flops / eval_ms / 1e9, 1),
        "peak_mem_gib": round(peak_gib, 2),
        "replicas_identical": replicas_identical,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "overrides": args.override,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="sudoku,maze,arc", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--steps", type=int, default=30, help="timed train steps per shape")
    parser.add_argument("--warmup", type=int, default=5, help="untimed train steps first (compilation)")
    parser.add_argument("--eval-batches", type=int, default=3, help="timed eval batches per shape (0: skip)")
    parser.add_argument("--global-batch-size", type=int, default=None, help="override every shape's batch")
    parser.add_argument("--json-out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--profile-dir", default=None, help="write a kernel-time table of 3 train steps per shape here")
    parser.add_argument(
        "--sync-debug", action="store_true", help="report the host synchronisations of 3 train steps (CUDA)"
    )
    parser.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. compile=false")
    args = parser.parse_args()
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.exit(2, f"error: unknown shape(s) {unknown}; choose from {sorted(SHAPES)}\n")

    rows = []
    with distributed_context("auto") as info:
        from models import cutlass_ops

        line = cutlass_ops.prepare()  # HRM_KERNELS=all: built (or loaded) here, its time apart from the steps'
        if line and info.is_main:
            print(line, file=sys.stderr, flush=True)
        for name in names:
            row = bench_shape(SHAPES[name], args, info)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if rows:
        header = f"{'shape':8} {'batch':>5} {'gpus':>4} {'train ms':>9} {'ex/s':>9} {'TFLOP/s':>8} {'eval ms':>8} {'peak GiB':>8}"
        print(header)
        for r in rows:
            print(
                f"{r['shape']:8} {r['global_batch']:5d} {r['world_size']:4d} {r['train_ms_per_step']:9.2f} "
                f"{r['train_examples_per_s']:9.1f} {r['train_tflops']:8.1f} {r['eval_ms_per_batch']:8.2f} "
                f"{r['peak_mem_gib']:8.2f}"
            )


if __name__ == "__main__":
    main()
