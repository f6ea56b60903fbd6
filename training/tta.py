"""Test-time augmentation for Sudoku and Maze (evaluate.py `tta=sudoku|maze tta_views=N`): each test puzzle is
solved in N symmetric views, each view's answer is mapped back, and the answers are voted as ARC's are.

Design choices:
- The views are the builders' own augmentations, the symmetries the model was trained on: Sudoku's
  `random_augmentations` (digit relabelling, transpose where boxes are square, band / row-in-band and
  stack / column-in-stack permutations), drawn from a generator seeded by the run's seed so that every rank
  draws the same views; Maze's dihedral transforms (`dataset.common`) in id order, so at most 8 views.
  View 0 is the identity: the plain answer is one of the votes.
- A view is a permutation of the cells and a relabelling of the tokens (Sudoku's digits, PAD and the blank
  cell fixed; a maze keeps its tokens), applied to a whole batch by indexing; the inverse permutation and
  relabelling map a view's predictions back. Ignored labels (-100) stay ignored.
- The answers of one puzzle are ranked by `evaluators.arc_scoring.rank_votes`, ARC's rule: most votes, then the
  highest mean sigmoid(q_halt); the first one is the answer. Reported per set as `tta_exact_accuracy` (the
  voted answer entirely right) and `tta_accuracy` (its cells right), over the rows the loss head counts
  (those with labels), to set beside the plain evaluation's `exact_accuracy` and `accuracy`. Each rank votes
  on its own rows, which it evaluates in every view; the sums are reduced over ranks.
- Cost: one evaluation pass per view.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dataset.build_maze_dataset import CHARSET
from dataset.build_sudoku_dataset import move_cells, random_augmentations
from dataset.common import dihedral_transform
from dataset.generate_sudoku import BOX_SHAPES
from evaluators.arc_scoring import halt_probabilities, rank_votes
from training.config import PretrainConfig
from training.evaluation import eval_batch
from training.train_state import EvalState, TrainState
from utils.distributed import DistInfo

KINDS = ("sudoku", "maze")
MAZE_VIEWS = 8  # the dihedral group


@dataclass
class Views:
    cells: torch.Tensor  # [V, seq_len]: cell i of view v holds the puzzle's cell cells[v, i]
    tokens: torch.Tensor  # [V, vocab_size]: the token of view v for each token of the puzzle (a permutation)

    def __len__(self) -> int:
        return self.cells.shape[0]

    def apply(self, view: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens or labels [B, seq_len] of the puzzle -> the same in view `view` (ignored labels kept)."""
        relabelled = torch.where(x >= 0, self.tokens[view][x.clamp_min(0).long()].to(x.dtype), x)
        return relabelled[:, self.cells[view]]

    def undo(self, view: int, y: torch.Tensor) -> torch.Tensor:
        """Predicted tokens [B, seq_len] in view `view` -> the same for the puzzle itself."""
        inverse_tokens, inverse_cells = torch.argsort(self.tokens[view]), torch.argsort(self.cells[view])
        return inverse_tokens[y.long()][:, inverse_cells]


def make_views(kind: str, count: int, metadata: Any, seed: int) -> Views:
    """`count` views (the identity first) of the puzzles of a Sudoku or Maze dataset with this metadata."""
    side = math.isqrt(metadata.seq_len)
    found = f"this dataset has seq_len {metadata.seq_len} and vocab_size {metadata.vocab_size}"
    if count < 2:
        raise ValueError(f"config key 'tta_views': at least 2 views (the puzzle and one augmentation), got {count}")
    index = np.arange(side * side).reshape(side, side)
    if kind == "sudoku":
        if side * side != metadata.seq_len or side not in BOX_SHAPES or metadata.vocab_size != side + 2:
            raise ValueError(
                "config key 'tta': sudoku views need a Sudoku dataset (seq_len 81, 36 or 16, vocab_size 11, 8 or 6); "
                + found
            )
        aug = random_augmentations(np.random.default_rng(seed), count - 1, side)
        cells = move_cells(np.broadcast_to(index, (count - 1, side, side)), aug).reshape(count - 1, -1)
        # Token t = value + 1 (PAD 0, blank 1): the digit map, blank fixed, moved up by one with PAD in front.
        tokens = np.concatenate([np.zeros((count - 1, 1), dtype=np.int64), aug["digit_map"].astype(np.int64) + 1], 1)
        cells = np.concatenate([index.reshape(1, -1), cells])
        tokens = np.concatenate([np.arange(side + 2)[None], tokens])
    elif kind == "maze":
        if side * side != metadata.seq_len or metadata.vocab_size != len(CHARSET) + 1:
            raise ValueError(
                f"config key 'tta': maze views need a Maze dataset (a square grid, vocab_size {len(CHARSET) + 1}); "
                + found
            )
        if count > MAZE_VIEWS:
            raise ValueError(f"config key 'tta_views': a maze has {MAZE_VIEWS} views (its dihedral group), got {count}")
        cells = np.stack([dihedral_transform(index, t).reshape(-1) for t in range(count)])
        tokens = np.tile(np.arange(metadata.vocab_size), (count, 1))
    else:
        raise ValueError(f"config key 'tta': expected one of {', '.join(KINDS)}, got {kind!r}")
    return Views(torch.as_tensor(cells, dtype=torch.long), torch.as_tensor(tokens, dtype=torch.long))


def vote(answers: torch.Tensor, confidence: np.ndarray) -> torch.Tensor:
    """answers [V, B, seq_len] and sigmoid(q_halt) [V, B] -> the voted answer of each row [B, seq_len]."""
    rows = answers.numpy().astype(np.int64)
    best = [
        rank_votes((rows[v, b].tobytes(), confidence[v, b]) for v in range(len(rows)))[0][0]
        for b in range(rows.shape[1])
    ]
    return torch.from_numpy(np.stack([np.frombuffer(key, dtype=np.int64) for key in best]))


def tta_accuracy(
    config: PretrainConfig,
    state: EvalState | TrainState,
    loader: DataLoader,
    metadata: Any,
    info: DistInfo,
    views: Views,
) -> dict[str, dict[str, float]] | None:
    """Voted-answer accuracy per set over the test split (every view of every batch); on rank 0, else None."""
    set_ids = {name: i for i, name in enumerate(metadata.sets)}
    sums = torch.zeros((len(set_ids), 3), dtype=torch.float64)  # rows, exactly right, mean cell accuracy
    for set_name, batch, _ in loader:
        answers, confidence = [], []
        for view in range(len(views)):
            shown = {**batch, **{k: views.apply(view, batch[k]) for k in ("inputs", "labels")}}
            _, _, outputs = eval_batch(config, state, shown, info, ["preds", "q_halt_logits"])
            answers.append(views.undo(view, outputs["preds"].cpu()))
            confidence.append(halt_probabilities(outputs["q_halt_logits"]))
        labels = batch["labels"].long()
        labelled = labels >= 0
        counts = labelled.sum(-1)
        right = (labelled & (vote(torch.stack(answers), np.stack(confidence)) == labels)).sum(-1)
        rows = counts > 0
        sums[set_ids[set_name]] += torch.stack(
            [rows.sum(), (rows & (right == counts)).sum(), (right / counts.clamp_min(1))[rows].sum()]
        ).double()
    if info.world_size > 1:
        sums = sums.to(info.device)
        dist.all_reduce(sums)
    if not info.is_main:
        return None
    sums = sums.cpu()
    return {
        name: {
            "tta_exact_accuracy": (sums[i, 1] / sums[i, 0].clamp_min(1)).item(),
            "tta_accuracy": (sums[i, 2] / sums[i, 0].clamp_min(1)).item(),
        }
        for name, i in set_ids.items()
    }
