"""TRM's launcher keys in pretrain.py / evaluate.py.

- Every training command line of TRM's README composes unchanged, and runs on tiny data on CPU with only
  data paths, epochs and batch size changed (the full-size model: these runs are the slow part).
- `data_paths` / `data_paths_test`: several datasets trained together, their identifiers kept apart.
- `evaluators` with TRM's hooks (`evaluators=[]` for none), `load_checkpoint` with TRM's mean-row rule,
  `freeze_weights`, `min_eval_interval`.
- evaluate.py on a TRM run folder as TRM writes it.
"""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import pretrain
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from tests.helpers import REPO, make_tiny_dataset
from training.build import identifier_offsets
from training.config import compose_config, config_from_hydra
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# TRM's README (SamsungSAILMontreal/TinyRecursiveModels, commit e7b6871), its training command lines as written.
TRM_README = {
    "arc1": """run_name="pretrain_att_arc1concept_4"
torchrun --nproc-per-node 4 --rdzv_backend=c10d --rdzv_endpoint=localhost:0 --nnodes=1 pretrain.py \\
arch=trm \\
data_paths="[data/arc1concept-aug-1000]" \\
arch.L_layers=2 \\
arch.H_cycles=3 arch.L_cycles=4 \\
+run_name=${run_name} ema=True""",
    "arc2": """run_name="pretrain_att_arc2concept_4"
torchrun --nproc-per-node 4 --rdzv_backend=c10d --rdzv_endpoint=localhost:0 --nnodes=1 pretrain.py \\
arch=trm \\
data_paths="[data/arc2concept-aug-1000]" \\
arch.L_layers=2 \\
arch.H_cycles=3 arch.L_cycles=4 \\
+run_name=${run_name} ema=True""",
    "sudoku_mlp": """run_name="pretrain_mlp_t_sudoku"
python pretrain.py \\
arch=trm \\
data_paths="[data/sudoku-extreme-1k-aug-1000]" \\
evaluators="[]" \\
epochs=50000 eval_interval=5000 \\
lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0 \\
arch.mlp_t=True arch.pos_encodings=none \\
arch.L_layers=2 \\
arch.H_cycles=3 arch.L_cycles=6 \\
+run_name=${run_name} ema=True""",
    "sudoku_att": """run_name="pretrain_att_sudoku"
python pretrain.py \\
arch=trm \\
data_paths="[data/sudoku-extreme-1k-aug-1000]" \\
evaluators="[]" \\
epochs=50000 eval_interval=5000 \\
lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0 \\
arch.L_layers=2 \\
arch.H_cycles=3 arch.L_cycles=6 \\
+run_name=${run_name} ema=True""",
    "maze": """run_name="pretrain_att_maze30x30"
torchrun --nproc-per-node 4 --rdzv_backend=c10d --rdzv_endpoint=localhost:0 --nnodes=1 pretrain.py \\
arch=trm \\
data_paths="[data/maze-30x30-hard-1k]" \\
evaluators="[]" \\
epochs=50000 eval_interval=5000 \\
lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0 \\
arch.L_layers=2 \\
arch.H_cycles=3 arch.L_cycles=4 \\
+run_name=${run_name} ema=True""",
}


def overrides_of(command: str) -> tuple[str, list[str]]:
    """(run_name, the overrides after pretrain.py) of a README block, as the shell would split them."""
    run_name = re.search(r'run_name="([^"]+)"', command).group(1)
    line = command.split("\n", 1)[1].replace("\\\n", " ")
    words = [w.replace('"', "").replace("${run_name}", run_name) for w in line.split()]
    return run_name, words[words.index("pretrain.py") + 1 :]


@pytest.mark.parametrize("name", sorted(TRM_README))
def test_trm_readme_command_composes_unchanged(name):
    run_name, overrides = overrides_of(TRM_README[name])
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):  # plain Hydra, no rewriting
        config = config_from_hydra(compose(config_name="cfg_pretrain", overrides=overrides))
    extra = config.arch.model_extra
    assert config.arch.name == "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
    assert config.run_name == run_name and config.ema is True and config.ema_rate == 0.999
    assert (extra["L_layers"], extra["H_cycles"]) == (2, 3)
    assert extra["L_cycles"] == (6 if name.startswith("sudoku") else 4)
    assert (extra["mlp_t"], extra["pos_encodings"]) == ((True, "none") if name == "sudoku_mlp" else (False, "rope"))
    assert (extra["puzzle_emb_len"], extra["no_ACT_continue"], extra["hidden_size"]) == (16, True, 512)
    assert len(config.data_paths) == 1 and config.data_paths[0].startswith("data/")
    if name.startswith("arc"):  # TRM's defaults: ARC evaluator, 100k epochs, evaluation every 10k
        assert [e.name for e in config.evaluators] == ["arc@ARC"]
        assert (config.epochs, config.eval_interval, config.lr, config.weight_decay) == (100000, 10000, 1e-4, 0.1)
    else:
        assert config.evaluators == []
        assert (config.epochs, config.eval_interval, config.weight_decay, config.puzzle_emb_lr) == (
            50000,
            5000,
            1.0,
            1e-4,
        )


def tiny_run_command(command: str, global_batch_size: int) -> str:
    """The README block with only epochs and batch size changed (the data paths stay: tiny data lives there)."""
    command = command.replace("epochs=50000 eval_interval=5000", "epochs=1 eval_interval=1")
    if "epochs=1" not in command:
        command += " epochs=1 eval_interval=1"
    return command + f" global_batch_size={global_batch_size}"


@pytest.mark.slow
@pytest.mark.full_size
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.multiprocess) if "torchrun" in TRM_README[n] else n for n in sorted(TRM_README)],
)
def test_trm_readme_command_runs_on_tiny_data(tmp_path, name):
    """The full-size TRM (d=512, bf16) for one step and one evaluation: 1 example per rank, 1 test example."""
    ranks = 4 if "torchrun" in TRM_README[name] else 1
    data_path = re.search(r'data_paths="\[(.*)\]"', TRM_README[name]).group(1)
    make_tiny_dataset(tmp_path / data_path, num_groups=ranks, aug_per_group=0, num_test=1)
    (tmp_path / "pretrain.py").symlink_to(REPO / "pretrain.py")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # torchrun and python of this venv
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    result = subprocess.run(
        ["bash", "-c", tiny_run_command(TRM_README[name], ranks)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_name, _ = overrides_of(TRM_README[name])
    project = f"{os.path.basename(data_path).capitalize()}-ACT-torch"  # TRM's naming with data_paths
    run = tmp_path / "checkpoints" / project / run_name
    assert (run / "step_1").is_file() and (run / "all_config.yaml").is_file(), sorted(p.name for p in run.iterdir())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("all/exact_accuracy" in m for m in metrics) and any("train/lm_loss" in m for m in metrics)


# ------------------------------------------------------------------------------------ several datasets


def tiny_trm(data_paths, ckpt, *extra):
    paths = ",".join(str(p) for p in data_paths)
    return compose_config(
        [
            "arch=trm_tiny",
            f"data_paths=[{paths}]",
            f"checkpoint_path={ckpt}",
            "run_name=tiny",
            "global_batch_size=4",
            "epochs=4",
            "eval_interval=2",
            "lr=1e-3",
            "lr_warmup_steps=2",
            "use_wandb=false",
            "device=cpu",
            "evaluators=[]",
            *extra,
        ]
    )


def shift_identifiers(root: Path, by: int) -> None:
    """Renumber a tiny dataset's identifiers from 1 + by, as TRM's builder does with --puzzle-identifiers-start."""
    for split in ("train", "test"):
        path = root / split / "all__puzzle_identifiers.npy"
        ids = np.load(path)
        np.save(path, np.where(ids == 0, ids, ids + by).astype(ids.dtype))
        meta = json.loads((root / split / "dataset.json").read_text())
        meta["num_puzzle_identifiers"] += by
        (root / split / "dataset.json").write_text(json.dumps(meta))


def loader(paths, offsets, split="train", test=False):
    return PuzzleDataset(
        PuzzleDatasetConfig(
            seed=0,
            dataset_paths=[str(p) for p in paths],
            identifier_offsets=offsets,
            global_batch_size=4,
            test_set_mode=test,
            epochs_per_iter=1,
            rank=0,
            num_replicas=1,
        ),
        split=split,
    )


def test_two_datasets_load_as_one_with_identifiers_apart(tmp_path):
    a = make_tiny_dataset(tmp_path / "a", num_groups=4, seed=1)
    b = make_tiny_dataset(tmp_path / "b", num_groups=6, seed=2)
    n_a = json.loads((a / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    n_b = json.loads((b / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    assert identifier_offsets([str(a), str(b)]) == [0, n_a]  # both numbered from 1: shifted apart

    ds = loader([a, b], [0, n_a])
    meta = ds.metadata
    assert meta.sets == ["all", "all1"] and meta.num_puzzle_identifiers == n_a + n_b
    assert (meta.total_groups, meta.total_puzzles) == (4 + 6, 12 + 18)
    batches = list(ds)
    by_set = {name: [b for s, b, _ in batches if s == name] for name in ("all", "all1")}
    # One example per group per epoch, each dataset in its own pass: 4 // 4 and 6 // 4 batches.
    assert [s for s, _, _ in batches] == ["all", "all1"]
    ids_a = torch.cat([b["puzzle_identifiers"] for b in by_set["all"]])
    ids_b = torch.cat([b["puzzle_identifiers"] for b in by_set["all1"]])
    assert ids_a.min() >= 1 and ids_a.max() < n_a
    assert ids_b.min() >= n_a and ids_b.max() < n_a + n_b  # dataset b's rows of the table, after a's
    # In test mode (examples in order) b's batches are b's own, its identifiers shifted by n_a, padding blank.
    together = [bt for s, bt, _ in loader([a, b], [0, n_a], "test", test=True) if s == "all1"]
    alone = [bt for _, bt, _ in loader([b], [0], "test", test=True)]
    assert len(together) == len(alone) > 0
    for x, y in zip(together, alone):
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["labels"], y["labels"])
        ids = y["puzzle_identifiers"]
        assert torch.equal(x["puzzle_identifiers"], torch.where(ids == 0, ids, ids + n_a))


def test_datasets_built_apart_keep_trm_numbering(tmp_path):
    a = make_tiny_dataset(tmp_path / "a", num_groups=4, seed=1)
    b = make_tiny_dataset(tmp_path / "b", num_groups=6, seed=2)
    n_a = json.loads((a / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    shift_identifiers(b, n_a)  # b numbered from n_a + 1, disjoint from a: TRM's --puzzle-identifiers-start
    assert identifier_offsets([str(a), str(b)]) == [0, 0]


def test_mismatched_datasets_are_one_line_errors(tmp_path):
    a = make_tiny_dataset(tmp_path / "a")
    b = make_tiny_dataset(tmp_path / "b")
    meta = json.loads((b / "train" / "dataset.json").read_text())
    meta["vocab_size"] = 9
    (b / "train" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"b/train/dataset.json: field 'vocab_size' is 9, but .*a/train/dataset.json has 6"
    ):
        loader([a, b], [0, 20])


def test_training_on_two_datasets_reports_each_test_set(tmp_path):
    a = make_tiny_dataset(tmp_path / "a", num_groups=4, seed=1)
    b = make_tiny_dataset(tmp_path / "b", num_groups=4, seed=2)
    # halt_max_steps 1: every row halts every step, so every batch enters the carry (with ACT a batch that
    # arrives while all rows still run is skipped, as in the reference).
    state = pretrain.run(tiny_trm([a, b], tmp_path / "ckpt", "arch.halt_max_steps=1"))
    n = sum(json.loads((p / "train" / "dataset.json").read_text())["num_puzzle_identifiers"] for p in (a, b))
    assert state.model.model.inner.puzzle_emb.weights.shape[0] == n
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "all/accuracy" in r]
    assert evals and all("all1/accuracy" in r for r in evals)
    # Trained rows: a's puzzles in [1, n_a), b's after; the blank row 0 never trains.
    table = state.model.model.inner.puzzle_emb.weights
    n_a = json.loads((a / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    assert table[0].abs().sum() == 0
    assert table[1:n_a].abs().sum() > 0 and table[n_a + 1 :].abs().sum() > 0


def test_test_dataset_that_is_a_training_dataset_gets_its_shift(tmp_path):
    a = make_tiny_dataset(tmp_path / "a", num_groups=4, seed=1)
    b = make_tiny_dataset(tmp_path / "b", num_groups=4, seed=2)
    n_a = json.loads((a / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    config = tiny_trm([a, b], tmp_path / "ckpt", f"data_paths_test=[{b}]")
    dataset, _ = pretrain.create_dataloader(config, "test", CPU, test_set_mode=True, epochs=1)
    ids = torch.cat([batch["puzzle_identifiers"] for _, batch, _ in dataset])
    assert ids[ids != 0].min() > n_a  # b's test puzzles index b's rows of the table


# ---------------------------------------------------------------------------------------- evaluators


class Recorder:
    """An evaluator with TRM's protocol that records what it is given."""

    required_outputs = {"preds", "puzzle_identifiers"}
    instances: list["Recorder"] = []

    def __init__(self, data_path, eval_metadata, scale=1.0):
        self.data_path, self.scale, self.calls, self.rows = data_path, scale, [], 0
        self.ids: list[torch.Tensor] = []
        Recorder.instances.append(self)

    def begin_eval(self):
        self.calls.append("begin")
        self.rows = 0

    def update_batch(self, batch, preds):
        assert "preds" in preds and preds["preds"].dtype in (torch.int64, torch.int32)
        self.calls.append("update")
        self.rows += int((batch["puzzle_identifiers"] != 0).sum())
        self.ids.append(batch["puzzle_identifiers"].cpu())

    def result(self, save_path, rank, world_size, group=None):
        self.calls.append("result")
        assert os.path.isdir(save_path) and world_size == 1 and rank == 0
        return {"REC/rows": self.scale * self.rows}


@pytest.fixture
def recorder(monkeypatch):
    module = types.ModuleType("evaluators.recorder")
    module.Recorder = Recorder
    monkeypatch.setitem(sys.modules, "evaluators.recorder", module)
    Recorder.instances = []
    return Recorder


def test_evaluators_get_trm_hooks_per_test_dataset(tmp_path, recorder):
    a = make_tiny_dataset(tmp_path / "a", num_groups=4, num_test=3, seed=1)
    b = make_tiny_dataset(tmp_path / "b", num_groups=4, num_test=5, seed=2)
    pretrain.run(tiny_trm([a, b], tmp_path / "ckpt", "evaluators=[{name: recorder@Recorder, scale: 2.0}]"))
    first, second = recorder.instances
    assert (first.data_path, second.data_path) == (str(a), str(b))
    # Two evaluations; each: begin, one update per batch of its own dataset, result.
    assert first.calls == ["begin", "update", "result"] * 2
    assert second.calls == ["begin", "update", "update", "result"] * 2
    assert (first.rows, second.rows) == (3, 5)
    # Identifiers as each dataset numbers them (the loader's shift undone).
    n_b = json.loads((b / "test" / "dataset.json").read_text())["num_puzzle_identifiers"]
    assert all(int(ids.max()) < n_b for ids in second.ids)
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "REC/rows" in r][-1]
    assert (final["REC/rows"], final["REC1/rows"]) == (6.0, 10.0)
    assert (tmp_path / "ckpt" / f"evaluator_Recorder_step_{final['step']}").is_dir()


def test_no_evaluators(tmp_path, recorder):
    data = make_tiny_dataset(tmp_path / "data")
    pretrain.run(tiny_trm([data], tmp_path / "ckpt", "evaluators=[]"))
    assert recorder.instances == []


def test_unknown_evaluator_option_is_a_config_error(tmp_path, recorder):
    data = make_tiny_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=r"config key 'evaluators': recorder@Recorder: .*colour"):
        pretrain.run(tiny_trm([data], tmp_path / "ckpt", "evaluators=[{name: recorder@Recorder, colour: 1}]"))


# ------------------------------------------------------------------------ load_checkpoint, freezing


def test_load_checkpoint_takes_weights_and_resets_a_resized_puzzle_table_to_its_mean_row(tmp_path):
    small = make_tiny_dataset(tmp_path / "small", num_groups=4)
    large = make_tiny_dataset(tmp_path / "large", num_groups=7)
    pretrain.run(tiny_trm([small], tmp_path / "first"))  # 4 epochs x 4 groups / batch 4: step_4
    trained = torch.load(tmp_path / "first" / "step_4", weights_only=True)
    # As TRM saves it: from a compiled module, every key prefixed.
    torch.save({f"_orig_mod.{k}": v for k, v in trained.items()}, tmp_path / "trm_step_6")

    config = tiny_trm([large], tmp_path / "second", f"+load_checkpoint={tmp_path / 'trm_step_6'}")
    dataset, _ = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    state, _ = pretrain.init_train_state(config, dataset.metadata, CPU)
    loaded = state.model.state_dict()
    key = "model.inner.puzzle_emb.weights"
    assert loaded[key].shape[0] == dataset.metadata.num_puzzle_identifiers != trained[key].shape[0]
    mean = trained[key].mean(dim=0, keepdim=True)
    assert torch.equal(loaded[key], mean.expand_as(loaded[key]))
    for k, v in trained.items():
        if k != key:
            assert torch.equal(loaded[k], v), k


def test_freeze_weights_trains_only_the_puzzle_embedding(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    config = tiny_trm([data], tmp_path / "ckpt", "freeze_weights=true", "ema=true")
    dataset, _ = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    torch.manual_seed(config.seed)
    initial, _ = pretrain.init_train_state(config, dataset.metadata, CPU)
    assert len(initial.optimizers) == 1  # SignSGD on the puzzle embedding only (TRM)
    state = pretrain.run(config)
    before, after = initial.model.state_dict(), state.model.state_dict()
    key = "model.inner.puzzle_emb.weights"
    assert not torch.equal(before[key], after[key])
    for k in before:
        if k != key:
            assert torch.equal(before[k], after[k]), k


def test_freeze_weights_without_a_puzzle_embedding_is_an_error(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="freeze_weights.*no puzzle embedding"):
        pretrain.run(tiny_trm([data], tmp_path / "ckpt", "freeze_weights=true", "arch.puzzle_emb_ndim=0"))


def test_min_eval_interval_skips_the_first_evaluations(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    pretrain.run(tiny_trm([data], tmp_path / "ckpt", "epochs=6", "min_eval_interval=2"))  # iterations 0, 1, 2
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "all/accuracy" in r] == [9]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_9"]


# --------------------------------------------------------------------------- evaluate.py on a TRM run


# The keys of TRM's PretrainConfig, which its all_config.yaml holds (yaml.dump of model_dump, sorted).
TRM_CONFIG_KEYS = (
    "arch data_paths data_paths_test evaluators global_batch_size epochs lr lr_min_ratio lr_warmup_steps "
    "weight_decay beta1 beta2 puzzle_emb_lr puzzle_emb_weight_decay project_name run_name load_checkpoint "
    "checkpoint_path seed checkpoint_every_eval eval_interval min_eval_interval eval_save_outputs ema ema_rate "
    "freeze_weights"
).split()


def test_evaluate_reads_a_trm_run_folder(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    ours = tmp_path / "ours"
    pretrain.run(tiny_trm([data], ours, "eval_save_outputs=[logits]"))
    # The folder as TRM writes it: its config keys only, weights under `_orig_mod.`.
    run = tmp_path / "trm_run"
    run.mkdir()
    saved = yaml.safe_load((ours / "all_config.yaml").read_text())
    (run / "all_config.yaml").write_text(yaml.dump({k: saved[k] for k in TRM_CONFIG_KEYS}))
    weights = torch.load(ours / "step_6", weights_only=True)
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, run / "step_6")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            f"checkpoint={run / 'step_6'}",
            "device=cpu",
            "save_outputs=[logits]",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("all/"))
    during = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()][-1]
    assert float(printed["all/exact_accuracy"]) == pytest.approx(during["all/exact_accuracy"], abs=1e-6)
    assert torch.equal(
        torch.load(run / "step_6_all_preds.0")["logits"], torch.load(ours / "step_6_all_preds.0")["logits"]
    )


def test_our_dataset_json_has_every_field_trms_loader_requires(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    trm_fields = {
        "pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len", "num_puzzle_identifiers",
        "total_groups", "mean_puzzle_examples", "total_puzzles", "sets",
    }  # fmt: skip
    for split in ("train", "test"):
        meta = json.loads((data / split / "dataset.json").read_text())
        assert trm_fields <= set(meta) and meta["total_puzzles"] is not None


def test_a_dataset_json_as_trms_sudoku_builder_writes_it_loads(tmp_path):
    """TRM's Sudoku and Maze builders write total_puzzles = the number of groups; our loader reads such files."""
    data = make_tiny_dataset(tmp_path / "data", num_groups=4, aug_per_group=2)
    for split in ("train", "test"):
        path = data / split / "dataset.json"
        meta = json.loads(path.read_text())
        meta["total_puzzles"] = meta["total_groups"]
        path.write_text(json.dumps(meta))
    ds = loader([data], None)
    assert ds.metadata.total_puzzles == 4 and [s for s, _, _ in ds] == ["all"]


def test_a_dataset_too_small_for_one_batch_is_named(tmp_path):
    big = make_tiny_dataset(tmp_path / "big", num_groups=8)
    small = make_tiny_dataset(tmp_path / "small", num_groups=2)
    with pytest.raises(ValueError, match=r"global_batch_size': 4 is more than one training iteration of .*small holds"):
        pretrain.run(tiny_trm([big, small], tmp_path / "ckpt", "epochs=1", "eval_interval=1"))
