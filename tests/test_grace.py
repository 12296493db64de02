"""GRACE (DESIGN §4.4) against a direct numpy implementation of the formula, plus its invariances,
its splits, a planted good/bad candidate pair, bad input, degenerate-response warnings and the
seeded dense projection."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dyn.core.errors import DataError, UsageError
from dyn.distill.grace import (
    DENSE_CHUNK_COLUMNS,
    DenseRademacherProjection,
    degenerate_response_counts,
    degenerate_response_warnings,
    grace_score,
    heldout_splits,
    rank_candidates,
)


def random_candidate(num_prompts: int, per_prompt: int, dim: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(100, 100 + num_prompts), per_prompt)
    grads = rng.normal(size=(len(ids), dim)) * scale
    # anisotropic, so Σ_tr is far from a multiple of I and the score depends on the directions
    grads *= np.linspace(0.2, 3.0, dim)
    return grads, ids


def naive_grace(grads, ids, nu, splits):
    """The formula written out: loops over splits and rows, explicit inverse."""
    grads = np.asarray(grads, dtype=np.float64)
    dim = grads.shape[1]
    scores = []
    for held in splits:
        sigma_tr = np.zeros((dim, dim))
        sigma_te = np.zeros((dim, dim))
        n_tr = n_te = 0
        for g, pid in zip(grads, ids):
            if pid in set(held.tolist()):
                sigma_te += np.outer(g, g)
                n_te += 1
            else:
                unit = g / np.linalg.norm(g)
                sigma_tr += np.outer(unit, unit)
                n_tr += 1
        sigma_tr /= n_tr
        sigma_te /= n_te
        reg = (1 - nu) * sigma_tr + nu * (np.trace(sigma_tr) / dim) * np.eye(dim)
        scores.append(np.trace(np.linalg.inv(reg) @ sigma_te))
    return float(np.mean(scores)), scores


@pytest.mark.parametrize(
    "num_prompts, per_prompt, dim, nu",
    [
        (30, 4, 8, 0.0),  # d < n: Σ_tr invertible without regularisation
        (30, 4, 8, 1e-3),
        (20, 3, 5, 0.3),
        (12, 2, 40, 1e-3),  # d > n: Σ_tr rank-deficient, ν regularises it
    ],
)
def test_matches_direct_numpy_formula(num_prompts, per_prompt, dim, nu):
    grads, ids = random_candidate(num_prompts, per_prompt, dim, seed=dim)
    result = grace_score(grads, ids, nu=nu, seed=7)
    expected, expected_splits = naive_grace(grads, ids, nu, heldout_splits(ids, seed=7))
    assert result.score == pytest.approx(expected, rel=1e-8)
    np.testing.assert_allclose(result.split_scores, expected_splits, rtol=1e-8)
    assert result.split_std == pytest.approx(np.std(expected_splits, ddof=1), rel=1e-6)
    assert result.num_prompts == num_prompts and result.num_responses == num_prompts * per_prompt
    assert result.dim == dim and result.nu == nu


def test_nu_changes_the_score_and_zero_nu_is_the_plain_inverse():
    grads, ids = random_candidate(30, 4, 8, seed=1)
    plain = grace_score(grads, ids, nu=0.0).score
    regularised = grace_score(grads, ids, nu=1e-3).score
    strong = grace_score(grads, ids, nu=0.5).score
    assert plain != regularised
    # shrinking towards (tr/d)·I moves the score smoothly: ν = 1e-3 stays close to ν = 0
    assert regularised == pytest.approx(plain, rel=1e-2)
    assert abs(strong - plain) > 10 * abs(regularised - plain)


def test_two_parts_match_their_definitions():
    grads, ids = random_candidate(20, 3, 6, seed=2)
    result = grace_score(grads, ids)
    norms, entropies = [], []
    for held in heldout_splits(ids, seed=0):
        te = np.isin(ids, held)
        norms.append(np.linalg.norm(grads[te], axis=1).mean())
        unit = grads[~te] / np.linalg.norm(grads[~te], axis=1, keepdims=True)
        lam = np.linalg.eigvalsh(unit.T @ unit / len(unit))
        p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
        entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert result.heldout_grad_norm == pytest.approx(np.mean(norms), rel=1e-10)
    assert result.spectrum_entropy == pytest.approx(np.mean(entropies), rel=1e-8)


def test_d_greater_than_n_with_zero_nu_raises():
    grads, ids = random_candidate(12, 2, 40, seed=3)
    with pytest.raises(UsageError, match="ν = 0"):
        grace_score(grads, ids, nu=0.0)


def test_zero_nu_with_collinear_gradients_raises_data_error():
    grads, ids = random_candidate(30, 4, 8, seed=4)
    grads[:, -1] = grads[:, 0]  # Σ_tr has rank d−1 however many rows there are
    with pytest.raises(DataError, match="singular"):
        grace_score(grads, ids, nu=0.0)
    assert np.isfinite(grace_score(grads, ids, nu=1e-3).score)


def test_common_scale_scales_scores_by_c_squared_and_keeps_the_ranking():
    candidates = {f"t{k}": random_candidate(20, 4, 10, seed=10 + k, scale=1.0 + k) for k in range(4)}
    # a distinct direction structure per candidate, so the ranking is not just the scale
    candidates["t1"][0][:, :5] *= 0.01
    results = {name: grace_score(g, i) for name, (g, i) in candidates.items()}
    c = 37.5
    scaled = {name: grace_score(g * c, i) for name, (g, i) in candidates.items()}
    for name in results:
        assert scaled[name].score == pytest.approx(c**2 * results[name].score, rel=1e-9)
        assert scaled[name].spectrum_entropy == pytest.approx(results[name].spectrum_entropy, rel=1e-9)
        assert scaled[name].heldout_grad_norm == pytest.approx(c * results[name].heldout_grad_norm, rel=1e-9)
    assert [n for n, _ in rank_candidates(results)] == [n for n, _ in rank_candidates(scaled)]
    assert len({r.score for r in results.values()}) == 4


def test_splits_are_seeded_and_hold_out_ten_percent_of_prompts():
    ids = np.repeat(np.arange(55), 3)
    a, b, other = heldout_splits(ids, seed=5), heldout_splits(ids, seed=5), heldout_splits(ids, seed=6)
    assert len(a) == 10
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))
    assert all(len(held) == 6 for held in a)  # round(5.5) half up
    assert len({tuple(h) for h in a}) == 10  # the splits differ from one another
    grads, _ = random_candidate(55, 3, 6, seed=0)
    first, again = grace_score(grads, ids, seed=5), grace_score(grads, ids, seed=5)
    assert first == again
    assert grace_score(grads, ids, seed=6).score != first.score


def test_splits_depend_on_the_prompt_ids_not_on_row_order():
    grads, ids = random_candidate(25, 4, 6, seed=8)
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = grace_score(grads[perm], ids[perm], seed=3)
    original = grace_score(grads, ids, seed=3)
    assert shuffled.score == pytest.approx(original.score, rel=1e-12)
    np.testing.assert_allclose(shuffled.split_scores, original.split_scores, rtol=1e-12)
    assert shuffled.splits_digest == original.splits_digest
    # prompts with unequal response counts and string ids work the same way
    assert all(
        np.array_equal(x, y) for x, y in zip(heldout_splits(ids, seed=3), heldout_splits(ids[perm][::-1], seed=3))
    )
    string_ids = np.array([f"p{i}" for i in ids])
    assert np.isfinite(grace_score(grads[:-1], string_ids[:-1]).score)


def test_planted_heldout_in_train_span_beats_orthogonal_noise():
    rng = np.random.default_rng(9)
    dim, span, num_prompts, per_prompt = 24, 4, 40, 4
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    inside, outside = basis[:, :span], basis[:, span:]
    ids = np.repeat(np.arange(num_prompts), per_prompt)
    # candidate "good": every response's gradient lies in the same 4-dim subspace
    good = rng.normal(size=(len(ids), span)) @ inside.T
    # candidate "bad": same train-like rows, but the held-out rows of every split are orthogonal noise
    # — planted by giving a tenth of the prompts orthogonal gradients of the same norm
    bad = good.copy()
    odd = np.isin(ids, np.arange(0, num_prompts, 10))
    noise = rng.normal(size=(odd.sum(), dim - span)) @ outside.T
    bad[odd] = noise / np.linalg.norm(noise, axis=1, keepdims=True) * np.linalg.norm(good[odd], axis=1, keepdims=True)
    results = {"bad": grace_score(bad, ids), "good": grace_score(good, ids)}
    assert results["good"].score < results["bad"].score / 10
    assert [name for name, _ in rank_candidates(results)] == ["good", "bad"]
    assert results["good"].spectrum_entropy < np.log(span) + 1e-9


def test_rank_breaks_ties_by_name_and_refuses_different_splits():
    grads, ids = random_candidate(20, 2, 4, seed=11)
    same = grace_score(grads, ids)
    worse = grace_score(grads * 2, ids)
    ranking = rank_candidates({"zeta": same, "alpha": same, "mid": worse})
    assert [name for name, _ in ranking] == ["alpha", "zeta", "mid"]
    with pytest.raises(UsageError, match="different prompts"):
        rank_candidates({"a": same, "b": grace_score(grads, ids, seed=1)})
    with pytest.raises(UsageError, match="different prompts"):
        rank_candidates({"a": same, "b": grace_score(grads, ids, nu=0.01)})


def test_fewer_than_ten_prompts_is_explained():
    grads, ids = random_candidate(9, 4, 4, seed=12)
    with pytest.raises(UsageError, match=r"at least 10 prompts, got 9.*one prompt per split"):
        grace_score(grads, ids)


def test_one_response_per_prompt_is_refused():
    grads, ids = random_candidate(20, 1, 4, seed=13)
    with pytest.raises(UsageError, match=r"G ≥ 2"):
        grace_score(grads, ids)


def test_nan_or_inf_row_is_named():
    grads, ids = random_candidate(15, 2, 4, seed=14)
    grads[17, 2] = np.nan
    with pytest.raises(DataError, match=r"row 17 \(prompt 108\)"):
        grace_score(grads, ids)
    grads[17, 2] = 0.0
    grads[3, 0] = np.inf
    with pytest.raises(DataError, match=r"row 3 "):
        grace_score(grads, ids)


def test_zero_row_mismatched_ids_and_bad_nu_are_refused():
    grads, ids = random_candidate(15, 2, 4, seed=15)
    with pytest.raises(DataError, match="one prompt id per gradient row"):
        grace_score(grads, ids[:-1])
    with pytest.raises(UsageError, match="ν"):
        grace_score(grads, ids, nu=-0.1)
    grads[5] = 0.0
    with pytest.raises(DataError, match=r"row 5 .*all zeros"):
        grace_score(grads, ids)


def test_torch_input_gives_the_same_score():
    grads, ids = random_candidate(15, 2, 4, seed=16)
    from_torch = grace_score(torch.from_numpy(grads).float(), torch.from_numpy(ids))
    assert from_torch.score == pytest.approx(grace_score(grads.astype(np.float32), ids).score, rel=1e-12)


def test_degenerate_responses_are_counted_and_described():
    ids = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    responses = ["a", "a", "", "b", "x", "x", "x", "x", "  ", "ok"]
    truncated = [False, True, False, False, False, False, False, False, False, True]
    counts = degenerate_response_counts(ids, responses, truncated)
    assert (counts.empty, counts.repeated, counts.truncated, counts.prompts_all_identical) == (2, 4, 2, 1)
    lines = degenerate_response_warnings(ids, responses, truncated, candidate="big@0.7")
    assert len(lines) == 4 and all(line.startswith("candidate 'big@0.7':") for line in lines)
    assert "2 of 10 responses (20.0%) are empty" in lines[0]
    assert degenerate_response_warnings([1, 1, 2, 2], ["a", "b", "c", "d"]) == []
    with pytest.raises(DataError, match="aligned"):
        degenerate_response_counts([1, 2], ["a"])


def test_dense_projection_is_the_chunked_matrix_and_pieces_agree():
    total, dim = 2 * DENSE_CHUNK_COLUMNS + 300, 16
    proj = DenseRademacherProjection(total, dim, seed=3)
    x = torch.randn(5, total, generator=torch.Generator().manual_seed(0))
    full = torch.cat([proj.chunk(c) for c in range(proj.num_chunks)], dim=1)
    assert full.shape == (dim, total)
    assert torch.all(full.abs() == 1 / dim**0.5)
    expected = x @ full.T
    torch.testing.assert_close(proj.project(x), expected, rtol=1e-5, atol=1e-4)
    pieces = [x[:, :100], x[:, 100 : DENSE_CHUNK_COLUMNS + 7], x[:, DENSE_CHUNK_COLUMNS + 7 :]]
    torch.testing.assert_close(proj.project(pieces), expected, rtol=1e-5, atol=1e-4)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(DenseRademacherProjection(total, dim, seed=3).chunk(1), proj.chunk(1))
    assert not torch.equal(DenseRademacherProjection(total, dim, seed=4).chunk(1), proj.chunk(1))
    with pytest.raises(UsageError, match="columns"):
        proj.project(x[:, :-1])


def test_dense_projection_is_identical_in_another_process():
    code = (
        "import torch;from dyn.distill.grace import DenseRademacherProjection as P;"
        "p=P(10000,8,seed=11).chunk(1);print(int((p>0).to(torch.int64).flatten()@torch.arange(p.numel())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = DenseRademacherProjection(10000, 8, seed=11).chunk(1)
    assert int(out) == int((here > 0).to(torch.int64).flatten() @ torch.arange(here.numel()))
