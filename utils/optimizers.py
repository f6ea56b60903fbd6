"""AdamATan2: Adam with `atan2(m, √v)` in place of `m / (√v + ε)` (Everett et al. 2024), no ε to tune.

Design choices:
- Three backends with one state layout (`step` as a 0-dim fp32 tensor on the param's device,
  `exp_avg`, `exp_avg_sq`), so optimizer state dicts move freely between them:
  * "fused-cuda": the CUDA kernel of the `adam-atan2` package, used only when its extension imports
    and a tiny step on the GPU matches the reference math. The kernel is called directly: the
    package's Python wrapper calls a torch helper removed in torch 2.11 and crashes there. It cannot
    read a skip flag on the device, so steps given one (`skip_if`, what the launcher passes on CUDA)
    take the Triton kernel instead: the package's kernel would make every such step wait for the GPU.
  * "triton": on CUDA, a one-pass Triton kernel per tensor (same math); the default for CUDA steps
    without the package and for every CUDA step with a skip flag.
  * "foreach": the same math with `torch._foreach_*` ops (per-tensor `atan2`, which has no foreach
    form), on any device. Bias corrections are computed from the step tensors on the device, so a
    step never synchronises with the host.
- The probe runs once at import, on the GPU of `LOCAL_RANK` (the one torchrun assigns), so ranks do
  not all create a context on GPU 0. `HRM_ADAM_ATAN2_BACKEND` (environment, read at import): `auto`
  (default, as above), `fused-cuda` (the package's kernel for every step, reading a skip flag on the
  host: one synchronisation per step), `triton` (never the package) or `foreach` (the portable path).
- `lr` is read from the param group at every step (the launcher's schedule rewrites it) and may be 0.
- `step(skip_if=flag)` drops the update when the 0-dim bool tensor `flag` holds True: weights, moments
  and step counts stay as they were. The Triton kernel reads the flag on the device, so a launcher can
  guard against a non-finite gradient without waiting for the device; the other backends read it once
  on the host (a synchronisation, as before the guard existed).
"""

import math
import os

import torch
from torch.optim.optimizer import Optimizer, ParamsT

try:  # optional accelerator: a one-pass Triton kernel for CUDA when the adam-atan2 package is absent
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _adam_atan2_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, skip_ptr, n_elements, lr, decay, beta1, beta2, log_beta1, log_beta2,
        HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One read and one write of p, m, v (and one read of g) instead of the nine passes of the
        # foreach path; the step count stays on the device, so no host synchronisation.
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        if HAS_SKIP:  # a skipped step masks every load and store: nothing is read or written
            mask = mask & (tl.load(skip_ptr) == 0)
        t = tl.load(step_ptr)
        p = tl.load(p_ptr + offsets, mask=mask)
        g = tl.load(g_ptr + offsets, mask=mask)
        m = tl.load(m_ptr + offsets, mask=mask)
        v = tl.load(v_ptr + offsets, mask=mask)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)  # lerp(m, g, 1 - beta1), weight < 0.5 form
        v = v + (1.0 - beta2) * (g * g - v)
        step_size = lr / (1.0 - tl.exp(t * log_beta1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(t * log_beta2))
        p = p - step_size * libdevice.atan2(m, tl.sqrt(v) / bias_correction2_sqrt)
        tl.store(p_ptr + offsets, p, mask=mask)
        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)


def _triton_adam_atan2_(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, skip=None
) -> None:
    """Same update as `_foreach_adam_atan2_`, one kernel per tensor (contiguous fp32 CUDA tensors).

    `skip`: None, or a 0-dim uint8 tensor on the device; when nonzero every kernel leaves its tensors as
    they are (the caller keeps the step counts unchanged too).
    """
    decay = 1 - lr * weight_decay  # computed in double on the host, as the foreach path does
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        n = p.numel()
        _adam_atan2_kernel[(triton.cdiv(n, 1024),)](
            p, g, m, v, t, t if skip is None else skip, n, lr, decay, beta1, beta2, math.log(beta1), math.log(beta2),
            HAS_SKIP=skip is not None, BLOCK=1024,
        )  # fmt: skip


def _triton_usable(tensors: list[torch.Tensor]) -> bool:
    return triton is not None and all(t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _foreach_adam_atan2_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One update of tensors on one device; `state_steps` already hold the new step count t."""
    # Decoupled weight decay first, on the old weights.
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)

    # step_size = lr / (1 - beta1^t); denom = sqrt(v) / sqrt(1 - beta2^t), both per tensor.
    bias_correction1 = torch._foreach_pow(beta1, state_steps)
    torch._foreach_neg_(bias_correction1)
    torch._foreach_add_(bias_correction1, 1)
    step_size = torch._foreach_reciprocal(bias_correction1)
    torch._foreach_mul_(step_size, lr)

    bias_correction2_sqrt = torch._foreach_pow(beta2, state_steps)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_add_(bias_correction2_sqrt, 1)
    torch._foreach_sqrt_(bias_correction2_sqrt)

    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    # atan2 is bounded and well defined at m = v = 0 (gives 0), unlike m / sqrt(v).
    updates = [torch.atan2(m, d, out=d) for m, d in zip(exp_avgs, denom)]
    torch._foreach_mul_(updates, step_size)
    torch._foreach_sub_(params, updates)


BACKEND_CHOICES = ("auto", "fused-cuda", "triton", "foreach")


def _backend_choice() -> str:
    choice = os.environ.get("HRM_ADAM_ATAN2_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"HRM_ADAM_ATAN2_BACKEND={choice!r}: expected one of {', '.join(BACKEND_CHOICES)}")
    return choice


def pick_backend(choice: str, fused_available: bool, triton_usable: bool, skip_flag: bool) -> str:
    """The backend of one step: "fused-cuda", "triton" or "foreach" (see the module doc).

    `fused_available`: the package's kernel passed its probe and the tensors are on CUDA; `triton_usable`: Triton
    can run these tensors; `skip_flag`: the step carries a device skip flag (`skip_if`)."""
    if choice == "foreach":
        return "foreach"
    if fused_available and choice != "triton" and (choice == "fused-cuda" or not (skip_flag and triton_usable)):
        return "fused-cuda"
    return "triton" if triton_usable else "foreach"


def _probe_fused_backend():
    """The `adam_atan2_backend` extension if it imports and computes a correct step on CUDA, else None."""
    if _backend_choice() in ("foreach", "triton"):
        return None
    try:
        import adam_atan2_backend
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", index if index < torch.cuda.device_count() else 0)
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(37, generator=gen) for _ in range(2)] + [torch.zeros(37), torch.zeros(37)]
        fused = [[t.to(device)] for t in tensors] + [[torch.ones((), device=device)]]
        portable = [[t.clone()] for t in tensors] + [[torch.ones(())]]
        adam_atan2_backend.adam_atan2_cuda_impl_(*fused, 1e-2, 0.9, 0.95, 0.1)
        _foreach_adam_atan2_(*portable, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
        torch.cuda.synchronize(device)
        if not torch.allclose(fused[0][0].cpu(), portable[0][0], rtol=0, atol=1e-6):
            return None
        return adam_atan2_backend
    except Exception:  # any failure of the optional kernel means: use the portable path
        return None


_BACKEND_CHOICE = _backend_choice()
_fused_backend = _probe_fused_backend()
_TRITON_ENABLED = triton is not None and torch.cuda.is_available() and _BACKEND_CHOICE != "foreach"
# The backend of CUDA steps without a skip flag (CPU tensors always use foreach), and of those with one.
ADAM_ATAN2_BACKEND = pick_backend(_BACKEND_CHOICE, _fused_backend is not None, _TRITON_ENABLED, skip_flag=False)
ADAM_ATAN2_SKIP_BACKEND = pick_backend(_BACKEND_CHOICE, _fused_backend is not None, _TRITON_ENABLED, skip_flag=True)


class AdamATan2(Optimizer):
    """Per step: t += 1; w *= 1 - lr·wd; m = lerp(m, g, 1-β1); v = lerp(v, g², 1-β2);
    w -= lr/(1-β1^t) · atan2(m, √v/√(1-β2^t))."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"AdamATan2: invalid lr {lr} (must be >= 0)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"AdamATan2: invalid betas[0] {betas[0]} (must be in [0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"AdamATan2: invalid betas[1] {betas[1]} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"AdamATan2: invalid weight_decay {weight_decay} (must be >= 0)")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None, skip_if: torch.Tensor | None = None):
        """One update; with `skip_if` (a 0-dim bool tensor) holding True, nothing changes (see module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        host_skip: list[bool] = []  # the flag read back once, by the first backend that cannot read it on device

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # Group tensors by (device, dtype): foreach ops and the fused kernel need uniform lists.
            buckets: dict[tuple, tuple[list, list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamATan2 does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:
                    # A loaded state dict keeps `step` where it was saved; both backends need it beside p.
                    state["step"] = state["step"].to(p.device)
                bucket = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
                for lst, t in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    lst.append(t)

            for (device, _), (params, grads, exp_avgs, exp_avg_sqs, steps) in buckets.items():
                backend = pick_backend(
                    _BACKEND_CHOICE,
                    fused_available=_fused_backend is not None and device.type == "cuda",
                    triton_usable=_TRITON_ENABLED and _triton_usable(params + grads),
                    skip_flag=skip_if is not None,
                )
                use_triton = backend == "triton"
                skip = None  # the flag on the device, for the Triton kernel
                if skip_if is not None and use_triton:
                    skip = skip_if.to(device=device, dtype=torch.uint8)
                elif skip_if is not None:
                    if not host_skip:
                        host_skip.append(bool(skip_if.item()))
                    if host_skip[0]:
                        continue
                if skip is None:
                    torch._foreach_add_(steps, 1)
                else:  # t stays put on a skipped step. A list operand: the 0-dim-tensor overload reads it on the host.
                    torch._foreach_add_(steps, [(1 - skip).to(steps[0].dtype)] * len(steps))
                if use_triton:
                    _triton_adam_atan2_(
                        params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1, beta2, group["weight_decay"],
                        skip,
                    )  # fmt: skip
                elif backend == "fused-cuda":
                    _fused_backend.adam_atan2_cuda_impl_(
                        params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1, beta2, group["weight_decay"]
                    )
                else:
                    _foreach_adam_atan2_(
                        params,
                        grads,
                        exp_avgs,
                        exp_avg_sqs,
                        steps,
                        lr=group["lr"],
                        beta1=beta1,
                        beta2=beta2,
                        weight_decay=group["weight_decay"],
                    )
        return loss
