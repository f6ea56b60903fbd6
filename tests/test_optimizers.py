"""AdamATan2 against a per-element float64 Python reference; backend selection; state round trip."""

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from utils import optimizers
from utils.optimizers import ADAM_ATAN2_BACKEND, AdamATan2

BETAS = (0.9, 0.95)


class ReferenceAdamATan2:
    """Element-by-element AdamATan2 math in Python floats, one scalar at a time."""

    def __init__(self, values: list[float], weight_decay: float):
        self.w = list(values)
        self.m = [0.0] * len(values)
        self.v = [0.0] * len(values)
        self.t = 0
        self.weight_decay = weight_decay

    def step(self, grads: list[float], lr: float) -> None:
        b1, b2 = BETAS
        self.t += 1
        for i, g in enumerate(grads):
            self.w[i] *= 1 - lr * self.weight_decay
            self.m[i] += (1 - b1) * (g - self.m[i])
            self.v[i] += (1 - b2) * (g * g - self.v[i])
            denom = math.sqrt(self.v[i]) / math.sqrt(1 - b2**self.t)
            self.w[i] -= lr / (1 - b1**self.t) * math.atan2(self.m[i], denom)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (), (2, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_backend_flag():
    assert ADAM_ATAN2_BACKEND in ("fused-cuda", "triton", "foreach")
    if not torch.cuda.is_available():
        assert ADAM_ATAN2_BACKEND == "foreach"


def test_env_forces_portable_backend(monkeypatch):
    monkeypatch.setenv("HRM_ADAM_ATAN2_BACKEND", "foreach")
    assert optimizers._probe_fused_backend() is None
    monkeypatch.setenv("HRM_ADAM_ATAN2_BACKEND", "triton")  # never the package
    assert optimizers._probe_fused_backend() is None


@pytest.mark.parametrize(
    "choice, fused, triton_ok, skip_flag, expected",
    [
        # The package's kernel would read a device skip flag on the host (a wait every step): Triton takes
        # those steps where it can run them.
        ("auto", True, True, True, "triton"),
        ("auto", True, True, False, "fused-cuda"),
        ("auto", True, False, True, "fused-cuda"),
        ("auto", False, True, True, "triton"),
        ("auto", False, True, False, "triton"),
        ("auto", False, False, True, "foreach"),
        ("fused-cuda", True, True, True, "fused-cuda"),
        ("fused-cuda", False, True, True, "triton"),
        ("triton", True, True, False, "triton"),
        ("foreach", True, True, True, "foreach"),
    ],
)
def test_backend_of_a_step(choice, fused, triton_ok, skip_flag, expected):
    assert optimizers.pick_backend(choice, fused, triton_ok, skip_flag) == expected


def test_bad_backend_choice_is_named():
    env = {**os.environ, "HRM_ADAM_ATAN2_BACKEND": "cuda"}
    out = subprocess.run(
        [sys.executable, "-c", "import utils.optimizers"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "HRM_ADAM_ATAN2_BACKEND='cuda': expected one of auto, fused-cuda, triton, foreach" in out.stderr


def test_skip_flag_never_waits_for_the_host_on_the_triton_path(monkeypatch):
    """A step given a skip flag asks for the backend of flagged steps and, Triton usable, hands the flag to the
    kernel without reading it: `.item()` on the flag would make every train step wait for the GPU."""

    class Flag(torch.Tensor):
        def item(self):
            raise AssertionError("skip flag read on the host")

    calls = []
    monkeypatch.setattr(optimizers, "_fused_backend", object())
    monkeypatch.setattr(optimizers, "_TRITON_ENABLED", True)
    monkeypatch.setattr(optimizers, "_triton_usable", lambda tensors: True)
    monkeypatch.setattr(optimizers, "_BACKEND_CHOICE", "auto")
    monkeypatch.setattr(optimizers, "pick_backend", _recording(optimizers.pick_backend, calls))
    monkeypatch.setattr(optimizers, "_triton_adam_atan2_", lambda *args: calls.append("triton kernel"))
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    flag = torch.zeros((), dtype=torch.bool).as_subclass(Flag)
    AdamATan2(params, lr=0.01, betas=BETAS).step(skip_if=flag)
    # fused_available is False: the package never takes CPU tensors (the choice itself is tested above).
    assert calls == [("auto", False, True, True), "triton", "triton kernel"]


def test_matches_per_element_reference_over_steps():
    params = make_params()
    frozen = torch.nn.Parameter(torch.ones(3))  # never gets a gradient
    groups = [
        {"params": params[:3], "weight_decay": 0.1},
        {"params": [params[3], frozen], "weight_decay": 0.5, "lr_scale": 0.5},
    ]
    opt = AdamATan2(groups, lr=0.0, betas=BETAS, weight_decay=0.0)
    refs = [
        ReferenceAdamATan2(p.detach().flatten().double().tolist(), wd) for p, wd in zip(params, [0.1, 0.1, 0.1, 0.5])
    ]

    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        base_lr = 0.05 * step / 6  # changes every step, as a schedule would
        for group in opt.param_groups:
            group["lr"] = base_lr * group.get("lr_scale", 1.0)
        for i, p in enumerate(params):
            # the last param has an all-zero gradient: m = v = 0 and atan2(0, 0) = 0 -> weight decay only
            p.grad = torch.zeros_like(p) if i == 3 else torch.randn(p.shape, generator=g) * 10 ** (i - 2)
        opt.step()
        for i, (p, ref) in enumerate(zip(params, refs)):
            ref.step(p.grad.flatten().double().tolist(), base_lr * (0.5 if i == 3 else 1.0))
            expected = torch.tensor(ref.w, dtype=torch.float64).view(p.shape)
            torch.testing.assert_close(p.detach().double(), expected, rtol=2e-6, atol=2e-7)

    state = opt.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}  # the adam-atan2 package's layout
    assert state["step"].dtype == torch.float32 and state["step"].ndim == 0 and state["step"].item() == 6
    torch.testing.assert_close(
        state["exp_avg"].double().flatten(), torch.tensor(refs[0].m, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        state["exp_avg_sq"].double().flatten(), torch.tensor(refs[0].v, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )
    assert torch.equal(frozen.detach(), torch.ones(3)) and frozen not in opt.state


def test_update_is_bounded_by_lr_over_bias_correction():
    # |atan2| <= π/2, so the first step moves a weight (no decay) by at most lr/(1-β1) · π/2, whatever the gradient
    # scale (kept where g² is finite in fp32).
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1e15, -1e15, 1e-15, 0.0])
    AdamATan2([p], lr=0.01, betas=BETAS, weight_decay=0.0).step()
    assert torch.isfinite(p).all()
    assert p.detach().abs().max().item() <= 0.01 / (1 - BETAS[0]) * math.pi / 2 + 1e-6
    # First step: m = 0.1 g, √v/√(1-β2) = |g|, so the update is lr/0.1 · atan(0.1 · sign g) for any g ≠ 0.
    assert p[0].item() == pytest.approx(-0.1 * math.atan(0.1), rel=1e-5)
    assert p[1].item() == pytest.approx(0.1 * math.atan(0.1), rel=1e-5)
    assert p[2].item() == pytest.approx(-0.1 * math.atan(0.1), rel=1e-5)
    assert p[3].item() == 0.0


def test_lr_zero_leaves_weights():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = AdamATan2(params, lr=0, betas=BETAS, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert opt.state[params[0]]["step"].item() == 1


def test_state_dict_round_trip_continues_exactly():
    def grads_for(step, params):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)

    params = make_params()
    opt = AdamATan2(params, lr=0.01, betas=BETAS, weight_decay=0.1)
    for step in range(5):
        grads_for(step, params)
        opt.step()

    resumed = make_params()
    opt2 = AdamATan2(resumed, lr=0.01, betas=BETAS, weight_decay=0.1)
    for step in range(3):
        grads_for(step, resumed)
        opt2.step()
    saved = opt2.state_dict()
    weights = [p.detach().clone() for p in resumed]

    fresh = [torch.nn.Parameter(w) for w in weights]
    opt3 = AdamATan2(fresh, lr=0.01, betas=BETAS, weight_decay=0.1)
    opt3.load_state_dict(saved)
    for step in range(3, 5):
        grads_for(step, fresh)
        opt3.step()
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"weight_decay": -1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdamATan2(make_params(), **kwargs)


def _recording(fn, calls):
    def wrapper(choice, fused_available, triton_usable, skip_flag):
        calls.append((choice, fused_available, triton_usable, skip_flag))
        result = fn(choice, fused_available, triton_usable, skip_flag)
        calls.append(result)
        return result

    return wrapper


@pytest.mark.gpu
@pytest.mark.skipif(ADAM_ATAN2_BACKEND != "fused-cuda", reason="adam-atan2 CUDA backend not available")
def test_fused_cuda_matches_foreach(monkeypatch):
    cpu = make_params()
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu = AdamATan2(cpu, lr=0.01, betas=BETAS, weight_decay=0.1)
    opt_gpu = AdamATan2(gpu, lr=0.01, betas=BETAS, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    optimizers.triton is None or not torch.cuda.is_available(),
    reason="needs Triton and CUDA (Triton's CPU interpreter has no libdevice.atan2)",
)
def test_triton_kernel_matches_foreach_update():
    """The one-pass Triton AdamATan2 kernel gives the foreach path's update over several steps."""
    from utils.optimizers import _foreach_adam_atan2_, _triton_adam_atan2_

    device = "cuda"
    gen = torch.Generator().manual_seed(7)
    shapes = [(37,), (5, 300), (1025,)]  # odd sizes: partial last blocks
    params = [torch.randn(s, generator=gen) for s in shapes]
    states = [[p.clone().to(device) for p in params] for _ in range(2)]
    moments = [
        [[torch.zeros(s, device=device) for s in shapes], [torch.zeros(s, device=device) for s in shapes]]
        for _ in range(2)
    ]
    steps = [[torch.zeros((), device=device) for _ in shapes] for _ in range(2)]
    for step in range(4):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        lr = 1e-2 * (step + 1)
        for impl, ps, (ms, vs), ts in zip((_foreach_adam_atan2_, _triton_adam_atan2_), states, moments, steps):
            torch._foreach_add_(ts, 1)
            impl(ps, grads, ms, vs, ts, lr=lr, beta1=0.9, beta2=0.95, weight_decay=0.1)
    for a, b in zip(states[0], states[1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(moments[0][1], moments[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert not torch.equal(states[1][0].cpu(), params[0])  # the update did move the weights


def _snapshot(opt: AdamATan2, params) -> list[torch.Tensor]:
    state = [t.clone() for p in params for t in opt.state[p].values()] if opt.state else []
    return [p.detach().clone() for p in params] + state


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_skip_if_true_changes_nothing_and_false_is_a_normal_step(device):
    """`skip_if` (a device flag): True leaves weights, moments and step counts bit-identical; False steps
    exactly like a call without it. On CUDA this exercises the Triton kernel's on-device skip."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    guarded = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(seed=4)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in guarded]
    opt_guarded = AdamATan2(guarded, lr=0.02, betas=BETAS, weight_decay=0.1)
    opt_plain = AdamATan2(plain, lr=0.02, betas=BETAS, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    for step, skip in enumerate([False, True, False, True, True, False]):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in guarded]
        if skip:
            grads[0] = grads[0] * float("nan")  # what the guard is for
        for p, g in zip(guarded, grads):
            p.grad = g.clone()
        before = _snapshot(opt_guarded, guarded)
        opt_guarded.step(skip_if=torch.tensor(skip, device=device))
        if skip:
            after = _snapshot(opt_guarded, guarded)
            assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before)), step
            continue
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        opt_plain.step()
        for a, b in zip(guarded, plain):
            assert torch.equal(a.detach(), b.detach()), step
    counts = [float(opt_guarded.state[p]["step"]) for p in guarded]
    assert counts == [3.0] * len(guarded)  # three applied steps of six
