"""The directional engine: every row's exact ⟨∇ℓ_i, V⟩ for a whole batch, with no per-sample
gradient ever formed or stored. With V = ḡ_c this is CLUES's dot-product score at checkpoint c.
Two routes give the same numbers:

- layer hooks (`hooked_directional_derivatives`, used whenever every scored parameter belongs to a
  Linear, HF Conv1D, Embedding or LayerNorm layer): one forward and one backward pass for
  activation gradients only; a row's gradient of a weight is Σ_t u_t v_tᵀ (influence.per_sample),
  so ⟨G_i, V⟩ = Σ_t u_tᵀ V v_t = sum((u V) ⊙ v) per layer. Several directions (anchor groups) cost
  one contraction each, not another pass. Measured about 3x a forward pass.
- forward mode (`directional_derivatives`): ⟨∇ℓ_i, V⟩ is the derivative of ℓ_i along V, so one
  Jacobian-vector product of the per-row losses with tangent V (the other parameters held fixed)
  covers any parameter of any layer, at about 4-6x a forward pass. Forward mode needs a
  forward-AD rule for every op: PyTorch's fused SDPA attention kernels have none on the CPU, so the
  model is switched to the eager attention path first (`use_eager_attention`).

Only linear Γ_c work here: LESS's Adam direction is not linear in the gradient (influence.adam).
"""

from __future__ import annotations

import torch

from dyn.influence.losses import model_inputs
from dyn.influence.parameters import ScoredParameters
from dyn.influence.per_sample import GradientSink


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


class DirectionSink(GradientSink):
    """Accumulates ⟨G_i, V_g⟩ per row for each direction g from the per-token factors."""

    def __init__(self, directions: list[list[torch.Tensor]], rows: int):
        self.directions = directions
        self.values = torch.zeros(rows, len(directions), dtype=torch.float64, device=directions[0][0].device)

    def matrix(self, block, u, v, u_ids=None):
        for g, direction in enumerate(self.directions):
            d = direction[block.index].to(v.dtype)
            if u_ids is not None:  # u is one-hot: u_tᵀ V = V[id_t]
                left = torch.nn.functional.embedding(u_ids, d).reshape(v.shape)
            else:
                left = u @ d
            self.values[:, g] += (left * v).sum(dim=(1, 2)).double()

    def vector(self, block, g_vec):
        for g, direction in enumerate(self.directions):
            self.values[:, g] += (g_vec @ direction[block.index].to(g_vec.dtype)).double()


def hooked_directional_derivatives(model, params: ScoredParameters, batch: dict, directions: list[list[torch.Tensor]]):
    """Per-row losses (B,) and ⟨∇ℓ_i, V_g⟩ (B, G) from layer hooks; NaN for rows with no response
    token. Raises UsageError (from `hookable_layers`) when a scored parameter has no hookable layer."""
    from dyn.influence.per_sample import run_with_hooks

    sink = DirectionSink(directions, batch["input_ids"].shape[0])
    losses = run_with_hooks(model, params, batch, sink)
    values = sink.values
    values[~torch.isfinite(losses)] = float("nan")
    return losses.double().cpu(), values.cpu()


def hooks_cover(model, params: ScoredParameters) -> bool:
    """True when every scored parameter belongs to a layer the hooks handle."""
    from dyn.core.errors import UsageError
    from dyn.influence.per_sample import hookable_layers

    try:
        hookable_layers(model, params)
    except UsageError:
        return False
    return True
