"""benchmarks/trace_summary.py on a hand-made Chrome trace: busy time is the union of GPU intervals."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def test_busy_idle_and_categories_of_a_synthetic_trace(tmp_path):
    events = [
        {"cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "triton_poi_fused_silu", "ts": 5, "dur": 10},  # overlaps the first: busy 0..15
        {"cat": "gpu_memset", "name": "Memset (Device)", "ts": 20, "dur": 2},  # idle 15..20
        {"cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": 30, "dur": 10},  # idle 22..30
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host events are not GPU time
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trace_summary.py"), str(path), "--steps", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    summary = json.loads(out[0])
    # span 0..40 µs, busy 15 + 2 + 10 = 27 µs (the overlap counted once), in ms
    assert summary["span_ms_per_step"] == 0.04 and summary["busy_ms_per_step"] == 0.027
    assert summary["idle_ms_per_step"] == 0.013 and summary["gpu_ops_per_step"] == 4.0
    by_cat = summary["ms_per_step_by_category"]
    assert by_cat == {"gemm": 0.01, "inductor_triton": 0.01, "nccl": 0.01, "other": 0.002}
    assert "nvjet_sm90_gemm" in out[1] and len(out) == 5


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps({"traceEvents": [{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]}), "no GPU events"),
        ("{not json", "not JSON"),
        (json.dumps({"events": []}), "no 'traceEvents' list"),
        (None, "no such file"),
    ],
)
def test_bad_traces_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "trace.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trace_summary.py"), str(path)], capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
