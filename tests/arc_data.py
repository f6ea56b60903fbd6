"""ARC test data shared by the builder, scoring and evaluator tests: real ARC Prize puzzles picked into subset
files, the golden digests of TRM's builder on them (cases A and B), and predictions for a built test split
whose scores are known (equal to the labels) or were computed by TRM's evaluator (TinyRecursiveModels e7b6871,
evaluators/arc.py: its pass@K and the sha256 of the submission.json it writes for `synthetic_rank_files`'
predictions on the datasets of cases A and B)."""

import json

import numpy as np
import torch

OFFICIAL_KEYS = [f"ARC/pass@{k}" for k in (1, 2, 5, 10, 100, 1000)]


def prize_files(kaggle, folder, picks, without_solutions=()):
    """Subset files `folder/arc_{subset}_{challenges,solutions}.json` holding the picked puzzle ids."""
    folder.mkdir(parents=True, exist_ok=True)
    for subset, ids in picks.items():
        ch = json.loads((kaggle / f"arc-agi_{subset}_challenges.json").read_text())
        so = json.loads((kaggle / f"arc-agi_{subset}_solutions.json").read_text())
        (folder / f"arc_{subset}_challenges.json").write_text(json.dumps({k: ch[k] for k in ids}))
        if subset not in without_solutions:
            (folder / f"arc_{subset}_solutions.json").write_text(json.dumps({k: so[k] for k in ids}))
    return str(folder / "arc")


GOLDEN_PICKS = {"training": ["007bbfb7", "00d62c1b"], "evaluation": ["12997ef3"], "concept": ["ExtractObjects10"]}
GOLDEN = {
    "A": (
        ["--subsets", "training", "evaluation", "--test-set-name", "evaluation", "--num-aug", "2"],
        {
            "identifiers.json": "d497717c1d2657fc49e52fcbc8905eb449b6c3e1941355c060f5f4086f1a1c7b",
            "test/all__group_indices.npy": "3eb619f04015333c589955f2821fd169d893ed3ee4b04cf2fc52059085c9ae49",
            "test/all__inputs.npy": "2d30b754b96669c0cfa99f82aad79363a1eec19d45084c48f0a9b01592b64706",
            "test/all__labels.npy": "fd7a042b1752a4d2a99001e283eedadaabe216ad1663f6088ec682d1538df020",
            "test/all__puzzle_identifiers.npy": "f9142c16bc6b8c78297d3c4f668f5a7de9f9690576082884653b59be8a6865d9",
            "test/all__puzzle_indices.npy": "1b7967d68718c9d0f8f631b3cb4b370018367443ba131414903935f507fbdece",
            "test/dataset.json": "4e1b028f6dcd711505a4c2b2a97ee1147ab965303a0c6b8360ca5bafad3d0d83",
            "test_puzzles.json": "70dc1310c009a944a3a753cf1447a3ce9b2f9f28ed7f4fb7754c67f3b8a42f47",
            "train/all__group_indices.npy": "14e3c0d70231ffea5e7522af3e793e4a8def63a3033224189185a7c267bb7d7c",
            "train/all__inputs.npy": "ab50710f867d04c4c1388ce4634e9de724286a2908e7cc10549a3ae2939d646e",
            "train/all__labels.npy": "d79e0665854c0ebd58012ebcc52f8c3d92a38383f3ef76730152a9a09703b216",
            "train/all__puzzle_identifiers.npy": "e6dcff3649277f434b8f0d499f2d24dbe1d264d45e15328c7eefdb31a3a3ec44",
            "train/all__puzzle_indices.npy": "da5e6dc4af9485f7b957c33eb30c9de98b255f76b4ffa7b8ccc28f09f6418297",
            "train/dataset.json": "7e97c3669f72e93ac2ba5500871e8a28af8889cc66f16fe27e464c5033013c26",
        },
    ),
    # concept without its solutions file (outputs [[0]]), a second test set, another seed, identifiers from 3
    "B": (
        ["--subsets", "training", "evaluation", "concept", "--test-set-name", "evaluation", "--test-set-name2"]
        + ["concept", "--seed", "5", "--num-aug", "3", "--puzzle-identifiers-start", "3"],
        {
            "identifiers.json": "e74086f37c1b8e94f845409b09e9c1079e0fe98b23ac645235ce0b2c56345da7",
            "test/all__group_indices.npy": "9461f3c67abb421033150f2fb3761c80f0aa17e5a0d021b99b531200bc9b99fd",
            "test/all__inputs.npy": "848acc5eba6edac5fa00653e44db08387318a756af8886b597b77094be3c83bd",
            "test/all__labels.npy": "d3302dc4aca88d67f9a83ed383b306198cf873b7b388b1459afe7b26b841c206",
            "test/all__puzzle_identifiers.npy": "228e2dcd781f28399ac0d91cb8e935a029247d186ff2f9838f43aaa20af5dcd1",
            "test/all__puzzle_indices.npy": "3c057391302376d8acf1e85cf85e6f6e36db6a9d582ccd86df33f1efefc900ab",
            "test/dataset.json": "210b1ead3239981d68aa0b1c782270a556ac0ebf780855d49837aa8f6bf32b34",
            "test_puzzles.json": "5661822b52e4236a8db50e66b2dc3f5eb178bf29bc5d1348362faabb2c908b7d",
            "train/all__group_indices.npy": "425ca124dd3f8e4ca5835f28ebf4f0de0ba0c1d1e2759cab060a8241f606b27d",
            "train/all__inputs.npy": "836b9afdc7b6877edc71686eff06bd4a5525d1b196e93bd7042d38633154dfb5",
            "train/all__labels.npy": "1d3c89dcc31f0c2b08aedd249400f583e60f55364c11b3aeffdafa1cfb5bd5fc",
            "train/all__puzzle_identifiers.npy": "0c87649d56b1b1ad8b93c49f8a5c5be7347729881c546fb39198dbb9fda65198",
            "train/all__puzzle_indices.npy": "1f774636e1738ad49e5fc0522cbffc5fc4ea6fa247872f48e9c941bb99046fcd",
            "train/dataset.json": "723daebdd3e4e4414e4b123541e093ce65a7beda3075f4d157539825f0bc7b2b",
        },
    ),
}


def save_rank_files(folder, outputs, ranks=2, logits_on=()):
    """Split rows over `ranks` files step_5_all_preds.{rank}; ranks in `logits_on` save one-hot logits."""
    bounds = np.linspace(0, len(outputs["inputs"]), ranks + 1).astype(int)
    files = []
    for rank in range(ranks):
        part = {k: np.ascontiguousarray(v[bounds[rank] : bounds[rank + 1]]) for k, v in outputs.items()}
        if rank in logits_on:
            part["logits"] = np.eye(12, dtype=np.float32)[part.pop("preds")]
        files.append(folder / f"step_5_all_preds.{rank}")
        torch.save({k: torch.from_numpy(v) for k, v in part.items()}, files[-1])
    return [str(f) for f in files]


def labels_as_predictions(data, folder, ranks=2):
    """Rank files predicting every test example's label, q_halt 1 (padding rows included)."""
    arrays = {k: np.load(data / "test" / f"all__{k}.npy") for k in ("inputs", "labels", "puzzle_identifiers")}
    ids = np.repeat(arrays["puzzle_identifiers"], np.diff(np.load(data / "test" / "all__puzzle_indices.npy")))
    outputs = {
        "inputs": arrays["inputs"].astype(np.int32),
        "preds": arrays["labels"].astype(np.int32),
        "puzzle_identifiers": ids.astype(np.int32),
        "q_halt_logits": np.ones(len(ids), np.float32),
    }
    for k in outputs:
        outputs[k] = np.concatenate([outputs[k], np.zeros_like(outputs[k][:2])])
    return save_rank_files(folder, outputs, ranks=ranks)


def synthetic_rank_files(data, folder):
    """Deterministic predictions for the test split, by row r: the label when r % 4 == 0, nothing (an
    empty answer) when r % 4 is 1 or 2, the label with its first cell's colour moved up by one when
    r % 4 == 3; q_halt logit ((7 r) % 5 - 2) / 2. Rows of the third test input of a task are dropped
    (a test input without predictions). Two ranks (halves), rank 1 saving one-hot logits, 3 padding rows each."""
    test = data / "test"
    labels = np.load(test / "all__labels.npy").astype(np.int32)
    sizes = np.diff(np.load(test / "all__puzzle_indices.npy"))
    ids = np.repeat(np.load(test / "all__puzzle_identifiers.npy"), sizes)
    example = np.concatenate([np.arange(n) for n in sizes])
    preds = labels.copy()
    for r in range(len(preds)):
        if r % 4 in (1, 2):
            preds[r] = 0
        elif r % 4 == 3:
            preds[r, 0] = (preds[r, 0] - 2 + 1) % 10 + 2
    q = ((np.arange(len(preds)) * 7) % 5 - 2) / 2
    keep = example != 2
    outputs = {
        "inputs": np.load(test / "all__inputs.npy").astype(np.int32)[keep],
        "labels": labels[keep],
        "puzzle_identifiers": ids.astype(np.int32)[keep],
        "preds": preds[keep],
        "q_halt_logits": q.astype(np.float32)[keep],
    }
    half = len(outputs["inputs"]) // 2
    files = []
    for rank, rows in enumerate((slice(0, half), slice(half, None))):
        part = {k: np.concatenate([v[rows], np.zeros_like(v[:3])]) for k, v in outputs.items()}
        if rank == 1:
            part["logits"] = np.eye(12, dtype=np.float32)[part.pop("preds")]
        files.append(str(folder / f"step_9_all_preds.{rank}"))
        torch.save({k: torch.from_numpy(v) for k, v in part.items()}, files[-1])
    return files


TRM_EVALUATOR_GOLDEN = {  # (pass@1, 2, 5, 10, 100, 1000), sha256 of submission.json
    "A": ((0.5,) * 6, "2492524887d799666069d41155fccaf0c8ff858d78b275cb727e99eb63a768ff"),
    "B": (
        (0.0, 0.41666666666666663) + (0.5833333333333333,) * 4,
        "e4b01531fb5cfd258e627e4539a86ee5a0d099ea3c9f078fd0e183ce60703086",
    ),
}
