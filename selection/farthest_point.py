"""Greedy farthest-point traversal (Gonzalez), the kernel of hmin selection.

Start at one row; keep m(x), the squared distance from every row to its nearest chosen row; take
argmax m; update m <- min(m, d(., new)); repeat. Each prefix of the order is a valid selection for
its size, the k-th insertion distance equals the h_min of the first k rows, and the selection is
within a factor 2 of the optimal max-min (and k-center) value.

Distances are ||x||^2 + ||q||^2 - 2 x.q: one matrix-vector product per step over one contiguous
matrix, never an N x d difference array, never an N x N or k x N distance matrix. The loop is
memory-bound (each step reads N*d stored values), so the kernels differ in how they read:
- `numpy`: float32 matrix, BLAS sgemv (CPU default; streams at full memory bandwidth here);
- `torch`: the same loop on a torch device without any host synchronisation per step (CUDA), or
  with float16/bfloat16 storage (half the bytes per step; dot products come back rounded to the
  storage type, so distances are good to ~3-4 digits).
Ties break on the smallest row index (argmax returns the first maximum in both kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STORAGE_TYPES = ("float32", "float16", "bfloat16")


@dataclass
class FarthestPointOrder:
    """The first k rows of a farthest-point traversal.

    `order`: row positions in pick order. `insertion_distance[i]`: distance from pick i to the
    nearest earlier pick (inf for the start). `coverage_radius`: after the last pick, the largest
    distance from any row to its nearest pick.
    """

    order: np.ndarray
    insertion_distance: np.ndarray
    coverage_radius: float


def farthest_point_order(
    vectors: np.ndarray,
    k: int,
    start: int,
    *,
    storage: str = "float32",
    device: str = "cpu",
) -> FarthestPointOrder:
    """Pick k rows of `vectors` (float32, rows x dim) by greedy farthest-point traversal from `start`."""
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start must be a row in [0, {n}), got {start}")
    if storage not in STORAGE_TYPES:
        raise ValueError(f"storage must be one of {STORAGE_TYPES}, got {storage}")
    if device == "cpu" and storage == "float32":
        return _numpy_traversal(np.ascontiguousarray(vectors, dtype=np.float32), k, start)
    return _torch_traversal(vectors, k, start, storage, device)


def _numpy_traversal(x: np.ndarray, k: int, start: int) -> FarthestPointOrder:
    n = x.shape[0]
    squared_norms = np.einsum("ij,ij->i", x, x)
    nearest = np.full(n, np.inf, dtype=np.float32)  # m(x): squared distance to the nearest pick
    dots = np.empty(n, dtype=np.float32)
    candidate = np.empty(n, dtype=np.float32)
    order = np.empty(k, dtype=np.int64)
    inserted = np.empty(k, dtype=np.float64)
    inserted[0] = np.inf
    pick = start
    for step in range(k):
        order[step] = pick
        np.dot(x, x[pick], out=dots)
        np.multiply(dots, -2.0, out=candidate)
        candidate += squared_norms
        candidate += squared_norms[pick]
        np.minimum(nearest, candidate, out=nearest)
        nearest[pick] = -1.0  # chosen rows never win again
        pick = int(np.argmax(nearest))
        if step + 1 < k:
            inserted[step + 1] = nearest[pick]
    radius = float(nearest[pick]) if nearest[pick] > 0 else 0.0
    return FarthestPointOrder(order, _root(inserted), float(np.sqrt(radius)))


def _torch_traversal(vectors: np.ndarray, k: int, start: int, storage: str, device: str) -> FarthestPointOrder:
    import torch

    dtype = getattr(torch, storage)
    x = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32)).to(device=device, dtype=dtype).contiguous()
    n = x.shape[0]
    squared_norms = x.float().pow(2).sum(1)  # norms of the stored (rounded) values, for consistency
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
    order = torch.empty(k, dtype=torch.long, device=device)
    inserted = torch.empty(k, dtype=torch.float32, device=device)
    inserted[0] = float("inf")
    pick = torch.tensor([start], dtype=torch.long, device=device)
    for step in range(k):  # no .item() inside: on CUDA the host never waits for the device
        order[step : step + 1] = pick
        query = x.index_select(0, pick)[0]
        dots = torch.mv(x, query).float()
        candidate = squared_norms.add(dots, alpha=-2.0).add_(squared_norms.index_select(0, pick))
        torch.minimum(nearest, candidate, out=nearest)
        nearest.index_fill_(0, pick, -1.0)
        pick = torch.argmax(nearest).view(1)
        if step + 1 < k:
            inserted[step + 1 : step + 2] = nearest.index_select(0, pick)
    radius = float(nearest.max().clamp_min(0).sqrt())
    return FarthestPointOrder(
        order.cpu().numpy(), _root(inserted.cpu().numpy().astype(np.float64)), radius
    )


def _root(squared: np.ndarray) -> np.ndarray:
    out = np.sqrt(np.clip(squared, 0.0, None))
    out[np.isinf(squared)] = np.inf
    return out

