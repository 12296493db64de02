"""Γ_c = adam: LESS's Adam update direction of a gradient, from a checkpoint's optimizer state.

LESS ("Selecting Influential Data for Targeted Instruction Tuning", Xia et al. 2024, §2 and its
released `obtain_gradients_with_adam`) folds the sample's gradient g into the checkpoint's Adam
moments and takes the resulting update direction:

    m' = β1·m + (1−β1)·g,   v' = β2·v + (1−β2)·g²,   Γ(g) = m' / sqrt(v' + ε)

with m, v the optimizer's `exp_avg`/`exp_avg_sq` for that parameter, no bias correction, and ε
inside the square root (ε = 1e-8), exactly as LESS computes it. β1, β2 are the checkpoint's own
(LESS hard-codes 0.9/0.999, the AdamW defaults). Γ is applied to the training rows' gradients only;
the anchor mean ḡ_c stays a plain gradient mean, as in LESS and DESIGN §4.2.

Γ is elementwise but not linear in g (g enters both m' and v'), so ⟨Γ(∇ℓ_i), ḡ⟩ is not a
directional derivative of ℓ_i: the directional engine cannot compute it, and scores with
`--precondition adam` come from per-sample gradients (exact or store engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dyn.core.errors import DataError

LESS_EPS = 1e-8
DEFAULT_BETAS = (0.9, 0.999)


@dataclass
class AdamMoments:
    """Adam's first and second moments per parameter (canonical names), with each one's betas."""

    exp_avg: dict
    exp_avg_sq: dict
    betas: dict = field(default_factory=dict)
    eps: float = LESS_EPS
    source: str = "optimizer state"

    @classmethod
    def from_state(cls, state, source: str) -> "AdamMoments":
        """From a checkpoint's `distill.checkpoints.AdamState` (moments by canonical name)."""
        return cls(dict(state.exp_avg), dict(state.exp_avg_sq), dict(state.betas), LESS_EPS, source)

    def aligned(self, params) -> list[tuple]:
        """(exp_avg, exp_avg_sq, beta1, beta2) for each scored parameter, in order; a clear error
        when one is missing or shaped differently."""
        out = []
        for key, tensor in zip(params.keys, params.tensors):
            if key not in self.exp_avg or key not in self.exp_avg_sq:
                raise DataError(
                    f"{self.source}: no Adam moments for parameter '{key}' (the state has "
                    f"{len(self.exp_avg)} entries); was it trainable in that run? Score the trained "
                    "parameters only (--modules), or use --precondition none"
                )
            m, v = self.exp_avg[key], self.exp_avg_sq[key]
            if tuple(m.shape) != tuple(tensor.shape) or tuple(v.shape) != tuple(tensor.shape):
                raise DataError(
                    f"{self.source}: Adam moments for '{key}' have shape {tuple(m.shape)}, "
                    f"the model's parameter {tuple(tensor.shape)}: checkpoints of different architectures?"
                )
            beta1, beta2 = self.betas.get(key, DEFAULT_BETAS)
            out.append((m.to(tensor.device, tensor.dtype), v.to(tensor.device, tensor.dtype), float(beta1), float(beta2)))
        return out


def adam_direction(grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float = LESS_EPS):
    """LESS's Γ(g) = m'/sqrt(v' + ε); broadcasts, so `grad` may carry a leading batch axis."""
    m = beta1 * exp_avg + (1.0 - beta1) * grad
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    return m / (v + eps).sqrt()
