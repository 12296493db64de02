"""Balance as well as spread: split the budget over groups and merge per-group greedy orders.

Farthest points include outliers, so a plain greedy selection can cover fewer labels than a random
subset (DESIGN §4.1). `--stratify FIELD` runs the greedy inside each group with a budget
proportional to the group's size, then merges the per-group orders into one ranking.
"""

from __future__ import annotations

import numpy as np


def split_budget(sizes: list[int], k: int) -> list[int]:
    """Split k over groups in proportion to their sizes (largest remainder), capped by each size.

    Deterministic: remainders tie-break on the larger group, then the earlier group.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    total = int(sizes_arr.sum())
    if not 0 <= k <= total:
        raise ValueError(f"budget {k} exceeds the {total} rows")
    exact = sizes_arr * k / total
    budget = np.floor(exact).astype(np.int64)
    remainder = exact - budget
    left = k - int(budget.sum())
    order = sorted(range(len(sizes)), key=lambda g: (-remainder[g], -sizes_arr[g], g))
    for g in order[:left]:
        budget[g] += 1
    return [int(b) for b in budget]


def merge_group_orders(walks) -> tuple[np.ndarray, np.ndarray]:
    """One ranking from per-group traversals: by insertion distance, largest first.

    Each group's own order is kept (its insertion distances do not increase); group starts
    (distance inf) come first, in group order.
    """
    rows, distances, group_ids, ranks = [], [], [], []
    for g, walk in enumerate(walks):
        if walk is None:
            continue
        rows.append(walk.order)
        distances.append(walk.insertion_distance)
        group_ids.append(np.full(len(walk.order), g))
        ranks.append(np.arange(len(walk.order)))
    rows_all, dist_all = np.concatenate(rows), np.concatenate(distances)
    merged = np.lexsort((np.concatenate(ranks), np.concatenate(group_ids), -dist_all))
    return rows_all[merged], dist_all[merged]
