"""The per-row loss of a batch, as every engine computes it: `core.lm.per_row_loss` over the model's
logits (each row's mean next-token cross-entropy over its own response tokens; DESIGN §4.5).

Batches are dicts of tensors: `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on prompt and
padding), optionally `position_ids`; other keys are ignored.
"""

from __future__ import annotations

from dyn.core.lm import IGNORE_INDEX, per_row_loss

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def batch_row_losses(model, batch: dict):
    """(batch,) losses; NaN for rows with no response token."""
    return per_row_loss(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])


def rows_with_response(batch: dict):
    """(batch,) bool: the row has at least one response token to predict."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)


def single_row(batch: dict, i: int) -> dict:
    """Row i alone, without its padding: what batch-size-1 engines feed the model."""
    keep = batch["attention_mask"][i].bool() if "attention_mask" in batch else None
    row = {}
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        if key not in batch:
            continue
        value = batch[key][i]
        row[key] = (value[keep] if keep is not None else value).unsqueeze(0)
    return row
