"""The GPU kernel switch (models/triton_common.py): `HRM_KERNELS` picks the set, `HRM_KERNELS_OFF` leaves single
kernels out. Both are read at import, so each case runs a fresh interpreter."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

REPORT = "import models.triton_common as t; print(t.DEFAULT_KERNELS, t.EXPERIMENTAL_KERNELS, {})"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HRM_KERNELS", "HRM_KERNELS_OFF")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize(
    "value, default, experimental",
    [(None, True, False), ("auto", True, False), ("all", True, True), ("portable", False, False)],
)
def test_kernels_switch_reads_the_environment(value, default, experimental):
    """HRM_KERNELS: auto (default) the kernels measured faster, all also the experimental ones, portable none."""
    env = {} if value is None else {"HRM_KERNELS": value}
    out = _run(REPORT.format("t.kernel_on('swiglu_backward'), t.kernel_on('short_attention')"), **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(default), str(experimental), str(default), str(experimental)]


def test_bad_kernels_switch_is_named():
    bad = _run("import models.triton_common", HRM_KERNELS="fast")
    assert bad.returncode != 0 and "HRM_KERNELS='fast': expected one of auto, all, portable" in bad.stderr


def test_kernels_off_leaves_out_the_named_kernels_only():
    names = "t.DEFAULT_KERNEL_NAMES + t.EXPERIMENTAL_KERNEL_NAMES"
    code = REPORT.format(f"*[n for n in {names} if t.kernel_on(n)], t.describe_kernels()")
    out = _run(code, HRM_KERNELS="all", HRM_KERNELS_OFF=" Token_Mix, swiglu_backward,")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    on = [
        "token_mix_layout",
        "gate_up_swiglu",
        "token_mix_transposed",
        "token_mix_padded",
        "short_attention",
        "gate_up_cutlass",
    ]
    assert words[:8] == ["True", "True", *on]
    assert " ".join(words[8:]).startswith("all without swiglu_backward,token_mix")


def test_kernels_off_with_an_unknown_name_is_named():
    bad = _run("import models.triton_common", HRM_KERNELS_OFF="token_mix,swiglu")
    assert bad.returncode != 0 and "unknown kernel 'swiglu'" in bad.stderr and "gate_up_swiglu" in bad.stderr


def test_kernels_off_reaches_the_launcher_as_one_error_line(tmp_path):
    """A misspelt name stops the launcher before any work, with one `error:` line (no traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "HRM_KERNELS"} | {"HRM_KERNELS_OFF": "tokenmix"}
    cmd = [sys.executable, str(REPO / "pretrain.py"), f"data_path={tmp_path}", "device=cpu"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: HRM_KERNELS_OFF='tokenmix': unknown kernel 'tokenmix'"), out.stderr
    assert "Traceback" not in out.stderr
