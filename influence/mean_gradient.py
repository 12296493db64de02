"""ḡ: the mean gradient of the anchors' per-row losses, from batched backward passes.

Σ_i ∇ℓ_i = ∇(Σ_i ℓ_i), so one backward per batch over the sum of the rows' own losses gives the
anchor total without any per-sample gradient; rows with no response token are left out of both the
sum and the count. Batches are summed in the order given, so every process that computes ḡ over
the same batches gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dyn.influence.exact import flatten
from dyn.influence.losses import batch_row_losses, rows_with_response
from dyn.influence.parameters import ScoredParameters, gradients_only_for


@dataclass
class MeanGradient:
    """ḡ as a flat vector, how many rows went into it, and each row's loss (NaN: no response)."""

    vector: torch.Tensor
    rows: int
    losses: list


class NonFiniteRow(Exception):
    """A row whose loss or gradient is not finite; `batch` and `row` say where."""

    def __init__(self, batch: int, row: int, what: str):
        super().__init__(f"non-finite {what}")
        self.batch, self.row, self.what = batch, row, what


def mean_gradient(model, params: ScoredParameters, batches: list[dict]) -> MeanGradient:
    total = torch.zeros(params.numel, dtype=torch.float64, device=params.tensors[0].device)
    count, losses = 0, []
    with gradients_only_for(model, params), torch.enable_grad():
        for b, batch in enumerate(batches):
            row_losses = batch_row_losses(model, batch)
            has = rows_with_response(batch)
            bad = has & ~torch.isfinite(row_losses)
            if bad.any():
                raise NonFiniteRow(b, int(bad.nonzero()[0]), "loss")
            losses.append(row_losses.detach().double().cpu())
            if not has.any():
                continue
            parts = torch.autograd.grad(row_losses[has].sum(), params.tensors, allow_unused=True)
            flat = flatten([torch.zeros_like(t) if g is None else g for g, t in zip(parts, params.tensors)])
            if not torch.isfinite(flat).all():
                raise NonFiniteRow(b, _first_non_finite_gradient(model, params, batch), "gradient")
            total += flat.double()
            count += int(has.sum())
    vector = total / max(count, 1)
    return MeanGradient(vector.to(params.tensors[0].dtype), count, losses)


def _first_non_finite_gradient(model, params, batch) -> int:
    from dyn.influence.exact import exact_row_gradients

    _, grads = exact_row_gradients(model, params, batch)
    for i in range(grads.shape[0]):
        row = grads[i]
        if not torch.isnan(row).all() and not torch.isfinite(row).all():
            return i
    return 0
