"""What the models' Triton kernels cost in registers, spills and shared memory on Hopper, compiled on any machine.

    python benchmarks/kernel_resources.py [--kernels gate_up_swiglu,token_mix,token_mix_transposed,short_attention]
        [--arch 90]
        [--json-out FILE]

Design choices:
- No GPU is needed: Triton compiles each kernel for the target (sm_90 by default) with its bundled LLVM and ptxas,
  and `cuobjdump` (bundled too) reads the registers and the stack (spill) bytes from the binary. A speed step can
  so be checked on the CPU for the things that decide a kernel's speed before any device time: register spills,
  shared memory (what limits programs per SM), whether the loop's loads were software-pipelined (asynchronous copies
  in the IR) and how many tensor-core waits each loop iteration has.
- The arguments are specialised as Triton's JIT specialises them at launch (pointers 16-byte aligned, integers
  divisible by 16 marked so), at the shapes of TRM's and HRM's Sudoku recipes, so the code compiled here is the code a
  launch would build. Each kernel is compiled for every launch choice it has (its autotuner's configs, or
  `short_attention`'s tiles).
- One JSON line per (kernel, config): regs, stack_bytes (0 means no spills), shared_bytes, programs_per_sm (by
  registers and shared memory: one means nothing else on the SM hides a program's stalls), async_copies (0 means the
  loads were not pipelined), waits (tensor-core waits with nothing pending, i.e. serialised dots),
  register_operand_dots (Hopper dots whose left operand comes from registers, as a flash-attention P·V does).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]


def compile_offline(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """Compile the JIT function `fn` for sm_`arch` without a GPU. `args`: each runtime argument's value, a dtype
    string like "*bf16" for a pointer (taken as 16-byte aligned) or an int / float (ints divisible by 16 get the
    divisibility hint the JIT would give them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


SM_REGISTERS, SM_SHARED_BYTES = 65536, 232448  # Hopper: a 64K-entry register file and 227 KiB of shared memory a block


def resources(kernel) -> dict:
    """Registers and stack bytes from the binary, shared memory from Triton, pipelining signs from the IR."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    ir = kernel.asm["ttgir"]
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    threads = 32 * kernel.metadata.num_warps
    return {
        "regs": regs,
        "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "shared_bytes": kernel.metadata.shared,
        # how many programs an SM holds at once, by registers (64K, allocated in 8s a thread) and shared memory
        "programs_per_sm": min(
            SM_REGISTERS // (-(-regs // 8) * 8 * threads), SM_SHARED_BYTES // max(kernel.metadata.shared, 1)
        ),
        "async_copies": ir.count("async_copy_global_to_local") + ir.count("async_tma_copy_global_to_local"),
        "waits": ir.count("pendings = 0"),
        # dots whose left operand the tensor cores read from registers rather than shared memory
        "register_operand_dots": sum(
            "dot_op" in line.split("} : ", 1)[-1].split(" * ", 1)[0]
            for line in ir.splitlines()
            if "warp_group_dot %" in line
        ),
    }


def token_mix_cases(transposed: bool):
    """TRM's Sudoku mlp_t: L = 97 padded to 128, D = 512 channels, m = 512, batch strides of [768, 97, 512]."""
    import models.token_mix as tm

    fn = tm._token_mix_transposed_kernel if transposed else tm._token_mix_kernel
    configs = tm._TRANSPOSED_CONFIGS if transposed else tm._CONFIGS
    args = {"x_ptr": "*bf16", "wgu_ptr": "*bf16", "wd_ptr": "*bf16", "out_ptr": "*bf16", "L": 97, "D": 512, "M": 512}
    args |= {"stride_xb": 97 * 512, "stride_xl": 512, "stride_ob": 97 * 512, "stride_ol": 512, "eps": 1e-5}
    for meta, warps, stages in configs:
        yield fn.fn, args, {"L_PAD": 128, "FP32_DOT": False, "INTERPRET": False, **meta}, warps, stages, meta


def short_attention_cases():
    """HRM's Sudoku attention: B 768, S 82, 8 heads of 64, from the [B, S, 3·512] projection."""
    from bench_fused_ops import ATTENTION_TILE_SWEEP

    import models.short_attention as sa

    args = {"qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "S": 82}
    args |= {"stride_qkv_b": 82 * 1536, "stride_qkv_s": 1536, "stride_out_b": 82 * 512, "stride_out_s": 512}
    args |= {"stride_cs": 64, "qk_scale_log2": 0.18, "total": 768 * 8 * 2, "NUM_M": 2}
    seen = set()
    for block_m, warps, _, prefetch in ATTENTION_TILE_SWEEP:
        if (block_m, warps, prefetch) in seen:  # programs per SM is a launch count, not a compile choice
            continue
        seen.add((block_m, warps, prefetch))
        const = {"H": 8, "KV": 8, "HALF": 32, "BLOCK_M": block_m, "BLOCK_N": 128, "APPLY_ROPE": True}
        const |= {"PREFETCH": prefetch, "FP32_DOT": False, "INTERPRET": False}
        yield sa._short_attention_kernel, args, const, warps, 1, {"BLOCK_M": block_m, "PREFETCH": prefetch}


def gate_up_tma_cases():
    """HRM's Sudoku channel SwiGLU for no-grad calls: T = 768 x 82 tokens, d = 512, m = 1536 (the Hopper default)."""
    import models.fused_ops as fo

    args = {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "T": 768 * 82, "N": 1536, "K": 512}
    for meta, warps, stages in fo._GATE_UP_TMA_CONFIGS:
        yield fo._gate_up_swiglu_tma_kernel.fn, args, meta, warps, stages, meta


CASES = {
    "gate_up_swiglu": gate_up_tma_cases,
    "token_mix": lambda: token_mix_cases(False),
    "token_mix_transposed": lambda: token_mix_cases(True),
    "short_attention": short_attention_cases,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(CASES), help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    parser.add_argument("--json-out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: --kernels: unknown {unknown}; choose from {sorted(CASES)}", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    rows, failed = [], 0
    for name in names:
        for fn, kernel_args, constexprs, warps, stages, meta in CASES[name]():
            row = {"kernel": name, "arch": args.arch, **meta, "num_warps": warps, "num_stages": stages}
            try:
                row |= resources(compile_offline(fn, kernel_args, constexprs, warps, stages, args.arch))
            except Exception as e:  # a config that does not build is a finding, not the end of the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                failed += 1
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
