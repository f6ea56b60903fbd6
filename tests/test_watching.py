"""Watching a run: the console line after each evaluation, train metrics on the progress bar, and learning
curves drawn from real metrics.jsonl files by `python -m tools.plot_metrics`."""

import json
import subprocess
import sys

import numpy as np
import pytest

import pretrain
from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset, metric_records, tiny_config
from tools import plot_metrics
from training.evaluation import eval_summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs with different learning rates (metrics.jsonl, 2 evaluations each)."""
    root = tmp_path_factory.mktemp("watch")
    data = make_tiny_dataset(root / "data")
    folders = []
    for lr in ("1e-3", "3e-3"):
        folder = root / f"lr{lr}"
        pretrain.run(tiny_config(data, folder, f"lr={lr}", "evaluators=[]"))
        folders.append(folder)
    return folders


def test_console_shows_each_evaluation_and_the_last_train_metrics(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [*TINY_ARCH, f"data_path={data}", f"checkpoint_path={run_dir}", "global_batch_size=4", "epochs=4"]
    overrides += ["eval_interval=2", "use_wandb=false", "device=cpu", "evaluators=[]"]
    done = subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), *overrides], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    records = metric_records(run_dir / "metrics.jsonl")
    evals = [r for r in records if "all/exact_accuracy" in r]
    assert len(evals) == 2
    assert done.stdout.splitlines() == [
        f"step {r['step']} eval | all: exact_accuracy {r['all/exact_accuracy']:.4g} accuracy {r['all/accuracy']:.4g} "
        f"lm_loss {r['all/lm_loss']:.4g}"
        for r in evals
    ]
    last = [r for r in records if "train/lm_loss" in r][-1]
    postfix = (
        f"loss {last['train/lm_loss']:.4g}, acc {last['train/accuracy']:.4g}, exact {last['train/exact_accuracy']:.4g}"
    )
    final_bar = done.stderr.split("\r")[-1]
    assert f"{last['step']}/{last['step']} [" in final_bar and final_bar.rstrip().endswith(f"{postfix}]")


def test_eval_summary_shows_main_metrics_and_evaluator_scores():
    results = {
        "all": {"accuracy": 0.94512, "exact_accuracy": 0.882, "lm_loss": 0.2131, "q_halt_accuracy": 0.5, "steps": 16.0},
        "ARC": {"pass@1": 0.31, "pass@10": 0.5, "pass@2": 0.4},
        "evaluator": {"score": 1.5},  # an evaluator whose metrics have no set prefix: all of them
    }
    assert eval_summary(results, 500) == (
        "step 500 eval | all: exact_accuracy 0.882 accuracy 0.9451 lm_loss 0.2131 | ARC: pass@1 0.31 pass@2 0.4 "
        "| evaluator: score 1.5"
    )


def png_pixels(path):
    from matplotlib.image import imread

    return imread(str(path))[..., :3]  # [height, width, RGB] floats


def has_colour(pixels, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(pixels - rgb).max(axis=-1) < 0.02).any())


def test_plot_overlays_runs_against_steps_and_wall_time(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    # A run folder and a metrics.jsonl file; the second also torn mid-line at its end, as while it is written.
    jsonl = runs[1] / "metrics.jsonl"
    with open(jsonl, "a") as f:
        f.write('{"step": 99, "train/lm')
    assert plot_metrics.main([str(runs[0]), str(jsonl), "--out", str(out), "--smooth", "2"]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 3 metrics of 2 run(s)\n"
    pixels = png_pixels(out)
    assert pixels.shape == (1100, 1300, 3)  # 3 metric rows x (step, wall time) at 100 dpi
    assert has_colour(pixels, "#1f77b4") and has_colour(pixels, "#ff7f0e")  # one colour per run
    packed = (np.round(pixels * 255).astype(np.int32) * [65536, 256, 1]).sum(axis=-1)
    assert len(np.unique(packed)) > 100  # lines, text, grid: a drawing, not a blank canvas


def test_plot_reads_curves_from_the_records(runs):
    records = plot_metrics.read_records(runs[0] / "metrics.jsonl")
    assert plot_metrics.curve_keys("accuracy", records) == ["train/accuracy", "all/accuracy"]
    assert plot_metrics.curve_keys("ARC/pass@2", records) == ["ARC/pass@2"]
    steps, times, values = plot_metrics.series(records, "all/accuracy")
    logged = [r for r in metric_records(runs[0] / "metrics.jsonl") if "all/accuracy" in r]
    assert steps.tolist() == [r["step"] for r in logged] and values.tolist() == [r["all/accuracy"] for r in logged]
    assert np.all(np.diff(times) > 0)
    # Train accuracies of steps where nothing halted (logged as 0 over 0 sequences) are left out; losses not.
    halted = [r["step"] for r in records if r.get("train/count", 0) > 0]
    assert plot_metrics.series(records, "train/accuracy")[0].tolist() == halted
    assert len(plot_metrics.series(records, "train/lm_loss")[0]) == len([r for r in records if "train/lm_loss" in r])
    assert plot_metrics.running_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_plot_draws_a_run_logged_before_wall_times_in_the_step_column(runs, tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in metric_records(runs[0] / "metrics.jsonl")))
    out = tmp_path / "old.png"
    assert plot_metrics.main([str(old), str(runs[1]), "--out", str(out), "--metrics", "lm_loss"]) == 0
    assert png_pixels(out).shape == (420, 1300, 3)
    assert np.isnan(plot_metrics.series(plot_metrics.read_records(old), "train/lm_loss")[1]).all()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such run folder or metrics.jsonl file"),
        ("empty", "metrics.jsonl: no records"),
        ("garbled", "metrics.jsonl line 2: not a JSON object"),
        ("not_a_record", "metrics.jsonl line 1: not a metrics record"),
        ("metric", "metric 'acuracy': no run logged it (logged: "),
        ("labels", "--labels: 2 labels for 1 runs"),
        ("smooth", "--smooth: must be >= 1, got 0"),
        ("smooth_not_int", "argument --smooth: invalid int value: 'x'"),  # a bad flag too: one line, not usage
    ],
)
def test_plot_bad_input_is_one_line(case, expected, runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    good = (runs[0] / "metrics.jsonl").read_text()
    contents = {"empty": "\n", "garbled": good.split("\n", 1)[0] + "\n{oops\n" + good, "not_a_record": "[1, 2]\n"}
    if case in contents:
        (run / "metrics.jsonl").write_text(contents[case])
    flags = {"metric": ["--metrics", "acuracy"], "labels": ["--labels", "a", "b"], "smooth": ["--smooth", "0"]}
    flags["smooth_not_int"] = ["--smooth", "x"]
    if case in flags:
        argv = [str(runs[0]), *flags[case]]
    else:
        argv = [str(run / "nope" if case == "missing" else run)]
    assert plot_metrics.main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch, capsys):
    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    assert plot_metrics.main([str(runs[0]), "--out", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err
        == 'error: matplotlib is needed for PNG output: pip install matplotlib (or the viz extra, "hrm[viz]")\n'
    )
