"""ARC evaluator run during training or evaluation (`evaluators=[{name: arc@ARC}]`, TRM's protocol).

The launchers drive it through the hooks of evaluators/protocol.py.

Design choices:
- Scoring is evaluators/arc_scoring.py (official ARC Prize rule by default, or the notebook's), so a
  score computed here equals the one computed later from the saved `step_N_all_preds.*` files.
- Each rank keeps only its votes (per task and test input, the answer and sigmoid(q_halt) of
  each prediction); `result` gathers them to rank 0 with `gather_object` on `group` (a gloo group
  suits: the votes are Python objects), pooled in rank order as TRM's evaluator pools them. With
  one process no process group is needed.
- `aggregated_voting` keeps the votes of earlier evaluations (TRM's default is on, ours off: a
  score should describe one checkpoint).
- Predictions are the model's `preds`, or the argmax of its `logits` when it returns no `preds`.
- On a dataset that is not ARC (no identifiers.json; no test_puzzles.json, 30x30 ARC encoding or ARC names)
  the constructor raises `EvaluatorNotApplicable`: the launcher leaves the evaluator out with a notice,
  so the default `evaluators: [{name: arc@ARC}]` (TRM's) costs nothing on Sudoku or mazes.
- `result_names()` lists the metrics `result` will report, so `keep_best=ARC/pass@2` is checked before
  training; the launcher checks the options' types against the constructor's annotations.
"""

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from evaluators.arc_scoring import (
    PASS_KS,
    RULES,
    SUBMISSION_K,
    Votes,
    load_identifier_names,
    load_test_tasks,
    metric_names,
    not_arc_reason,
    score_votes,
    write_submission,
)
from evaluators.protocol import EvaluatorNotApplicable


class ARC:
    required_outputs = {"inputs", "puzzle_identifiers", "q_halt_logits", "preds"}

    def __init__(
        self,
        data_path: str,
        eval_metadata: Any,
        submission_K: int = SUBMISSION_K,
        pass_Ks: Sequence[int] = PASS_KS,
        aggregated_voting: bool = False,
        rule: str = "official",
    ):
        if rule not in RULES:
            raise ValueError(f"ARC evaluator: rule must be one of {', '.join(RULES)}, got {rule!r}")
        if submission_K < 1 or not pass_Ks or min(pass_Ks) < 1:
            raise ValueError(f"ARC evaluator: submission_K and pass_Ks must be >= 1, got {submission_K} and {pass_Ks}")
        self.submission_K, self.pass_Ks, self.rule = int(submission_K), tuple(pass_Ks), rule
        self.aggregated_voting = aggregated_voting
        self.blank_identifier_id = eval_metadata.blank_identifier_id
        if not os.path.isfile(os.path.join(data_path, "identifiers.json")):
            raise EvaluatorNotApplicable("no identifiers.json: not an ARC dataset")
        self.identifier_names = load_identifier_names(data_path)
        reason = not_arc_reason(data_path, self.identifier_names, eval_metadata.seq_len, eval_metadata.vocab_size)
        if reason is not None:
            raise EvaluatorNotApplicable(reason)
        self.tasks = load_test_tasks(data_path, self.identifier_names)
        self.votes = Votes(self.identifier_names, self.blank_identifier_id)

    def result_names(self) -> list[str]:
        """The keys `result` reports, known before any evaluation (the launcher checks `keep_best` against them)."""
        return metric_names(self.rule, self.pass_Ks)

    def begin_eval(self) -> None:
        if not self.aggregated_voting:
            self.votes = Votes(self.identifier_names, self.blank_identifier_id)

    def update_batch(self, batch: dict[str, torch.Tensor], preds: dict[str, torch.Tensor]) -> None:
        tokens = preds["preds"] if "preds" in preds else preds["logits"].argmax(-1)
        self.votes.add(batch["puzzle_identifiers"], batch["inputs"], tokens, preds["q_halt_logits"])

    def result(
        self, save_path: str | None, rank: int, world_size: int, group: dist.ProcessGroup | None = None
    ) -> dict[str, float] | None:
        """Rank 0: {"ARC/pass@K": ...} and `save_path`/submission.json; other ranks: None."""
        if world_size > 1:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(self.votes.entries, gathered, dst=0, group=group)
        else:
            gathered = [self.votes.entries]
        if rank != 0:
            return None
        score = score_votes(self.tasks, gathered, self.rule, self.pass_Ks, self.submission_K)
        if save_path is not None:
            write_submission(os.path.join(save_path, "submission.json"), score.submission)
        return score.metrics()
