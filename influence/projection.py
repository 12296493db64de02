"""Seeded random projections for per-sample gradients: factored per weight matrix (LoGra), dense
for vectors (biases, norm weights).

A weight's per-sample gradient is G = Σ_t u_t v_tᵀ (R×C: for a Linear layer u = the output's
gradient, v = the input). Its projection is P_0 G P_1ᵀ = Σ_t (P_0 u_t)(P_1 v_t)ᵀ, a k_0×k_1 block
computed from the two projected factors without ever forming G (LoGra, Choe et al. 2024). Entries
are ±1/√k (Rademacher), so E[PᵀP] = I and, with P_0 and P_1 independent,
E⟨P_0 G P_1ᵀ, P_0 H P_1ᵀ⟩ = ⟨G, H⟩: projected inner products are unbiased. A side no longer than
its target size is left unprojected (identity), so small layers are exact.

Each matrix is drawn from a generator seeded by (seed, parameter key, axis): the same on every
rank, in every rerun and for every checkpoint, whatever else the model holds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

DEFAULT_PROJ_DIM = 1024


def block_sides(shape: tuple[int, ...], proj_dim: int) -> tuple[int, ...]:
    """Projected size of each axis of a block: about √proj_dim a side for a matrix (the short side
    unprojected when it is shorter), proj_dim for a vector; never more than the axis itself."""
    if len(shape) == 1:
        return (min(shape[0], proj_dim),)
    rows, cols = shape
    side = max(1, math.isqrt(proj_dim))
    k0 = min(rows, side)
    if cols <= side:
        k0 = min(rows, max(1, proj_dim // cols))
    k1 = min(cols, max(1, proj_dim // k0))
    return (k0, k1)


def rademacher(rows: int, cols: int, seed: int, key: str) -> torch.Tensor:
    """A rows×cols matrix of ±1/√rows, the same for the same (seed, key) everywhere."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
    return (signs.float() * 2 - 1) / math.sqrt(rows)


@dataclass
class BlockProjection:
    """The projection of one parameter's gradient: one matrix per axis (None: identity)."""

    key: str
    shape: tuple[int, ...]
    sides: tuple[int, ...]
    matrices: tuple

    @property
    def size(self) -> int:
        return math.prod(self.sides)

    def to(self, device, dtype) -> "BlockProjection":
        moved = tuple(None if m is None else m.to(device=device, dtype=dtype) for m in self.matrices)
        return BlockProjection(self.key, self.shape, self.sides, moved)

    def project_side(self, axis: int, x: torch.Tensor) -> torch.Tensor:
        """x (..., shape[axis]) -> (..., sides[axis])."""
        m = self.matrices[axis]
        return x if m is None else x @ m.T

    def project_full(self, grad: torch.Tensor) -> torch.Tensor:
        """A materialised per-sample gradient (B, *shape) -> (B, size)."""
        if len(self.shape) == 1:
            return self.project_side(0, grad)
        out = grad
        if self.matrices[0] is not None:
            out = torch.einsum("kr,brc->bkc", self.matrices[0], out)
        if self.matrices[1] is not None:
            out = torch.einsum("bkc,lc->bkl", out, self.matrices[1])
        return out.reshape(out.shape[0], -1)


def block_projection(key: str, shape: tuple[int, ...], proj_dim: int | None, seed: int) -> BlockProjection:
    """The seeded projection of a parameter's gradient; `proj_dim=None` means no projection."""
    if proj_dim is None:
        return BlockProjection(key, tuple(shape), tuple(shape), tuple(None for _ in shape))
    sides = block_sides(tuple(shape), proj_dim)
    matrices = tuple(
        None if side == dim else rademacher(side, dim, seed, f"{key}#axis{axis}")
        for axis, (side, dim) in enumerate(zip(sides, shape))
    )
    return BlockProjection(key, tuple(shape), sides, matrices)
