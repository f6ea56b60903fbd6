"""Learning curves of one or more runs in one PNG, from their metrics.jsonl (no W&B needed).

    python -m tools.plot_metrics RUN [RUN ...] --out curves.png [--metrics lm_loss accuracy] [--smooth 50]

RUN is a run folder (`checkpoint_path`, holding metrics.jsonl) or a metrics.jsonl file; the file may still
be being written.

Design choices:
- One row per metric (default: lm_loss, accuracy, exact_accuracy), two columns: against the step and
  against wall time (the `wall_time_s` of each record; a run logged before that field existed appears in
  the step column only).
- A metric without a set (`accuracy`) draws the train curve (`train/accuracy`, solid) and each test set's
  (`all/accuracy`, dashed, a marker per evaluation); one with a set (`ARC/pass@2`) exactly that key.
- Runs are overlaid, one colour each, in one legend with the line styles; losses spanning more than a
  decade get a log axis. Train accuracies of steps in which no sequence halted (`train/count` 0, logged
  as 0) are left out.
- `--smooth N` draws train curves as the running mean of the last N logged steps (per-step values are
  noisy); evaluation points are never smoothed.
- Bad input is one line (`error: ...`, status 2): a missing run folder or file, a file without records, a
  line that is not a JSON object (except a torn last line, which a live run is still writing), a metric no
  run has, missing matplotlib (the `viz` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tools.visualize import figure_class
from utils.cli import OneLineErrorParser, run_flag_command
from utils.logging_utils import WALL_TIME_KEY

DEFAULT_METRICS = ("lm_loss", "accuracy", "exact_accuracy")
TEST_MARKERS = "osv^D*"


def metrics_file(run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no such run folder or metrics.jsonl file")
    return path


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a torn last line (a live run mid-write) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                continue
            raise ValueError(f"{path} line {number}: not a JSON object") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path} line {number}: not a metrics record (a JSON object with a step)")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def curve_keys(metric: str, records: list[dict]) -> list[str]:
    """The logged keys a metric names: `train/M` then every test set's `S/M`, or the key itself."""
    if "/" in metric:
        return [metric]
    sets = sorted({k.split("/", 1)[0] for r in records for k in r if k.endswith(f"/{metric}")} - {"train"})
    return [f"train/{metric}", *(f"{s}/{metric}" for s in sets)]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, wall times (NaN where not logged), values) of the records holding a finite `key`.

    A train step in which no sequence halted (`train/count` 0) has no accuracies (they are logged as 0);
    its losses, divided by the batch size, still count."""
    no_halted = key.startswith("train/") and not key.endswith("loss")
    rows = [
        (r["step"], r.get(WALL_TIME_KEY, math.nan), r[key])
        for r in records
        if isinstance(r.get(key), (int, float))
        and math.isfinite(r[key])
        and not (no_halted and r.get("train/count") == 0)
    ]
    steps, times, values = (np.array(column, dtype=np.float64) for column in zip(*rows)) if rows else ([],) * 3
    return np.asarray(steps), np.asarray(times), np.asarray(values)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, values.size + 1) - window, 0)]) / counts


def time_unit(seconds: float) -> tuple[str, float]:
    if seconds <= 300:
        return "s", 1.0
    return ("min", 60.0) if seconds <= 5 * 3600 else ("h", 3600.0)


def plot_runs(
    runs: Sequence[tuple[str, list[dict]]],
    out: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    smooth: int = 1,
) -> Path:
    """Draw the curves of `runs` ((label, records) each) for `metrics` into the PNG `out`."""
    Figure = figure_class()  # first: without matplotlib, the one-line hint
    from matplotlib.lines import Line2D

    for metric in metrics:
        if not any(series(records, key)[0].size for _, records in runs for key in curve_keys(metric, records)):
            logged = sorted({k for _, records in runs for r in records for k in r} - {"step", WALL_TIME_KEY})
            raise ValueError(f"metric {metric!r}: no run logged it (logged: {', '.join(logged)})")
    wall_times = [r.get(WALL_TIME_KEY, 0.0) for _, records in runs for r in records]
    unit, scale = time_unit(max(wall_times, default=0.0))

    fig = Figure(figsize=(13, 3.4 * len(metrics) + 0.8))
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    test_sets: list[str] = []
    for row, metric in enumerate(metrics):
        by_step, by_time = axes[row]
        for index, (_label, records) in enumerate(runs):
            colour = f"C{index % 10}"
            for key in curve_keys(metric, records):
                steps, times, values = series(records, key)
                if steps.size == 0:
                    continue
                set_name = key.split("/", 1)[0] if "/" in key else key
                if set_name == "train":
                    style = {"linestyle": "-", "linewidth": 1.2}
                    values = running_mean(values, smooth)
                else:
                    if set_name not in test_sets:
                        test_sets.append(set_name)
                    marker = TEST_MARKERS[test_sets.index(set_name) % len(TEST_MARKERS)]
                    style = {"linestyle": "--", "linewidth": 1.6, "marker": marker, "markersize": 4}
                by_step.plot(steps, values, color=colour, **style)
                timed = ~np.isnan(times)
                if timed.any():
                    by_time.plot(times[timed] / scale, values[timed], color=colour, **style)
        for ax, xlabel in ((by_step, "step"), (by_time, f"wall time ({unit})")):
            ax.set_title(f"{metric} vs {xlabel.split(' (')[0]}")
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            values = np.concatenate([line.get_ydata() for line in ax.lines]) if ax.lines else np.ones(1)
            if metric.endswith("loss") and values.min() > 0 and values.max() > 10 * values.min():
                ax.set_yscale("log")
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")

    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=3, label=label) for i, (label, _) in enumerate(runs)]
    train_label = f"train (mean of {smooth} steps)" if smooth > 1 else "train"
    handles.append(Line2D([], [], color="black", linestyle="-", label=train_label))
    for i, set_name in enumerate(test_sets):
        marker = TEST_MARKERS[i % len(TEST_MARKERS)]
        handles.append(Line2D([], [], color="black", linestyle="--", marker=marker, label=f"test: {set_name}"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def run_labels(runs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """`--labels`, else each run folder's name (the paths as given where two names are alike)."""
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"--labels: {len(labels)} labels for {len(runs)} runs")
        return list(labels)
    names = [metrics_file(run).parent.resolve().name for run in runs]
    return names if len(set(names)) == len(names) else list(runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="python -m tools.plot_metrics",
        description="Plot train and test learning curves of runs (metrics.jsonl) against steps and wall time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder or a metrics.jsonl file")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metrics (train and test), or keys like ARC/pass@2"
    )
    parser.add_argument("--smooth", type=int, default=1, help="running mean of this many steps for train curves")
    parser.add_argument("--labels", nargs="+", help="legend names of the runs (default: their folder names)")

    def body() -> None:
        args = parser.parse_args(argv)
        if args.smooth < 1:
            raise ValueError(f"--smooth: must be >= 1, got {args.smooth}")
        runs = [
            (label, read_records(metrics_file(run)))
            for label, run in zip(run_labels(args.runs, args.labels), args.runs)
        ]
        path = plot_runs(runs, args.out, args.metrics, args.smooth)
        print(f"wrote {path}: {len(args.metrics)} metrics of {len(runs)} run(s)")

    return run_flag_command(body)


if __name__ == "__main__":
    sys.exit(main())
