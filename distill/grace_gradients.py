"""The student's per-response gradients for GRACE (DESIGN §4.4): at the student's given weights, on
each (prompt, response) with the loss on the response tokens (each row's mean next-token
cross-entropy over its own response tokens, `core.lm`), projected to d dims and divided by
√(#scored parameters).

Two projections, both seeded, both with E[PᵀP] = I (projected inner products are unbiased):

- `factored` (default, `FactoredProjection`): each parameter's per-sample gradient is projected on
  its own with the LoGra factored projection of `influence.projection` (P_0 G P_1ᵀ, computed from
  the per-token factors in the layer hooks, so no per-sample gradient is ever formed), to about
  `block_dim` numbers per parameter (small parameters stay exact); the concatenation (K numbers)
  is then projected to d by one dense seeded Rademacher matrix (d × K, held in memory). Both stages
  are independent Johnson–Lindenstrauss maps, so their product is one too. The second stage is
  needed because the score inverts a d × d covariance: K (up to thousands of numbers per
  parameter) is far too many dims for that. A factored projection to k numbers is noisier than a
  dense one to k (each side is only about √k wide), so `block_dim` defaults to 4d: measured on a
  tiny GPT-2 at d = 512, the projected Gram matrix's relative error is 0.16 dense, 0.22 factored
  with 4d per parameter, 0.29 with d. It is halved until K·d ≤ 2^27 entries (512 MB) for models
  with very many parameter tensors.
- `rademacher` (`DenseProjection`): the plain definition — the full flattened per-sample
  gradient times one dense seeded d × D Rademacher matrix (`grace.DenseRademacherProjection`).
  Per-sample gradients are materialised from the same layer hooks (batched) and the matrix is held
  in memory when it fits (D·d ≤ 2^27 entries), else regenerated chunk by chunk for every batch.

Where the layer hooks do not cover every scored parameter (layers other than Linear, Conv1D,
Embedding and LayerNorm), both projections fall back to batch-size-1 autograd (`influence.exact`)
and project the full gradient with the same matrices: the same numbers, slower; the route taken is
reported.

Rows are the token-budget batches of `core.lm_batches`, shared out over the ranks by `map_batches`
and gathered back in batch order, so a multi-process run computes every row in the same batch as
one process does, and its result is identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dyn.core.errors import DataError, UsageError

DEFAULT_DIM = 512
PROJECTIONS = ("factored", "rademacher")
MAX_HELD_ENTRIES = 1 << 27  # entries of a projection matrix held in memory (float32: 512 MB)
MIN_BLOCK_DIM = 16
BLOCK_DIM_FACTOR = 4  # default numbers per parameter in the factored first stage, × d
MATERIALISE_MAX_ENTRIES = 1 << 26  # per-sample gradient entries materialised at once (rademacher)


def check_projection(kind: str, dim: int) -> None:
    if kind not in PROJECTIONS:
        raise UsageError(f"--projection {kind}: choose one of {', '.join(PROJECTIONS)}")
    if dim < 1:
        raise UsageError(f"--dim {dim}: must be at least 1")


def _as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A parameter's shape as the projection sees it: vectors stay, higher ranks become matrices."""
    if len(shape) <= 2:
        return tuple(shape)
    return (shape[0], math.prod(shape[1:]))


def _held_matrix(total: int, dim: int, seed: int, key: str, device, dtype) -> torch.Tensor:
    """The whole d × total matrix of `DenseRademacherProjection(total, dim, seed, key)`."""
    from dyn.distill.grace import DenseRademacherProjection

    dense = DenseRademacherProjection(total, dim, seed, key)
    return torch.cat([dense.chunk(c) for c in range(dense.num_chunks)], dim=1).to(device=device, dtype=dtype)


class FactoredProjection:
    """Per-parameter LoGra projection to about `block_dim` numbers each, then a dense d × K map."""

    kind = "factored"

    def __init__(self, params, dim: int, seed: int, block_dim: int | None = None, device="cpu"):
        from dyn.influence.projection import block_projection

        self.dim, self.seed = int(dim), int(seed)
        shapes = [_as_matrix_shape(tuple(t.shape)) for t in params.tensors]
        self.block_dim = int(block_dim) if block_dim is not None else self._fitting_block_dim(shapes, dim)
        self.blocks = [block_projection(key, shape, self.block_dim, seed).to(device, torch.float32)
                       for key, shape in zip(params.keys, shapes)]
        self.stage_one_dim = sum(b.size for b in self.blocks)
        self.second = _held_matrix(self.stage_one_dim, dim, seed, "grace/factored-stage2", device, torch.float32)

    @staticmethod
    def _fitting_block_dim(shapes, dim: int) -> int:
        """4d, halved while the second-stage matrix would exceed MAX_HELD_ENTRIES."""
        from dyn.influence.projection import block_sides

        block = max(BLOCK_DIM_FACTOR * dim, MIN_BLOCK_DIM)
        while block > MIN_BLOCK_DIM:
            total = sum(math.prod(block_sides(s, block)) for s in shapes)
            if total * dim <= MAX_HELD_ENTRIES:
                break
            block //= 2
        return block

    def by_key(self) -> dict:
        return {b.key: b for b in self.blocks}

    def from_stage_one(self, concatenated: torch.Tensor) -> torch.Tensor:
        return concatenated @ self.second.T

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, D) full flattened gradients -> (B, d): the same map as the hooks route."""
        parts, start = [], 0
        for block in self.blocks:
            size = math.prod(block.shape)
            piece = flat[:, start:start + size].reshape(flat.shape[0], *block.shape)
            parts.append(block.project_full(piece.float()).reshape(flat.shape[0], -1))
            start += size
        return self.from_stage_one(torch.cat(parts, dim=1))

    def describe(self) -> dict:
        return {"projection": self.kind, "dim": self.dim, "seed": self.seed, "block_dim": self.block_dim,
                "stage_one_dim": self.stage_one_dim}


class DenseProjection:
    """`grace.DenseRademacherProjection` over the flattened gradient; held when it fits."""

    kind = "rademacher"

    def __init__(self, params, dim: int, seed: int, device="cpu", max_held_entries: int = MAX_HELD_ENTRIES):
        from dyn.distill.grace import DenseRademacherProjection

        self.dim, self.seed = int(dim), int(seed)
        self.total = params.numel
        self.dense = DenseRademacherProjection(self.total, dim, seed, "grace/dense")
        self.held = None
        if self.total * dim <= max_held_entries:
            self.held = _held_matrix(self.total, dim, seed, "grace/dense", device, torch.float32)

    def project_flat(self, flat) -> torch.Tensor:
        """(B, D) flattened gradients, or a list of (B, D_i) pieces in order, -> (B, d)."""
        pieces = [flat] if isinstance(flat, torch.Tensor) else list(flat)
        if self.held is None:
            return self.dense.project([p.float() for p in pieces])
        # one GEMM over the whole row (column slices of the held matrix are strided: many small
        # products over them were measured 2-3x slower)
        whole = pieces[0] if len(pieces) == 1 else torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)
        return whole.float() @ self.held.T

    def describe(self) -> dict:
        return {"projection": self.kind, "dim": self.dim, "seed": self.seed, "matrix_held": self.held is not None}


def make_projection(kind: str, params, dim: int, seed: int, device="cpu", block_dim: int | None = None):
    check_projection(kind, dim)
    if kind == "factored":
        return FactoredProjection(params, dim, seed, block_dim=block_dim, device=device)
    return DenseProjection(params, dim, seed, device=device)


@dataclass
class BatchGradients:
    losses: torch.Tensor  # (B,)
    features: torch.Tensor  # (B, d), already divided by √(#params)


class GraceGradients:
    """Projected, scaled per-sample gradients of one student's scored parameters, batch by batch."""

    def __init__(self, model, params, projection):
        from dyn.influence.directional import hooks_cover

        self.model, self.params, self.projection = model, params, projection
        self.scale = 1.0 / math.sqrt(params.numel)
        self.hooks = hooks_cover(model, params)
        self.route = "layer hooks" if self.hooks else "batch-size-1 autograd (some scored parameters are in layers the hooks do not cover)"

    def batch(self, batch: dict) -> BatchGradients:
        if not self.hooks:
            return self._autograd(batch)
        if self.projection.kind == "factored":
            return self._factored_hooks(batch)
        return self._dense_hooks(batch)

    def _factored_hooks(self, batch: dict) -> BatchGradients:
        from dyn.influence.features import ProjectingSink
        from dyn.influence.per_sample import run_with_hooks

        rows = batch["input_ids"].shape[0]
        sink = ProjectingSink(self.projection.by_key(), rows)
        losses = run_with_hooks(self.model, self.params, batch, sink)
        parts = []
        for index, block in enumerate(self.projection.blocks):
            value = sink.blocks.get(index)
            parts.append(torch.zeros(rows, block.size, device=losses.device) if value is None else value.reshape(rows, block.size).float())
        features = self.projection.from_stage_one(torch.cat(parts, dim=1))
        return BatchGradients(losses, features * self.scale)

    def _dense_hooks(self, batch: dict) -> BatchGradients:
        """Per-sample gradients materialised from the hooks, a slice of rows at a time."""
        from dyn.influence.features import MaterialisingSink
        from dyn.influence.per_sample import run_with_hooks

        rows = batch["input_ids"].shape[0]
        step = max(1, MATERIALISE_MAX_ENTRIES // max(1, self.params.numel))
        losses, features = [], []
        for start in range(0, rows, step):
            part = {k: v[start:start + step] for k, v in batch.items()}
            count = part["input_ids"].shape[0]
            sink = MaterialisingSink(count)
            losses.append(run_with_hooks(self.model, self.params, part, sink))
            pieces = []
            for index, tensor in enumerate(self.params.tensors):
                value = sink.blocks.get(index)
                pieces.append(torch.zeros(count, tensor.numel(), device=tensor.device) if value is None else value.reshape(count, -1))
            features.append(self.projection.project_flat(pieces))
        return BatchGradients(torch.cat(losses), torch.cat(features) * self.scale)

    def _autograd(self, batch: dict) -> BatchGradients:
        from dyn.influence.exact import exact_row_gradients

        losses, flat = exact_row_gradients(self.model, self.params, batch)
        return BatchGradients(losses, self.projection.project_flat(flat) * self.scale)


def projected_gradients(gradients: GraceGradients, rows, label: str) -> np.ndarray:
    """(N, d) float64 projected gradients of every row of `rows` (a `core.lm_batches.RowBatches`
    whose rows all have a response token), computed over the ranks' shares of the batches; every
    rank gets the whole matrix. A non-finite loss or gradient is a DataError naming the row."""
    from dyn.core.lm_batches import map_batches

    def compute(j: int, batch: dict):
        out = gradients.batch(batch)
        losses = out.losses.detach().cpu().numpy()
        features = out.features.detach().cpu().to(torch.float64).numpy()
        positions = rows.batches[j]
        for i in range(len(positions)):
            if not np.isfinite(losses[i]):
                raise DataError(f"{rows.where(int(positions[i]))}: the student's loss on this response is not finite ({losses[i]})")
            if not np.isfinite(features[i]).all():
                raise DataError(f"{rows.where(int(positions[i]))}: the student's gradient on this response is not finite")
        return features

    per_batch = map_batches(rows, compute, label)
    out = np.zeros((len(rows), gradients.projection.dim), dtype=np.float64)
    for positions, values in zip(rows.batches, per_batch):
        out[positions] = values
    return out
