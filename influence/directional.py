"""The directional engine: every row's exact ⟨∇ℓ_i, V⟩ from one forward-mode pass over a batch.

⟨∇ℓ_i, V⟩ is the derivative of ℓ_i along V, so a Jacobian-vector product of the per-row losses
with the tangent V (shaped like the scored parameters; the others held fixed) returns the whole
batch's scores at once — no per-sample gradient is ever formed or stored, and the cost is about
that of a few forward passes. With V = ḡ_c this is CLUES's dot-product score at checkpoint c.

Forward mode needs a forward-AD rule for every op: PyTorch's fused SDPA attention kernels have none
on the CPU, so the model is switched to the eager attention path first (`use_eager_attention`).
Only linear Γ_c work here: LESS's Adam direction is not linear in the gradient (influence.adam).
"""

from __future__ import annotations

import torch

from dyn.influence.losses import model_inputs
from dyn.influence.parameters import ScoredParameters


def use_eager_attention(model) -> bool:
    """Switch a Hugging Face model to eager attention when it uses a fused kernel; True if changed."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation("eager")
    return True


def directional_derivatives(model, params: ScoredParameters, batch: dict, directions: list[list[torch.Tensor]]):
    """Per-row losses (B,) and derivatives (B, G) along each of G directions.

    Each direction is a list of tensors shaped like `params.tensors`. Rows with no response token
    get NaN in both.
    """
    from torch.func import functional_call, jvp

    from dyn.core.lm import per_row_loss

    inputs = model_inputs(batch)
    labels = batch["labels"]
    primals = {name: t.detach() for name, t in zip(params.names, params.tensors)}

    def losses_logits(values):
        return per_row_loss(functional_call(model, values, (), {**inputs, "use_cache": False}).logits, labels)

    derivatives, losses = [], None
    with torch.no_grad():
        for direction in directions:
            tangents = {name: d.to(t.dtype) for name, d, t in zip(params.names, direction, params.tensors)}
            losses, derivative = jvp(losses_logits, (primals,), (tangents,))
            derivatives.append(derivative)
    derivatives = torch.stack(derivatives, dim=1).double()
    derivatives[torch.isnan(losses)] = float("nan")
    return losses.double().cpu(), derivatives.cpu()
