"""Distillation losses between a student's next-token distribution and a teacher's, computed in
float32 over the teacher's cached top-k support (or over the full vocabulary when the teacher's
logits are at hand), mixed with the label cross-entropy (DESIGN §4.4, §4.5).

Layout. Inputs are aligned to targets: `student_logits[b, t]` (batch, seq, vocab) predicts
`targets[b, t]` (batch, seq), which holds the target token id, or IGNORE_INDEX (-100) at prompt
and padding positions. `shift_for_next_token` turns a causal LM's logits and §4.5 labels into this
layout. Only counted positions (targets != IGNORE_INDEX) are ever computed on, so whatever sits at
the others (even NaN) changes neither the loss nor its gradient. Teacher tensors come either in
the same layout, (batch, seq, k), or compact, (n, k): one entry per counted position in row-major
order, which is how a teacher cache stores response tokens.

Distributions. p_T is the teacher's, p_S the student's, both at temperature τ over a support:

    full vocabulary    p = softmax(logits / τ)
    top-k support S    the teacher's k cached ids; the mass outside S by one of two rules:
      "tail" (default) k+1 buckets: the k ids and one bucket for everything else, each
                       distribution bucketed at τ = 1 and then tempered as a (k+1)-way
                       distribution. Teacher: softmax([log p_T(S), log(1 − Σ_S p_T)] / τ), the
                       tail from the cached log-probs (or given exactly); student:
                       softmax([z_S, logsumexp(z outside S)] / τ). Exact at τ = 1; at τ ≠ 1 the
                       tail is tempered as if it were one token (the cache does not hold the
                       tail's shape), the same way on both sides, so a student equal to the
                       teacher still scores 0. The student's mass outside S costs loss.
      "renormalise"    k buckets: teacher log_softmax(log p_T(S) / τ), student
                       log_softmax(z_S / τ), both restricted to S. Exact for the teacher at every
                       τ, but blind to how much mass the student puts outside S.
    When k equals the vocabulary there is no outside, and both rules equal the full path.

Divergences (per counted token, summed over the support):

    forward-kl (alias kl)  KL(p_T ‖ p_S) = Σ p_T (log p_T − log p_S)
    reverse-kl             KL(p_S ‖ p_T) = Σ p_S (log p_S − log p_T)
    jsd  (beta β)          M = β p_T + (1−β) p_S (probabilities mixed, not log-probabilities),
                           JSD_β = β KL(p_T ‖ M) + (1−β) KL(p_S ‖ M) for 0 < β < 1. The endpoints
                           follow the GKD convention (Agarwal et al. 2024; TRL's GKDTrainer):
                           β = 0 is forward KL and β = 1 is reverse KL, each computed exactly
                           (the raw formula would give 0 there).
    skew-kl (skew α)       KL(p_T ‖ α p_T + (1−α) p_S) (DistiLLM); α = 0 is forward KL, α = 1 is 0.
    tvd                    ½ Σ |p_T − p_S|

A teacher probability of exactly 0 (a tail the cache rounded to nothing) contributes 0 where it
weights a term; where it is divided by (reverse KL) its log is floored at LOG_PROB_FLOOR, so the
loss stays finite. τ = 0 means the teacher's argmax labels: the KD term is the student's
cross-entropy (at τ = 1) on the teacher's top-1 id, whatever the divergence. No τ² factor.

Mixing. per-token loss = α·KD + (1−α)·CE, CE being the student's cross-entropy on `targets` at
τ = 1 (exactly `core.lm.per_token_losses`). α = 1 needs no labels beyond the mask; α = 0 needs no
teacher. The trainer passes α·w(t), w(t) the schedule's KD weight (`distill/schedules.py`).
Reduction: `DistillLoss.mean()` over counted tokens; `row_means()` per batch row (NaN for a row
with no counted token), so a NaN can be reported by row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX

LOSS_NAMES = ("forward-kl", "reverse-kl", "jsd", "skew-kl", "tvd")
LOSS_ALIASES = {"kl": "forward-kl"}
OUTSIDE_TOP_K_RULES = ("tail", "renormalise")
OUTSIDE_TOP_K_ALIASES = {"renormalize": "renormalise"}
DEFAULT_OUTSIDE_TOP_K = "tail"
# log of float32's smallest normal number: a zero teacher probability's log where it divides.
LOG_PROB_FLOOR = math.log(1.1754943508222875e-38)


@dataclass(frozen=True)
class KDLossSettings:
    """What the distillation loss computes; every value checked when built (UsageError).

    `loss`: one of LOSS_NAMES (or "kl"). `temperature`: τ ≥ 0 (0 = teacher argmax labels).
    `beta`: JSD's β in [0, 1]. `skew`: skew KL's α in [0, 1] (named `skew` so it is never
    confused with the mixing weight). `outside_top_k`: "tail" or "renormalise". `alpha`: weight
    of the KD term against the label cross-entropy, in [0, 1].
    """

    loss: str = "forward-kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    outside_top_k: str = DEFAULT_OUTSIDE_TOP_K
    alpha: float = 1.0

    def __post_init__(self):
        loss = LOSS_ALIASES.get(self.loss, self.loss)
        if loss not in LOSS_NAMES:
            raise UsageError(f"unknown distillation loss {self.loss!r}; choose one of: {', '.join(LOSS_NAMES)}")
        rule = OUTSIDE_TOP_K_ALIASES.get(self.outside_top_k, self.outside_top_k)
        if rule not in OUTSIDE_TOP_K_RULES:
            raise UsageError(
                f"unknown rule for the mass outside the top-k {self.outside_top_k!r}; "
                f"choose one of: {', '.join(OUTSIDE_TOP_K_RULES)}"
            )
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "outside_top_k", rule)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be a finite number >= 0 (0 = teacher argmax labels), got {self.temperature}")
        for name in ("beta", "skew", "alpha"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0):
                raise UsageError(f"--{name} must lie in [0, 1], got {value}")


@dataclass
class DistillLoss:
    """Per-token losses at the counted positions of a batch, in row-major order.

    `per_token` (n,): α·KD + (1−α)·CE; `kd` / `label_ce` (n,): the two parts (None when their
    weight is 0); `row_index` (n,): the batch row of each token; `batch_size`: rows in the batch.
    """

    per_token: "torch.Tensor"
    kd: "torch.Tensor | None"
    label_ce: "torch.Tensor | None"
    row_index: "torch.Tensor"
    batch_size: int

    def mean(self):
        """Mean over counted tokens (NaN when the batch counts none)."""
        return self.per_token.mean()

    def row_means(self):
        """Each row's mean over its own counted tokens, (batch,); NaN for a row with none."""
        import torch

        totals = torch.zeros(self.batch_size, dtype=self.per_token.dtype, device=self.per_token.device)
        counts = torch.zeros_like(totals)
        totals = totals.index_add(0, self.row_index, self.per_token)
        counts = counts.index_add(0, self.row_index, torch.ones_like(self.per_token))
        return torch.where(counts > 0, totals / counts.clamp_min(1), torch.full_like(totals, float("nan")))


def shift_for_next_token(logits, labels):
    """A causal LM's (batch, seq, vocab) logits and §4.5 labels (batch, seq) -> the aligned layout:
    logits[:, :-1] predicting targets labels[:, 1:] (the shift of `core.lm.per_token_losses`)."""
    return logits[:, :-1, :], labels[:, 1:]


def next_token_targets(labels):
    """§4.5 labels (batch, seq) -> targets (batch, seq) aligned with a causal LM's unshifted
    logits: targets[:, t] = labels[:, t+1], IGNORE_INDEX at the last position. The same counted
    entries, in the same order, as `shift_for_next_token`, so the losses are identical; but the
    logits are used whole, so their gradient skips the slice's backward (a zero-filled copy of the
    (batch, seq, vocab) gradient)."""
    import torch

    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def distillation_loss(student_logits, targets, settings: KDLossSettings, *, teacher_log_probs=None,
                      teacher_ids=None, teacher_tail_log_prob=None, teacher_logits=None) -> DistillLoss:
    """The mixed distillation loss of a batch (see the module doc for the layout and formulas).

    Give the teacher as its cached top-k (`teacher_log_probs` (…, k) τ=1 log-probabilities with
    `teacher_ids` (…, k), optionally `teacher_tail_log_prob` (…,) the exact log of the mass
    outside them) or as full `teacher_logits` (…, vocab); `…` is (batch, seq) or compact (n,).
    No teacher is needed when settings.alpha is 0.
    """
    import torch

    if student_logits.dim() != 3:
        raise UsageError(f"student logits must be (batch, seq, vocab), got shape {tuple(student_logits.shape)}")
    if tuple(targets.shape) != tuple(student_logits.shape[:2]):
        raise UsageError(f"targets {tuple(targets.shape)} do not match student logits {tuple(student_logits.shape)}")
    counted = targets != IGNORE_INDEX
    positions = counted.nonzero(as_tuple=False)
    row_index = positions[:, 0]
    student = student_logits[counted].float()
    labels = targets[counted]

    alpha = settings.alpha
    kd = label_ce = None
    if alpha > 0:
        if teacher_logits is not None:
            if teacher_log_probs is not None or teacher_ids is not None:
                raise UsageError("give the teacher as top-k log-probabilities or as full logits, not both")
            kd = kd_token_losses_full(student, _counted(teacher_logits, counted, "teacher logits"), settings)
        elif teacher_log_probs is not None and teacher_ids is not None:
            tail = None if teacher_tail_log_prob is None else _counted(teacher_tail_log_prob, counted, "teacher tail", trailing=0)
            kd = kd_token_losses_top_k(
                student, _counted(teacher_log_probs, counted, "teacher log-probs"),
                _counted(teacher_ids, counted, "teacher ids"), settings, teacher_tail_log_prob=tail,
            )
        else:
            raise UsageError("the KD term (alpha > 0) needs a teacher: top-k log-probabilities with ids, or logits")
    if alpha < 1:
        label_ce = torch.nn.functional.cross_entropy(student, labels, reduction="none")
    if kd is None:
        per_token = label_ce
    elif label_ce is None:
        per_token = kd
    else:
        per_token = alpha * kd + (1 - alpha) * label_ce
    return DistillLoss(per_token, kd, label_ce, row_index, int(student_logits.shape[0]))


def _counted(tensor, counted, what: str, trailing: int = 1):
    """`tensor` at the counted positions: from the (batch, seq, …) layout, or already compact."""
    lead = tuple(tensor.shape[: tensor.dim() - trailing])
    if lead == tuple(counted.shape):
        return tensor[counted]
    n = int(counted.sum())
    if lead == (n,):
        return tensor
    raise UsageError(
        f"{what} of shape {tuple(tensor.shape)} fit neither the batch {tuple(counted.shape)} "
        f"nor the {n} counted positions"
    )


# --------------------------------------------------------------------------- per-token KD terms

def kd_token_losses_top_k(student_logits, teacher_log_probs, teacher_ids, settings: KDLossSettings,
                          teacher_tail_log_prob=None):
    """KD loss of each position over the teacher's top-k support, (n,).

    `student_logits` (n, vocab); `teacher_log_probs` (n, k) τ=1 log-probabilities of the ids in
    `teacher_ids` (n, k), distinct within a row; `teacher_tail_log_prob` (n,), the log of the
    teacher's mass outside them, else taken as log(1 − Σ exp(teacher_log_probs)).
    """
    import torch

    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    if teacher_log_probs.shape != teacher_ids.shape:
        raise UsageError(f"teacher log-probs {tuple(teacher_log_probs.shape)} and ids {tuple(teacher_ids.shape)} differ in shape")
    if k > vocab:
        raise UsageError(f"top-k ({k}) is larger than the student's vocabulary ({vocab})")
    if k < 1:
        raise UsageError("the teacher's top-k support is empty (k = 0)")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise UsageError(f"teacher token ids must be integers, got {teacher_ids.dtype}")
    teacher_ids = teacher_ids.long()
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab):
        raise DataError(f"teacher token ids outside the student's vocabulary [0, {vocab}) (a cache for another tokenizer?)")
    teacher_log_probs = teacher_log_probs.detach().float()

    if settings.temperature == 0:
        top1 = teacher_ids.gather(-1, teacher_log_probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
        return torch.nn.functional.cross_entropy(student_logits.float(), top1, reduction="none")

    teacher_logp, student_logp = top_k_log_distributions(
        student_logits, teacher_log_probs, teacher_ids, settings.temperature, settings.outside_top_k,
        teacher_tail_log_prob,
    )
    return divergence(teacher_logp, student_logp, settings)


def kd_token_losses_full(student_logits, teacher_logits, settings: KDLossSettings):
    """KD loss of each position over the full vocabulary, (n,): `student_logits` and
    `teacher_logits` (n, vocab). The reference the top-k path equals when k = vocab."""
    import torch

    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise UsageError(
            f"teacher vocabulary ({teacher_logits.shape[-1]}) differs from the student's ({student_logits.shape[-1]})"
        )
    teacher_logits = teacher_logits.detach().float()
    if settings.temperature == 0:
        return torch.nn.functional.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1), reduction="none")
    tau = settings.temperature
    teacher_logp = torch.log_softmax(teacher_logits / tau, dim=-1)
    student_logp = torch.log_softmax(student_logits.float() / tau, dim=-1)
    return divergence(teacher_logp, student_logp, settings)


def top_k_log_distributions(student_logits, teacher_log_probs, teacher_ids, temperature: float,
                            outside_top_k: str = DEFAULT_OUTSIDE_TOP_K, teacher_tail_log_prob=None):
    """(teacher, student) log-distributions at `temperature` over the top-k support, each (n, k)
    under "renormalise" or (n, k+1) under "tail" (the last column is the outside bucket).
    When k equals the vocabulary the tail is empty and dropped (both rules agree)."""
    import torch

    tau = float(temperature)
    teacher_log_probs = teacher_log_probs.float()
    k, vocab = teacher_ids.shape[-1], student_logits.shape[-1]
    if outside_top_k == "renormalise" or k == vocab:
        teacher_logp = torch.log_softmax(teacher_log_probs / tau, dim=-1)
        student_logp = torch.log_softmax(student_logits.float().gather(-1, teacher_ids) / tau, dim=-1)
        return teacher_logp, student_logp

    if teacher_tail_log_prob is None:
        inside = torch.logsumexp(teacher_log_probs, dim=-1)
        teacher_tail_log_prob = torch.log((-torch.expm1(inside)).clamp_min(0.0))
    teacher_buckets = torch.cat([teacher_log_probs, teacher_tail_log_prob.float().unsqueeze(-1)], dim=-1)
    teacher_logp = torch.log_softmax(teacher_buckets / tau, dim=-1)

    inside, outside = student_top_k_and_outside(student_logits.float(), teacher_ids)
    student_logp = torch.log_softmax(torch.cat([inside, outside], dim=-1) / tau, dim=-1)
    return teacher_logp, student_logp


# Rows whose outside sum, shifted by the row's overall max, falls below this are recomputed shifted
# by the outside max (exp of the outside entries would otherwise lose precision or underflow).
_OUTSIDE_SUM_FLOOR = 2.0 ** -60


def student_top_k_and_outside(student_logits, teacher_ids):
    """(z_S (n, k), logsumexp of z outside S (n, 1)) for float32 `student_logits` (n, vocab) and
    the teacher's ids (n, k), with their gradient.

    The same numbers as `gather` and `logsumexp(z.scatter(-1, ids, -inf))`, in fewer passes over
    the (n, vocab) logits (the top-k path's cost on a CPU): one exp forward, none backward (the
    outside softmax is kept), no copy with -inf written in, no zero-filled gather gradient.
    Each row is shifted by its overall max; rows whose outside sum would fall below
    `_OUTSIDE_SUM_FLOOR` are redone shifted by the outside max, as logsumexp does."""
    return _TopKAndOutside.apply(student_logits, teacher_ids)


def _make_top_k_and_outside():
    import torch

    class TopKAndOutside(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, ids):
            inside = logits.gather(-1, ids)
            shift = logits.amax(dim=-1, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            weights = torch.sub(logits, shift).exp_()
            weights.scatter_(-1, ids, 0.0)
            total = weights.sum(dim=-1, keepdim=True)
            low = (total < _OUTSIDE_SUM_FLOOR).squeeze(-1).nonzero().squeeze(-1)
            if low.numel():  # a peaked row: shift by the outside max instead
                rows = logits.index_select(0, low).scatter(-1, ids.index_select(0, low), float("-inf"))
                row_shift = rows.amax(dim=-1, keepdim=True)
                row_shift = torch.where(torch.isfinite(row_shift), row_shift, torch.zeros_like(row_shift))
                row_weights = torch.sub(rows, row_shift).exp_()
                weights.index_copy_(0, low, row_weights)
                total.index_copy_(0, low, row_weights.sum(dim=-1, keepdim=True))
                shift = shift.index_copy(0, low, row_shift)
            ctx.save_for_backward(weights, total, ids)
            return inside, total.log() + shift

        @staticmethod
        def backward(ctx, grad_inside, grad_outside):
            weights, total, ids = ctx.saved_tensors
            grad = weights * (grad_outside / total) if grad_outside is not None else torch.zeros_like(weights)
            if grad_inside is not None:
                grad.scatter_add_(-1, ids, grad_inside)
            return grad, None

    return TopKAndOutside


class _LazyFunction:
    """The autograd Function, built on first use (torch is imported inside functions here)."""

    def __init__(self, make):
        self.make, self.function = make, None

    def apply(self, *args):
        if self.function is None:
            self.function = self.make()
        return self.function.apply(*args)


_TopKAndOutside = _LazyFunction(_make_top_k_and_outside)


# --------------------------------------------------------------------------- divergences

def divergence(teacher_logp, student_logp, settings: KDLossSettings):
    """The divergence `settings.loss` between two log-distributions over the same support, (n,)."""
    if settings.loss == "forward-kl":
        return forward_kl(teacher_logp, student_logp)
    if settings.loss == "reverse-kl":
        return reverse_kl(teacher_logp, student_logp)
    if settings.loss == "jsd":
        return generalized_jsd(teacher_logp, student_logp, settings.beta)
    if settings.loss == "skew-kl":
        return skew_kl(teacher_logp, student_logp, settings.skew)
    return total_variation(teacher_logp, student_logp)


def _kl(logp, logq):
    """KL(p ‖ q) over the last axis from log-probabilities; terms with p = 0 are 0 (with finite
    gradients, which a plain p·(log p − log q) would not give). A NaN in p stays NaN, so a broken
    teacher shows as a non-finite loss instead of a silent 0."""
    import torch

    p = logp.exp()
    present = p != 0
    safe_logp = torch.where(present, logp, torch.zeros_like(logp))
    terms = torch.where(present, p * (safe_logp - logq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def forward_kl(teacher_logp, student_logp):
    """KL(p_T ‖ p_S) per position."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(teacher_logp, student_logp):
    """KL(p_S ‖ p_T) per position; a zero teacher probability counts as exp(LOG_PROB_FLOOR)."""
    return _kl(student_logp, teacher_logp.clamp_min(LOG_PROB_FLOOR))


def _log_mixture(teacher_logp, student_logp, weight: float):
    """log(w·p_T + (1−w)·p_S) for 0 < w < 1, in log space."""
    import torch

    return torch.logaddexp(teacher_logp + math.log(weight), student_logp + math.log1p(-weight))


def generalized_jsd(teacher_logp, student_logp, beta: float):
    """β KL(p_T ‖ M) + (1−β) KL(p_S ‖ M), M = β p_T + (1−β) p_S; β = 0 forward KL, β = 1
    reverse KL (the GKD convention, see the module doc)."""
    if beta == 0:
        return forward_kl(teacher_logp, student_logp)
    if beta == 1:
        return reverse_kl(teacher_logp, student_logp)
    log_m = _log_mixture(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


def skew_kl(teacher_logp, student_logp, skew: float):
    """KL(p_T ‖ α p_T + (1−α) p_S) with α = `skew`; α = 0 forward KL, α = 1 exactly 0."""
    if skew == 0:
        return forward_kl(teacher_logp, student_logp)
    if skew == 1:
        return student_logp[..., 0] * 0.0  # exactly 0, still attached to the student's graph
    return _kl(teacher_logp, _log_mixture(teacher_logp, student_logp, skew))


def total_variation(teacher_logp, student_logp):
    """½ Σ |p_T − p_S| per position."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(dim=-1)
