"""evaluate.py on checkpoints in the Hugging Face hub cache (`checkpoint=hf://owner/name[@revision][/path]`).

A tiny trained run is laid out in a real hub cache folder exactly as huggingface_hub leaves it after a download
(`models--owner--name/{blobs,refs,snapshots}`: blobs named by their git or LFS hash, snapshot entries as relative
links to them, `refs/main` holding the commit), once as HRM's released repositories are (`checkpoint` and
`all_config.yaml` in the reference's keys, compiled-module weight keys) and once as TRM's ARC Prize verification
repository is (one folder per run, `step_N` beside its config). evaluate.py then runs through the real command line
with `HF_HUB_OFFLINE=1` on a dataset that has only its test split, and must write its results under the current
folder, never into the cache.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import evaluate
import pretrain
from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset, tiny_config
from training.build import PUZZLE_TABLE_KEY
from utils.distributed import DistInfo
from utils.hub import HubCheckpoint, parse_hub_checkpoint, weights_file

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The keys of the reference's PretrainConfig, which HRM's released all_config.yaml files hold.
REFERENCE_KEYS = (
    "arch data_path global_batch_size epochs lr lr_min_ratio lr_warmup_steps weight_decay beta1 beta2 "
    "puzzle_emb_lr puzzle_emb_weight_decay project_name run_name checkpoint_path seed checkpoint_every_eval "
    "eval_interval eval_save_outputs"
).split()


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay `files` (path in the repository -> content) out as huggingface_hub caches a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path, content in files.items():
        if len(content) > 1000:  # an LFS file is stored under its sha256, a small git file under its git blob id
            blob = hashlib.sha256(content).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(content)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def cache_listing(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    data = make_tiny_dataset(root / "data")
    run = root / "run"
    pretrain.run(tiny_config(data, run, "evaluators=[]"))
    test_only = Path(shutil.copytree(data, root / "test-only"))
    shutil.rmtree(test_only / "train")
    # The metrics of the same weights evaluated as a local run folder (train split present).
    local = evaluate.evaluate_checkpoint(evaluate.EvalConfig(checkpoint=str(run / "step_6"), device="cpu"), CPU)

    saved = yaml.safe_load((run / "all_config.yaml").read_text())
    hrm_config = {k: saved[k] for k in REFERENCE_KEYS}
    hrm_config["data_path"] = "data/moved-away"  # the training machine's path: data_path= is needed
    weights = torch.load(run / "step_6", weights_only=True)
    compiled = root / "compiled"
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, compiled)
    cache = root / "cache"
    add_to_hub_cache(
        cache,
        "sapientinc/HRM-checkpoint-tiny",
        {"checkpoint": compiled.read_bytes(), "all_config.yaml": yaml.safe_dump(hrm_config).encode()},
    )
    add_to_hub_cache(
        cache,
        "arcprize/trm_tiny_verification",
        {
            "run_a/step_6": (run / "step_6").read_bytes(),
            "run_a/all_config.yaml": (run / "all_config.yaml").read_bytes(),
            "README.md": b"two runs, one folder each\n",
        },
    )
    return root, test_only, cache, local["metrics"]["all"]


def cli(*args, cwd, cache, **env):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(cache), **env}
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *args, "device=cpu"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_released_checkpoint_from_the_hub_cache_offline_on_a_test_split_alone(world, tmp_path):
    root, test_only, cache, local = world
    before = cache_listing(cache)
    hub = "hf://sapientinc/HRM-checkpoint-tiny"
    result = cli(f"checkpoint={hub}", f"data_path={test_only}", cwd=tmp_path, cache=cache, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("all/"))
    assert printed.keys() == {f"all/{k}" for k in local}
    for key, value in local.items():
        assert float(printed[f"all/{key}"]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Everything lands in evaluations/<owner>--<name> under the current folder; the cache is untouched.
    out = tmp_path / "evaluations" / "sapientinc--HRM-checkpoint-tiny"
    assert sorted(p.name for p in out.iterdir()) == ["eval_results.json", "step_0_all_preds.0"]
    assert cache_listing(cache) == before
    results = json.loads((out / "eval_results.json").read_text())
    assert results["checkpoint"] == hub and results["repo_id"] == "sapientinc/HRM-checkpoint-tiny"
    assert results["revision"] == COMMIT and results["step"] == 0
    assert results["file"] == str(
        cache / "models--sapientinc--HRM-checkpoint-tiny" / "snapshots" / COMMIT / "checkpoint"
    )
    assert results["data_paths"] == [str(test_only)] and results["overrides"] == {
        "data_path": str(test_only),
        "device": "cpu",
    }
    assert results["date"].endswith("+00:00")
    for key, value in local.items():
        assert results["metrics"][f"all/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_run_folder_inside_a_repository_at_a_revision_into_a_chosen_folder(world, tmp_path):
    root, test_only, cache, local = world
    hub = f"hf://arcprize/trm_tiny_verification@{COMMIT}/run_a"
    out = tmp_path / "mine"
    result = cli(
        f"checkpoint={hub}",
        f"data_path={test_only}",
        f"output_dir={out}",
        cwd=tmp_path,
        cache=cache,
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 6 and results["revision"] == COMMIT  # the folder's step_6, its step from the name
    assert results["file"].endswith(f"{COMMIT}/run_a/step_6")
    assert (out / "step_6_all_preds.0").is_file() and not (tmp_path / "evaluations").exists()
    assert results["metrics"]["all/exact_accuracy"] == pytest.approx(local["exact_accuracy"], abs=1e-6)


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],  # offline; hub unreachable
    ids=["offline", "unreachable"],
)
def test_a_checkpoint_not_in_the_cache_is_one_line_at_once(world, tmp_path, env):
    _, _, cache, _ = world
    hub = "hf://sapientinc/HRM-checkpoint-absent"
    # A data path that does not exist: the checkpoint must be the first (and only) complaint.
    result = cli(f"checkpoint={hub}", "data_path=/nonexistent", cwd=tmp_path, cache=cache, **env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    reason = "HF_HUB_OFFLINE is set" if env["HF_HUB_OFFLINE"] == "1" else "the hub could not be reached"
    assert last == f"error: checkpoint {hub}: not in the hub cache {cache} and {reason}"
    assert not (tmp_path / "evaluations").exists()


def test_data_built_differently_from_the_checkpoints_is_one_line(world, tmp_path):
    root, _, _, _ = world
    other = make_tiny_dataset(tmp_path / "other", num_groups=4)  # fewer puzzles: fewer identifiers
    cfg = evaluate.EvalConfig(checkpoint=str(root / "run" / "step_6"), data_path=str(other), device="cpu")
    with pytest.raises(ValueError) as error:
        evaluate.evaluate_checkpoint(cfg, CPU)
    assert str(error.value) == (
        f"checkpoint {root / 'run' / 'step_6'}: its puzzle embedding has 24 rows, but {other} has 18 puzzle "
        "identifiers (num_puzzle_identifiers): the dataset was not built as the checkpoint's training data was "
        "(same builder, raw files, seed and augmentation count)"
    )


def test_hub_spellings_and_weights_files(tmp_path):
    assert parse_hub_checkpoint("checkpoints/run/step_6") is None
    spec = parse_hub_checkpoint("hf://arcprize/trm_arc_prize_verification@v1.0/arc_v1_public/step_518071")
    assert spec == HubCheckpoint("arcprize/trm_arc_prize_verification", "v1.0", "arc_v1_public/step_518071")
    assert str(spec) == "hf://arcprize/trm_arc_prize_verification@v1.0/arc_v1_public/step_518071"
    assert spec.folder_name() == "arcprize--trm_arc_prize_verification@v1.0--arc_v1_public--step_518071"
    assert parse_hub_checkpoint("hf://sapientinc/HRM-checkpoint-ARC-2/") == HubCheckpoint(
        "sapientinc/HRM-checkpoint-ARC-2", None, ""
    )
    with pytest.raises(ValueError, match=r"not of the form hf://owner/name\[@revision\]"):
        parse_hub_checkpoint("hf://just-a-name")
    for names, expected in (
        (["step_9", "step_10", "all_config.yaml"], "step_10"),
        (["checkpoint", "README.md"], "checkpoint"),
    ):
        folder = tmp_path / expected
        folder.mkdir()
        for name in names:
            (folder / name).write_text("")
        assert weights_file(str(folder), "here") == str(folder / expected)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "model.safetensors").write_text("")
    with pytest.raises(
        FileNotFoundError, match=r"^here: no weights file \(step_N or checkpoint\) among model.safetensors"
    ):
        weights_file(str(tmp_path / "none"), "here")


def test_fine_tuning_starts_from_a_hub_checkpoint(world, tmp_path):
    root, _, cache, _ = world
    overrides = [*TINY_ARCH, f"data_path={root / 'data'}", f"checkpoint_path={tmp_path / 'tuned'}", "run_name=tuned"]
    overrides += ["epochs=2", "eval_interval=2", "global_batch_size=4", "use_wandb=false", "evaluators=[]"]
    hub = "hf://sapientinc/HRM-checkpoint-tiny"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain.py"),
            *overrides,
            f"load_checkpoint={hub}",
            "freeze_weights=true",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"load_checkpoint: initial weights from {hub}" in result.stderr
    base = torch.load(root / "run" / "step_6", weights_only=True)
    (tuned,) = (tmp_path / "tuned").glob("step_*")
    final = torch.load(tuned, weights_only=True)
    assert not torch.equal(final[PUZZLE_TABLE_KEY], base[PUZZLE_TABLE_KEY])
    assert all(torch.equal(final[k], base[k]) for k in base if k != PUZZLE_TABLE_KEY)
