"""The exact engine: each row alone (batch size 1), autograd, the flattened gradient.

This is the oracle the other engines are tested against (DESIGN §4.2): nothing is batched,
projected or differentiated in forward mode, so what it returns is ∇ℓ_i by definition. It is slow
(one forward and one backward per row) and stores a full gradient per row: tests and small runs only.
"""

from __future__ import annotations

import torch

from dyn.influence.losses import batch_row_losses, single_row
from dyn.influence.parameters import ScoredParameters, gradients_only_for


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, params: ScoredParameters) -> list[torch.Tensor]:
    """A flat vector cut into tensors shaped like the scored parameters."""
    out, start = [], 0
    for t in params.tensors:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def exact_row_gradients(model, params: ScoredParameters, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (B,) and flattened gradients (B, D); rows with no response token get NaN."""
    rows = batch["input_ids"].shape[0]
    device = params.tensors[0].device
    losses = torch.full((rows,), float("nan"), dtype=torch.float64, device=device)
    grads = torch.full((rows, params.numel), float("nan"), dtype=params.tensors[0].dtype, device=device)
    with gradients_only_for(model, params), torch.enable_grad():
        for i in range(rows):
            loss = batch_row_losses(model, single_row(batch, i))[0]
            if torch.isnan(loss):
                continue
            parts = torch.autograd.grad(loss, params.tensors, allow_unused=True)
            grads[i] = flatten([torch.zeros_like(t) if g is None else g for g, t in zip(parts, params.tensors)])
            losses[i] = loss.detach().double()
    return losses, grads


def adam_precondition_flat(grads: torch.Tensor, params: ScoredParameters, moments) -> torch.Tensor:
    """Γ applied to flattened gradients (B, D), parameter by parameter (see influence.adam)."""
    from dyn.influence.adam import adam_direction

    out, start = [], 0
    for (m, v, beta1, beta2), t in zip(moments.aligned(params), params.tensors):
        n = t.numel()
        out.append(adam_direction(grads[:, start:start + n], m.reshape(-1), v.reshape(-1), beta1, beta2, moments.eps))
        start += n
    return torch.cat(out, dim=1)
