"""Research options of the train loop that decide when to stop and what to keep (README "Research options").

Design choices:
- `EarlyStopping` keeps its window on rank 0 (the only rank with metrics) and broadcasts the decision,
  so every rank stops at the same step.
- `BestCheckpoint` writes the best weights so far in the `step_N` format, atomically, beside a small
  JSON record (`best.json`: metric, value, step); a resumed run continues from that record, and evaluate.py
  reads the step of a `best` checkpoint from it (`read_best_record`). A damaged record is one error line
  naming it, before any training: guessing a value could overwrite better weights with worse ones.
"""

import json
import math
import os
from collections import deque

from training.evaluation import flatten_eval_metrics
from training.train_state import TrainState
from utils import checkpointing as ckpt
from utils.distributed import DistInfo, broadcast_object


class EarlyStopping:
    """`early_stop_train_accuracy`: stop once the mean of train/exact_accuracy (the fraction of halted
    sequences entirely right) over the last `window` logged steps reaches `threshold`.

    The window must be full before it can trigger; a resumed run starts a new window.
    """

    def __init__(self, threshold: float, window: int):
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)

    def update(self, metrics: dict[str, float] | None, info: DistInfo) -> bool:
        """Collective: record this step's metrics (rank 0) and say whether to stop."""
        if metrics is not None:
            self.recent.append(metrics["train/exact_accuracy"])
        full = len(self.recent) == self.recent.maxlen
        reached = info.is_main and full and sum(self.recent) / len(self.recent) >= self.threshold
        return bool(broadcast_object(reached))


BEST_RECORD = "best.json"


def read_best_record(checkpoint_path: str) -> dict | None:
    """`{checkpoint_path}/best.json` ({"metric": str, "value": float, "step": int}), or None when there is none;
    a file that is not such a record is one ValueError line naming it."""
    path = os.path.join(checkpoint_path, BEST_RECORD)
    if not os.path.isfile(path):
        return None
    remedy = "delete it and `best` beside it to keep the best weights afresh"
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable keep_best record ({e}); {remedy}") from None
    fields = {"metric": (str,), "value": (int, float), "step": (int,)}
    if not isinstance(saved, dict) or any(
        not isinstance(saved.get(k), types) or isinstance(saved.get(k), bool) for k, types in fields.items()
    ):
        raise ValueError(f'{path}: not a keep_best record {{"metric", "value", "step"}}; {remedy}')
    return saved


class BestCheckpoint:
    """`keep_best`: the weights with the best value so far of one eval metric (`<set>/<metric>`), kept as
    `{checkpoint_path}/best` (same format as `step_N`) beside `best.json` (metric, value, step).

    Higher is better, except for metrics ending in `loss`.
    """

    def __init__(self, metric: str, checkpoint_path: str):
        self.metric = metric
        self.lower_is_better = metric.endswith("loss")
        self.weights_path = os.path.join(checkpoint_path, "best")
        self.json_path = os.path.join(checkpoint_path, BEST_RECORD)
        self.value: float | None = None
        saved = read_best_record(checkpoint_path)
        if saved is not None and saved["metric"] == metric:
            self.value = float(saved["value"])

    def is_better(self, value: float) -> bool:
        if self.value is None:
            return not math.isnan(value)
        return value < self.value if self.lower_is_better else value > self.value

    def update(self, results: dict[str, dict[str, float]] | None, state: TrainState, info: DistInfo) -> None:
        """Collective (for the error only): on rank 0, save the model's weights if the metric improved."""
        flat = flatten_eval_metrics(results) if results is not None else {}
        error = None
        if info.is_main and self.metric not in flat:
            error = f"config key 'keep_best': {self.metric!r} is not an eval metric (have {', '.join(sorted(flat))})"
        error = broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        if not info.is_main or not self.is_better(flat[self.metric]):
            return
        self.value = flat[self.metric]
        ckpt.atomic_torch_save(state.model.state_dict(), self.weights_path)
        record = {"metric": self.metric, "value": self.value, "step": state.step}
        ckpt.atomic_write(self.json_path, lambda f: json.dump(record, f), mode="w")
