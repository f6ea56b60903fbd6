"""ARC scoring of predictions: crop, undo augmentation, vote, pass@K, ARC Prize submission.

    python -m evaluators.arc_scoring --predictions RUN/step_N_all_preds.* --data-path data/arc1concept-aug-1000 \
        --submission-out submission.json [--rule official|notebook] [--json]

Design choices:
- Each sequence is a 30x30 canvas (PAD 0, EOS 1, colour c -> c + 2). An answer is the largest
  top-left rectangle free of PAD/EOS, minus 2 (computed for a whole batch at once).
- A puzzle identifier's name says which augmentation produced the example: `<id>_t<k>_<perm>`
  (HRM, our folder builds) or `<id>|||t<k>|||<perm>` (TRM, ARC Prize builds). The augmentation
  applied colours first, then the dihedral transform, so it is undone in the opposite order.
- The tasks and their true test outputs come from the dataset: `test_puzzles.json` (TRM's
  builder, ours in ARC Prize mode) or, for folder builds, the un-augmented examples of the test
  split. Every test task counts; a task without predictions scores 0.
- Votes are kept as TRM's evaluator keeps them: per (task, un-augmented test input), the list of
  (answer, sigmoid(q_halt) in float64) in arrival order, pooled over ranks in rank order; answers
  are ranked by (votes, mean q) descending with ties in first-seen order. The same floats and the
  same order make the attempts, and so `submission.json`, identical to TRM's for the same predictions.
- Two rules over one ranking. "official" (ARC Prize, TRM's evaluator; reported as `ARC/pass@K`): a
  task scores the fraction of its test inputs whose truth is among the top K, pass@K is the mean
  over tasks. "notebook" (HRM's notebook; `ARC/notebook_pass@K`): a task counts only when all its
  test inputs are right.
- submission.json follows the ARC Prize format, {task: [{"attempt_1": grid, "attempt_2": grid}, ...]},
  one entry per test input, attempt 2 repeating attempt 1 when there is one candidate. As in TRM's
  evaluator, a test input without predictions gets no entry (a warning names the tasks); it is written atomically.
- Scoring saved files refuses a dataset that is not ARC (the evaluator's test, `not_arc_reason`) and files none
  of whose predictions is of a test input: scores of 0 would read as a model that solves nothing.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dataset.common import inverse_dihedral_transform, load_metadata, read_json
from utils.checkpointing import atomic_write
from utils.cli import OneLineErrorParser, run_flag_command
from utils.saved_outputs import in_rank_order, read_saved_outputs

PASS_KS = (1, 2, 5, 10, 100, 1000)
NOTEBOOK_PASS_KS = (1, 2, 10, 100, 1000)  # HRM's ARC notebook's K list, kept by `score_predictions`
RULES = ("official", "notebook")
SUBMISSION_K = 2  # attempts per test input in the ARC Prize format
ROWS_PER_CHUNK = 8192  # saved rows voted at once
GRID_SIZE = 30
COLOUR_OFFSET = 2  # token = colour + 2 (PAD 0, EOS 1)
NUM_COLOURS = 10
AUGMENTED_NAMES = (
    re.compile(r"^(?P<base>.+)_t(?P<tid>[0-7])_(?P<perm>[0-9]{10})$"),  # HRM
    re.compile(r"^(?P<base>.+?)\|\|\|t(?P<tid>[0-7])\|\|\|(?P<perm>[0-9]{10})$"),  # TRM
)
IDENTITY = np.arange(NUM_COLOURS)


def parse_identifier(name: str) -> tuple[str, int, np.ndarray]:
    """Variant name -> (task id, dihedral id, colour map); a name without a suffix is the un-augmented task."""
    for pattern in AUGMENTED_NAMES:
        m = pattern.match(name)
        if m is not None:
            mapping = np.array([int(c) for c in m.group("perm")])
            if sorted(mapping.tolist()) != list(range(NUM_COLOURS)):
                raise ValueError(f"identifier {name!r}: colour map {m.group('perm')} is not a permutation of 0..9")
            return m.group("base"), int(m.group("tid")), mapping
    return name, 0, IDENTITY


def is_arc_dataset(identifier_names: Sequence[str]) -> bool:
    return any(p.match(name) for name in identifier_names for p in AUGMENTED_NAMES)


def not_arc_reason(data_path: str, identifier_names: Sequence[str], seq_len: int | None, vocab_size: int | None):
    """Why the dataset at `data_path` is not ARC, or None: an ARC dataset has test_puzzles.json, 30x30 canvases of
    PAD, EOS and 10 colours (`seq_len`, `vocab_size` of its test split, None when unknown) or augmented ARC names."""
    arc_encoding = (seq_len, vocab_size) == (GRID_SIZE * GRID_SIZE, COLOUR_OFFSET + NUM_COLOURS)
    if os.path.isfile(os.path.join(data_path, "test_puzzles.json")) or arc_encoding or is_arc_dataset(identifier_names):
        return None
    return "not an ARC dataset (no test_puzzles.json, no ARC grids or puzzle names)"


def crop_shapes(tokens: np.ndarray, grid_size: int = GRID_SIZE) -> np.ndarray:
    """[N, grid_size**2] canvases -> [N, 2] (rows, cols) of the largest top-left colour rectangle."""
    grids = np.asarray(tokens).reshape(-1, grid_size, grid_size)  # [N, rows, cols]
    valid = (grids >= COLOUR_OFFSET) & (grids < COLOUR_OFFSET + NUM_COLOURS)
    runs = np.where(valid.all(axis=2), grid_size, valid.argmin(axis=2))  # [N, rows]: leading colour cells
    widths = np.minimum.accumulate(runs, axis=1)  # widest rectangle using rows 0..r
    areas = widths * np.arange(1, grid_size + 1)
    best = areas.argmax(axis=1)  # the first largest, as a scan keeping strict improvements finds
    found = areas.max(axis=1) > 0
    return np.stack([np.where(found, best + 1, 0), np.where(found, widths[np.arange(len(best)), best], 0)], axis=1)


def crop(tokens: np.ndarray, grid_size: int = GRID_SIZE) -> np.ndarray:
    """Largest top-left rectangle of colour tokens in one flattened canvas, as colours 0..9."""
    rows, cols = crop_shapes(tokens, grid_size)[0]
    return np.asarray(tokens).reshape(grid_size, grid_size)[:rows, :cols].astype(np.int64) - COLOUR_OFFSET


def undo_augmentation(grid: np.ndarray, tid: int, mapping: np.ndarray) -> np.ndarray:
    """Inverse of `dihedral_transform(mapping[grid], tid)` (the ARC builders' augmentation)."""
    return np.argsort(mapping)[inverse_dihedral_transform(grid, tid)]


def grid_key(grid: np.ndarray) -> bytes:
    """Exact identity of a grid: rows, cols (each <= 30, one byte) then cells."""
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return bytes(grid.shape) + grid.tobytes()


def key_grid(key: bytes) -> np.ndarray:
    return np.frombuffer(key, dtype=np.uint8, offset=2).reshape(key[0], key[1])


def halt_probabilities(q_halt_logits) -> np.ndarray:
    """sigmoid(q_halt) in float64 through torch, the computation TRM's evaluator ranks with."""
    logits = q_halt_logits if isinstance(q_halt_logits, torch.Tensor) else torch.from_numpy(np.asarray(q_halt_logits))
    return logits.detach().to("cpu", torch.float64).sigmoid().numpy()


class Votes:
    """Answers received per (task, un-augmented test input key): lists of (answer key, q) in arrival order."""

    def __init__(self, identifier_names: Sequence[str], blank_identifier_id: int = 0):
        self.names = identifier_names
        self.blank_identifier_id = blank_identifier_id
        self.entries: dict[str, dict[bytes, list[tuple[bytes, float]]]] = {}
        self._variants: dict[int, tuple[str, int, np.ndarray]] = {}  # identifier -> (task, tid, inverse colour map)

    def _variant(self, identifier: int) -> tuple[str, int, np.ndarray]:
        if identifier not in self._variants:
            if not 0 <= identifier < len(self.names):
                raise ValueError(f"ARC scoring: puzzle identifier {identifier} not in identifiers.json")
            base, tid, mapping = parse_identifier(self.names[identifier])
            self._variants[identifier] = (base, tid, np.argsort(mapping).astype(np.uint8))
        return self._variants[identifier]

    def add(self, puzzle_identifiers, inputs, preds, q_halt_logits) -> None:
        """One batch (tensors on any device, or arrays); rows with the blank identifier are padding."""
        ids = np.asarray(torch.as_tensor(puzzle_identifiers).cpu()).reshape(-1)
        keep = ids != self.blank_identifier_id
        ids = ids[keep]
        inputs = np.asarray(torch.as_tensor(inputs).cpu())[keep]
        preds = np.asarray(torch.as_tensor(preds).cpu())[keep]
        q = halt_probabilities(torch.as_tensor(q_halt_logits).reshape(-1))[keep]
        grid_size = int(round(inputs.shape[-1] ** 0.5)) if len(ids) else GRID_SIZE
        if grid_size * grid_size != inputs.shape[-1] or preds.shape[-1] != inputs.shape[-1]:
            raise ValueError(f"ARC scoring: sequences of {inputs.shape[-1]} tokens are not one square canvas")
        in_shapes, pred_shapes = crop_shapes(inputs, grid_size), crop_shapes(preds, grid_size)
        for row, identifier in enumerate(ids.tolist()):
            base, tid, inverse_map = self._variant(identifier)
            answers = []
            for tokens, (h, w) in ((inputs[row], in_shapes[row]), (preds[row], pred_shapes[row])):
                grid = (tokens.reshape(grid_size, grid_size)[:h, :w] - COLOUR_OFFSET).astype(np.uint8)
                answers.append(grid_key(inverse_map[inverse_dihedral_transform(grid, tid)]))
            self.entries.setdefault(base, {}).setdefault(answers[0], []).append((answers[1], float(q[row])))


def rank_votes(votes: Iterable[tuple[bytes, float]]) -> list[tuple[bytes, list]]:
    """(answer, q) votes -> [(answer, [votes, mean q])], best first: most votes, then highest mean q, then first seen."""
    stats: dict[bytes, list] = {}
    for answer, q in votes:
        s = stats.setdefault(answer, [0, 0.0])
        s[0] += 1
        s[1] += q
    for s in stats.values():
        s[1] /= s[0]
    return sorted(stats.items(), key=lambda kv: kv[1], reverse=True)


def rank_answers(entries_per_rank: Sequence[dict], task: str, input_key: bytes) -> list[tuple[bytes, list]]:
    """`rank_votes` of one test input's answers, pooled over ranks in rank order."""
    return rank_votes(vote for entries in entries_per_rank for vote in entries.get(task, {}).get(input_key, ()))


TestTasks = dict[str, list[tuple[bytes, bytes]]]  # task -> [(input key, true output key)] in test order


@dataclass
class ArcScore:
    rule: str
    pass_at: dict[int, float]  # K -> score (official: mean partial credit; notebook: fraction solved)
    solved_at: dict[int, float]  # K -> tasks solved (official: sum of partial credits)
    num_puzzles: int
    num_test_inputs: int
    num_predictions: int
    missing: list[str] = field(default_factory=list)  # tasks with a test input that received no prediction
    submission: dict[str, list[dict]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return dict(zip(metric_names(self.rule, self.pass_at), self.pass_at.values()))


def metric_names(rule: str, pass_ks: Iterable[int]) -> list[str]:
    """The keys of `ArcScore.metrics` for a rule and its K list: `ARC/pass@K` (official), `ARC/notebook_pass@K`."""
    prefix = "ARC/pass@" if rule == "official" else "ARC/notebook_pass@"
    return [f"{prefix}{k}" for k in pass_ks]


def score_votes(
    tasks: TestTasks,
    entries_per_rank: Sequence[dict],
    rule: str = "official",
    pass_ks: Iterable[int] = PASS_KS,
    submission_k: int = SUBMISSION_K,
) -> ArcScore:
    """Score pooled votes (`Votes.entries` of each rank, in rank order) against the test tasks."""
    if rule not in RULES:
        raise ValueError(f"ARC scoring: rule must be one of {', '.join(RULES)}, got {rule!r}")
    pass_ks = tuple(pass_ks)
    credit = [0.0] * len(pass_ks)
    submission: dict[str, list[dict]] = {}
    missing = []
    for task, pairs in tasks.items():
        submission[task] = []
        correct = [0] * len(pass_ks)
        for input_key, output_key in pairs:
            ranking = rank_answers(entries_per_rank, task, input_key)
            if not ranking:
                missing.append(task)
                continue
            for i, k in enumerate(pass_ks):
                correct[i] += any(answer == output_key for answer, _ in ranking[:k])
            attempts = [key_grid(answer) for answer, _ in ranking[:submission_k]]
            attempts += attempts[:1] * (submission_k - len(attempts))
            submission[task].append({f"attempt_{i + 1}": grid.tolist() for i, grid in enumerate(attempts)})
        for i in range(len(pass_ks)):
            credit[i] += correct[i] / len(pairs) if rule == "official" else int(correct[i] == len(pairs))
    if missing:
        names = sorted(set(missing))
        print(
            f"warning: ARC scoring: {len(names)} of {len(tasks)} tasks lack predictions for some test input "
            f"(scored 0 there, no submission entry): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}",
            file=sys.stderr,
        )
    return ArcScore(
        rule=rule,
        pass_at={k: credit[i] / max(len(tasks), 1) for i, k in enumerate(pass_ks)},
        solved_at=dict(zip(pass_ks, credit)),
        num_puzzles=len(tasks),
        num_test_inputs=sum(len(p) for p in tasks.values()),
        num_predictions=sum(len(v) for entries in entries_per_rank for e in entries.values() for v in e.values()),
        missing=sorted(set(missing)),
        submission=submission,
    )


def write_submission(path: str, submission: dict) -> None:
    """ARC Prize submission.json, serialised as TRM's evaluator does (json.dump defaults), written atomically."""
    atomic_write(path, lambda f: json.dump(submission, f), mode="w")


# ----------------------------------------------------------------------------------------------
# Inputs: identifiers, test tasks, saved predictions
# ----------------------------------------------------------------------------------------------


def load_identifier_names(data_path: str) -> list[str]:
    path = os.path.join(data_path, "identifiers.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"identifiers.json not found in {data_path}")
    names = read_json(path, "identifiers.json")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a list of identifier names")
    return names


def tasks_from_test_puzzles(path: str) -> TestTasks:
    """TRM's test_puzzles.json: task -> {"train": [...], "test": [{"input", "output"}]}."""
    raw = read_json(path, "test_puzzles.json")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty object mapping task ids to puzzles")
    tasks: TestTasks = {}
    for task, puzzle in raw.items():
        pairs = puzzle.get("test") if isinstance(puzzle, dict) else None
        if not isinstance(pairs, list) or not pairs:
            raise ValueError(f"{path}: task '{task}': expected a non-empty 'test' list")
        tasks[task] = []
        for i, pair in enumerate(pairs):
            try:
                grids = [np.array(pair[k]) for k in ("input", "output")]
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{path}: task '{task}' field 'test[{i}]': expected grids 'input' and 'output'"
                ) from None
            if any(g.ndim != 2 or g.dtype.kind not in "iu" or g.size and (g.min() < 0 or g.max() > 9) for g in grids):
                raise ValueError(f"{path}: task '{task}' field 'test[{i}]': grids must be 2-D lists of colours 0..9")
            tasks[task].append((grid_key(grids[0]), grid_key(grids[1])))
    return tasks


def tasks_from_test_split(data_path: str, names: Sequence[str]) -> TestTasks:
    """Test tasks of a folder build: the test split's examples, un-augmented, in order of appearance.

    The un-augmented variant of a task (its plain name) is read when present, else every variant;
    variants that disagree on a test input's answer mean inconsistent files and are refused.
    """
    split = os.path.join(data_path, "test")
    arrays = {}
    for name in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices"):
        path = os.path.join(split, f"all__{name}.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{data_path}: neither test_puzzles.json nor the test split ({path}) found")
        arrays[name] = np.load(path, mmap_mode="r")
    variants = []  # (puzzle, its name, task, dihedral id, colour map)
    for p, identifier in enumerate(np.asarray(arrays["puzzle_identifiers"]).tolist()):
        if not 0 <= identifier < len(names):
            raise ValueError(f"{split}: puzzle identifier {identifier} not in identifiers.json")
        variants.append((p, names[identifier], *parse_identifier(names[identifier])))
    plain = {base for _, name, base, _, _ in variants if name == base}
    truths: dict[str, dict[bytes, bytes]] = {}
    starts = np.asarray(arrays["puzzle_indices"])
    for p, name, base, tid, mapping in variants:
        if base in plain and name != base:
            continue
        rows = slice(int(starts[p]), int(starts[p + 1]))
        keys = []
        for tokens in (np.asarray(arrays["inputs"][rows]), np.asarray(arrays["labels"][rows])):
            shapes = crop_shapes(tokens)
            keys.append(
                [grid_key(undo_augmentation(t.reshape(GRID_SIZE, GRID_SIZE)[:h, :w] - 2, tid, mapping))
                 for t, (h, w) in zip(tokens, shapes)]
            )  # fmt: skip
        task = truths.setdefault(base, {})
        for input_key, output_key in zip(*keys):
            if task.setdefault(input_key, output_key) != output_key:
                raise ValueError(f"{split}: variants of task {base!r} disagree on the answer of a test input")
    return {task: list(pairs.items()) for task, pairs in truths.items()}


def load_test_tasks(data_path: str, names: Sequence[str]) -> TestTasks:
    path = os.path.join(data_path, "test_puzzles.json")
    if os.path.isfile(path):
        return tasks_from_test_puzzles(path)
    return tasks_from_test_split(data_path, names)


def read_prediction_file(path: str) -> dict[str, np.ndarray]:
    """One rank's saved outputs as numpy, `logits` reduced to `preds` at once (utils/saved_outputs.py)."""
    saved = read_saved_outputs(path, preds=True)
    return {k: (v.float().numpy() if v.is_floating_point() else v.numpy()) for k, v in saved.items()}


def add_outputs(votes: Votes, outputs: dict[str, np.ndarray], where: str) -> None:
    needed = ("inputs", "puzzle_identifiers", "q_halt_logits")
    lacking = [k for k in needed if k not in outputs] + ([] if "preds" in outputs else ["logits or preds"])
    if lacking:
        raise ValueError(f"{where}: ARC scoring needs saved {', '.join(lacking)} (have: {', '.join(sorted(outputs))})")
    for start in range(0, len(outputs["inputs"]), ROWS_PER_CHUNK):  # bounds the cropping temporaries
        rows = slice(start, start + ROWS_PER_CHUNK)
        votes.add(*(outputs[k][rows] for k in ("puzzle_identifiers", "inputs", "preds", "q_halt_logits")))


def score_prediction_files(
    paths: Sequence[str],
    data_path: str,
    *,
    rule: str = "official",
    pass_ks: Iterable[int] = PASS_KS,
    submission_k: int = SUBMISSION_K,
    submission_path: str | None = None,
    blank_identifier_id: int = 0,
) -> ArcScore:
    """Score saved `step_N_all_preds.{rank}` files (logits or preds) of an ARC dataset at `data_path`.

    The files are read one at a time, in rank order whatever order they are given in; with
    `submission_path`, the ARC Prize submission.json is written there.
    """
    if rule not in RULES:
        raise ValueError(f"ARC scoring: rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not paths:
        raise FileNotFoundError("no prediction files given")
    names = load_identifier_names(data_path)
    test_split = os.path.join(data_path, "test")
    metadata = load_metadata(test_split) if os.path.isfile(os.path.join(test_split, "dataset.json")) else None
    reason = not_arc_reason(data_path, names, *((metadata.seq_len, metadata.vocab_size) if metadata else (None, None)))
    if reason is not None:
        raise ValueError(f"{data_path}: {reason}")
    tasks = load_test_tasks(data_path, names)
    votes = Votes(names, blank_identifier_id)
    for path in in_rank_order(paths):  # votes are pooled in rank order
        add_outputs(votes, read_prediction_file(path), path)
    matched = sum(len(votes.entries.get(task, {}).get(key, ())) for task, pairs in tasks.items() for key, _ in pairs)
    if not matched:  # scores of 0 would read as a model that solves nothing
        rows = sum(len(v) for inputs in votes.entries.values() for v in inputs.values())
        files = f"{paths[0]} and {len(paths) - 1} more" if len(paths) > 1 else paths[0]
        raise ValueError(
            f"ARC scoring: no prediction of {files} is of a test input of {data_path} ({rows} rows besides padding; "
            "predictions of another dataset or split?)"
        )
    score = score_votes(tasks, [votes.entries], rule, pass_ks, submission_k)
    if submission_path is not None:
        write_submission(submission_path, score.submission)
    return score


def score_predictions(
    outputs: dict[str, np.ndarray],
    identifier_names: Sequence[str],
    ks: Iterable[int] = NOTEBOOK_PASS_KS,
    blank_identifier_id: int = 0,
) -> ArcScore:
    """The notebook rule on saved outputs alone, truth from their saved labels (no dataset folder needed)."""
    if "labels" not in outputs:
        raise ValueError(f"ARC scoring needs saved 'labels' (have: {', '.join(sorted(outputs))})")
    if "preds" not in outputs and "logits" in outputs:
        outputs = {**outputs, "preds": np.asarray(outputs["logits"]).argmax(-1)}
    votes = Votes(identifier_names, blank_identifier_id)
    add_outputs(votes, outputs, "saved outputs")
    truth = Votes(identifier_names, blank_identifier_id)  # the labels, voted once each, give the answer keys
    add_outputs(truth, {**outputs, "preds": outputs["labels"]}, "saved outputs")
    tasks: TestTasks = {}
    for task, inputs in truth.entries.items():
        tasks[task] = []
        for input_key, labels in inputs.items():
            if len({answer for answer, _ in labels}) > 1:
                raise ValueError(f"ARC scoring: variants of puzzle {task!r} disagree on the answer of a test input")
            tasks[task].append((input_key, labels[0][0]))
    return score_votes(tasks, [votes.entries], "notebook", ks)


def format_table(score: ArcScore) -> str:
    lines = [
        f"ARC scoring ({score.rule} rule): {score.num_puzzles} puzzles, {score.num_test_inputs} test inputs, "
        f"{score.num_predictions} predictions",
        f"{'metric':<10}{'solved':>10}{'rate':>10}",
    ]
    for k, rate in score.pass_at.items():
        lines.append(f"{f'pass@{k}':<10}{score.solved_at[k]:>10.4g}{100 * rate:>9.2f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrorParser(
        description="ARC pass@K and submission.json from saved step_N_all_preds.* files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--predictions", nargs="+", required=True, help="the per-rank step_N_all_preds.R files")
    parser.add_argument("--data-path", required=True, help="the ARC dataset folder (identifiers.json, test tasks)")
    parser.add_argument("--submission-out", default=None, help="write the ARC Prize submission.json here")
    parser.add_argument("--rule", choices=RULES, default="official", help="official (ARC Prize) or notebook")
    parser.add_argument("--json", action="store_true", help="print one JSON line of ARC/pass@K instead of a table")

    def body() -> None:
        args = parser.parse_args(argv)
        score = score_prediction_files(
            args.predictions, args.data_path, rule=args.rule, submission_path=args.submission_out
        )
        print(json.dumps(score.metrics()) if args.json else format_table(score))

    return run_flag_command(body)


if __name__ == "__main__":
    sys.exit(main())
