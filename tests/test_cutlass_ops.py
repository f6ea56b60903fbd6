"""The CUTLASS gate/up + SwiGLU kernel (models/cutlass_ops.py, models/cuda/gate_up_swiglu.cu): its weight order and
tile semantics against the PyTorch path on the CPU, the build and its cache with a stand-in nvcc, every way the
build can be missing (one line, the kernel off), the real sm_90a compile where nvcc and CUTLASS are at hand (CI
brings both as wheels), and on a Hopper GPU the kernel against the PyTorch path and the Triton kernel."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import cutlass_ops

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w.to(x.dtype)).chunk(2, dim=-1)
    return F.silu(gate) * up


def _kernel_semantics(x: torch.Tensor, w_interleaved: torch.Tensor) -> torch.Tensor:
    """What the kernel computes from the interleaved weight, tile by tile: of each 128 product columns the first 64
    are gate columns and the last 64 the up columns of the same 64 outputs."""
    product = F.linear(x, w_interleaved)  # [T, 2m]
    tiles = product.view(x.shape[0], -1, 2, cutlass_ops.INTERLEAVE)  # [T, m / 64, gate|up, 64]
    return (F.silu(tiles[:, :, 0]) * tiles[:, :, 1]).reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [64, 192, 1536])
def test_interleaved_weight_gives_the_swiglu_of_the_original(dtype, m):
    torch.manual_seed(0)
    x = torch.randn(37, 64).to(dtype)
    w = torch.randn(2 * m, 64)
    w_il = cutlass_ops.interleave_gate_up(w.to(dtype)).contiguous()
    assert torch.equal(_kernel_semantics(x, w_il), _swiglu(x, w))  # same products, same roundings: bit for bit
    # a permutation of rows: every gate row and every up row once
    assert torch.equal(w_il.sort(dim=0).values, w.to(dtype).sort(dim=0).values)


def test_supported_shapes():
    x = torch.zeros(10, 512, dtype=torch.bfloat16)
    w = torch.zeros(3072, 512)
    assert not cutlass_ops.supported(x, w)  # a CPU tensor
    meta = x.to("meta")
    assert not cutlass_ops.supported(meta, w)
    if torch.cuda.is_available():
        xc = x.cuda()
        assert cutlass_ops.supported(xc, w)
        assert not cutlass_ops.supported(xc.half(), w)  # bf16 only
        assert not cutlass_ops.supported(xc, torch.zeros(3072 - 64, 512))  # m not a multiple of 64
        assert not cutlass_ops.supported(xc[:, :500], torch.zeros(3072, 500))  # d not a multiple of 8


def test_bad_config_is_one_clear_error():
    assert cutlass_ops.parse_config("1") == 1
    assert cutlass_ops.parse_config("128x128x64") == 0
    assert cutlass_ops.parse_config("256x128x64_cooperative_direct") == 4
    assert cutlass_ops.parse_config("128x128x64_registers_tma") == 5
    with pytest.raises(ValueError, match="HRM_GATE_UP_CUTLASS_CONFIG='8'"):
        cutlass_ops.parse_config("8")


def _fake_nvcc(tmp_path, body: str) -> str:
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    """A stand-in nvcc that writes its -o file: the first build runs it, the second finds the cache; a failing one
    raises with nvcc's last line and leaves nothing in the cache."""
    monkeypatch.setenv("HRM_CUDA_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "calls"
    nvcc = _fake_nvcc(
        tmp_path,
        f'if [ "$1" = --version ]; then echo "release 13.0"; exit 0; fi\n'
        f'echo built >> {log}\nwhile [ "$1" != -o ]; do shift; done; echo lib > "$2"\n',
    )
    cutlass = tmp_path / "cutlass"
    path, seconds = cutlass_ops.build(nvcc, cutlass)
    assert path.is_file() and seconds is not None and path.parent == tmp_path / "cache"
    again, seconds_again = cutlass_ops.build(nvcc, cutlass)
    assert again == path and seconds_again is None and log.read_text().count("built") == 1
    assert not list(path.parent.glob("*.tmp"))

    broken = _fake_nvcc(
        tmp_path,
        'if [ "$1" = --version ]; then echo "release 13.1"; exit 0; fi\n'
        'echo "gate_up_swiglu.cu(12): error: something" >&2; exit 2\n',
    )
    with pytest.raises(RuntimeError, match=r"nvcc failed on gate_up_swiglu.cu: gate_up_swiglu.cu\(12\): error"):
        cutlass_ops.build(broken, cutlass)
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".lock", ".lock", ".so"]  # no half library


def test_build_flags_keep_the_wgmma_pipeline():
    cmd = cutlass_ops.build_command("nvcc", cutlass_ops.Path("/c"), cutlass_ops.Path("/o.so"))
    # without -DNDEBUG ptxas serialises the wgmma instructions (a function call inside the mainloop)
    assert "-DNDEBUG" in cmd and "-arch=sm_90a" in cmd and cmd[-1] == str(cutlass_ops.SOURCE)
    assert "-I/c/include" in cmd and "-I/c/tools/util/include" in cmd


@pytest.fixture
def fresh_prepare(monkeypatch):
    monkeypatch.setattr(cutlass_ops, "_lib", None)
    monkeypatch.setattr(cutlass_ops, "_status", "not prepared")
    monkeypatch.setattr(cutlass_ops, "READY", False)
    monkeypatch.setattr(cutlass_ops, "GATE_UP_CUTLASS", True)
    return monkeypatch


@pytest.mark.skipif(ON_HOPPER, reason="the reasons a machine without a Hopper GPU, nvcc or CUTLASS gives")
def test_without_the_toolchain_one_line_and_the_kernel_off(fresh_prepare, tmp_path):
    line = cutlass_ops.prepare()
    assert line.startswith("gate_up_cutlass off: ") and "\n" not in line and not cutlass_ops.ready()
    assert cutlass_ops.prepare() == line  # once a process
    # as if on a Hopper GPU: then each missing piece in turn
    fresh_prepare.setattr(cutlass_ops, "_status", "not prepared")
    fresh_prepare.setattr(torch.cuda, "is_available", lambda: True)
    fresh_prepare.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    fresh_prepare.setattr(cutlass_ops, "find_nvcc", lambda: None)
    assert cutlass_ops.prepare() == "gate_up_cutlass off: nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)"
    fresh_prepare.setattr(cutlass_ops, "_status", "not prepared")
    fresh_prepare.setattr(cutlass_ops, "find_nvcc", lambda: "/bin/true")
    fresh_prepare.setattr(cutlass_ops, "find_cutlass", lambda: None)
    assert "CUTLASS headers not found" in cutlass_ops.prepare()
    fresh_prepare.setattr(cutlass_ops, "_status", "not prepared")
    fresh_prepare.setenv("HRM_CUDA_CACHE", str(tmp_path))
    fresh_prepare.setattr(cutlass_ops, "find_cutlass", lambda: tmp_path)
    fresh_prepare.setattr(
        cutlass_ops, "find_nvcc", lambda: _fake_nvcc(tmp_path, "echo 'fatal: no space' >&2; exit 1\n")
    )
    line = cutlass_ops.prepare()
    assert line.startswith("gate_up_cutlass off: ") and not cutlass_ops.ready(), line
    fresh_prepare.setattr(cutlass_ops, "_status", "not prepared")
    fresh_prepare.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert cutlass_ops.prepare() == "gate_up_cutlass off: built for sm_90a, this GPU is sm_80"


def test_off_by_default_and_the_model_path_unchanged():
    """Experimental: without HRM_KERNELS=all nothing is built, and the dispatcher never takes the op."""
    assert cutlass_ops.GATE_UP_CUTLASS == (os.environ.get("HRM_KERNELS", "auto") == "all")
    if not cutlass_ops.GATE_UP_CUTLASS:
        assert cutlass_ops.prepare() == "" and not cutlass_ops.ready()


def _toolchain():
    nvcc, cutlass = cutlass_ops.find_nvcc(), cutlass_ops.find_cutlass()
    if nvcc is None or cutlass is None:
        pytest.skip("nvcc or CUTLASS not here (.ci/run brings both as wheels: CUDA_HOME, HRM_CUTLASS_DIR)")
    return nvcc, cutlass


@pytest.mark.slow
def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """The real source through nvcc for sm_90a (object only: no GPU, no CUDA runtime needed): both configs build
    without register spills and without ptxas serialising the wgmma instructions."""
    nvcc, cutlass = _toolchain()
    cmd = [a for a in cutlass_ops.build_command(nvcc, cutlass, tmp_path / "k.o") if a != "-shared"]
    done = subprocess.run([*cmd[:-1], "-c", "-Xptxas", "-v", cmd[-1]], capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "C7510" not in out and "wgmma serialization" not in out.lower(), out[-3000:]
    kernels = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert len(kernels) >= len(cutlass_ops.CONFIGS), out[-3000:]
    # 384 threads a block (a producer and two consumer warpgroups) share 64 K registers: at most 168 each
    assert all(int(r) <= 168 for r in kernels), kernels
    assert all(s == ("0", "0") for s in spills), spills


_SWIZZLE_CHECK = r"""
#include <cstdio>
#include "gate_up_swiglu.cu"
template <int kTileM, int kThreads>
int mismatches() {
  using E = hrm::SwigluTmaEpilogue<kTileM, 128, kThreads>;
  alignas(1024) static hrm::bf16 tile[cute::cosize_v<typename E::SmemLayout>];
  auto s_h = cute::make_tensor(cute::make_smem_ptr(tile), typename E::SmemLayout{});
  int bad = 0, hits[kTileM * E::kOut] = {};
  for (int r = 0; r < kTileM; ++r)
    for (int c = 0; c < E::kOut; ++c) {
      int const off = E::swizzled(r, c);
      bad += off != int(&s_h(r, c) - tile) || off < 0 || off >= kTileM * E::kOut || hits[off]++;
    }
  return bad;
}
int main() { std::printf("mismatches %d %d\n", mismatches<128, 128>(), mismatches<256, 256>()); }
"""


@pytest.mark.slow
def test_tma_epilogue_offsets_are_the_swizzled_layout(tmp_path):
    """The TMA epilogue writes h at offsets it computes itself (SwigluTmaEpilogue::swizzled); they must be where
    CuTe's 128-byte-swizzled layout, the one the TMA store reads, puts each (row, column), each slot once. Built
    and run on the host (no GPU): the source without its kernels."""
    nvcc, cutlass = _toolchain()
    (tmp_path / "check.cu").write_text(_SWIZZLE_CHECK)
    libs = [f"-L{Path(nvcc).resolve().parent.parent / sub}" for sub in ("lib", "lib64")]
    cmd = [
        nvcc,
        "-std=c++17",
        "-arch=sm_90a",
        "--expt-relaxed-constexpr",
        "-DHRM_GATE_UP_LAYOUT_ONLY",
        f"-I{cutlass_ops.SOURCE.parent}",
        f"-I{cutlass / 'include'}",
        f"-I{cutlass / 'tools' / 'util' / 'include'}",
        *libs,
        "-o",
        str(tmp_path / "check"),
        str(tmp_path / "check.cu"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = subprocess.run(
        [str(tmp_path / "check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LD_LIBRARY_PATH": ":".join(a[2:] for a in libs)},
    )
    assert run.stdout.strip() == "mismatches 0 0", run.stdout + run.stderr


@pytest.mark.skipif(not ON_HOPPER, reason="the kernel runs on Hopper (sm_90) GPUs")
@pytest.mark.parametrize("tokens, d, m", [(62976, 512, 1536), (1000, 512, 1536), (130, 256, 192), (5, 64, 64)])
@pytest.mark.parametrize("config", [i for i in range(len(cutlass_ops.CONFIGS)) if i != cutlass_ops.PRODUCT_CONFIG])
def test_kernel_matches_the_pytorch_path_and_the_triton_kernel(tokens, d, m, config):
    line = cutlass_ops.prepare(force=True)
    assert cutlass_ops._lib is not None, line
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device="cuda").bfloat16()
    w = torch.randn(2 * m, d, device="cuda") / d**0.5
    with torch.no_grad():
        out = cutlass_ops.gate_up_swiglu_cutlass(x, w, config)
        ref = _swiglu(x, w)
        triton_out = torch.ops.hrm.gate_up_swiglu_tma(x, w.bfloat16())
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= 2e-2, err
    # the roundings of the PyTorch path: most outputs bit-equal, the rest a rounding step away
    assert (out == ref).float().mean().item() >= 0.95
    assert (out == triton_out).float().mean().item() >= 0.95
    # deterministic: the same bits twice
    assert torch.equal(cutlass_ops.gate_up_swiglu_cutlass(x, w, config), out)


@pytest.mark.skipif(not ON_HOPPER, reason="the kernel runs on Hopper (sm_90) GPUs")
@pytest.mark.parametrize("tokens, d, m", [(62976, 512, 1536), (130, 256, 192)])
def test_product_config_is_the_matmul(tokens, d, m):
    """The timing reference (CUTLASS's own epilogue, no gating) returns the bf16 product of the interleaved weight."""
    line = cutlass_ops.prepare(force=True)
    assert cutlass_ops._lib is not None, line
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device="cuda").bfloat16()
    w_il = cutlass_ops.interleave_gate_up((torch.randn(2 * m, d, device="cuda") / d**0.5).bfloat16()).contiguous()
    with torch.no_grad():
        out = torch.ops.hrm.gate_up_swiglu_cutlass(x, w_il, cutlass_ops.PRODUCT_CONFIG)
        ref = F.linear(x, w_il)
    assert out.shape == ref.shape
    assert (out == ref).float().mean().item() >= 0.95
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 1e-2
