"""Token losses and the ACT loss head that turns model outputs into a training loss and metrics.

Design choices:
- Losses are per token (shape of labels, zero at ignored positions); the head normalises each
  sequence by its own count of labelled tokens and *sums* over the batch. The launcher divides by
  the global batch size, so every sequence weighs the same whatever its length.
- Stablemax (Prieto et al., "Grokking at the edge of numerical stability") replaces exp by a
  function that grows linearly for positive logits; it is evaluated in float64, as the reference does,
  except on Apple GPUs (MPS), which have no float64: float32 there.
- Metrics are sums over sequences that halted in this ACT step and have at least one label, so
  the launcher can reduce them across ranks and divide by `count`.
- The head is the only place that reads labels, so the model forward never syncs with the host.
- A head declares what it reports: `metric_names(training)` lists the keys of its metrics in a mode (they
  depend on the model: `q_continue_loss` only where the model trains a continue target), so the launchers
  check `keep_best` before any work without running the head.
- The head adds `preds` (the argmax tokens, int64, detached) to the model's outputs, as TRM's head does,
  so `return_keys` can ask for them (TRM's evaluators read `preds`). Both losses take TRM's optional
  `valid_mask` argument.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_LABEL_ID = -100


def s(x: torch.Tensor, epsilon: float = 1e-30) -> torch.Tensor:
    """Stablemax numerator: 1/(1 - x) for negative x, x + 1 otherwise (continuous, positive)."""
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s_x = s(x)
    return torch.log(s_x / torch.sum(s_x, dim=dim, keepdim=True))


def stablemax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_LABEL_ID,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token stablemax cross entropy in float64 (float32 on MPS); 0 at ignored labels.

    `valid_mask` (TRM's head passes it): the positions that count; by default `labels != ignore_index`.
    """
    logprobs = log_stablemax(logits.to(torch.float32 if logits.device.type == "mps" else torch.float64), dim=-1)
    if valid_mask is None:
        valid_mask = labels != ignore_index
    safe_labels = torch.where(valid_mask, labels, 0).to(torch.long)  # gather needs an in-range index
    label_logprobs = torch.gather(logprobs, index=safe_labels.unsqueeze(-1), dim=-1).squeeze(-1)
    return -torch.where(valid_mask, label_logprobs, 0)


def softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_LABEL_ID,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token softmax cross entropy in float32; 0 at ignored labels.

    `reshape`, not `view`: with a puzzle-embedding prefix the logits are a sliced, non-contiguous tensor.
    `valid_mask` as in `stablemax_cross_entropy` (TRM's head passes it, which its own softmax loss rejects).
    """
    if valid_mask is not None:
        labels = torch.where(valid_mask, labels, ignore_index)
    losses = F.cross_entropy(
        logits.to(torch.float32).reshape(-1, logits.shape[-1]),  # [B*S, V]
        labels.to(torch.long).reshape(-1),  # [B*S]
        ignore_index=ignore_index,
        reduction="none",
    )
    return losses.reshape(labels.shape)  # [B, S]


LOSS_FUNCTIONS = {
    "stablemax_cross_entropy": stablemax_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
}


# The metrics of `halted_sequence_metrics`: `count` (halted rows with labels) is the divisor of the others.
HALTED_SEQUENCE_METRICS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")


@torch.no_grad()
def halted_sequence_metrics(labels: torch.Tensor, outputs: dict[str, torch.Tensor], carry):
    """Batch sums of the reported metrics over halted rows that have labels; also returns the per-row
    loss divisor `[B, 1]` (labelled tokens, at least 1) and whether each row is entirely correct `[B]`.
    `carry` provides `halted` and `steps` (`[B]`); `outputs` provides `logits` and `q_halt_logits`."""
    mask = labels != IGNORE_LABEL_ID
    loss_counts = mask.sum(-1)
    loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)  # [B, 1]

    is_correct = mask & (torch.argmax(outputs["logits"], dim=-1) == labels)
    seq_is_correct = is_correct.sum(-1) == loss_counts

    valid = carry.halted & (loss_counts > 0)
    metrics = {
        "count": valid.sum(),
        "accuracy": torch.where(valid, (is_correct.to(torch.float32) / loss_divisor).sum(-1), 0).sum(),
        "exact_accuracy": (valid & seq_is_correct).sum(),
        "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_is_correct)).sum(),
        "steps": torch.where(valid, carry.steps, 0).sum(),
    }
    return metrics, loss_divisor, seq_is_correct


class ACTLossHead(nn.Module):
    """Wraps an ACT model (attribute `model`, an interface for checkpoints) and computes loss + metrics."""

    def __init__(self, model: nn.Module, loss_type: str):
        super().__init__()
        if loss_type not in LOSS_FUNCTIONS:
            raise ValueError(f"loss_type: unknown {loss_type!r}; expected one of {', '.join(LOSS_FUNCTIONS)}")
        self.model = model
        self.loss_fn = LOSS_FUNCTIONS[loss_type]

    def initial_carry(self, *args, **kwargs):
        return self.model.initial_carry(*args, **kwargs)

    def metric_names(self, training: bool | None = None) -> tuple[str, ...]:
        """The keys of the metrics `forward` returns in training or eval mode (default: the head's own mode)."""
        training = self.training if training is None else training
        continue_loss = ("q_continue_loss",) if self.model.makes_continue_target(training) else ()
        return HALTED_SEQUENCE_METRICS + ("lm_loss", "q_halt_loss") + continue_loss

    def forward(self, return_keys: Sequence[str], **model_kwargs):
        new_carry, outputs = self.model(**model_kwargs)
        labels = new_carry.current_data["labels"]
        # Predicted tokens, so `return_keys` can ask for them (TRM's evaluators read `preds`).
        outputs["preds"] = torch.argmax(outputs["logits"], dim=-1).detach()  # [B, S], int64

        metrics, loss_divisor, seq_is_correct = halted_sequence_metrics(labels, outputs, new_carry)
        lm_loss = (self.loss_fn(outputs["logits"], labels, ignore_index=IGNORE_LABEL_ID) / loss_divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(
            outputs["q_halt_logits"], seq_is_correct.to(outputs["q_halt_logits"].dtype), reduction="sum"
        )
        metrics.update({"lm_loss": lm_loss.detach(), "q_halt_loss": q_halt_loss.detach()})

        q_continue_loss = 0
        if "target_q_continue" in outputs:
            q_continue_loss = F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum"
            )
            metrics["q_continue_loss"] = q_continue_loss.detach()

        detached_outputs = {k: outputs[k].detach() for k in return_keys if k in outputs}
        loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss)
        return new_carry, loss, metrics, detached_outputs, new_carry.halted.all()
