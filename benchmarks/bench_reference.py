"""Time a reference implementation's own code (TRM's or HRM's) on the shapes of bench_hrm.py, for side-by-side tables.

    python benchmarks/bench_reference.py --ref-dir .ref/trm --shapes trm,trm_mlp,trm_arc [--json-out FILE]
    python benchmarks/bench_reference.py --ref-dir .ref/hrm --shapes sudoku,arc

`--ref-dir` is a copy of the reference repository's `models/` (and `config/arch/`), e.g. of
SamsungSAILMontreal/TinyRecursiveModels or sapientinc/HRM, kept out of this repository (git-ignored); it is
put first on `sys.path`, so `models` there is the reference's package, and nothing of this project is imported.

Design choices:
- The reference's model, loss head and optimizers are built as its launcher builds them: the arch YAML
  plus the launcher's keys, `loss_head(model, loss_type)`, `torch.compile(head)` (its default), SignSGD on the
  puzzle embedding and the `adam-atan2` package's AdamATan2 on the parameters (its requirement; the 0.0.3
  wrapper's CUDA-graph health check, which fails on torch >= 2.11, is switched off, nothing else changed).
- A train step is its `train_batch`: forward on the persistent carry, backward of loss / global batch, each
  optimizer's lr set and stepped, gradients zeroed, the metrics stacked and copied to the host (the
  reference's host synchronisation each step). An eval batch is its evaluation loop: a fresh carry, then the
  head called until `all_finish`, which the reference reads on the host after every call.
- HRM's code imports flash-attn; where it is not installed (the GPU machines here), its `flash_attn_func` is
  PyTorch's SDPA through a shim (the JSON line's `attention` says which ran).
- Same inputs and timing as bench_hrm.py: random tokens (never zeros), a pool of 4 batches, warm-up steps
  that absorb compilation, host clock between device synchronisations; one JSON line per shape.
"""

import argparse
import json
import os
import sys
import time

SHAPES = {  # name: (seq_len, vocab, puzzle ids, global batch, arch yaml, overrides) -- as bench_hrm.py
    "sudoku": (81, 11, 1, 768, "hrm_v1", {}),
    "arc": (900, 12, 1000, 96, "hrm_v1", {}),
    "trm": (81, 11, 1, 768, "trm", {"L_layers": 2, "H_cycles": 3, "L_cycles": 6}),
    "trm_mlp": (
        81, 11, 1, 768, "trm", {"L_layers": 2, "H_cycles": 3, "L_cycles": 6, "mlp_t": True, "pos_encodings": "none"}
    ),
    "trm_arc": (900, 12, 1000, 96, "trm", {"L_layers": 2, "H_cycles": 3, "L_cycles": 4}),
}  # fmt: skip


def install_flash_attn_shim() -> str:
    """HRM's layers import flash-attn (FA3, else FA2) at module level. Where neither is installed, give them
    `flash_attn_func` through PyTorch's SDPA (TRM's code calls SDPA itself; the same [B, S, H, D] in and out),
    and say which attention ran in the results."""
    import importlib.util
    import types

    for name in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            return name
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)  # [B, S, H, D]

    shim = types.ModuleType("flash_attn_interface")
    shim.flash_attn_func = flash_attn_func
    sys.modules["flash_attn_interface"] = shim
    return "sdpa (flash-attn not installed)"


def arch_config(ref_dir: str, arch: str, overrides: dict) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(ref_dir, "config", "arch", f"{arch}.yaml")), resolve=True)
    cfg.update(overrides)
    return cfg


def load_class(identifier: str):
    import importlib

    module, name = identifier.split("@")
    return getattr(importlib.import_module("models." + module), name)


def build(ref_dir: str, shape: str, device, global_batch_size: int | None = None):
    import torch

    seq_len, vocab, ids, gbs, arch, overrides = SHAPES[shape]
    gbs = global_batch_size or gbs
    cfg = arch_config(ref_dir, arch, overrides)
    loss_cfg = cfg.pop("loss")
    name = cfg.pop("name")
    model_cfg = {**cfg, "batch_size": gbs, "vocab_size": vocab, "seq_len": seq_len, "num_puzzle_identifiers": ids}
    model_cfg["causal"] = False
    with torch.device(device):
        model = load_class(name)(model_cfg)
        head = load_class(loss_cfg.pop("name"))(model, **loss_cfg)
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed

    try:
        from adam_atan2 import AdamATan2

        AdamATan2._cuda_graph_capture_health_check = lambda self: None  # fails on torch >= 2.11 (see docstring)
        backend = "adam-atan2"
    except ImportError:  # CPU checks of this script only
        sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from utils.optimizers import AdamATan2

        backend = "portable (adam-atan2 not importable)"
    optimizers = [
        CastedSparseEmbeddingSignSGD_Distributed(head.model.puzzle_emb.buffers(), lr=0, weight_decay=0.1, world_size=1),
        AdamATan2(head.parameters(), lr=0, weight_decay=0.1, betas=(0.9, 0.95)),
    ]
    forward = torch.compile(head) if device.type == "cuda" and "DISABLE_COMPILE" not in os.environ else head
    return head, forward, optimizers, backend, (seq_len, vocab, ids, gbs)


def batches(seq_len, vocab, ids, gbs, device, count=4, seed=1234):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        b = {
            "inputs": torch.randint(1, vocab, (gbs, seq_len), generator=gen, dtype=torch.int32),
            "labels": torch.randint(1, vocab, (gbs, seq_len), generator=gen, dtype=torch.int32),
            "puzzle_identifiers": torch.randint(min(1, ids - 1), ids, (gbs,), generator=gen).to(torch.int32),
        }
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def train_step(head, forward, optimizers, state, batch, gbs):
    """The reference's train_batch on one GPU (see the module docstring)."""
    import torch

    if state["carry"] is None:
        with torch.device(batch["inputs"].device):
            state["carry"] = head.initial_carry(batch)
    state["carry"], loss, metrics, _, _ = forward(carry=state["carry"], batch=batch, return_keys=[])
    ((1 / gbs) * loss).backward()
    for optimizer, lr in zip(optimizers, (1e-4, 1e-4)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
    keys = sorted(metrics)
    torch.stack([metrics[k] for k in keys]).cpu().numpy()


def eval_batch(head, forward, batch):
    import torch

    with torch.inference_mode():
        with torch.device(batch["inputs"].device):
            carry = head.initial_carry(batch)
        while True:
            carry, _, _, _, all_finish = forward(carry=carry, batch=batch, return_keys=[])
            if all_finish:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-dir", required=True, help="copy of the reference repository (models/, config/arch/)")
    parser.add_argument("--shapes", default="trm,trm_mlp,trm_arc", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-batches", type=int, default=3)
    parser.add_argument("--global-batch-size", type=int, default=None, help="override every shape's batch")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--label", default=None, help="name of the reference in the JSON lines (default: folder)")
    args = parser.parse_args()
    ref_dir = os.path.abspath(args.ref_dir)
    if not os.path.isdir(os.path.join(ref_dir, "models")):
        parser.exit(2, f"error: {ref_dir}: no models/ folder (a copy of the reference repository is expected)\n")
    sys.path.insert(0, ref_dir)
    attention = install_flash_attn_shim()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            parser.exit(2, f"error: unknown shape {shape!r}; choose from {sorted(SHAPES)}\n")
        torch.manual_seed(0)
        head, forward, optimizers, backend, (seq_len, vocab, ids, gbs) = build(
            ref_dir, shape, device, args.global_batch_size
        )
        pool = batches(seq_len, vocab, ids, gbs, device)
        state = {"carry": None}
        head.train()
        for i in range(args.warmup):
            train_step(head, forward, optimizers, state, pool[i % 4], gbs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(args.steps):
            train_step(head, forward, optimizers, state, pool[i % 4], gbs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_ms = (time.perf_counter() - start) * 1000 / args.steps
        eval_ms = float("nan")
        if args.eval_batches > 0:
            head.eval()
            for i in range(1 + args.eval_batches):
                if i == 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                eval_batch(head, forward, pool[i % 4])
            if device.type == "cuda":
                torch.cuda.synchronize()
            eval_ms = (time.perf_counter() - start) * 1000 / args.eval_batches
        row = {
            "bench": "reference_train_eval",
            "reference": args.label or os.path.basename(ref_dir.rstrip("/")),
            "shape": shape,
            "global_batch": gbs,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "optimizer": backend,
            "attention": attention,
            "train_ms_per_step": round(train_ms, 2),
            "eval_ms_per_batch": round(eval_ms, 2),
            "params": sum(p.numel() for p in head.parameters()),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del head, forward, optimizers, pool, state
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
