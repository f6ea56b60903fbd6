"""Experiment: persistent TMA Triton GEMMs with fused epilogues against cuBLAS + Inductor (Hopper GPUs).

    python benchmarks/exp_tma_gemm.py [--tokens 62976] [--seq 82]

The kernels behind benchmarks/RESULTS.md's session-2 notes, each next to the reference composition
compiled by torch.compile (the bar to beat) and the plain cuBLAS GEMM (the floor without fusion):
- gate/up projection + SwiGLU (kept: models/fused_ops.py has the production version);
- QKV projection + RoPE, storing through pointers (v1) and through a 3-D TMA box (v2; faster alone,
  no gain inside a whole train step, so not kept);
- down projection + residual + RMSNorm with whole rows per program (slower, not kept).
One JSON line per (op, tile config): time (triton.testing.do_bench), TFLOP/s of the matmul, max error
relative to the compiled reference, and the speed-up over it. Needs CUDA, Triton with tensor
descriptors, and an sm_90+ GPU.
"""

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


triton.set_allocator(_alloc)
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def _tile_ids(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks sweep all column blocks together, so x rows and w stay in L2.
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    pid_n = (tile % group) // size_m
    return pid_m, pid_n


@triton.jit
def swiglu_tma_kernel(
    x_ptr, w_ptr, h_ptr, T, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
):  # fmt: skip
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[T, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = _tile_ids(tile, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            a = x_desc.load([om, ok])
            g = tl.dot(a, w_desc.load([on, ok]).T, g)
            u = tl.dot(a, w_desc.load([N + on, ok]).T, u)
        out_ty = h_ptr.dtype.element_ty
        gate = g.to(out_ty).to(tl.float32)
        up = u.to(out_ty).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
        h_desc.store([om, on], (act * up).to(out_ty))


def swiglu_tma(x, w, cfg):
    T, K = x.shape
    N = w.shape[0] // 2
    h = torch.empty((T, N), device=x.device, dtype=x.dtype)
    bm, bn, bk, gm, warps, stages, flatten = cfg
    tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
    progs = min(NUM_SMS, tiles)
    swiglu_tma_kernel[(progs,)](
        x, w, h, T, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, NUM_PROGS=progs, FLATTEN=flatten,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return h


@triton.jit
def qkv_rope_tma_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, NC, K, S, ROPE_NC, OUT_W,
    HALF_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
):  # fmt: skip
    # w is the qkv weight with rows permuted to [first halves of every head; second halves]: [2·NC, K].
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * NC, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(NC, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = _tile_ids(tile, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            a = x_desc.load([om, ok])
            acc1 = tl.dot(a, w_desc.load([on, ok]).T, acc1)
            acc2 = tl.dot(a, w_desc.load([NC + on, ok]).T, acc2)
        out_ty = out_ptr.dtype.element_ty
        offs_m = om + tl.arange(0, BLOCK_M)
        offs_c = on + tl.arange(0, BLOCK_N)
        j = offs_c % HALF_D
        col1 = (offs_c // HALF_D) * (2 * HALF_D) + j
        mask_m = offs_m < T
        x1 = acc1.to(out_ty).to(tl.float32)
        x2 = acc2.to(out_ty).to(tl.float32)
        rope = mask_m[:, None] & (offs_c < ROPE_NC)[None, :]
        pos = (offs_m % S)[:, None]
        cos1 = tl.load(cos_ptr + pos * (2 * HALF_D) + j[None, :], mask=rope, other=1.0)
        sin1 = tl.load(sin_ptr + pos * (2 * HALF_D) + j[None, :], mask=rope, other=0.0)
        cos2 = tl.load(cos_ptr + pos * (2 * HALF_D) + (j + HALF_D)[None, :], mask=rope, other=1.0)
        sin2 = tl.load(sin_ptr + pos * (2 * HALF_D) + (j + HALF_D)[None, :], mask=rope, other=0.0)
        r1 = (x1 * cos1 - x2 * sin1).to(out_ty)
        r2 = (x2 * cos2 + x1 * sin2).to(out_ty)
        mask = mask_m[:, None] & (offs_c < NC)[None, :]
        rows = out_ptr + offs_m.to(tl.int64)[:, None] * OUT_W
        tl.store(rows + col1[None, :], r1, mask=mask)
        tl.store(rows + (col1 + HALF_D)[None, :], r2, mask=mask)


def permute_qkv_weight(w, head_dim):
    heads = w.shape[0] // head_dim
    return w.view(heads, 2, head_dim // 2, w.shape[1]).transpose(0, 1).reshape(w.shape).contiguous()


def qkv_rope_tma(x, w_perm, cos, sin, seq, rope_heads, head_dim, cfg):
    T, K = x.shape
    width = w_perm.shape[0]
    out = torch.empty((T, width), device=x.device, dtype=x.dtype)
    bm, bn, bk, gm, warps, stages, flatten = cfg
    nc = width // 2
    tiles = triton.cdiv(T, bm) * triton.cdiv(nc, bn)
    progs = min(NUM_SMS, tiles)
    qkv_rope_tma_kernel[(progs,)](
        x, w_perm, cos, sin, out, T, nc, K, seq, rope_heads * head_dim // 2, width,
        HALF_D=head_dim // 2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, NUM_PROGS=progs, FLATTEN=flatten,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@triton.jit
def qkv_rope_tma2_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, NC, K, S, ROPE_NC, HEADS,
    HALF_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # As qkv_rope_tma_kernel, but the outputs leave through a 3-D TMA box [BM, heads, D/2] and the
    # rotation tables are the half tables [S, D/2] (cos and sin repeat across the two halves).
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * NC, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(
        out_ptr, shape=[T, HEADS, 2 * HALF_D], strides=[HEADS * 2 * HALF_D, 2 * HALF_D, 1],
        block_shape=[BLOCK_M, BLOCK_N // HALF_D, HALF_D],
    )  # fmt: skip
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(NC, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_ids(tile, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            ok = ki * BLOCK_K
            a = x_desc.load([om, ok])
            acc1 = tl.dot(a, w_desc.load([on, ok]).T, acc1)
            acc2 = tl.dot(a, w_desc.load([NC + on, ok]).T, acc2)
        out_ty = out_ptr.dtype.element_ty
        x1 = acc1.to(out_ty).to(tl.float32)
        x2 = acc2.to(out_ty).to(tl.float32)
        if on < ROPE_NC:  # tiles of value heads skip the rotation (BLOCK_N divides ROPE_NC)
            offs_m = om + tl.arange(0, BLOCK_M)
            j = (on + tl.arange(0, BLOCK_N)) % HALF_D
            pos = (offs_m % S)[:, None] * HALF_D
            c = tl.load(cos_ptr + pos + j[None, :])
            sn = tl.load(sin_ptr + pos + j[None, :])
            r1 = x1 * c - x2 * sn
            r2 = x2 * c + x1 * sn
            x1 = r1
            x2 = r2
        o_desc.store([om, on // HALF_D, 0], tl.reshape(x1.to(out_ty), (BLOCK_M, BLOCK_N // HALF_D, HALF_D)))
        o_desc.store([om, on // HALF_D, HALF_D], tl.reshape(x2.to(out_ty), (BLOCK_M, BLOCK_N // HALF_D, HALF_D)))


def qkv_rope_tma2(x, w_perm, cos_half, sin_half, seq, rope_heads, head_dim, cfg):
    T, K = x.shape
    width = w_perm.shape[0]
    out = torch.empty((T, width), device=x.device, dtype=x.dtype)
    bm, bn, bk, gm, warps, stages, _ = cfg
    nc = width // 2
    progs = min(NUM_SMS, triton.cdiv(T, bm) * triton.cdiv(nc, bn))
    qkv_rope_tma2_kernel[(progs,)](
        x, w_perm, cos_half, sin_half, out, T, nc, K, seq, rope_heads * head_dim // 2, width // head_dim,
        HALF_D=head_dim // 2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@triton.jit
def down_norm_tma_kernel(
    a_ptr, w_ptr, r_ptr, y_ptr, T, K, eps,
    N_HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = rms_norm(r + a @ W^T) with whole rows per program: N = 2·N_HALF output columns in two
    # accumulators (a TMA box is at most 256 wide).
    N: tl.constexpr = 2 * N_HALF
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[N_HALF, BLOCK_K])
    r_desc = tl.make_tensor_descriptor(r_ptr, shape=[T, N], strides=[N, 1], block_shape=[BLOCK_M, N_HALF])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[T, N], strides=[N, 1], block_shape=[BLOCK_M, N_HALF])
    num_m = tl.cdiv(T, BLOCK_M)
    for tile in tl.range(tl.program_id(0), num_m, tl.num_programs(0)):
        om = tile * BLOCK_M
        acc1 = tl.zeros((BLOCK_M, N_HALF), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, N_HALF), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            ok = ki * BLOCK_K
            a = a_desc.load([om, ok])
            acc1 = tl.dot(a, w_desc.load([0, ok]).T, acc1)
            acc2 = tl.dot(a, w_desc.load([N_HALF, ok]).T, acc2)
        out_ty = y_ptr.dtype.element_ty
        s1 = (r_desc.load([om, 0]).to(tl.float32) + acc1.to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        s2 = (r_desc.load([om, N_HALF]).to(tl.float32) + acc2.to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        var = (tl.sum(s1 * s1, axis=1) + tl.sum(s2 * s2, axis=1)) / N
        inv = tl.rsqrt(var + eps)[:, None]
        y_desc.store([om, 0], (s1 * inv).to(out_ty))
        y_desc.store([om, N_HALF], (s2 * inv).to(out_ty))


def down_norm_tma(a, w, r, cfg):
    T, K = a.shape
    N = w.shape[0]
    y = torch.empty((T, N), device=a.device, dtype=a.dtype)
    bm, bk, gm, warps, stages = cfg
    progs = min(NUM_SMS, triton.cdiv(T, bm))
    down_norm_tma_kernel[(progs,)](
        a, w, r, y, T, K, 1e-5, N_HALF=N // 2, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages
    )
    return y


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def baseline(op: str, reference, gemm_only) -> tuple[torch.Tensor, float]:
    """Time the compiled reference and its plain cuBLAS GEMM, print them; returns (reference output, its ms)."""
    t_ref = do_bench(reference)
    print(json.dumps({"op": op, "compiled_ms": t_ref, "cublas_gemm_only_ms": do_bench(gemm_only)}), flush=True)
    return reference(), t_ref


def sweep(op: str, run, configs, want: torch.Tensor, t_ref: float, flops: float) -> None:
    """One JSON line per tile config of `run(cfg)`: time, TFLOP/s, error against `want`, speed-up (or the error)."""
    for cfg in configs:
        try:
            err = rel_err(run(cfg), want)
            t = do_bench(lambda cfg=cfg: run(cfg))
            row = {"op": op, "cfg": cfg, "ms": t, "tflops": flops / t / 1e9, "rel_err": err, "vs_compiled": t_ref / t}
        except Exception as e:  # noqa: BLE001 - a config that does not fit (e.g. shared memory) is a result too
            row = {"op": op, "cfg": cfg, "error": str(e)[:300]}
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=768 * 82)
    parser.add_argument("--seq", type=int, default=82)
    args = parser.parse_args()
    T, d, m, D, heads = args.tokens, 512, 1536, 64, 8
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    w_gu = (torch.randn(2 * m, d, device="cuda") / d**0.5).to(torch.bfloat16)
    w_qkv = (torch.randn(3 * d, d, device="cuda") / d**0.5).to(torch.bfloat16)
    w_down = (torch.randn(d, m, device="cuda") / m**0.5).to(torch.bfloat16)
    h_in = torch.randn(T, m, device="cuda", dtype=torch.bfloat16)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    freqs = torch.outer(torch.arange(args.seq, device="cuda").float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()

    def ref_swiglu(x, w):
        g, u = F.linear(x, w).chunk(2, -1)
        return F.silu(g) * u

    def ref_down_norm(a, w, r):
        s = r + F.linear(a, w)
        return (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(a.dtype)

    def ref_qkv_rope(x, w):
        qkv = F.linear(x, w).view(-1, args.seq, 3 * heads, D)
        qk, v = qkv[:, :, : 2 * heads], qkv[:, :, 2 * heads :]
        q1, q2 = qk.float().chunk(2, -1)
        rot = torch.cat([-q2, q1], -1)
        qk = (qk.float() * cos[:, None] + rot * sin[:, None]).to(x.dtype)
        return torch.cat([qk, v], 2).view(-1, 3 * d)

    c_swiglu, c_down, c_qkv = (torch.compile(f) for f in (ref_swiglu, ref_down_norm, ref_qkv_rope))

    want, t_ref = baseline("swiglu", lambda: c_swiglu(x, w_gu), lambda: F.linear(x, w_gu))
    configs = [(128, 128, 64, 8, 8, 3, False), (128, 128, 64, 16, 8, 3, False), (128, 128, 64, 8, 8, 4, False)]
    sweep("swiglu", lambda cfg: swiglu_tma(x, w_gu, cfg), configs, want, t_ref, 2 * T * 2 * m * d)

    want, t_ref = baseline("down_norm", lambda: c_down(h_in, w_down, x), lambda: F.linear(h_in, w_down))
    configs = [(64, 64, 8, 8, 3), (64, 64, 8, 8, 2), (64, 32, 8, 8, 4), (64, 64, 8, 4, 3)]
    sweep("down_norm", lambda cfg: down_norm_tma(h_in, w_down, x, cfg), configs, want, t_ref, 2 * T * m * d)

    w_perm = permute_qkv_weight(w_qkv, D)
    cos_half, sin_half = cos[:, : D // 2].contiguous(), sin[:, : D // 2].contiguous()
    want, t_ref = baseline("qkv_rope", lambda: c_qkv(x, w_qkv), lambda: F.linear(x, w_qkv))
    flops = 2 * T * 3 * d * d
    configs = [(128, 128, 64, 8, 8, 3, False), (128, 64, 64, 8, 4, 4, False), (128, 128, 64, 8, 8, 4, False)]
    sweep(
        "qkv_rope_v2",
        lambda cfg: qkv_rope_tma2(x, w_perm, cos_half, sin_half, args.seq, 2 * heads, D, cfg),
        configs,
        want,
        t_ref,
        flops,
    )
    sweep(
        "qkv_rope",
        lambda cfg: qkv_rope_tma(x, w_perm, cos, sin, args.seq, 2 * heads, D, cfg),
        [(128, 64, 64, 8, 8, 4, True)],
        want,
        t_ref,
        flops,
    )


if __name__ == "__main__":
    main()
