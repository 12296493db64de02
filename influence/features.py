"""Projected per-sample gradients ("features"): the store engine's numbers (DESIGN §4.2).

Each row's gradient over the scored parameters, projected block by block (influence.projection)
and concatenated in the parameters' order. Without Γ the projection happens on the per-token
factors, so no per-sample gradient is ever formed (`ProjectingSink`). LESS's Adam direction Γ_c is
elementwise and non-linear, so with `--precondition adam` each row's gradient of one parameter is
formed first, Γ_c applied, then projected (`MaterialisingSink`; memory: batch × the largest scored
parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dyn.influence.per_sample import Block, GradientSink, hookable_layers, run_with_hooks
from dyn.influence.projection import BlockProjection, block_projection


class ProjectingSink(GradientSink):
    """Accumulates P_0 (Σ_t u_t v_tᵀ) P_1ᵀ per row from projected factors."""

    def __init__(self, projections: dict, rows: int):
        self.projections = projections
        self.rows = rows
        self.blocks: dict[int, torch.Tensor] = {}

    def _add(self, block: Block, value: torch.Tensor) -> None:
        value = value.reshape(self.rows, -1)
        if block.index in self.blocks:
            self.blocks[block.index] = self.blocks[block.index] + value
        else:
            self.blocks[block.index] = value

    def matrix(self, block, u, v, u_ids=None):
        p: BlockProjection = self.projections[block.key]
        if u_ids is not None:
            first = p.matrices[0]
            pu = F.one_hot(u_ids, block.shape[0]).to(v.dtype) if first is None else F.embedding(u_ids, first.T)
            pu = pu.reshape(self.rows, -1, pu.shape[-1])
        else:
            pu = p.project_side(0, u)
        pv = p.project_side(1, v)
        self._add(block, torch.einsum("btk,btl->bkl", pu, pv))

    def vector(self, block, g):
        self._add(block, self.projections[block.key].project_side(0, g))


class MaterialisingSink(GradientSink):
    """Accumulates each row's full gradient of every scored parameter, (B, *shape)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.blocks: dict[int, torch.Tensor] = {}

    def _add(self, block, value):
        if block.index in self.blocks:
            self.blocks[block.index] = self.blocks[block.index] + value
        else:
            self.blocks[block.index] = value

    def matrix(self, block, u, v, u_ids=None):
        rows, cols = block.shape
        if u_ids is not None:
            grad = torch.zeros(self.rows * rows, cols, dtype=v.dtype, device=v.device)
            offsets = torch.arange(self.rows, device=u_ids.device).view(-1, *([1] * (u_ids.dim() - 1))) * rows
            grad.index_add_(0, (u_ids + offsets).reshape(-1), v.reshape(-1, cols))
            self._add(block, grad.view(self.rows, rows, cols))
        else:
            self._add(block, torch.einsum("btr,btc->brc", u, v))

    def vector(self, block, g):
        self._add(block, g)


class GradientFeatures:
    """Projected per-sample gradients of one model's scored parameters.

    `proj_dim` is the size of each parameter's projected block (None: no projection — the exact
    per-sample gradient, used by tests); `seed` fixes the projection everywhere.
    """

    def __init__(self, model, params, proj_dim: int | None, seed: int = 0, moments=None):
        self.model, self.params = model, params
        _, self.blocks = hookable_layers(model, params)
        dtype = params.tensors[0].dtype
        device = params.tensors[0].device
        self.projections = {
            b.key: block_projection(b.key, b.shape, proj_dim, seed).to(device, dtype) for b in self.blocks
        }
        self.dim = sum(p.size for p in self.projections.values())
        self.moments = moments.aligned(params) if moments is not None else None
        self.adam = moments

    def compute(self, batch: dict, plain: bool = False) -> dict:
        """{"losses": (B,), "features": (B, dim)} — Γ_c applied when Adam moments were given — and,
        with `plain=True` and Adam moments, "plain": the un-preconditioned features too. Rows with
        no response token get NaN."""
        rows = batch["input_ids"].shape[0]
        if self.moments is None:
            sink = ProjectingSink(self.projections, rows)
            losses = run_with_hooks(self.model, self.params, batch, sink)
            features = self._concat(sink.blocks, rows, None)
            out = {"losses": losses, "features": features}
            if plain:
                out["plain"] = features
        else:
            sink = MaterialisingSink(rows)
            losses = run_with_hooks(self.model, self.params, batch, sink)
            out = {"losses": losses, "features": self._concat(sink.blocks, rows, self._adam_projected)}
            if plain:
                out["plain"] = self._concat(sink.blocks, rows, lambda b, g: self.projections[b.key].project_full(g))
        missing = torch.isnan(losses)
        for name in ("features", "plain"):
            if name in out:
                out[name][missing] = float("nan")
        return out

    def _adam_projected(self, block: Block, grad: torch.Tensor) -> torch.Tensor:
        from dyn.influence.adam import adam_direction

        m, v, beta1, beta2 = self.moments[block.index]
        direction = adam_direction(grad, m, v, beta1, beta2, self.adam.eps)
        return self.projections[block.key].project_full(direction)

    def _concat(self, blocks: dict, rows: int, finish) -> torch.Tensor:
        """Blocks in parameter order as (rows, dim); `finish` turns a materialised gradient into its
        projected block (None: the blocks are projected already)."""
        parts = []
        dtype, device = self.params.tensors[0].dtype, self.params.tensors[0].device
        for block in self.blocks:
            size = self.projections[block.key].size
            if finish is None:
                value = blocks.get(block.index)
                parts.append(torch.zeros(rows, size, dtype=dtype, device=device) if value is None else value.reshape(rows, size))
                continue
            # A layer that took no part in the loss has a zero gradient (and Γ of zero is not zero).
            grad = blocks.get(block.index)
            if grad is None:
                grad = torch.zeros((rows, *block.shape), dtype=dtype, device=device)
            parts.append(finish(block, grad).reshape(rows, size))
        return torch.cat(parts, dim=1)
