"""Summarise the quick start's Sudoku evaluation: accuracy on the blank cells against simple baselines.

Reads the outputs that `evaluate.py ... save_outputs=[inputs,labels,logits]` saved and prints
token accuracy, accuracy on the cells that were blank in the puzzle, and what you would get without
learning anything about Sudoku: copy the givens and write the most frequent digit in every blank.
Usage: python scripts/quickstart_report.py CHECKPOINT_DIR/step_N_all_preds.0 [more rank files]
"""

import sys

import torch

BLANK_TOKEN = 1  # Sudoku tokens: PAD 0, blank 1, digits 1..9 as 2..10
IGNORE = -100


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python scripts/quickstart_report.py step_N_all_preds.0 [...]", file=sys.stderr)
        return 2
    parts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    inputs = torch.cat([p["inputs"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    preds = torch.cat([p["logits"].argmax(-1) for p in parts])
    valid = labels != IGNORE
    rows = valid.any(-1)  # drop padding rows of the last batch
    inputs, labels, preds, valid = inputs[rows], labels[rows], preds[rows], valid[rows]
    blank = valid & (inputs == BLANK_TOKEN)
    correct = preds == labels

    token_acc = correct[valid].float().mean().item()
    blank_acc = correct[blank].float().mean().item()
    exact = (correct | ~valid).all(-1).float().mean().item()
    most_frequent = labels[blank].bincount().max().item() / blank.sum().item()
    baseline = (valid & ~blank).sum().item() / valid.sum().item() + most_frequent * blank.float().mean().item()
    print(f"test puzzles:                  {labels.shape[0]}")
    print(
        f"token accuracy:                {100 * token_acc:.1f}%  (copy givens + most frequent digit: {100 * baseline:.1f}%)"
    )
    print(f"accuracy on blank cells:       {100 * blank_acc:.1f}%  (most frequent digit: {100 * most_frequent:.1f}%)")
    print(f"exact (whole puzzle) accuracy: {100 * exact:.1f}%")
    print("learned beyond the baseline" if blank_acc > most_frequent else "not beyond the baseline yet (train longer)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
