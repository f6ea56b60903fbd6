"""Installing the project and its commands: `--help` of every command, and a wheel installed into a fresh
virtual environment, whose console commands build a dataset, train and evaluate from another folder."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate import EvalConfig
from tests.test_pretrain_helpers import REPO
from utils.config import CONFIG_DIR, PretrainConfig, compose_config

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
    assert keys["save_outputs"][0] == "[inputs, labels, puzzle_identifiers, logits, q_halt_logits, q_continue_logits]"
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
