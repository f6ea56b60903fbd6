"""Time the fused Triton block ops (models/fused_ops.py) against their unfused PyTorch equivalents.

    python benchmarks/bench_fused_ops.py [--shapes sudoku,trm,arc] [--dtype bfloat16] [--no-compile]
        [--sweep-attention-tiles]

Design choices:
- Shapes are the HRM block at the paper's batch sizes: Sudoku T = 768 × 82 tokens (81 cells + one
  puzzle-embedding position), TRM's Sudoku 768 × 97 (16 prefix rows), ARC T = 96 × 901; hidden 512, 8 heads
  × 64, SwiGLU width 1536. At the short lengths the default kernels are timed too (short-sequence attention,
  and at TRM's length the mlp_t token mixing in the [B, L, D] layout), and at every shape the SwiGLU gating's
  backward (models/swiglu_backward.py) against the backward autograd builds.
- Each op is timed three ways: the eager PyTorch composition of models/layers.py (what the model
  runs today), that composition under torch.compile (Inductor's own fusion, the bar to beat), and the
  fused op. The whole post-norm block is timed too, since that is what a train step repeats.
  Weights are fp32 parameters cast per call in every variant, as the model does.
- Correctness first: before timing, every fused op is compared with the eager reference on fresh
  random inputs; the max relative error is printed and the script exits with status 1 if it is above
  bf16 tolerance (a fast wrong kernel is worth nothing).
- `triton.testing.do_bench` (median of many runs, L2 flushed between runs). TFLOP/s counts the
  matmul FLOPs (2·T·N·K); GB/s counts the fused op's compulsory HBM traffic (activations read and
  written once, 16-bit weights read once), for the fused time only.
- Prints a table and one JSON line per (shape, op); `--json-out` appends the JSON lines to a file.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models.fused_ops import FUSED_OPS_AVAILABLE  # noqa: E402
from models.layers import (  # noqa: E402
    Attention,
    PostNormBlock,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary_pos_emb,
    attention,
    rms_norm,
)

EPS = 1e-5
HIDDEN, NUM_HEADS, EXPANSION = 512, 8, 4.0
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Shape:
    name: str
    batch_size: int
    seq_len: int  # including the puzzle-embedding position


SHAPES = {"sudoku": Shape("sudoku", 768, 82), "trm": Shape("trm", 768, 97), "arc": Shape("arc", 96, 901)}


@dataclass
class Case:
    op: str
    reference: Callable  # the eager composition of models/layers.py
    fused: Callable
    args: tuple
    flops: float
    fused_bytes: float | None  # None: not a single-pass op (the whole block)
    time_reference: bool = True  # False: a launch variant of an op whose reference another row times


def make_cases(shape: Shape, dtype: torch.dtype, device: torch.device, sweep_tiles: bool = False) -> list[Case]:
    """Fresh random inputs and weights (fp32 parameters, as in the model) for each op and the whole block."""
    from models.fused_ops import (
        fused_gate_up_swiglu,
        fused_linear_residual_rmsnorm,
        fused_qkv_rope,
    )

    B, S, d = shape.batch_size, shape.seq_len, HIDDEN
    T = B * S
    head_dim = d // NUM_HEADS
    block = PostNormBlock(d, NUM_HEADS, EXPANSION, EPS, fused_ops=True).to(device)
    attn, mlp = block.self_attn, block.mlp
    m = mlp.down_proj.weight.shape[1]
    cos, sin = RotaryEmbedding(head_dim, S, base=10000.0, device=device)()
    x = torch.randn(B, S, d, device=device).to(dtype)
    o = torch.randn(B, S, d, device=device).to(dtype)
    h = torch.randn(B, S, m, device=device).to(dtype)
    el = torch.finfo(dtype).bits // 8  # bytes per activation / cast weight element

    def ref_gate_up(x, w):
        gate, up = F.linear(x, w.to(x.dtype)).chunk(2, dim=-1)
        return F.silu(gate) * up

    def ref_linear_norm(a, w, r):
        return rms_norm(r + F.linear(a, w.to(a.dtype)), EPS)

    def ref_qkv_rope(x, w, cos, sin):
        qkv = F.linear(x, w.to(x.dtype)).view(B, S, 3 * NUM_HEADS, head_dim)  # [B, S, 3H, D]
        q, k = apply_rotary_pos_emb(qkv[:, :, :NUM_HEADS], qkv[:, :, NUM_HEADS : 2 * NUM_HEADS], cos, sin)
        return q, k, qkv[:, :, 2 * NUM_HEADS :]

    def ref_block(x):
        x = rms_norm(x + attn(cos_sin=(cos, sin), hidden_states=x), EPS)
        return rms_norm(x + mlp(x), EPS)

    w_gu, w_o, w_down, w_qkv = (
        mlp.gate_up_proj.weight,
        attn.o_proj.weight,
        mlp.down_proj.weight,
        attn.qkv_proj.weight,
    )
    block_flops = 2 * T * d * (3 * d + d + 3 * m) + 4 * B * S * S * d
    extra = short_sequence_cases(shape, dtype, device, sweep_tiles) + swiglu_backward_cases(shape, dtype, device, m)
    extra += cutlass_gate_up_cases(x, w_gu, ref_gate_up, el)
    return extra + [
        Case(
            "qkv_rope",
            ref_qkv_rope,
            lambda x, w, c, s: fused_qkv_rope(x, w, c, s, NUM_HEADS, head_dim),
            (x, w_qkv, cos, sin),
            2 * T * d * 3 * d,
            el * (T * d + 3 * d * d + T * 3 * d),
        ),
        Case(
            "o_proj_residual_rmsnorm",
            ref_linear_norm,
            lambda a, w, r: fused_linear_residual_rmsnorm(a, w, r, EPS),
            (o, w_o, x),
            2 * T * d * d,
            el * (3 * T * d + d * d),
        ),
        Case(
            "gate_up_swiglu",
            ref_gate_up,
            fused_gate_up_swiglu,
            (x, w_gu),
            2 * T * d * 2 * m,
            el * (T * d + 2 * m * d + T * m),
        ),
        Case(
            "down_proj_residual_rmsnorm",
            ref_linear_norm,
            lambda a, w, r: fused_linear_residual_rmsnorm(a, w, r, EPS),
            (h, w_down, x),
            2 * T * m * d,
            el * (T * m + 2 * T * d + m * d),
        ),
        Case(
            "block",
            ref_block,
            lambda x: block.forward_fused((cos, sin), x),
            (x,),
            block_flops,
            None,
        ),
    ]


def cutlass_gate_up_cases(x: torch.Tensor, w_gu: torch.Tensor, reference: Callable, el: int) -> list[Case]:
    """The CUTLASS gate/up + SwiGLU kernel (models/cutlass_ops.py) in each of its configs, as the model calls it
    (the weight interleaved and cast each call), and once more with the weight prepared beforehand (the kernel
    alone). None where `cutlass_ops.prepare` could not build it (its line says why)."""
    from models import cutlass_ops

    if not cutlass_ops._lib or x.dtype != torch.bfloat16 or not cutlass_ops.supported(x, w_gu):
        return []
    T, d = x.shape[0] * x.shape[1], x.shape[-1]
    m = w_gu.shape[0] // 2
    flops, traffic = 2 * T * d * 2 * m, el * (T * d + 2 * m * d + T * m)
    w_prepared = cutlass_ops.interleave_gate_up(w_gu.to(x.dtype)).contiguous()
    swiglu_configs = [(i, name) for i, name in enumerate(cutlass_ops.CONFIGS) if i != cutlass_ops.PRODUCT_CONFIG]
    as_called = lambda i: lambda x, w: cutlass_ops.gate_up_swiglu_cutlass(x.view(-1, d), w, i).view(*x.shape[:-1], m)
    alone = lambda i: (
        lambda x, w: torch.ops.hrm.gate_up_swiglu_cutlass(x.view(-1, d), w_prepared, i).view(*x.shape[:-1], m)
    )
    # each config as the model calls it, then with the weight prepared beforehand (the kernel alone)
    cases = [
        Case(f"gate_up_swiglu_cutlass_{kind}{name}", reference, fn(i), (x, w_gu), flops, traffic, time_reference=False)
        for kind, fn in (("", as_called), ("kernel_", alone))
        for i, name in swiglu_configs
    ]
    # the matmul alone with CUTLASS's own epilogue (the [T, 2m] product, no gating): what the mainloop costs
    product = lambda x, w: F.linear(x, cutlass_ops.interleave_gate_up(w.to(x.dtype)))
    product_kernel = lambda x, w: torch.ops.hrm.gate_up_swiglu_cutlass(
        x.view(-1, d), w_prepared, cutlass_ops.PRODUCT_CONFIG
    ).view(*x.shape[:-1], 2 * m)
    product_traffic = el * (T * d + 2 * m * d + 2 * T * m)
    return cases + [Case("gate_up_product_cutlass_kernel", product, product_kernel, (x, w_gu), flops, product_traffic)]


# Launch choices of the short-sequence attention kernel timed with --sweep-attention-tiles (BLOCK_M, warps, programs
# per SM, prefetch); the default `Tiles()` is timed as `short_attention` in every run.
ATTENTION_TILE_SWEEP = [
    (block_m, warps, per_sm, prefetch)
    for block_m in (64, 128)
    for warps in (4, 8)
    for per_sm in (1, 2, 4)
    for prefetch in (False, True)
] + [(32, 4, 2, True), (32, 4, 4, True)]


def best_attention_tiles(rows: list[dict], shape: str) -> str | None:
    """The fastest launch choice of the short-sequence attention kernel among `rows` (this script's JSON lines of a
    --sweep-attention-tiles run) at `shape`, as HRM_SHORT_ATTENTION_TILES takes it (BLOCK_M:WARPS:PROGRAMS:PREFETCH);
    None when the sweep has no row there. The unswept `short_attention` row is the default `Tiles()`."""
    from models.short_attention import Tiles

    timed = {}
    for row in rows:
        if row.get("shape") != shape or not str(row.get("op", "")).startswith("short_attention"):
            continue
        op = row["op"]
        if op == "short_attention":
            key = Tiles().spec()
        elif op.startswith("short_attention[") and op.endswith("]"):
            key = op[len("short_attention[") : -1]
        else:
            continue
        timed[key] = min(timed.get(key, float("inf")), row["fused_ms"])
    return min(timed, key=timed.__getitem__) if len(timed) > 1 else None


def best_gate_up_config(rows: list[dict], shape: str) -> str | None:
    """The fastest config of the CUTLASS gate/up + SwiGLU kernel among `rows` (this script's JSON lines) at `shape`,
    timed as the model calls it, by the name HRM_GATE_UP_CUTLASS_CONFIG takes; None when no config was timed there."""
    prefix = "gate_up_swiglu_cutlass_"
    timed = {}
    for row in rows:
        op = str(row.get("op", ""))
        if row.get("shape") == shape and op.startswith(prefix) and not op.startswith(prefix + "kernel_"):
            name = op[len(prefix) :]
            timed[name] = min(timed.get(name, float("inf")), row["fused_ms"])
    return min(timed, key=timed.__getitem__) if timed else None


def short_sequence_cases(
    shape: Shape, dtype: torch.dtype, device: torch.device, sweep_tiles: bool = False
) -> list[Case]:
    """The kernels the models use by default at short lengths: attention from the QKV projection
    (models/short_attention.py, S <= 128; alone, its launch choices with `sweep_tiles`, and inside a compiled
    projection -> attention -> o_proj layer against the compiled PyTorch layer, which shows what the kernel costs
    or saves among Inductor's own kernels) and, at TRM's length, the mlp_t token-mixing sub-layer in the [B, L, D]
    layout against TRM's transposed one (`forward_over_dim1`, the same without the row-padded weight view, and the
    whole sub-layer in one Triton kernel, models/token_mix.py, in both of its tile orientations)."""
    from models.short_attention import MAX_SEQ_LEN, Tiles, short_attention
    from models.token_mix import token_mix

    B, S, d = shape.batch_size, shape.seq_len, HIDDEN
    if S > MAX_SEQ_LEN:
        return []
    head_dim = d // NUM_HEADS
    cos, sin = RotaryEmbedding(head_dim, S, base=10000.0, device=device)()
    qkv = torch.randn(B, S, 3 * d, device=device).to(dtype)
    el = torch.finfo(dtype).bits // 8

    def ref_attention(qkv):
        q, k, v = qkv.view(B, S, 3 * NUM_HEADS, head_dim).split(NUM_HEADS, dim=2)  # [B, S, H, D] each
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return attention(q, k, v).reshape(B, S, d)

    attention_flops, attention_bytes = 4 * B * S * S * d, el * (B * S * 3 * d + B * S * d)
    cases = [
        Case(
            "short_attention",
            ref_attention,
            lambda qkv: short_attention(qkv, (cos, sin), NUM_HEADS, NUM_HEADS, head_dim),
            (qkv,),
            attention_flops,
            attention_bytes,
        )
    ]
    for block_m, warps, per_sm, prefetch in ATTENTION_TILE_SWEEP if sweep_tiles else []:
        tiles = Tiles(block_m, warps, per_sm, prefetch)
        cases.append(
            Case(
                f"short_attention[{tiles.spec()}]",
                ref_attention,
                lambda qkv, t=tiles: short_attention(qkv, (cos, sin), NUM_HEADS, NUM_HEADS, head_dim, t),
                (qkv,),
                attention_flops,
                attention_bytes,
                time_reference=False,
            )
        )
    # The kernel alone under torch.compile, behind the opaque op (the default) and as the traced triton_op: in the
    # 2026-12-04 whole steps the traced one took 0.57 ms a call against 0.20 ms alone; these rows tell whether
    # compiling around the kernel is what costs (the eager row is the same kernel).
    for name, op in (("short_attention_compiled", "custom_op"), ("short_attention_compiled_traced", "triton_op")):
        fn = torch.compile(lambda qkv, op=op: short_attention(qkv, (cos, sin), NUM_HEADS, NUM_HEADS, head_dim, op=op))
        cases.append(Case(name, ref_attention, fn, (qkv,), attention_flops, attention_bytes, time_reference=False))
    layer = Attention(d, head_dim, NUM_HEADS, NUM_HEADS).to(device)
    w_qkv, w_o = layer.qkv_proj.weight, layer.o_proj.weight

    def ref_layer(x):  # what Attention.forward runs without the kernel
        return F.linear(ref_attention(F.linear(x, w_qkv.to(x.dtype))), w_o.to(x.dtype))

    def kernel_layer(x):
        qkv = F.linear(x, w_qkv.to(x.dtype))
        return F.linear(short_attention(qkv, (cos, sin), NUM_HEADS, NUM_HEADS, head_dim), w_o.to(x.dtype))

    x_layer = torch.randn(B, S, d, device=device).to(dtype)
    cases.append(
        Case(
            "attention_layer_compiled",  # fused column: the kernel's layer under torch.compile
            ref_layer,
            torch.compile(kernel_layer),
            (x_layer,),
            attention_flops + 2 * B * S * d * 4 * d,
            None,
        )
    )
    cases.append(
        Case(
            "attention_layer_eager",  # the same layer without torch.compile (reference column: PyTorch eager)
            ref_layer,
            kernel_layer,
            (x_layer,),
            attention_flops + 2 * B * S * d * 4 * d,
            None,
        )
    )
    if shape.name != "trm":
        return cases
    mix = SwiGLU(S, EXPANSION).to(device)  # over the L = 97 positions of each channel
    inter = mix.down_proj.weight.shape[1]
    x = torch.randn(B, S, d, device=device).to(dtype)

    def ref_token_mix(x):
        xt = x.transpose(1, 2)  # [B, D, L]
        return rms_norm(xt + mix(xt), EPS).transpose(1, 2)

    def unpadded(x):
        gate, up = torch.matmul(mix.gate_up_proj.weight.to(x.dtype), x).chunk(2, dim=1)  # [B, m, D]
        return rms_norm(x + torch.matmul(mix.down_proj.weight.to(x.dtype), F.silu(gate) * up), EPS, dim=1)

    flops = 2 * B * d * S * 3 * inter
    mix_bytes = el * (2 * B * S * d + 3 * inter * S)
    return cases + [
        Case(
            "mlp_t_token_mix", ref_token_mix, lambda x: rms_norm(x + mix.forward_over_dim1(x), EPS, dim=1), (x,),
            flops, mix_bytes,
        ),
        Case("mlp_t_token_mix_unpadded", ref_token_mix, unpadded, (x,), flops, mix_bytes),
        Case(
            "mlp_t_token_mix_kernel", ref_token_mix,
            lambda x: token_mix(x, mix.gate_up_proj.weight, mix.down_proj.weight, EPS, False), (x,), flops, mix_bytes,
        ),
        Case(
            "mlp_t_token_mix_transposed", ref_token_mix,
            lambda x: token_mix(x, mix.gate_up_proj.weight, mix.down_proj.weight, EPS, True), (x,), flops, mix_bytes,
        ),
        # The same kernel under torch.compile as the traced triton_op (the default) and as the opaque op: inside the
        # 2026-12-04 trm_mlp step it took 0.677 ms a call against 0.607 alone.
        *(
            Case(
                name, ref_token_mix,
                torch.compile(
                    lambda x, op=op: token_mix(x, mix.gate_up_proj.weight, mix.down_proj.weight, EPS, True, op)
                ),
                (x,), flops, mix_bytes, time_reference=False,
            )
            for name, op in (("mlp_t_token_mix_compiled", "triton_op"), ("mlp_t_token_mix_compiled_opaque", "custom_op"))
        ),
    ]  # fmt: skip


def ref_swiglu_backward(gate_up, grad_h):
    """The backward autograd builds for silu(gate) * up after chunk: the two halves, then their concatenation."""
    gate, up = gate_up.chunk(2, dim=-1)
    d_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
    return torch.cat([d_gate, grad_h * F.silu(gate)], dim=-1)


def swiglu_backward_cases(shape: Shape, dtype: torch.dtype, device: torch.device, inner: int) -> list[Case]:
    """The SwiGLU gating's backward (models/swiglu_backward.py) at the channel SwiGLU's shape [T, 2m] and, at
    TRM's length, the token SwiGLU's (one row per batch row and channel, m of the 97 positions' SwiGLU)."""
    from models.swiglu_backward import swiglu_backward

    B, S, d = shape.batch_size, shape.seq_len, HIDDEN
    el = torch.finfo(dtype).bits // 8
    sizes = [("swiglu_backward", B * S, inner)]
    if shape.name == "trm":
        token_inner = SwiGLU(S, EXPANSION).down_proj.weight.shape[1]
        sizes.append(("swiglu_backward_token_mlp", B * d, token_inner))
    cases = []
    for op, rows, m in sizes:
        gate_up = torch.randn(rows, 2 * m, device=device).to(dtype)
        grad_h = torch.randn(rows, m, device=device).to(dtype)
        # 0 FLOPs counted (pointwise); bytes: gate, up and dh read once, both gradient halves written once
        cases.append(Case(op, ref_swiglu_backward, swiglu_backward, (gate_up, grad_h), 0.0, el * 5 * rows * m))
    return cases


def max_rel_err(out, ref) -> float:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    errs = []
    for a, b in zip(outs, refs, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise RuntimeError(f"shape/dtype mismatch: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        errs.append(((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
    return max(errs)


def _fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def time_case(case: Case, shape: Shape, dtype: torch.dtype, compile_reference: bool, failures: list[str]) -> dict:
    """One case's JSON row: correctness on fresh inputs first (a miss is appended to `failures`), then the median
    times of the eager reference, the compiled reference and the fused op."""
    import triton.testing

    err = max_rel_err(case.fused(*case.args), case.reference(*case.args))
    tol = MAX_REL_ERR[dtype] * (3 if case.op == "block" else 1)
    if not err <= tol:
        failures.append(f"{shape.name}/{case.op}: max relative error {err:.3e} > {tol:.0e}")
        print(f"CORRECTNESS FAILURE {failures[-1]}", file=sys.stderr, flush=True)
    eager_ms = compiled_ms = None
    if case.time_reference:
        eager_ms = triton.testing.do_bench(lambda: case.reference(*case.args), return_mode="median")
    if case.time_reference and compile_reference:
        compiled = torch.compile(case.reference)
        compiled(*case.args)
        compiled_ms = triton.testing.do_bench(lambda: compiled(*case.args), return_mode="median")
    fused_ms = triton.testing.do_bench(lambda: case.fused(*case.args), return_mode="median")
    return {
        "shape": shape.name,
        "op": case.op,
        "tokens": shape.batch_size * shape.seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "fused_ms": fused_ms,
        "speedup_vs_eager": eager_ms / fused_ms if eager_ms else None,
        "speedup_vs_compiled": compiled_ms / fused_ms if compiled_ms else None,
        "fused_tflops": case.flops / fused_ms / 1e9,
        "fused_gbps": case.fused_bytes / fused_ms / 1e6 if case.fused_bytes else None,
        "max_rel_err": err,
    }


def autotuned_choices() -> list[str]:
    """One line per autotuned kernel of the models and tuning key (the shapes it was called at): the config the
    autotuner chose, so a session's log says which tiles its timings were taken with."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    lines = []
    for module_name in ("models.fused_ops", "models.token_mix", "models.swiglu_backward", "models.short_attention"):
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if isinstance(obj, Autotuner):
                lines += [f"autotuned {module_name}.{name} {key}: {config}" for key, config in obj.cache.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="sudoku,trm,arc", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--json-out", default=None, help="append the JSON lines to this file")
    parser.add_argument(
        "--sweep-attention-tiles",
        action="store_true",
        help="also time the short-sequence attention kernel's launch choices (ATTENTION_TILE_SWEEP)",
    )
    parser.add_argument(
        "--best-tiles-from",
        default=None,
        metavar="JSONL",
        help="print the fastest attention launch choice of a --sweep-attention-tiles run's JSON lines at the one "
        "shape of --shapes (for HRM_SHORT_ATTENTION_TILES), or nothing when the file has no sweep there",
    )
    parser.add_argument(
        "--best-gate-up-config-from",
        default=None,
        metavar="JSONL",
        help="print the fastest config of the CUTLASS gate/up + SwiGLU kernel in a run's JSON lines at the one shape "
        "of --shapes (for HRM_GATE_UP_CUTLASS_CONFIG), or nothing when the file has none timed there",
    )
    args = parser.parse_args(argv)

    for flag, path, pick in (
        ("--best-tiles-from", args.best_tiles_from, best_attention_tiles),
        ("--best-gate-up-config-from", args.best_gate_up_config_from, best_gate_up_config),
    ):
        if not path:
            continue
        try:
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            print(f"error: {flag} {path}: {e}", file=sys.stderr)
            return 2
        best = pick(rows, args.shapes.split(",")[0].strip())
        if best:
            print(best)
        return 0
    if not FUSED_OPS_AVAILABLE:
        print("error: the fused ops need Triton and a CUDA device", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        print(f"error: --shapes: unknown {unknown}; choose from {sorted(SHAPES)}", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(device)}  torch {torch.__version__}  dtype {args.dtype}")
    from models import cutlass_ops

    print(cutlass_ops.prepare(force=True), flush=True)  # build time reported here, apart from the timings
    header = f"{'shape':<8} {'op':<28} {'eager ms':>9} {'compile ms':>10} {'fused ms':>9} {'x eager':>8} {'x comp':>7} {'TFLOP/s':>8} {'GB/s':>7} {'rel err':>8}"
    rows, failures = [], []
    for name in names:
        shape = SHAPES[name]
        with torch.inference_mode():
            for case in make_cases(shape, dtype, device, args.sweep_attention_tiles):
                try:
                    row = time_case(case, shape, dtype, not args.no_compile, failures)
                except Exception as e:  # one kernel that does not build or run costs only its own row
                    failures.append(f"{name}/{case.op}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    print(f"FAILURE {failures[-1]}", file=sys.stderr, flush=True)
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(header)
    for r in rows:
        print(
            f"{r['shape']:<8} {r['op']:<28} {_fmt(r['eager_ms'], 9, '.3f')} {_fmt(r['compiled_ms'], 10, '.3f')} "
            f"{r['fused_ms']:>9.3f} {_fmt(r['speedup_vs_eager'], 8, '.2f')} {_fmt(r['speedup_vs_compiled'], 7, '.2f')} "
            f"{r['fused_tflops']:>8.1f} {_fmt(r['fused_gbps'], 7, '.0f')} {r['max_rel_err']:>8.1e}"
        )
    for line in autotuned_choices():
        print(line)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
