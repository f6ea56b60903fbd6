"""What the Triton kernels of this package share: the optional-import probe, the kernel switch, and the
in-kernel helpers that keep the kernels' roundings those of the PyTorch path.

Design choices:
- Triton is an optional accelerator, probed once here: without it every kernel module still imports,
  `HAS_TRITON` is False and the models keep their portable PyTorch path.
- `HRM_KERNELS` (environment, read at import) chooses which kernels run: `auto` (default) the ones measured
  faster than the PyTorch path on a GPU (benchmarks/RESULTS.md, speed log), `all` also the experimental ones
  not yet faster (to time them beside the default in one command), `portable` none, so a run takes exactly the
  PyTorch op sequence of models/layers.py (for comparisons and bug hunts). `HRM_KERNELS_OFF=name[,name]`
  leaves out single kernels (names in `DEFAULT_KERNEL_NAMES`, `EXPERIMENTAL_KERNEL_NAMES`), so one command can
  time a new kernel beside the default without it.
- Under the Triton interpreter (TRITON_INTERPRET=1), which runs the same kernels with numpy on CPU
  tensors for the tests, two interpreter defects are worked around behind constexpr flags, leaving the
  compiled GPU code untouched: its 16-bit `tl.dot` returns garbage, so dot operands are upcast to fp32
  (exact: a product of two 16-bit floats fits fp32), and its fp32 -> bf16 cast truncates, so bf16
  rounding is done on the bit pattern (round to nearest even).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator: the models fall back to the portable PyTorch path
    triton = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

_KERNEL_CHOICES = ("auto", "all", "portable")
# Every kernel the models may take, by the name HRM_KERNELS_OFF uses: the default ones (measured faster), then
# the experimental ones (only with HRM_KERNELS=all).
DEFAULT_KERNEL_NAMES = (
    "token_mix",
    "token_mix_layout",
    "gate_up_swiglu",
    "swiglu_backward",
    "token_mix_transposed",
    "token_mix_padded",
)
EXPERIMENTAL_KERNEL_NAMES = ("short_attention", "gate_up_cutlass")


def _kernels_mode() -> str:
    mode = os.environ.get("HRM_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _KERNEL_CHOICES:
        raise ValueError(f"HRM_KERNELS={mode!r}: expected one of {', '.join(_KERNEL_CHOICES)}")
    return mode


def _kernels_off() -> frozenset[str]:
    text = os.environ.get("HRM_KERNELS_OFF", "")
    names = frozenset(name.strip().lower() for name in text.split(",") if name.strip())
    known = DEFAULT_KERNEL_NAMES + EXPERIMENTAL_KERNEL_NAMES
    unknown = sorted(names - set(known))
    if unknown:
        raise ValueError(f"HRM_KERNELS_OFF={text!r}: unknown kernel {unknown[0]!r} (known: {', '.join(known)})")
    return names


KERNELS_MODE = _kernels_mode()
KERNELS_OFF = _kernels_off()
DEFAULT_KERNELS = KERNELS_MODE in ("auto", "all")
EXPERIMENTAL_KERNELS = KERNELS_MODE == "all"


def kernel_on(name: str) -> bool:
    """Whether the kernel `name` may run: a default one unless HRM_KERNELS=portable, an experimental one only with
    HRM_KERNELS=all, and neither when HRM_KERNELS_OFF names it (to time a change beside the default in one
    command). Read once at import; each kernel module keeps the answer in a module constant."""
    if name in DEFAULT_KERNEL_NAMES:
        return DEFAULT_KERNELS and name not in KERNELS_OFF
    if name in EXPERIMENTAL_KERNEL_NAMES:
        return EXPERIMENTAL_KERNELS and name not in KERNELS_OFF
    raise ValueError(f"kernel_on: unknown kernel {name!r}")


def parse_op(text: str, name: str, default: str) -> str:
    """How torch.compile is to see a kernel, from the environment variable `name` (value `text`, empty for
    `default`): `triton_op` (traced: Inductor compiles and launches the kernel with its own code) or `custom_op`
    (opaque: the op's body launches it as a direct call does). Bad values raise ValueError naming them."""
    op = text.strip().lower() or default
    if op not in ("custom_op", "triton_op"):
        raise ValueError(f"{name}={text!r}: expected custom_op or triton_op")
    return op


def describe_kernels() -> str:
    """One line for the launchers' start-up banner: which kernel mode runs, what is switched off, and what is
    missing for the rest."""
    mode = KERNELS_MODE + (f" without {','.join(sorted(KERNELS_OFF))}" if KERNELS_OFF else "")
    if KERNELS_MODE != "portable" and not HAS_TRITON:
        return f"{mode} (Triton not installed: the Triton kernels fall back to PyTorch)"
    return mode


def kernel_call(x: torch.Tensor) -> bool:
    """What every Triton kernel of the models needs of a call: Triton, a CUDA tensor (or the interpreter), 16-bit
    activations. Device and dtype only: torch.compile guards on it without a graph break."""
    return HAS_TRITON and (x.is_cuda or INTERPRET) and x.dtype in SUPPORTED_DTYPES


def no_grad_kernel_call(x: torch.Tensor) -> bool:
    """`kernel_call`, with autograd off: what the forward-only kernels need (they have no backward)."""
    return kernel_call(x) and not torch.is_grad_enabled()


def local_gpu() -> int:
    """The index of this process's GPU: torchrun's LOCAL_RANK one (all ranks' GPUs are alike), so no rank queries or
    initialises another rank's device."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def kernel_flags(dtype: torch.dtype) -> dict:
    """fp32 inputs use an exact fp32 dot; the interpreter needs it for 16-bit inputs too (module doc)."""
    return {"FP32_DOT": INTERPRET or dtype == torch.float32, "INTERPRET": INTERPRET}


if HAS_TRITON:

    def autotune_configs(gpu: list[tuple[dict, int, int]], interpret: dict) -> list:
        """Autotune configs: a few Hopper candidates on GPU, one small tile under the interpreter."""
        if INTERPRET:
            return [triton.Config(interpret, num_warps=4, num_stages=1)]
        return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu]

    @triton.jit
    def dot(a, b, acc, FP32_DOT: tl.constexpr):
        """acc + a @ b with fp32 accumulation (exact fp32 operands when FP32_DOT, see the module doc)."""
        if FP32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def round_to(x, out_ty: tl.constexpr, INTERPRET: tl.constexpr):
        """Round fp32 `x` to `out_ty` (nearest even) and return it as fp32, i.e. x.to(out_ty).to(fp32)."""
        if INTERPRET and out_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round on the bit pattern instead (finite values).
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(out_ty).to(tl.float32)
