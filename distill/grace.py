"""GRACE: rank candidate teachers for a student from the student's gradients on their responses,
without training the student (DESIGN §4.4).

"In Good GRACEs: Principled Teacher Selection for Knowledge Distillation", Panigrahi et al.,
ICLR 2026. For one candidate teacher (a teacher at one sampling temperature) the input is, for n
prompts with G responses each, the student's per-response gradient at its initial weights,
projected to d dims: a matrix of N ≈ n·G rows g_i and each row's prompt id. Then, over 10 random
prompt-level splits that hold out 10% of the prompts:

    Σ_tr = (1/|tr|) Σ_{i∈tr} ĝ_i ĝ_iᵀ          ĝ = g/‖g‖   (train part, unit-normalised)
    Σ_te = (1/|te|) Σ_{j∈te} g_j g_jᵀ                      (held-out part, raw)
    Σ̃    = (1−ν) Σ_tr + ν (tr Σ_tr / d) I                  ν = 1e-3
    score = tr(Σ̃⁻¹ Σ_te) = (1/|te|) Σ_{j∈te} g_jᵀ Σ̃⁻¹ g_j

and GRACE is the mean score over the splits; **lower is better**. Why: a held-out gradient that is
large (the student has much to learn from this teacher, and the steps it would take are large) or
that points where the train gradients rarely go (the teacher's responses are not diverse enough to
cover the directions the student will meet: a leave-out generalisation gap) makes the score large.
The score therefore trades off the size of the gradients against the spread of their directions;
we report the two parts as the mean held-out gradient norm and the spectrum entropy of Σ_tr.

Choices made here:
- Splits hold out prompts, never single responses, so the G responses to a prompt are always on the
  same side. A split is derived from the sorted unique prompt ids and the seed alone (each prompt's
  place in split s is a hash of (seed, s, prompt id)), never from row order, so every candidate
  scored on the same prompts with the same seed gets the same splits, and shuffling rows changes
  nothing but rounding. Held out per split: round(10% of the prompts), at least one.
- Everything is float64. Σ̃⁻¹ is never formed: Σ̃ = LLᵀ (Cholesky) and the score is
  ‖L⁻¹ G_teᵀ‖²_F / |te|.
- Since ĝ is unit-normalised, tr Σ_tr = 1 and Σ_tr does not change when all gradients are scaled
  by c; Σ_te scales by c², so scores scale by c² and rankings are invariant.
- d > |tr| makes Σ_tr rank-deficient; ν > 0 regularises it. With ν = 0 and d larger than the
  number of train responses of some split, Σ̃ is singular and `grace_score` raises `UsageError`
  (it never returns inf); with ν = 0 and a Σ_tr that is singular for another reason (repeated or
  collinear gradients) the Cholesky factorisation fails and it raises `DataError`.
- An all-zero gradient row (an empty response) has no direction to normalise: `DataError`, drop
  such rows first (and count them with `degenerate_response_counts`).

`DenseRademacherProjection` projects flattened gradients to d dims with a seeded dense ±1/√d
matrix generated chunk by chunk (the plain alternative to the factored projection of
`influence.projection`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dyn.core.errors import DataError, UsageError
from dyn.influence.projection import rademacher

DEFAULT_NU = 1e-3
DEFAULT_NUM_SPLITS = 10
HOLDOUT_FRACTION = 0.1
MIN_PROMPTS = 10  # one held-out prompt per split at 10%
MIN_RESPONSES_PER_PROMPT = 2


@dataclass(frozen=True)
class GraceResult:
    """One candidate's GRACE (`score`, lower is better) and what it is made of."""

    score: float
    split_scores: tuple[float, ...]
    split_std: float  # sample standard deviation of the per-split scores (0 for one split)
    heldout_grad_norm: float  # mean ‖g‖ over the held-out responses, averaged over splits
    spectrum_entropy: float  # −Σ p log p of Σ_tr's eigenvalues p = λ/Σλ (nats), averaged over splits
    num_prompts: int
    num_responses: int
    dim: int
    nu: float
    seed: int
    splits_digest: str  # identifies the held-out prompt sets: equal for comparable candidates

    def to_dict(self) -> dict:
        out = asdict(self)
        out["split_scores"] = list(self.split_scores)
        return out


# --- input checks -----------------------------------------------------------------------------


def as_float64_matrix(gradients) -> np.ndarray:
    """A (N, d) float64 numpy copy of a numpy array or torch tensor (any device)."""
    if isinstance(gradients, torch.Tensor):
        gradients = gradients.detach().to("cpu", torch.float64).numpy()
    matrix = np.asarray(gradients, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise DataError(f"GRACE needs a non-empty (responses × dims) gradient matrix, got shape {matrix.shape}")
    return matrix


def as_prompt_ids(prompt_ids, num_rows: int) -> np.ndarray:
    """A 1-D array of integer or string prompt ids, one per gradient row."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.cpu().numpy()
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or len(ids) != num_rows:
        raise DataError(f"GRACE needs one prompt id per gradient row: {num_rows} rows but prompt ids of shape {ids.shape}")
    if ids.dtype.kind not in "iuUS":
        raise UsageError(f"prompt ids must be integers or strings, got dtype {ids.dtype}")
    return ids


def check_finite_rows(gradients: np.ndarray, prompt_ids: np.ndarray) -> None:
    """DataError naming the first row with a NaN or inf, or with no direction (all zeros)."""
    bad = np.flatnonzero(~np.isfinite(gradients).all(axis=1))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"gradient row {row} (prompt {prompt_ids[row]}) has NaN or inf values ({len(bad)} such rows in all)"
        )
    zero = np.flatnonzero(~gradients.any(axis=1))
    if len(zero):
        row = int(zero[0])
        raise DataError(
            f"gradient row {row} (prompt {prompt_ids[row]}) is all zeros, so it has no direction to "
            f"unit-normalise ({len(zero)} such rows in all): drop empty responses before scoring"
        )


def check_prompt_counts(prompt_ids: np.ndarray) -> None:
    """UsageError unless there are at least 10 prompts and G ≥ 2 responses per prompt."""
    unique, counts = np.unique(prompt_ids, return_counts=True)
    if len(unique) < MIN_PROMPTS:
        raise UsageError(
            f"GRACE needs at least {MIN_PROMPTS} prompts, got {len(unique)}: it holds out "
            f"{HOLDOUT_FRACTION:.0%} of the prompts in each of {DEFAULT_NUM_SPLITS} splits, so it needs "
            f"at least {MIN_PROMPTS} to hold out one prompt per split (hundreds give a stable score)"
        )
    if counts.max() < MIN_RESPONSES_PER_PROMPT:
        raise UsageError(
            f"GRACE needs at least {MIN_RESPONSES_PER_PROMPT} responses per prompt (G ≥ 2), but every "
            f"prompt has 1 (prompt {unique[0]}, …): generate several responses per prompt"
        )


def check_nu(nu: float) -> float:
    if not (0.0 <= nu <= 1.0):
        raise UsageError(f"GRACE's regularisation ν must lie in [0, 1], got {nu}")
    return float(nu)


# --- splits -------------------------------------------------------------------------------------


def heldout_count(num_prompts: int) -> int:
    """Prompts held out per split: 10% rounded half up, at least one."""
    return max(1, math.floor(num_prompts * HOLDOUT_FRACTION + 0.5))


def split_keys(unique_ids: np.ndarray, seed: int, split: int) -> np.ndarray:
    """A pseudo-random uint64 per prompt for split `split`, from (seed, split, prompt id) only."""
    digests = b"".join(
        hashlib.blake2b(f"{seed}\x00{split}\x00{pid}".encode(), digest_size=8).digest() for pid in unique_ids.tolist()
    )
    return np.frombuffer(digests, dtype="<u8")


def heldout_splits(prompt_ids, *, seed: int = 0, num_splits: int = DEFAULT_NUM_SPLITS) -> list[np.ndarray]:
    """For each split, the sorted held-out prompt ids: the 10% of the sorted unique ids with the
    smallest keys (ties, practically impossible, go to the smaller id). Row order plays no part."""
    unique = np.unique(np.asarray(prompt_ids))
    count = heldout_count(len(unique))
    splits = []
    for split in range(num_splits):
        order = np.argsort(split_keys(unique, seed, split), kind="stable")
        splits.append(np.sort(unique[order[:count]]))
    return splits


def splits_digest(splits: Sequence[np.ndarray], nu: float, dim: int) -> str:
    """A short digest of the held-out sets, ν and d: candidates are comparable when theirs agree."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"nu={nu!r};dim={dim}".encode())
    for held in splits:
        h.update(("\x1f".join(str(p) for p in held.tolist()) + "\x1e").encode())
    return h.hexdigest()


# --- one split ----------------------------------------------------------------------------------


def unit_rows(gradients: torch.Tensor) -> torch.Tensor:
    return gradients / gradients.norm(dim=1, keepdim=True)


def train_covariance(train_unit: torch.Tensor) -> torch.Tensor:
    """Σ_tr = mean of ĝĝᵀ (d×d)."""
    return train_unit.T @ train_unit / train_unit.shape[0]


def regularised(train_cov: torch.Tensor, nu: float) -> torch.Tensor:
    """Σ̃ = (1−ν) Σ_tr + ν (tr Σ_tr / d) I."""
    dim = train_cov.shape[0]
    ridge = nu * torch.trace(train_cov) / dim
    return (1.0 - nu) * train_cov + ridge * torch.eye(dim, dtype=train_cov.dtype)


def whitened_heldout_energy(reg_cov: torch.Tensor, heldout: torch.Tensor, split: int) -> float:
    """tr(Σ̃⁻¹ Σ_te) = ‖L⁻¹ G_teᵀ‖²_F / |te| with Σ̃ = LLᵀ."""
    chol, info = torch.linalg.cholesky_ex(reg_cov)
    if int(info) != 0:
        raise DataError(
            f"GRACE split {split}: the regularised train covariance is singular (the train gradients "
            f"span fewer than d = {reg_cov.shape[0]} directions); use ν > 0"
        )
    whitened = torch.linalg.solve_triangular(chol, heldout.T, upper=False)
    return float(whitened.square().sum() / heldout.shape[0])


def spectrum_entropy(train_unit: torch.Tensor) -> float:
    """−Σ p log p of the eigenvalues p = λ/Σλ of Σ_tr, computed on the smaller of ĜᵀĜ and ĜĜᵀ
    (the same non-zero eigenvalues)."""
    rows, dim = train_unit.shape
    gram = train_unit @ train_unit.T if rows < dim else train_unit.T @ train_unit
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    p = eigenvalues / eigenvalues.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@dataclass(frozen=True)
class SplitScore:
    score: float
    heldout_grad_norm: float
    spectrum_entropy: float


def score_split(train: torch.Tensor, heldout: torch.Tensor, nu: float, split: int) -> SplitScore:
    """One split's tr(Σ̃⁻¹ Σ_te) and its two parts."""
    train_unit = unit_rows(train)
    reg_cov = regularised(train_covariance(train_unit), nu)
    return SplitScore(
        score=whitened_heldout_energy(reg_cov, heldout, split),
        heldout_grad_norm=float(heldout.norm(dim=1).mean()),
        spectrum_entropy=spectrum_entropy(train_unit),
    )


# --- the score ----------------------------------------------------------------------------------


def check_nu_zero_rank(splits: Sequence[np.ndarray], prompt_ids: np.ndarray, dim: int) -> None:
    """With ν = 0, Σ_tr must be full rank, so every split needs at least d train responses."""
    fewest_train = min(int((~np.isin(prompt_ids, held)).sum()) for held in splits)
    if fewest_train < dim:
        raise UsageError(
            f"GRACE with ν = 0 needs at least d = {dim} train responses per split to invert Σ_tr, "
            f"but a split has only {fewest_train}: use ν > 0 (default {DEFAULT_NU}) or project to fewer dims"
        )


def grace_score(
    gradients,
    prompt_ids,
    *,
    nu: float = DEFAULT_NU,
    seed: int = 0,
    num_splits: int = DEFAULT_NUM_SPLITS,
) -> GraceResult:
    """GRACE of one candidate from its (N, d) projected per-response student gradients and the
    (N,) prompt id of each row. Lower is better. See the module docstring for the formula."""
    nu = check_nu(nu)
    if num_splits < 1:
        raise UsageError(f"GRACE needs at least one split, got {num_splits}")
    matrix = as_float64_matrix(gradients)
    ids = as_prompt_ids(prompt_ids, matrix.shape[0])
    check_prompt_counts(ids)
    check_finite_rows(matrix, ids)
    splits = heldout_splits(ids, seed=seed, num_splits=num_splits)
    dim = matrix.shape[1]
    if nu == 0.0:
        check_nu_zero_rank(splits, ids, dim)

    rows = torch.from_numpy(matrix)
    per_split = []
    for split, held in enumerate(splits):
        is_heldout = torch.from_numpy(np.isin(ids, held))
        per_split.append(score_split(rows[~is_heldout], rows[is_heldout], nu, split))

    scores = np.array([s.score for s in per_split])
    return GraceResult(
        score=float(scores.mean()),
        split_scores=tuple(float(s) for s in scores),
        split_std=float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
        heldout_grad_norm=float(np.mean([s.heldout_grad_norm for s in per_split])),
        spectrum_entropy=float(np.mean([s.spectrum_entropy for s in per_split])),
        num_prompts=len(np.unique(ids)),
        num_responses=int(matrix.shape[0]),
        dim=dim,
        nu=nu,
        seed=int(seed),
        splits_digest=splits_digest(splits, nu, dim),
    )


def rank_candidates(results: Mapping[str, GraceResult]) -> list[tuple[str, GraceResult]]:
    """Candidates best first: lower GRACE first, ties broken by name. UsageError when they were not
    scored on the same held-out prompts with the same ν and d (their scores would not compare)."""
    if not results:
        raise UsageError("no candidates to rank")
    digests = {name: r.splits_digest for name, r in results.items()}
    if len(set(digests.values())) > 1:
        first, *_ = sorted(digests)
        other = next(n for n in sorted(digests) if digests[n] != digests[first])
        raise UsageError(
            f"candidates {first!r} and {other!r} were scored on different prompts, seeds, ν or dims; "
            f"GRACE compares candidates only on the same prompt splits"
        )
    return sorted(results.items(), key=lambda item: (item[1].score, item[0]))


# --- degenerate candidates ----------------------------------------------------------------------


@dataclass(frozen=True)
class DegenerateCounts:
    """How many of a candidate's responses are empty, repeated within their prompt, or truncated."""

    num_responses: int
    empty: int  # blank after stripping whitespace
    repeated: int  # non-empty and identical to an earlier response to the same prompt
    truncated: int  # flagged by the caller (hit the token limit)
    prompts_all_identical: int  # prompts (with ≥ 2 responses) whose non-empty responses are all one text


def degenerate_response_counts(prompt_ids, responses: Sequence[str], truncated=None) -> DegenerateCounts:
    """Count degenerate responses; rows are aligned: prompt_ids[i], responses[i], truncated[i]."""
    ids = list(np.asarray(prompt_ids).tolist())
    if len(ids) != len(responses) or (truncated is not None and len(truncated) != len(responses)):
        raise DataError(
            f"degenerate-response check needs aligned rows: {len(ids)} prompt ids, {len(responses)} responses"
            + ("" if truncated is None else f", {len(truncated)} truncation flags")
        )
    by_prompt: dict = defaultdict(list)
    for pid, text in zip(ids, responses):
        by_prompt[pid].append(text)
    empty = repeated = all_identical = 0
    for texts in by_prompt.values():
        non_empty = [t for t in texts if t.strip()]
        empty += len(texts) - len(non_empty)
        distinct = Counter(non_empty)
        repeated += len(non_empty) - len(distinct)
        if len(texts) >= 2 and len(non_empty) >= 2 and len(distinct) == 1:
            all_identical += 1
    return DegenerateCounts(
        num_responses=len(responses),
        empty=empty,
        repeated=repeated,
        truncated=0 if truncated is None else int(np.count_nonzero(np.asarray(truncated, dtype=bool))),
        prompts_all_identical=all_identical,
    )


def degenerate_warnings(counts: DegenerateCounts, candidate: str = "") -> list[str]:
    """One human-readable line per kind of degenerate response that occurs (none: an empty list)."""
    who = f"candidate {candidate!r}: " if candidate else ""
    total = counts.num_responses

    def share(k: int) -> str:
        return f"{k} of {total} responses ({k / total:.1%})" if total else f"{k} responses"

    lines = []
    if counts.empty:
        lines.append(f"{who}{share(counts.empty)} are empty")
    if counts.repeated:
        lines.append(f"{who}{share(counts.repeated)} repeat an earlier response to the same prompt")
    if counts.prompts_all_identical:
        lines.append(f"{who}{counts.prompts_all_identical} prompts got the same response every time")
    if counts.truncated:
        lines.append(f"{who}{share(counts.truncated)} were truncated at the token limit")
    return lines


def degenerate_response_warnings(prompt_ids, responses: Sequence[str], truncated=None, candidate: str = "") -> list[str]:
    """`degenerate_warnings(degenerate_response_counts(...))` in one call."""
    return degenerate_warnings(degenerate_response_counts(prompt_ids, responses, truncated), candidate)


# --- dense projection ---------------------------------------------------------------------------

DENSE_CHUNK_COLUMNS = 8192  # part of the matrix's definition: changing it changes P


class DenseRademacherProjection:
    """P (dim × total_size) with entries ±1/√dim, so E[PᵀP] = I and projected inner products are
    unbiased. Column chunk c = [c·8192, (c+1)·8192) of P is `projection.rademacher(dim, width, seed,
    f"{key}#chunk{c}")`, drawn from a CPU torch.Generator seeded by (seed, key, c): the same in every
    process and on every device, and never more than one chunk is held at a time."""

    def __init__(self, total_size: int, dim: int, seed: int, key: str = "dense"):
        if total_size < 1 or dim < 1:
            raise UsageError(f"a dense projection needs positive sizes, got {total_size} → {dim}")
        self.total_size = int(total_size)
        self.dim = int(dim)
        self.seed = int(seed)
        self.key = key
        self.num_chunks = math.ceil(self.total_size / DENSE_CHUNK_COLUMNS)

    def chunk(self, index: int) -> torch.Tensor:
        """Columns [index·8192, …) of P: a (dim × width) float32 CPU tensor."""
        start = index * DENSE_CHUNK_COLUMNS
        width = min(DENSE_CHUNK_COLUMNS, self.total_size - start)
        return rademacher(self.dim, width, self.seed, f"{self.key}#chunk{index}")

    def project(self, flat) -> torch.Tensor:
        """(B, total_size) → (B, dim); `flat` may also be a sequence of (B, D_i) pieces of the
        flattened gradient in order (Σ D_i = total_size), so it never has to be concatenated."""
        pieces = [flat] if isinstance(flat, torch.Tensor) else list(flat)
        if sum(p.shape[-1] for p in pieces) != self.total_size:
            raise UsageError(
                f"dense projection built for {self.total_size} columns, got {sum(p.shape[-1] for p in pieces)}"
            )
        first = pieces[0]
        out_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        out = torch.zeros(first.shape[0], self.dim, dtype=out_dtype, device=first.device)
        offset, held_index, held = 0, -1, None
        for piece in pieces:
            col = 0
            while col < piece.shape[-1]:
                index, within = divmod(offset + col, DENSE_CHUNK_COLUMNS)
                if index != held_index:
                    held_index, held = index, self.chunk(index).to(device=first.device, dtype=out_dtype)
                width = min(piece.shape[-1] - col, held.shape[1] - within)
                out += piece[:, col : col + width].to(out_dtype) @ held[:, within : within + width].T
                col += width
            offset += piece.shape[-1]
        return out
