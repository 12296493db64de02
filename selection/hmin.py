"""hmin selection: choose rows that maximise the minimum pairwise distance (DESIGN §4.1).

Paper: Wang & Gu, "Data Uniformity Improves Training Efficiency and More, with a Convergence
Framework Beyond the NTK Regime" (arXiv 2506.24120): a selection with a larger minimum pairwise
distance h_min trains faster. The selection is the greedy farthest-point order over embeddings.

This module wraps the kernel (`farthest_point`) with what makes it a selector: cosine or l2,
the start rule, exact duplicates (never two copies before every distinct row is chosen),
stratification by a label, and the figures a user checks it by (h_min and coverage radius of the
selection next to a random subset of the same size, groups covered, near-duplicates).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from dyn.core.errors import UsageError
from dyn.selection.farthest_point import FarthestPointOrder, farthest_point_order
from dyn.selection.neighbours import (
    coverage_radius,
    first_of_each_duplicate,
    min_pairwise_distance,
    near_duplicate_pairs,
)
from dyn.selection.result import SelectionResult
from dyn.selection.stratify import merge_group_orders, split_budget

METRICS = ("cosine", "l2")
# Above this many N*k distance evaluations the random subset's coverage radius is skipped.
COVERAGE_WORK_LIMIT = 4e10


@dataclass(frozen=True)
class HminSettings:
    k: int
    metric: str = "cosine"
    start: str = "random"  # "random", "medoid" or a row number
    seed: int = 0
    storage: str = "float32"
    device: str = "cpu"
    near_duplicate_radius: float = 0.05


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """The matrix the loop reads: float32, contiguous, unit rows for cosine."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.where(norms > 0, norms, 1.0)
    return x


def parse_start(start: str, n: int) -> str | int:
    if start in ("random", "medoid"):
        return start
    try:
        index = int(start)
    except ValueError:
        raise UsageError(f"--start {start}: use random, medoid or a row number") from None
    if not 0 <= index < n:
        raise UsageError(f"--start {index}: the input has rows 0..{n - 1}")
    return index


def greedy_with_duplicates(
    x: np.ndarray, k: int, start: str | int, seed: int, storage: str = "float32", device: str = "cpu",
    representative: np.ndarray | None = None,
) -> FarthestPointOrder:
    """Farthest-point order over all rows of `x` in which byte-equal rows come last.

    The traversal runs over one representative of each distinct vector (its first row, or the
    start row); when k exceeds the number of distinct vectors the remaining copies follow in row
    order with insertion distance 0. So duplicates are never both chosen before every distinct
    row is, whatever floating-point rounding would say.
    """
    n = x.shape[0]
    representative = first_of_each_duplicate(x)
    if isinstance(start, int) and not representative[start]:
        same = np.flatnonzero((x == x[start]).all(axis=1))
        representative[same] = False
        representative[start] = True
    candidates = np.flatnonzero(representative)
    local_start = _start_position(x if len(candidates) == n else x[candidates], start, candidates, seed)
    take = min(k, len(candidates))
    walk_over = x if len(candidates) == n else x[candidates]  # no copy when every row is distinct
    walk = farthest_point_order(walk_over, take, local_start, storage=storage, device=device)
    order = candidates[walk.order]
    inserted = walk.insertion_distance
    radius = walk.coverage_radius
    if k > take:
        copies = np.flatnonzero(~representative)[: k - take]
        order = np.concatenate([order, copies])
        inserted = np.concatenate([inserted, np.zeros(len(copies))])
        radius = 0.0
    elif take == len(candidates):
        radius = 0.0
    return FarthestPointOrder(order, inserted, radius if n > 0 else 0.0)


def _start_position(candidate_vectors: np.ndarray, start: str | int, candidates: np.ndarray, seed: int) -> int:
    if isinstance(start, int):
        return int(np.searchsorted(candidates, start))
    if start == "random":
        return int(np.random.default_rng(seed).integers(len(candidates)))
    centroid = candidate_vectors.mean(axis=0)  # medoid: the row nearest the centroid
    squared = np.einsum("ij,ij->i", candidate_vectors, candidate_vectors) - 2.0 * candidate_vectors @ centroid
    return int(np.argmin(squared))


def select_hmin(
    vectors: np.ndarray,
    settings: HminSettings,
    groups: np.ndarray | None = None,
    stratify: bool = False,
    phase=None,
) -> SelectionResult:
    """Choose `settings.k` rows by greedy max-min distance and measure the choice.

    `groups` (one label per row) enables the coverage report and, with `stratify`, a greedy run
    inside each group with the budget split by group size. `phase(name)`, if given, is a context
    manager that times each part (the run record's).
    """
    phase = phase or (lambda name: nullcontext())
    n = vectors.shape[0]
    k = settings.k
    if not 1 <= k <= n:
        raise UsageError(f"-k {k}: must be between 1 and the number of rows ({n})")
    x = prepare_vectors(vectors, settings.metric)
    start = parse_start(settings.start, n)
    with phase("greedy"):
        representative = first_of_each_duplicate(x)
        if stratify:
            if groups is None:
                raise UsageError("--stratify needs a label per row")
            order, inserted, walk_radius = _stratified(x, groups, settings, start)
        else:
            walk = greedy_with_duplicates(
                x, k, start, settings.seed, settings.storage, settings.device, representative=representative
            )
            order, inserted, walk_radius = walk.order, walk.insertion_distance, walk.coverage_radius
    with phase("measure"):
        random_subset = np.random.default_rng(settings.seed).choice(n, size=k, replace=False)
        figures = _figures(x, order, random_subset, settings, groups, walk_radius, stratify, int(representative.sum()))
    inserted_column = [None if np.isinf(v) else float(v) for v in inserted]
    columns = {"dyn_rank": np.arange(len(order), dtype=np.int64), "dyn_hmin_at": inserted_column}
    if stratify:
        columns["dyn_group"] = [_plain(groups[i]) for i in order]
    return SelectionResult(rows=order, columns=columns, figures=figures)


def _stratified(x: np.ndarray, groups: np.ndarray, settings: HminSettings, start):
    labels, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    budgets = split_budget([len(m) for m in members], settings.k)
    walks = []
    for g, (rows, budget) in enumerate(zip(members, budgets)):
        if budget == 0:
            walks.append(None)
            continue
        group_start = start
        if isinstance(start, int):
            group_start = int(np.searchsorted(rows, start)) if start in set(rows.tolist()) else "random"
        walk = greedy_with_duplicates(x[rows], budget, group_start, settings.seed + g, settings.storage, settings.device)
        walks.append(FarthestPointOrder(rows[walk.order], walk.insertion_distance, walk.coverage_radius))
    order, inserted = merge_group_orders(walks)
    return order, inserted, None


def _figures(x, order, random_subset, settings, groups, walk_radius, stratify, distinct) -> dict:
    n, k = x.shape[0], len(order)
    chosen, baseline = x[order], x[random_subset]
    work_ok = n * k <= COVERAGE_WORK_LIMIT
    figures = {
        "rows": n,
        "selected": k,
        "metric": settings.metric,
        "distinct_vectors": distinct,
        "duplicate_rows": n - distinct,
        "hmin": min_pairwise_distance(chosen),
        "hmin_random": min_pairwise_distance(baseline),
        "coverage_radius": coverage_radius(x, chosen) if work_ok or walk_radius is None else walk_radius,
        "coverage_radius_random": coverage_radius(x, baseline) if work_ok else None,
        "near_duplicate_radius": settings.near_duplicate_radius,
        "near_duplicate_pairs": near_duplicate_pairs(chosen, settings.near_duplicate_radius),
        "near_duplicate_pairs_random": near_duplicate_pairs(baseline, settings.near_duplicate_radius),
        "stratified": stratify,
        "approximation": "greedy farthest-point: h_min within a factor 2 of the optimal max-min selection",
    }
    if stratify:
        figures["approximation"] = "greedy within each group; h_min is not guaranteed across groups"
    if groups is not None:
        labels = np.asarray(groups, dtype=object).astype(str)
        figures["groups_total"] = int(len(np.unique(labels)))
        figures["groups_covered"] = int(len(np.unique(labels[order])))
        figures["groups_covered_random"] = int(len(np.unique(labels[random_subset])))
    return figures


def _plain(value):
    return value.item() if hasattr(value, "item") else value
