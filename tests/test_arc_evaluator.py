"""The ARC evaluator (evaluators/arc.py): one process without a process group, two gloo ranks,
aggregated voting; its results equal the file-based scorer's and TRM's evaluator's (golden case B)."""

import hashlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset.build_arc_dataset import ArcBuildConfig
from dataset.build_arc_dataset import main as build_main
from dataset.cli import run_cli
from dataset.common import load_metadata
from evaluators.arc_scoring import score_prediction_files
from tests.arc_data import (
    GOLDEN,
    GOLDEN_PICKS,
    OFFICIAL_KEYS,
    TRM_EVALUATOR_GOLDEN,
    labels_as_predictions,
    prize_files,
    synthetic_rank_files,
)
from utils.functions import load_model_class

BATCH = 8


@pytest.fixture(scope="module")
def dataset(raw_data_dir, tmp_path_factory):
    """Golden case B of the builder tests (TRM names, test_puzzles.json) and its synthetic rank files."""
    root = tmp_path_factory.mktemp("arc_eval")
    prefix = prize_files(raw_data_dir / "kaggle-combined", root / "src", GOLDEN_PICKS, without_solutions=("concept",))
    data = root / "data"
    assert run_cli(build_main, ArcBuildConfig, ["--input-file-prefix", prefix, "--output-dir", str(data), *GOLDEN["B"][0]]) == 0  # fmt: skip
    (root / "preds").mkdir()
    return data, synthetic_rank_files(data, root / "preds")


def feed(evaluator, path, logits=False):
    """Batches of one rank file, as the evaluation loop hands them over (batch dict, model outputs dict)."""
    saved = torch.load(path)
    tokens = saved["preds"] if "preds" in saved else saved["logits"].argmax(-1)
    for start in range(0, len(tokens), BATCH):
        rows = slice(start, start + BATCH)
        batch = {k: saved[k][rows] for k in ("inputs", "labels", "puzzle_identifiers") if k in saved}
        outputs = {"q_halt_logits": saved["q_halt_logits"][rows]}
        if logits:
            outputs["logits"] = torch.nn.functional.one_hot(tokens[rows].long(), 12).float()
        else:
            outputs["preds"] = tokens[rows]
        evaluator.update_batch(batch, outputs)


def make_evaluator(data, **options):
    cls = load_model_class("arc@ARC", prefix="evaluators.")
    return cls(data_path=str(data), eval_metadata=load_metadata(data / "test"), **options)


def test_one_process_without_process_group(dataset, tmp_path):
    data, files = dataset
    assert not dist.is_initialized()
    evaluator = make_evaluator(data)
    assert evaluator.required_outputs == {"inputs", "puzzle_identifiers", "q_halt_logits", "preds"}
    evaluator.begin_eval()
    for i, path in enumerate(files):  # both ranks' rows in rank order in one process
        feed(evaluator, path, logits=i == 1)
    metrics = evaluator.result(str(tmp_path / "out"), rank=0, world_size=1)
    expected, digest = TRM_EVALUATOR_GOLDEN["B"]
    assert metrics == dict(zip(OFFICIAL_KEYS, expected))
    reference = score_prediction_files(files, str(data), submission_path=str(tmp_path / "s.json"))
    assert metrics == reference.metrics()
    assert (tmp_path / "out" / "submission.json").read_bytes() == (tmp_path / "s.json").read_bytes()
    assert evaluator.result(None, rank=0, world_size=1) == metrics  # no save path: nothing written, same scores


def rank_worker(rank, init_file, data, files, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = make_evaluator(data)
        evaluator.begin_eval()
        feed(evaluator, files[rank], logits=rank == 1)
        result = evaluator.result(out if rank == 0 else None, rank=rank, world_size=2, group=dist.group.WORLD)
        with open(f"{out}/result.{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_ranks_gather_to_rank_0(dataset, tmp_path):
    data, files = dataset
    mp.spawn(rank_worker, args=(str(tmp_path / "init"), data, files, str(tmp_path)), nprocs=2, join=True)
    expected, digest = TRM_EVALUATOR_GOLDEN["B"]
    assert json.loads((tmp_path / "result.0.json").read_text()) == dict(zip(OFFICIAL_KEYS, expected))
    assert json.loads((tmp_path / "result.1.json").read_text()) is None
    assert hashlib.sha256((tmp_path / "submission.json").read_bytes()).hexdigest() == digest


def test_aggregated_voting_keeps_earlier_evaluations(dataset, tmp_path):
    data, _ = dataset
    perfect = labels_as_predictions(data, tmp_path, ranks=1)[0]
    empty = str(tmp_path / "empty.0")  # the same rows, every prediction an empty canvas
    torch.save({**torch.load(perfect), "preds": torch.zeros(torch.load(perfect)["preds"].shape)}, empty)
    runs = {}
    for aggregated in (False, True):
        evaluator = make_evaluator(data, aggregated_voting=aggregated, pass_Ks=(1, 2))
        for path in (empty, perfect):  # two evaluations
            evaluator.begin_eval()
            feed(evaluator, path)
        runs[aggregated] = evaluator.result(None, rank=0, world_size=1)
    assert runs[False] == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0}  # the second evaluation only
    # pooled: the empty answer ties the truth on votes and mean q, and was seen first
    assert runs[True] == {"ARC/pass@1": 0.0, "ARC/pass@2": 1.0}
    assert runs[True] == score_prediction_files([empty, perfect], str(data), pass_ks=(1, 2)).metrics()


def test_bad_options_rejected(dataset):
    data, _ = dataset
    with pytest.raises(ValueError, match="rule must be one of official, notebook"):
        make_evaluator(data, rule="strict")
    evaluator = make_evaluator(data)
    batch = {"inputs": torch.zeros(1, 900, dtype=torch.int32), "puzzle_identifiers": torch.tensor([10**6])}
    with pytest.raises(ValueError, match="puzzle identifier 1000000 not in identifiers.json"):
        evaluator.update_batch(batch, {"preds": torch.zeros(1, 900), "q_halt_logits": torch.zeros(1)})
    assert make_evaluator(data).result(None, 0, 1) == {k: 0.0 for k in OFFICIAL_KEYS}  # no predictions: all tasks 0
