"""What the launchers expect of an evaluator (`evaluators: [{name: module@Class, ...}]` in the config).

An evaluator is any class under the `evaluators` package; `module@Class` names it (`arc@ARC` is
`evaluators/arc.py`'s `ARC`). The launchers (pretrain.py at every evaluation, evaluate.py once) use it so:

1. `Class(data_path=..., eval_metadata=..., **options)` once per test dataset: `data_path` is the dataset's
   folder, `eval_metadata` its test split's `dataset.json`, `options` the config entry's other keys (checked
   against the constructor's signature and annotations before anything runs). A constructor that finds the
   dataset is not one it can score raises `EvaluatorNotApplicable`: the launcher prints a notice naming the
   reason and leaves that evaluator out for that dataset (so an evaluator configured by default costs nothing
   where it does not apply).
2. `required_outputs`: the model outputs it reads, added to those the evaluation returns.
3. Per evaluation: `begin_eval()`, then `update_batch(batch, outputs)` for each of its test dataset's batches on
   every rank (tensors on the device, puzzle identifiers numbered as the dataset's identifiers.json), then
   `result(save_path, rank, world_size, group)` on every rank; rank 0 returns `{"SET/metric": value}` (None
   elsewhere), reported under SET. `save_path` is a folder for its files (None: write none), `group` a process
   group for gathering Python objects (None with one process).
4. Optionally `result_names()`: the keys `result` will report, known before any evaluation, so that
   `keep_best=SET/metric` is checked before training.
"""

from typing import Any, Protocol, runtime_checkable


class EvaluatorNotApplicable(Exception):
    """Raised by an evaluator's constructor for a dataset it cannot score (the launcher leaves it out)."""


@runtime_checkable
class Evaluator(Protocol):
    """The hooks of an evaluator, as the module docstring describes them (`result_names` is optional)."""

    required_outputs: set[str]

    def begin_eval(self) -> None: ...

    def update_batch(self, batch: dict[str, Any], preds: dict[str, Any]) -> None: ...

    def result(
        self, save_path: str | None, rank: int, world_size: int, group: Any = None
    ) -> dict[str, float] | None: ...
