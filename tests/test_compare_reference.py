"""benchmarks/compare_reference.py: --variant specs (environment variables and Hydra overrides told apart, bad specs
refused) and one shape's comparison row, a failing variant included."""

import importlib.util
import json
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


def _timing(train_ms: float, eval_ms: float) -> dict:
    return {"device": "test", "train_ms_per_step": train_ms, "eval_ms_per_batch": eval_ms}


def test_failing_variant_is_recorded_and_the_rest_still_compared(capsys):
    """An experimental variant that crashes costs only its own row entries: the default run, the other variants and
    the reference are still timed in every round, and the ratios come out; it is not retried in later rounds."""
    module = _module()
    broken, fine = module.parse_variant("broken=HRM_KERNELS=all"), module.parse_variant("fine=HRM_KERNELS=auto")
    calls = []

    def run_ours(shape, variant, round_index):
        calls.append((shape, None if variant is None else variant.name, round_index))
        if variant is broken:
            raise RuntimeError("bench_hrm.py failed (exit 1): CompilationError")
        return _timing(80.0 if variant is None else 70.0, 400.0)

    def run_reference(shape, round_index):
        calls.append((shape, "reference", round_index))
        return _timing(100.0, 500.0)

    row = module.compare_shape("sudoku", 2, [broken, fine], run_ours, run_reference)
    assert calls == [
        ("sudoku", None, 0), ("sudoku", "broken", 0), ("sudoku", "fine", 0), ("sudoku", "reference", 0),
        ("sudoku", None, 1), ("sudoku", "fine", 1), ("sudoku", "reference", 1),
    ]  # fmt: skip
    assert row["broken_error"] == "bench_hrm.py failed (exit 1): CompilationError"
    assert "broken_train_ms" not in row and "broken_train_speedup" not in row
    assert row["ours_train_ms"] == [80.0, 80.0] and row["ours_train_speedup"] == 1.25
    assert row["fine_train_speedup"] == round(100 / 70, 3) and row["fine_eval_speedup"] == 1.25
    assert "variant broken failed" in capsys.readouterr().err


def test_failing_reference_raises():
    module = _module()

    def run_reference(shape, round_index):
        raise RuntimeError("bench_reference.py failed (exit 1)")

    with pytest.raises(RuntimeError, match="bench_reference.py failed"):
        module.compare_shape("trm", 1, [], lambda shape, variant, i: _timing(1.0, 1.0), run_reference)


def test_best_attention_tiles_picks_the_fastest_launch_choice_of_the_shape(tmp_path):
    """speed_session.sh puts the sweep's fastest attention launch choice into `@tiles@` variants through
    `bench_fused_ops.py --best-tiles-from`: the fastest of that shape's rows (the unswept row is the default tiles),
    nothing where the file has no sweep at that shape, and an error line for a file that cannot be read."""
    rows = [
        {"shape": "sudoku", "op": "short_attention", "fused_ms": 0.20},
        {"shape": "sudoku", "op": "short_attention[64:8:1:1]", "fused_ms": 0.15},
        {"shape": "sudoku", "op": "short_attention[128:8:1:0]", "fused_ms": 0.17},
        {"shape": "trm", "op": "short_attention[64:8:1:1]", "fused_ms": 0.30},
        {"shape": "trm", "op": "short_attention", "fused_ms": 0.10},
        {"shape": "trm", "op": "attention_layer_compiled", "fused_ms": 0.01},
        {"shape": "trm", "op": "short_attention_compiled", "fused_ms": 0.01},  # not a launch choice
        {"shape": "arc", "op": "short_attention", "fused_ms": 0.01},
    ]
    path = tmp_path / "kernels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = str(REPO / "benchmarks" / "bench_fused_ops.py")

    def best(shape, file=path):
        return subprocess.run(
            [sys.executable, script, "--best-tiles-from", str(file), "--shapes", shape], capture_output=True, text=True
        )

    assert best("sudoku").stdout.strip() == "64:8:1:1"
    assert best("trm").stdout.strip() == "64:4:2:1"  # the default Tiles() row won
    assert best("arc").stdout.strip() == ""  # no sweep there: the defaults stand
    missing = best("sudoku", tmp_path / "none.jsonl")
    assert missing.returncode == 2 and missing.stderr.startswith("error: --best-tiles-from")


def test_best_gate_up_config_picks_the_fastest_cutlass_config_as_the_model_calls_it(tmp_path):
    """speed_session.sh puts the kernels stage's fastest CUTLASS gate/up config into `@gate_up@` variants through
    `bench_fused_ops.py --best-gate-up-config-from`: the kernel-alone rows (`..._kernel_NAME`) and the product
    config are not candidates, and a shape with no CUTLASS rows prints nothing (the default config stands)."""
    rows = [
        {"shape": "sudoku", "op": "gate_up_swiglu", "fused_ms": 0.10},  # the Triton kernel: not a config
        {"shape": "sudoku", "op": "gate_up_swiglu_cutlass_128x128x64", "fused_ms": 0.50},
        {"shape": "sudoku", "op": "gate_up_swiglu_cutlass_256x128x64_cooperative_tma", "fused_ms": 0.35},
        {"shape": "sudoku", "op": "gate_up_swiglu_cutlass_kernel_128x128x64", "fused_ms": 0.20},
        {"shape": "sudoku", "op": "gate_up_product_cutlass_kernel", "fused_ms": 0.01},
        {"shape": "trm", "op": "gate_up_swiglu_cutlass_128x128x64_registers_tma", "fused_ms": 0.30},
        {"shape": "trm", "op": "gate_up_swiglu_cutlass_256x128x64_cooperative_tma", "fused_ms": 0.31},
    ]
    path = tmp_path / "kernels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = str(REPO / "benchmarks" / "bench_fused_ops.py")

    def best(shape, file=path):
        return subprocess.run(
            [sys.executable, script, "--best-gate-up-config-from", str(file), "--shapes", shape],
            capture_output=True,
            text=True,
        )

    assert best("sudoku").stdout.strip() == "256x128x64_cooperative_tma"
    assert best("trm").stdout.strip() == "128x128x64_registers_tma"
    assert best("arc").stdout.strip() == ""
    missing = best("sudoku", tmp_path / "none.jsonl")
    assert missing.returncode == 2 and missing.stderr.startswith("error: --best-gate-up-config-from")
