"""CUDA C++ kernels built with CUTLASS (models/cuda/*.cu), compiled on the machine that runs them and cached.

`gate_up_cutlass` (experimental, `HRM_KERNELS=all`): the no-grad SwiGLU gate/up matmul with the gating in its
epilogue, as CUTLASS's Hopper warp-specialised GEMM (models/cuda/gate_up_swiglu.cu) with an epilogue of our own. It
computes what `models.fused_ops.fused_gate_up_swiglu` computes, with the same roundings, and is meant to replace its
persistent Triton kernel on Hopper where it measures faster. On an H100 (2026-12-06) the default config, ping-pong
128x128x64 tiles with h staged through shared memory, took 0.359 ms at the sudoku shape (62,976 tokens,
512 -> 2 x 1536) against the Triton kernel's 0.401, and 0.413 against 0.470 at TRM's (74,496 tokens): 10-12%
faster alone, and in the whole step on all four shapes (train 1-2%, eval 2-3%) with TRM's learning curve
unchanged. It stays experimental until the whole-model GPU tests with it and HRM's learning check have run.
(Its first epilogue computed the sigmoid with an IEEE division, whose slow-path branch serialised the 64 outputs a
thread and cost 0.15-0.2 ms; the sigmoid is now the Triton kernel's branch-free `ex2.approx` + `div.full`
sequence. The two configs storing h by TMA, 0.434 ms, were not faster.)

Building: nvcc (`$CUDA_HOME/bin/nvcc`, else the one on PATH, else /usr/local/cuda/bin/nvcc) and CUTLASS 4's headers
(`$HRM_CUTLASS_DIR`, a folder with `include/` and `tools/util/include/`, else the `nvidia-cutlass` package's
copy) compile the source for sm_90a into a shared library under `$HRM_CUDA_CACHE` (default
~/.cache/hrm/cuda), named by a hash of the source, the flags and nvcc's version; a lock file lets the ranks of
one machine build it once. `prepare()` does this at a launcher's start, before any step is timed, and returns
one line for the banner (built in so many seconds, loaded from the cache, or why not: the kernel then stays off
and the Triton or PyTorch path runs). Nothing here runs at import.

The library has a C entry point called through ctypes on PyTorch's current stream; the op is an opaque
`torch.library.custom_op` (`hrm::gate_up_swiglu_cutlass`), so torch.compile keeps it whole.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from models.triton_common import kernel_on

SOURCE = Path(__file__).resolve().parent / "cuda" / "gate_up_swiglu.cu"
GATE_UP_CUTLASS = kernel_on("gate_up_cutlass")
INTERLEAVE = 64  # rows of gate, then of up, a 128-column tile of the interleaved weight holds
# The source's configurations, in its order (models/cuda/gate_up_swiglu.cu, `Configs`): the tile, a cluster, how
# the epilogue stores h (gate/up through shared memory; the gating in registers with h through shared memory; the
# gating in registers with direct stores; the gating in registers with h stored by TMA), the cooperative schedule,
# and the product without the gating (a timing reference for the matmul alone: it returns the [T, 2m] product of
# the interleaved weight, not h).
CONFIGS = (
    "128x128x64",
    "128x128x64_cluster2x1",
    "128x128x64_registers_smem_h",
    "128x128x64_registers_direct",
    "256x128x64_cooperative_direct",
    "128x128x64_registers_tma",
    "256x128x64_cooperative_tma",
    "product_128x128x64",
)
PRODUCT_CONFIG = CONFIGS.index("product_128x128x64")
DEFAULT_CONFIG = "128x128x64"  # the fastest measured since the branch-free sigmoid (RESULTS.md, tenth session)
CONFIG = os.environ.get("HRM_GATE_UP_CUTLASS_CONFIG", "").strip() or DEFAULT_CONFIG
FLAGS = ("-std=c++17", "-arch=sm_90a", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-shared")

_lib: ctypes.CDLL | None = None
_status = "not prepared"
READY = False  # set by prepare(); a plain bool, which torch.compile guards on as a constant
_LAUNCH: dict[tuple, tuple[int, int]] = {}  # (device, config, m, n, k) -> (SM count, workspace bytes)


def parse_config(text: str) -> int:
    """HRM_GATE_UP_CUTLASS_CONFIG: an index into CONFIGS or one of its names. Bad values raise ValueError."""
    if text in CONFIGS:
        return CONFIGS.index(text)
    if text.isdigit() and int(text) < len(CONFIGS):
        return int(text)
    raise ValueError(
        f"HRM_GATE_UP_CUTLASS_CONFIG={text!r}: expected 0-{len(CONFIGS) - 1} or one of {', '.join(CONFIGS)}"
    )


CONFIG_INDEX = parse_config(CONFIG)
if CONFIG_INDEX == PRODUCT_CONFIG:
    raise ValueError(f"HRM_GATE_UP_CUTLASS_CONFIG={CONFIG!r}: the product config is a timing reference, not h")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_cutlass() -> Path | None:
    """A folder with CUTLASS's include/cutlass/cutlass.h and tools/util/include, or None."""
    given = os.environ.get("HRM_CUTLASS_DIR")
    roots = [Path(given)] if given else []
    try:
        import cutlass_library  # the nvidia-cutlass wheel: headers under cutlass_library/source

        roots.append(Path(cutlass_library.__file__).resolve().parent / "source")
    except ImportError:
        pass
    return next((r for r in roots if (r / "include" / "cutlass" / "cutlass.h").is_file()), None)


def build_command(nvcc: str, cutlass: Path, output: Path) -> list[str]:
    return [
        nvcc,
        *FLAGS,
        f"-I{cutlass / 'include'}",
        f"-I{cutlass / 'tools' / 'util' / 'include'}",
        "-o",
        str(output),
        str(SOURCE),
    ]


def library_path(nvcc: str, cutlass: Path) -> Path:
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), str(cutlass).encode()):
        digest.update(part)
    cache = Path(os.environ.get("HRM_CUDA_CACHE") or Path.home() / ".cache" / "hrm" / "cuda")
    return cache / f"{SOURCE.stem}-{digest.hexdigest()[:16]}.so"


def build(nvcc: str, cutlass: Path) -> tuple[Path, float | None]:
    """The cached library, built first where absent (one rank builds, the others wait on the lock). Returns its
    path and the build's seconds (None: it was in the cache). A failed build raises RuntimeError with nvcc's
    last line."""
    path = library_path(nvcc, cutlass)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path, None
        start = time.perf_counter()
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(build_command(nvcc, cutlass, partial), capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            raise RuntimeError(f"nvcc failed on {SOURCE.name}: {lines[-1] if lines else 'no output'}")
        os.replace(partial, path)  # whole or absent: a crash mid-build leaves no half library
        return path, time.perf_counter() - start


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.hrm_gate_up_swiglu.restype = ctypes.c_int
    lib.hrm_gate_up_swiglu.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 3, *[ctypes.c_int] * 4]
    lib.hrm_gate_up_swiglu.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.hrm_gate_up_swiglu_workspace.restype = ctypes.c_size_t
    lib.hrm_gate_up_swiglu_workspace.argtypes = [ctypes.c_int] * 5
    return lib


def prepare(force: bool = False) -> str:
    """Build or load the CUTLASS kernels if they are switched on (or `force`), once per process; returns the
    banner's line about them ("" when off). Never raises for a missing tool or a failed build: the kernel
    stays off and the line says why."""
    global _lib, _status, READY
    if not (GATE_UP_CUTLASS or force):
        return ""
    if _status != "not prepared":  # loaded, or known to be off
        return _status
    why = None
    if not torch.cuda.is_available():
        why = "no CUDA device"
    elif torch.cuda.get_device_capability() != (9, 0):
        why = f"built for sm_90a, this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    nvcc = find_nvcc() if why is None else None
    cutlass = find_cutlass() if why is None else None
    if why is None and nvcc is None:
        why = "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)"
    if why is None and cutlass is None:
        why = "CUTLASS headers not found (HRM_CUTLASS_DIR or the nvidia-cutlass package)"
    if why is None:
        try:
            path, seconds = build(nvcc, cutlass)
            _lib = _load(path)
            READY = GATE_UP_CUTLASS  # loaded with `force` only (benchmarks): the op runs, the models do not take it
            how = f"built in {seconds:.1f} s" if seconds is not None else "loaded from the cache"
            _status = f"gate_up_cutlass {how} ({path}; config {CONFIGS[CONFIG_INDEX]})"
            return _status
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            why = str(e).splitlines()[0]
    _status = f"gate_up_cutlass off: {why}"
    return _status


def ready() -> bool:
    """Whether the models take the kernel: switched on and loaded by `prepare()` (a plain module flag)."""
    return READY


def supported(x: torch.Tensor, w_gate_up: torch.Tensor) -> bool:
    """Shapes the kernel takes: bf16 rows on CUDA, d a multiple of 8 (16-byte TMA rows), m a multiple of 64."""
    m2, d = w_gate_up.shape
    return x.is_cuda and x.dtype == torch.bfloat16 and d % 8 == 0 and m2 % (2 * INTERLEAVE) == 0


def interleave_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """[2m, d] weight (gate rows, then up rows) -> the kernel's order: blocks of 64 gate rows, each followed by the
    64 up rows of the same outputs. A view plus one copy, which torch.compile fuses with the bf16 cast."""
    m2, d = w_gate_up.shape
    blocks = w_gate_up.view(2, m2 // (2 * INTERLEAVE), INTERLEAVE, d).transpose(0, 1)
    return blocks.reshape(m2, d)


@torch.library.custom_op("hrm::gate_up_swiglu_cutlass", mutates_args=())
def _gate_up_swiglu_cutlass(rows: torch.Tensor, w_interleaved: torch.Tensor, config: int) -> torch.Tensor:
    if _lib is None:
        raise RuntimeError("gate_up_cutlass: models.cutlass_ops.prepare() has not loaded the kernel")
    m, k = rows.shape
    n = w_interleaved.shape[0]
    h = rows.new_empty((m, n if config == PRODUCT_CONFIG else n // 2))
    device = rows.device.index if rows.device.index is not None else torch.cuda.current_device()
    key = (device, config, m, n, k)
    if key not in _LAUNCH:  # the host's per-shape questions, asked once
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        _LAUNCH[key] = sms, _lib.hrm_gate_up_swiglu_workspace(config, m, n, k, sms)
    sms, size = _LAUNCH[key]
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=rows.device)
    stream = torch.cuda.current_stream(rows.device).cuda_stream
    status = _lib.hrm_gate_up_swiglu(
        config, rows.data_ptr(), w_interleaved.data_ptr(), h.data_ptr(), m, n, k, sms,
        workspace.data_ptr(), size, stream,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"gate_up_cutlass: the kernel returned status {status} for x {tuple(rows.shape)}")
    return h


@_gate_up_swiglu_cutlass.register_fake
def _(rows: torch.Tensor, w_interleaved: torch.Tensor, config: int) -> torch.Tensor:
    n = w_interleaved.shape[0]
    return rows.new_empty((rows.shape[0], n if config == PRODUCT_CONFIG else n // 2))


def gate_up_swiglu_cutlass(rows: torch.Tensor, w_gate_up: torch.Tensor, config: int | None = None) -> torch.Tensor:
    """silu(rows @ Wg^T) * (rows @ Wu^T) for bf16 rows [T, d] and w_gate_up [2m, d] (any float dtype, gate rows
    first) on the CUTLASS kernel (`config`: an index into CONFIGS, default HRM_GATE_UP_CUTLASS_CONFIG's);
    `prepare()` must have loaded it and `supported` must hold."""
    weight = interleave_gate_up(w_gate_up.to(rows.dtype)).contiguous()
    return torch.ops.hrm.gate_up_swiglu_cutlass(rows.contiguous(), weight, CONFIG_INDEX if config is None else config)
