"""The greedy farthest-point loop against a direct O(N^2) brute force, and its guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from dyn.selection.farthest_point import farthest_point_order
from dyn.selection.hmin import HminSettings, greedy_with_duplicates, prepare_vectors, select_hmin
from dyn.selection.neighbours import coverage_radius, min_pairwise_distance
from dyn.selection.stratify import split_budget


def brute_force_greedy(x: np.ndarray, k: int, start: int):
    """Textbook greedy in float64 with explicit differences and a full distance matrix."""
    x = np.asarray(x, dtype=np.float64)
    full = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    chosen, inserted = [start], [np.inf]
    nearest = full[start].copy()
    nearest[start] = -1.0
    while len(chosen) < k:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        inserted.append(nearest[pick])
        nearest = np.minimum(nearest, full[pick])
        nearest[chosen] = -1.0
    return np.asarray(chosen), np.asarray(inserted)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(200, 8), (400, 48)])
def test_order_equals_brute_force_on_random_data(seed, shape):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    start = seed * 7 % shape[0]
    walk = farthest_point_order(x, 120, start)
    expected, inserted = brute_force_greedy(x, 120, start)
    np.testing.assert_array_equal(walk.order, expected)
    np.testing.assert_allclose(walk.insertion_distance[1:], inserted[1:], rtol=1e-4, atol=1e-4)
    assert np.isinf(walk.insertion_distance[0])


def test_order_equals_brute_force_on_real_embeddings(minilm, t0_rows):
    from dyn.core.embeddings import embed_texts

    rows = t0_rows(160)
    vectors, _ = embed_texts([r["prompt"] + "\n" + r["completion"] for r in rows], minilm)
    x = prepare_vectors(vectors, "cosine")
    keep = np.flatnonzero(np.isin(np.arange(len(x)), np.unique(x, axis=0, return_index=True)[1]))
    x = x[keep]  # distinct rows only: the brute force has no duplicate rule
    walk = farthest_point_order(x, 60, 0)
    expected, inserted = brute_force_greedy(x, 60, 0)
    np.testing.assert_array_equal(walk.order, expected)
    np.testing.assert_allclose(walk.insertion_distance[1:], inserted[1:], rtol=1e-4, atol=1e-4)


def test_each_prefix_hmin_equals_its_last_insertion_distance():
    x = unit_rows(300, 16, 3)
    walk = farthest_point_order(x, 80, 5)
    for size in (2, 3, 10, 41, 80):
        prefix = x[walk.order[:size]]
        assert min_pairwise_distance(prefix) == pytest.approx(walk.insertion_distance[size - 1], rel=1e-4, abs=1e-5)
    assert np.all(np.diff(walk.insertion_distance[1:]) <= 1e-6), "insertion distances never increase"


def test_coverage_radius_from_the_loop_matches_faiss():
    x = unit_rows(500, 12, 4)
    walk = farthest_point_order(x, 40, 0)
    assert walk.coverage_radius == pytest.approx(coverage_radius(x, x[walk.order]), rel=1e-4)


def test_torch_kernel_matches_numpy_kernel():
    from dyn.selection.farthest_point import _torch_traversal

    x = unit_rows(300, 24, 5)
    reference = farthest_point_order(x, 100, 11)
    torch_walk = _torch_traversal(x, 100, 11, "float32", "cpu")
    np.testing.assert_array_equal(torch_walk.order, reference.order)
    np.testing.assert_allclose(torch_walk.insertion_distance, reference.insertion_distance, rtol=1e-5)


@pytest.mark.parametrize("storage,tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_reduced_precision_storage_stays_close(storage, tolerance):
    # Unit vectors in well-separated clusters (the cosine case): dot products come back rounded
    # to the storage type, so the order may differ only among near-ties; h_min stays close.
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(30, 32))
    x = (centres[rng.integers(30, size=600)] + rng.normal(size=(600, 32)) * 0.05).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    reference = farthest_point_order(x, 30, 0)
    reduced = farthest_point_order(x, 30, 0, storage=storage)
    if storage == "float16":
        np.testing.assert_array_equal(reduced.order, reference.order)
    exact_hmin = min_pairwise_distance(x[reduced.order])
    assert exact_hmin == pytest.approx(min_pairwise_distance(x[reference.order]), rel=tolerance)
    np.testing.assert_allclose(reduced.insertion_distance[1:], reference.insertion_distance[1:], rtol=tolerance)


def test_ties_break_on_the_smallest_row_index():
    # Four corners of a square, start at the centre: all corners tie at sqrt(2) from it, and
    # stay tied after each pick (the centre stays nearer than any other corner): row order wins.
    x = np.array([[0, 0], [1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=np.float32)
    walk = farthest_point_order(x, 5, 0)
    assert walk.order.tolist() == [0, 1, 2, 3, 4]
    again = farthest_point_order(x, 5, 0)
    np.testing.assert_array_equal(again.order, farthest_point_order(x, 5, 0).order)


def test_duplicates_are_never_both_chosen_before_every_distinct_row():
    base = unit_rows(50, 8, 7)
    copies = base[[3, 3, 10, 20, 20, 20]]
    x = np.concatenate([base, copies])  # 56 rows, 50 distinct
    walk = greedy_with_duplicates(x, 56, "random", seed=0)
    first_50 = walk.order[:50]
    assert len({tuple(x[i]) for i in first_50}) == 50, "every distinct row comes before any second copy"
    assert sorted(walk.order.tolist()) == list(range(56))
    np.testing.assert_array_equal(walk.insertion_distance[50:], 0.0)
    assert walk.coverage_radius == 0.0


def test_duplicate_start_row_is_honoured():
    base = unit_rows(20, 4, 8)
    x = np.concatenate([base, base[[5]]])  # row 20 copies row 5
    walk = greedy_with_duplicates(x, 3, 20, seed=0)
    assert walk.order[0] == 20 and 5 not in walk.order[:3]


def test_medoid_start_is_the_row_nearest_the_centroid():
    x = unit_rows(100, 6, 9)
    walk = greedy_with_duplicates(x, 1, "medoid", seed=0)
    centroid = x.mean(0)
    assert walk.order[0] == int(np.argmin(((x - centroid) ** 2).sum(1)))


def test_l2_metric_uses_raw_vectors_and_cosine_normalises():
    x = np.array([[1, 0], [100, 0], [0, 1]], dtype=np.float32)
    l2 = select_hmin(x, HminSettings(k=2, metric="l2", start="0"))
    assert l2.rows.tolist() == [0, 1]
    cosine = select_hmin(x, HminSettings(k=2, metric="cosine", start="0"))
    assert cosine.rows.tolist() == [0, 2]  # rows 0 and 1 point the same way


def test_split_budget_is_proportional_and_exact():
    assert split_budget([50, 30, 20], 10) == [5, 3, 2]
    assert sum(split_budget([7, 5, 3, 1], 9)) == 9
    assert split_budget([1, 1, 100], 3) == [0, 0, 3] or sum(split_budget([1, 1, 100], 3)) == 3
    assert split_budget([2, 2], 4) == [2, 2]


def test_stratified_selection_covers_every_group_in_proportion():
    rng = np.random.default_rng(10)
    x = unit_rows(400, 16, 11)
    groups = np.asarray(["a"] * 200 + ["b"] * 150 + ["c"] * 50, dtype=object)
    rng.shuffle(groups)
    result = select_hmin(x, HminSettings(k=40), groups=groups, stratify=True)
    chosen = groups[result.rows]
    assert (chosen == "a").sum() == 20 and (chosen == "b").sum() == 15 and (chosen == "c").sum() == 5
    assert result.figures["groups_covered"] == 3
    assert len(set(result.rows.tolist())) == 40


def test_selection_beats_random_subset_on_hmin():
    x = unit_rows(1000, 32, 12)
    result = select_hmin(x, HminSettings(k=100, seed=3))
    figures = result.figures
    assert figures["hmin"] > figures["hmin_random"]
    assert figures["coverage_radius"] <= figures["coverage_radius_random"] + 1e-6
    assert figures["hmin"] == pytest.approx(result.columns["dyn_hmin_at"][-1], rel=1e-4)
