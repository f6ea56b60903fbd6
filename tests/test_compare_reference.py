"""benchmarks/compare_reference.py's --variant: environment variables and Hydra overrides told apart, bad specs refused."""

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _module():
    spec = importlib.util.spec_from_file_location("compare_reference", REPO / "benchmarks" / "compare_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_splits_environment_from_overrides():
    variant = _module().parse_variant("graphs=compile_mode=reduce-overhead,HRM_KERNELS_OFF=token_mix,+arch.x=1")
    assert variant.name == "graphs"
    assert variant.env == {"HRM_KERNELS_OFF": "token_mix"}
    assert variant.overrides == ["compile_mode=reduce-overhead", "+arch.x=1"]


def test_variant_value_lists_keep_every_item():
    """`HRM_KERNELS_OFF=a,b` switches off both kernels: an item without '=' continues the previous value (the
    parser once dropped it, so such a variant silently left the second kernel on)."""
    variant = _module().parse_variant("before=HRM_KERNELS_OFF=gate_up_swiglu,swiglu_backward,HRM_KERNELS=auto")
    assert variant.env == {"HRM_KERNELS_OFF": "gate_up_swiglu,swiglu_backward", "HRM_KERNELS": "auto"}
    assert variant.overrides == []


@pytest.mark.parametrize(
    "text", ["before", "before=", "before=HRM_KERNELS", "before=x,A=1", "ours=HRM_KERNELS=all", "=A=1", "b==1"]
)
def test_bad_variant_is_refused_by_the_parser(text):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare_reference.py"), "--shapes", "sudoku", "--variant", text],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("compare_reference.py: error: argument --variant")
