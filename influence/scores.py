"""From per-checkpoint numbers to scores: dot or cosine against the anchors, anchor groups, the
checkpoint-weighted sum, and anchor statistics (DESIGN §4.2).

    score(z) = max_G Σ_c η_c · s_c(z, G)

s_c(z, G) is ⟨Γ_c(∇ℓ(z; θ_c)), ḡ_{c,G}⟩ for `--similarity dot` (ḡ_{c,G}: the mean anchor gradient of
group G) and, for `--similarity cosine`, the mean over anchors a in G of cos(Γ_c(∇ℓ(z)), ∇ℓ(a)) —
LESS's form. Without `--anchor-group-field` there is one group and the max is the identity. The
anchors go through the same function, so their scores are comparable with the rows'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIMILARITIES = ("dot", "cosine")


@dataclass
class CheckpointScores:
    """One checkpoint's s_c for every row and anchor, (rows, groups) and (anchors, groups); NaN
    where a row has no response token."""

    step: int
    weight: float
    rows: np.ndarray
    anchors: np.ndarray


@dataclass
class CombinedScores:
    """The weighted, group-maximised scores, per checkpoint columns and anchor statistics."""

    rows: np.ndarray
    anchors: np.ndarray
    per_checkpoint: dict = field(default_factory=dict)
    anchor_stats: dict = field(default_factory=dict)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero, NaN rows stay NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def group_means(features: np.ndarray, groups: np.ndarray, names: list) -> np.ndarray:
    """(groups, D): the mean of the rows of each named group (rows with NaN left out)."""
    out = np.zeros((len(names), features.shape[1]), dtype=np.float64)
    finite = np.isfinite(features).all(axis=1)
    for g, name in enumerate(names):
        members = features[(groups == name) & finite]
        if len(members):
            out[g] = members.astype(np.float64).mean(axis=0)
    return out


def feature_scores(row_features: np.ndarray, anchor_centres: np.ndarray, similarity: str) -> np.ndarray:
    """s(z, G) from features: ⟨f_z, centre_G⟩, with unit f_z for cosine (the centres of unit anchor
    features then make it the group's mean cosine)."""
    x = row_features.astype(np.float64)
    if similarity == "cosine":
        x = unit_rows(x)
    return x @ anchor_centres.T


def combine(checkpoints: list[CheckpointScores]) -> CombinedScores:
    """Σ_c η_c s_c, then the max over anchor groups; per checkpoint, its own s_c (max over groups)."""
    total_rows = sum(c.weight * c.rows for c in checkpoints)
    total_anchors = sum(c.weight * c.anchors for c in checkpoints)
    combined = CombinedScores(rows=_group_max(total_rows), anchors=_group_max(total_anchors))
    for c in checkpoints:
        combined.per_checkpoint[c.step] = _group_max(c.rows)
        combined.anchor_stats[c.step] = {"weight": c.weight, **describe(_group_max(c.anchors))}
    combined.anchor_stats["combined"] = describe(combined.anchors)
    return combined


def _group_max(x: np.ndarray) -> np.ndarray:
    """Max over the group axis; NaN when the row has no score."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] == 1:
        return x[:, 0].copy()
    out = np.full(x.shape[0], np.nan)
    scored = np.isfinite(x).any(axis=1)
    out[scored] = np.nanmax(x[scored], axis=1)
    return out


def describe(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"count": 0}
    return {"count": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


@dataclass
class KeepRule:
    """Which scored rows to keep: score ≥ threshold (default: the mean anchor score), or the top
    `k` / `fraction` of the scored rows."""

    k: int | None = None
    fraction: float | None = None
    threshold: float | None = None

    def describe(self) -> str:
        if self.k is not None:
            return f"top {self.k}"
        if self.fraction is not None:
            return f"top fraction {self.fraction}"
        if self.threshold is not None:
            return f"score >= {self.threshold}"
        return "score >= mean anchor score"


def keep_rows(scores: np.ndarray, anchor_scores: np.ndarray, rule: KeepRule) -> tuple[np.ndarray, float | None]:
    """Positions of the kept rows, best first (ties: smaller position first), and the threshold
    used (None for -k/--fraction). Rows without a score are never kept."""
    scored = np.flatnonzero(np.isfinite(scores))
    order = scored[np.lexsort((scored, -scores[scored]))]
    if rule.k is not None:
        return order[: rule.k], None
    if rule.fraction is not None:
        return order[: max(1, int(round(rule.fraction * len(scored))))] if len(scored) else order, None
    threshold = rule.threshold
    if threshold is None:
        finite = anchor_scores[np.isfinite(anchor_scores)]
        threshold = float(finite.mean())
    return order[scores[order] >= threshold], float(threshold)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for telling `positive` rows from the rest (ties count
    half): the probability a random positive outscores a random negative."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
