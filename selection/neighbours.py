"""Neighbour figures around the greedy loop, computed exactly with FAISS flat indexes.

h_min of any selection (distance from each chosen row to its nearest other chosen row, minimised),
its coverage radius (distance from every row to its nearest chosen row, maximised), near-duplicate
pairs inside a set (range search), exact duplicates (byte-equal vectors) and k-means groups.
All distances are Euclidean on the vectors given (for cosine: on the unit-normalised vectors).
"""

from __future__ import annotations

import numpy as np


def _flat_index(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def nearest_other_distances(chosen: np.ndarray) -> np.ndarray:
    """For each chosen vector, the distance to the nearest other chosen vector."""
    if len(chosen) < 2:
        return np.full(len(chosen), np.inf)
    index = _flat_index(chosen)
    squared, ids = index.search(np.ascontiguousarray(chosen, dtype=np.float32), 2)
    own = np.arange(len(chosen))
    other = np.where(ids[:, 0] != own, squared[:, 0], squared[:, 1])
    return np.sqrt(np.clip(other.astype(np.float64), 0.0, None))


def min_pairwise_distance(chosen: np.ndarray) -> float:
    """h_min: the smallest distance between two chosen vectors (inf for fewer than two)."""
    return float(nearest_other_distances(chosen).min()) if len(chosen) >= 2 else float("inf")


def coverage_radius(vectors: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from any vector to its nearest chosen vector."""
    index = _flat_index(chosen)
    squared, _ = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return float(np.sqrt(max(float(squared.max()), 0.0)))


def near_duplicate_pairs(chosen: np.ndarray, radius: float) -> int:
    """How many pairs of distinct chosen vectors lie within `radius` of each other."""
    if len(chosen) < 2:
        return 0
    index = _flat_index(chosen)
    lims, distances, ids = index.range_search(np.ascontiguousarray(chosen, dtype=np.float32), radius * radius)
    rows = np.repeat(np.arange(len(chosen)), np.diff(lims.astype(np.int64)))
    return int(np.count_nonzero(ids > rows))


def first_of_each_duplicate(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask: True for the first row of every group of byte-equal vectors."""
    rows = np.ascontiguousarray(vectors)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first = np.unique(as_bytes, return_index=True)
    mask = np.zeros(len(rows), dtype=bool)
    mask[first] = True
    return mask


def kmeans_groups(vectors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """A k-means cluster id per row (FAISS), for grouping when no label column exists."""
    import faiss

    kmeans = faiss.Kmeans(vectors.shape[1], clusters, niter=20, seed=seed, verbose=False)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    kmeans.train(data)
    _, labels = kmeans.index.search(data, 1)
    return labels.ravel().astype(np.int64)
