"""dataset/cli.py's output staging: a build writes into a hidden sibling folder that replaces `--output-dir`
only when the build succeeds, so a failed build never leaves a partial dataset or damages a previous one.

Exercised through `run_cli` with the real Sudoku builder and with small `main` functions standing in for
a builder that fails at a chosen moment (every builder and generator goes through the same `run_cli`).
"""

import os
import subprocess
import sys

import pytest
from pydantic import BaseModel

from dataset.build_sudoku_dataset import SudokuBuildConfig
from dataset.build_sudoku_dataset import main as build_sudoku
from dataset.cli import run_cli
from dataset.generate_sudoku import make_sudoku
from dataset.generation import puzzle_rng
from utils.files import _host_tag


class Config(BaseModel):
    output_dir: str
    fail: str = "none"  # none | value | oserror | interrupt | nothing


def fake_builder(config: Config) -> None:
    """Writes a split, then fails the way asked (after writing, so there is something to clean up)."""
    out = os.path.join(config.output_dir, "train")
    if config.fail != "nothing":
        os.makedirs(out)
        with open(os.path.join(out, "dataset.json"), "w") as f:
            f.write(f'{{"fail": "{config.fail}"}}')
    if config.fail == "value":
        raise ValueError(f"{out}/all__inputs.npy: something is wrong")
    if config.fail == "oserror":
        open(os.path.join(config.output_dir, "no", "such", "file"), "w")
    if config.fail == "interrupt":
        raise KeyboardInterrupt


def run(out, fail="none"):
    return run_cli(fake_builder, Config, ["--output-dir", str(out), "--fail", fail])


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.mark.parametrize("fail", ["value", "oserror", "interrupt", "nothing"])
def test_failed_build_leaves_neither_output_nor_staging(tmp_path, capsys, fail):
    out = tmp_path / "data" / "set"
    if fail == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            run(out, fail)
    else:
        assert run(out, fail) == 2
    assert os.listdir(tmp_path / "data") == []
    err = capsys.readouterr().err
    if fail == "value":  # the message names the output folder, not the staging folder it came from
        assert err == f"error: {out}/train/all__inputs.npy: something is wrong\n"
    if fail == "oserror":
        assert err == f"error: {out}/no/such/file: No such file or directory\n"
    if fail == "nothing":
        assert err == f"error: {out}: nothing was written\n"


@pytest.mark.parametrize("fail", ["value", "oserror", "interrupt", "nothing"])
def test_failed_build_keeps_the_previous_dataset_byte_identical(tmp_path, fail):
    out = tmp_path / "set"
    assert run(out) == 0
    before = tree(out)
    if fail == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            run(out, fail)
    else:
        assert run(out, fail) == 2
    assert tree(out) == before and os.listdir(tmp_path) == ["set"]


def test_successful_build_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "set"
    (out / "test").mkdir(parents=True)
    (out / "test" / "stale.npy").write_bytes(b"from an older build")
    (out / "identifiers.json").write_text("[]")
    assert run(out) == 0
    assert tree(out) == [("train", None), ("train/dataset.json", b'{"fail": "none"}')]
    assert os.listdir(tmp_path) == ["set"]


def test_folder_holding_other_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "set"
    out.mkdir()
    (out / "train").mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train.csv").write_text("source,question,answer,rating\n")
    assert run(out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: holds 'notes.txt' and 1 more, which this tool does not write")
    assert tree(out) == [("notes.txt", b"mine"), ("train", None), ("train.csv", b"source,question,answer,rating\n")]
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file") == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'}: exists and is not a folder\n"


def test_symlinked_output_folder_replaces_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert run(tmp_path / "link") == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "train" / "dataset.json").is_file()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_build_are_cleaned_or_restored(tmp_path):
    host = _host_tag()  # staging names carry the host, since a pid means something on its own host only
    pid = dead_pid()
    partial = tmp_path / f".set.partial-{host}-{pid}-0a0a"
    (partial / "train").mkdir(parents=True)
    # Killed between its two renames: the previous dataset sits aside, the output folder is missing.
    aside = tmp_path / f".set.old-{host}-{pid}-0a0a"
    (aside / "train").mkdir(parents=True)
    (aside / "train" / "dataset.json").write_text("previous")
    alive = tmp_path / f".set.partial-{host}-{os.getppid()}-0b0b"  # a live build's staging: left alone
    alive.mkdir()
    other = tmp_path / ".other.partial-x-1-0c0c"  # another output folder's: left alone
    other.mkdir()
    assert run(tmp_path / "set", "value") == 2
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "set"])
    assert (tmp_path / "set" / "train" / "dataset.json").read_text() == "previous"


@pytest.fixture(scope="module")
def sudoku_rows():
    return [make_sudoku(puzzle_rng(3, "train", i), min_rating=1) for i in range(3)]


def test_real_builder_output_is_the_staged_build(tmp_path, sudoku_rows):
    src = tmp_path / "src"
    src.mkdir()
    for name, rows in (("train.csv", sudoku_rows[:2]), ("test.csv", sudoku_rows[2:])):
        (src / name).write_text("source,question,answer,rating\n" + "".join(f"s,{q},{a},{r}\n" for q, a, r in rows))
    out = tmp_path / "sudoku"
    assert run_cli(build_sudoku, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["identifiers.json", "test", "train"] and os.listdir(tmp_path) == [
        "src",
        "sudoku",
    ]
    # Building the source folder into itself is refused: it holds train.csv, which a builder does not write.
    assert run_cli(build_sudoku, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(src)]) == 2
    assert sorted(os.listdir(src)) == ["test.csv", "train.csv"]
