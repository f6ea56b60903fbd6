"""Installing the project and its commands: `--help` of every command, and a wheel installed into a fresh
virtual environment, whose console commands build a dataset, train and evaluate from another folder."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evaluate import EvalConfig
from tests.helpers import REPO
from training.config import CONFIG_DIR, PretrainConfig, compose_config

BUILDERS = {  # console command -> (module, config class)
    "hrm-build-sudoku": ("dataset.build_sudoku_dataset", "SudokuBuildConfig"),
    "hrm-build-maze": ("dataset.build_maze_dataset", "MazeBuildConfig"),
    "hrm-build-arc": ("dataset.build_arc_dataset", "ArcBuildConfig"),
    "hrm-generate-sudoku": ("dataset.generate_sudoku", "GenerateSudokuConfig"),
    "hrm-generate-maze": ("dataset.generate_maze", "GenerateMazeConfig"),
}


def help_sections(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """A Hydra command's `--help`: section title -> [(key, default, description joined over its lines)]."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    entries = None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            entries = sections.setdefault(line[:-1], [])
        elif entries is not None and line.startswith("  ") and not line.startswith("   "):
            entries.append((*line.strip().split("=", 1), ""))
        elif entries is not None and line.startswith("      "):
            key, default, description = entries[-1]
            entries[-1] = (key, default, f"{description} {line.strip()}".strip())
    return sections


def keys_of(text: str) -> dict[str, tuple[str, str]]:
    entries = help_sections(text)["keys (key=default)"]
    assert len({key for key, _, _ in entries}) == len(entries)
    return {key: (default, description) for key, default, description in entries}


def run_help(*command: str) -> str:
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def test_pretrain_help_lists_every_key_with_its_default_and_description():
    text = run_help(sys.executable, str(REPO / "pretrain.py"))
    assert text.startswith("usage: pretrain.py [key=value ...]")
    keys = keys_of(text)
    assert set(keys) == set(PretrainConfig.model_fields)
    assert [k for k, (_, description) in keys.items() if not description] == []
    # Each default shown, given back as an override, composes to what a bare command line gets.
    assert compose_config([f"{key}={default}" for key, (default, _) in keys.items()]) == compose_config([])
    assert keys["arch"][0] == "hrm_v1" and keys["lr"] == ("1e-4", "AdamATan2 learning rate after warmup")
    # Descriptions come from where the keys are defined: the YAML's comments, the typed config's fields.
    with open(Path(CONFIG_DIR) / "cfg_pretrain.yaml", encoding="utf-8") as f:
        assert any(line.endswith(f"# {keys['use_tensorboard'][1]}\n") for line in f)
    assert keys["run_name"][1] == PretrainConfig.model_fields["run_name"].description
    # Every architecture, described by its file's first comment line.
    archs = help_sections(text)["architectures"]
    assert [default for _, default, _ in archs] == sorted(p.stem for p in Path(CONFIG_DIR, "arch").glob("*.yaml"))
    assert {key for key, _, _ in archs} == {"arch"} and all(description for _, _, description in archs)
    assert ("arch", "hrm_v1", "HRM ACT-v1, the paper's architecture (27.3M parameters on Sudoku)") in archs


def test_evaluate_help_lists_every_key_with_its_default_and_description():
    text = run_help(sys.executable, str(REPO / "evaluate.py"))
    assert text.startswith("usage: evaluate.py checkpoint=PATH [key=value ...]")
    keys = keys_of(text)
    assert set(keys) == set(EvalConfig.model_fields)
    assert keys["checkpoint"][0] == "... (required)" and keys["eval_halting"][0] == "null"
    # save_outputs: null (the model's own defaults), and the help names them.
    assert keys["save_outputs"][0] == "null"
    assert "[inputs, labels, puzzle_identifiers, logits, q_halt_logits, q_continue_logits]" in keys["save_outputs"][1]
    for key, (_, description) in keys.items():
        assert description == EvalConfig.model_fields[key].description, key


@pytest.mark.parametrize("command", sorted(BUILDERS))
def test_builder_help_shows_each_flag_with_description_and_default(command, capsys, monkeypatch):
    module_name, class_name = BUILDERS[command]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, class_name)
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.command_line()
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: {command} ")
    for name, field in config_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert f"--{name.replace('_', '-')}" in text
        assert f"{field.description} (default: {default})" in text, name


# ------------------------------------------------------------------------------- a wheel in a fresh venv

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # as scripts/test.sh installs it
PROJECT_TOP = (
    "pretrain.py",
    "evaluate.py",
    "puzzle_dataset.py",
    "models",
    "dataset",
    "utils",
    "training",
    "evaluators",
    "tools",
)


def run_in(cwd: Path, *command, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command with nothing of the checkout on its path (no PYTHONPATH, no virtual environment active)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel built from a copy of the checkout, installed (torch first, then the wheel and its
    dependencies from the package index) into a fresh virtual environment; returns (wheel, venv bin, a folder
    outside both)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build's own folders never land in the checkout
    listed = checked(run_in(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard")).stdout
    for name in listed.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    checked(run_in(root, sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", source))
    (wheel,) = (root / "dist").glob("hrm-*.whl")
    checked(run_in(root, sys.executable, "-m", "venv", root / "venv"))
    pip = [root / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile"]
    checked(run_in(root, *pip, TORCH_SPEC))  # first, so no dependency pulls another torch build
    checked(run_in(root, *pip, wheel))
    work = root / "work"
    work.mkdir()
    return wheel, root / "venv" / "bin", work


@pytest.mark.slow
def test_wheel_holds_the_code_and_config_the_commands_read(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    project = {
        str(p.relative_to(REPO))
        for top in PROJECT_TOP
        for p in ([REPO / top] if top.endswith(".py") else (REPO / top).rglob("*.py"))
    }
    assert project <= names, sorted(project - names)
    cuda_sources = {str(p.relative_to(REPO)) for p in (REPO / "models" / "cuda").glob("*.cu")}
    assert cuda_sources and cuda_sources <= names, sorted(cuda_sources - names)  # compiled where they run
    config = {"hrm_config/" + str(p.relative_to(REPO / "config")) for p in (REPO / "config").rglob("*.yaml")}
    assert config <= names and "hrm_config/arch/trm_tiny.yaml" in config
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/", "config/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = re.findall(r"^(hrm-[a-z-]+) = ", zipfile.ZipFile(wheel).read(entry_points).decode(), re.MULTILINE)
    assert set(scripts) == {
        "hrm-train",
        "hrm-evaluate",
        "hrm-arc-score",
        "hrm-visualize",
        "hrm-plot-metrics",
        *BUILDERS,
    }


@pytest.mark.slow
def test_installed_commands_build_train_and_evaluate_from_another_folder(installed):
    _, bin_dir, work = installed
    where = checked(
        run_in(
            work,
            bin_dir / "python",
            "-c",
            "import pretrain, training.config as c; print(pretrain.__file__, c.CONFIG_DIR)",
        )
    )
    module, config_dir = where.stdout.split()
    site = str(bin_dir.parent / "lib")
    assert module.startswith(site) and config_dir.startswith(site) and config_dir.endswith("hrm_config")

    checked(run_in(work, bin_dir / "hrm-generate-sudoku", "--output-dir", "raw", "--num-train", "40", "--num-test", "10", "--size", "4", "--min-rating", "0", "--num-workers", "1"))  # fmt: skip
    checked(run_in(work, bin_dir / "hrm-build-sudoku", "--source-repo", "raw", "--output-dir", "data", "--size", "4", "--num-aug", "1"))  # fmt: skip
    train = ["arch=trm_tiny", "data_path=data", "global_batch_size=16", "epochs=2", "eval_interval=1", "lr=1e-3"]
    train += ["use_wandb=false", "device=cpu", "evaluators=[]"]
    trained = checked(run_in(work, bin_dir / "hrm-train", *train, "checkpoint_path=run"))
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "all/exact_accuracy" in r]
    step = records[-1]["step"]
    assert [r["step"] for r in evals] == [step // 2, step] and (work / "run" / f"step_{step}").is_file()
    assert [line.split(" | ")[0] for line in trained.stdout.splitlines()] == [f"step {r['step']} eval" for r in evals]

    evaluated = checked(run_in(work, bin_dir / "hrm-evaluate", f"checkpoint=run/step_{step}"))
    printed = dict(line.split(": ") for line in evaluated.stdout.splitlines())
    for key in ("all/exact_accuracy", "all/accuracy", "all/lm_loss"):  # the same weights and test split
        assert float(printed[key]) == pytest.approx(evals[-1][key], rel=1e-5), key
    assert (work / "run" / f"step_{step}_all_preds.0").is_file()

    # What the extras add is refused in one line where they are not installed (this venv has neither).
    no_tensorboard = run_in(work, bin_dir / "hrm-train", *train, "checkpoint_path=run2", "use_tensorboard=true")
    assert no_tensorboard.returncode == 2 and no_tensorboard.stderr.splitlines()[-1].startswith(
        "error: config key 'use_tensorboard': the tensorboard package is not installed"
    )
    no_matplotlib = run_in(work, bin_dir / "hrm-plot-metrics", "run", "--out", "curves.png")
    assert (no_matplotlib.returncode, no_matplotlib.stderr) == (
        2,
        'error: matplotlib is needed for PNG output: pip install matplotlib (or the viz extra, "hrm[viz]")\n',
    )


@pytest.mark.slow
def test_every_installed_command_starts(installed):
    _, bin_dir, work = installed
    # The commands the other tests do not run; hrm-train's help reads the installed config's comments.
    commands = ["hrm-train", "hrm-arc-score", "hrm-visualize", "hrm-build-maze", "hrm-build-arc", "hrm-generate-maze"]
    with ThreadPoolExecutor(3) as pool:
        helps = dict(zip(commands, pool.map(lambda c: run_in(work, bin_dir / c, "--help", timeout=300), commands)))
    for command, done in helps.items():
        assert done.returncode == 0 and done.stdout.startswith("usage: "), (command, done.stderr[-2000:])
    assert "  lr=1e-4\n      AdamATan2 learning rate after warmup\n" in helps["hrm-train"].stdout
    assert helps["hrm-build-maze"].stdout.startswith("usage: hrm-build-maze ")
