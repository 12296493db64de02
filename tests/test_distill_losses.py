"""Distillation losses (distill/losses.py) against brute-force formulas written here in float64
numpy, one position and one vocabulary entry at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX, per_token_losses
from dyn.distill.losses import (
    LOSS_NAMES,
    KDLossSettings,
    distillation_loss,
    kd_token_losses_full,
    kd_token_losses_top_k,
    shift_for_next_token,
)

BATCH, SEQ, VOCAB, K = 3, 6, 13, 5
TEMPERATURES = (0.5, 1.0, 2.0)
# (loss, beta, skew): every divergence, with the β/α endpoints and an interior value.
VARIANTS = [
    ("forward-kl", 0.5, 0.1), ("reverse-kl", 0.5, 0.1), ("tvd", 0.5, 0.1),
    ("jsd", 0.0, 0.1), ("jsd", 0.3, 0.1), ("jsd", 1.0, 0.1),
    ("skew-kl", 0.5, 0.0), ("skew-kl", 0.5, 0.4), ("skew-kl", 0.5, 1.0),
]


# --------------------------------------------------------------------------- brute force

def bf_softmax(z, tau=1.0):
    e = [math.exp(v / tau - max(z) / tau) for v in z]
    return [x / sum(e) for x in e]


def bf_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def bf_divergence(loss, p_t, p_s, beta, skew):
    if loss == "forward-kl":
        return bf_kl(p_t, p_s)
    if loss == "reverse-kl":
        return bf_kl(p_s, p_t)
    if loss == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s))
    if loss == "skew-kl":
        return bf_kl(p_t, [skew * a + (1 - skew) * b for a, b in zip(p_t, p_s)])
    if beta == 0:  # GKD convention at the endpoints
        return bf_kl(p_t, p_s)
    if beta == 1:
        return bf_kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * bf_kl(p_t, m) + (1 - beta) * bf_kl(p_s, m)


def bf_bucket(p, ids):
    """p restricted to `ids`, plus one bucket for everything else."""
    inside = [p[i] for i in ids]
    return inside + [sum(p[j] for j in range(len(p)) if j not in ids)]


def bf_restrict(p, ids):
    inside = [p[i] for i in ids]
    return [x / sum(inside) for x in inside]


def bf_temper(p, tau):
    powered = [x ** (1 / tau) for x in p]
    return [x / sum(powered) for x in powered]


# --------------------------------------------------------------------------- fixtures

def random_batch(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    targets[0, :2] = IGNORE_INDEX          # a prompt
    targets[1, -3:] = IGNORE_INDEX         # padding
    targets[2, :] = IGNORE_INDEX           # a row with no response token
    return student.float(), teacher.float(), targets


def top_k_of(teacher_logits, k, shuffle_seed=None):
    """Cached-teacher view: τ=1 log-probs and ids of the k largest, optionally in shuffled order."""
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    if shuffle_seed is not None:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(shuffle_seed))
        values, ids = values[..., order], ids[..., order]
    return values.float(), ids


def counted_positions(targets):
    return [(b, t) for b in range(targets.shape[0]) for t in range(targets.shape[1]) if targets[b, t] != IGNORE_INDEX]


def kd_of(student, targets, settings, **teacher):
    return distillation_loss(student, targets, settings, **teacher).kd


# --------------------------------------------------------------------------- full vocabulary

@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("loss,beta,skew", VARIANTS)
def test_full_path_matches_brute_force(loss, beta, skew, tau):
    student, teacher, targets = random_batch()
    settings = KDLossSettings(loss=loss, temperature=tau, beta=beta, skew=skew)
    got = kd_of(student, targets, settings, teacher_logits=teacher)
    expected = [
        bf_divergence(loss, bf_softmax(teacher[b, t].tolist(), tau), bf_softmax(student[b, t].tolist(), tau), beta, skew)
        for b, t in counted_positions(targets)
    ]
    assert got.shape == (len(expected),)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["tail", "renormalise"])
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("loss,beta,skew", VARIANTS)
def test_top_k_with_k_equal_to_vocab_equals_full_path(loss, beta, skew, tau, rule):
    student, teacher, targets = random_batch(seed=1)
    settings = KDLossSettings(loss=loss, temperature=tau, beta=beta, skew=skew, outside_top_k=rule)
    log_probs, ids = top_k_of(teacher, VOCAB, shuffle_seed=3)
    top_k = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    full = kd_of(student, targets, settings, teacher_logits=teacher)
    torch.testing.assert_close(top_k, full, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- top-k support

@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("loss,beta,skew", VARIANTS)
def test_renormalise_matches_both_distributions_restricted_to_the_top_k(loss, beta, skew, tau):
    student, teacher, targets = random_batch(seed=2)
    settings = KDLossSettings(loss=loss, temperature=tau, beta=beta, skew=skew, outside_top_k="renormalise")
    log_probs, ids = top_k_of(teacher, K, shuffle_seed=4)
    got = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    expected = []
    for b, t in counted_positions(targets):
        support = ids[b, t].tolist()
        p_t = bf_restrict(bf_softmax(teacher[b, t].tolist(), tau), support)
        p_s = bf_restrict(bf_softmax(student[b, t].tolist(), tau), support)
        expected.append(bf_divergence(loss, p_t, p_s, beta, skew))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("loss,beta,skew", VARIANTS)
def test_tail_bucket_matches_bucketed_full_distributions(loss, beta, skew, tau):
    """Both distributions bucketed at τ = 1 (top-k + one tail bucket), then tempered as (k+1)-way
    distributions. At τ = 1 this is the full distributions bucketed, exactly."""
    student, teacher, targets = random_batch(seed=3)
    settings = KDLossSettings(loss=loss, temperature=tau, beta=beta, skew=skew)
    assert settings.outside_top_k == "tail"  # the default
    log_probs, ids = top_k_of(teacher, K, shuffle_seed=5)
    got = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    expected = []
    for b, t in counted_positions(targets):
        support = ids[b, t].tolist()
        p_t = bf_temper(bf_bucket(bf_softmax(teacher[b, t].tolist()), support), tau)
        p_s = bf_temper(bf_bucket(bf_softmax(student[b, t].tolist()), support), tau)
        expected.append(bf_divergence(loss, p_t, p_s, beta, skew))
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4, atol=1e-5)


def test_tail_rule_charges_student_mass_outside_the_top_k_and_renormalise_does_not():
    student, teacher, targets = random_batch(seed=4)
    log_probs, ids = top_k_of(teacher, K)
    # Raise every logit outside the teacher's top-k: the student moves mass off the support.
    outside = torch.ones_like(student).scatter(-1, ids, 0.0)
    moved = student + 3.0 * outside
    for rule, changes in (("tail", True), ("renormalise", False)):
        settings = KDLossSettings(outside_top_k=rule)
        before = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
        after = kd_of(moved, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
        assert (not torch.allclose(before, after, atol=1e-4)) is changes, rule


def test_exact_teacher_tail_is_used_when_given():
    student, teacher, targets = random_batch(seed=5)
    log_probs, ids = top_k_of(teacher, K)
    settings = KDLossSettings(loss="reverse-kl", temperature=2.0)
    exact_tail = torch.log1p(-log_probs.double().exp().sum(-1)).float()
    implicit = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    explicit = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids,
                     teacher_tail_log_prob=exact_tail)
    torch.testing.assert_close(implicit, explicit, rtol=1e-5, atol=1e-6)
    shifted = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids,
                    teacher_tail_log_prob=exact_tail - 1.0)
    assert not torch.allclose(implicit, shifted)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_teacher_with_no_mass_outside_the_top_k_gives_finite_losses_and_gradients(loss):
    student, _, targets = random_batch(seed=6)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(BATCH * SEQ)]).view(BATCH, SEQ, K)
    log_probs = torch.log_softmax(torch.randn(BATCH, SEQ, K, generator=g), dim=-1)  # sums to 1: no tail
    student.requires_grad_(True)
    result = distillation_loss(student, targets, KDLossSettings(loss=loss, beta=0.5, skew=0.3),
                               teacher_log_probs=log_probs, teacher_ids=ids)
    assert torch.isfinite(result.per_token).all()
    result.mean().backward()
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------- properties

@pytest.mark.parametrize("rule", ["tail", "renormalise"])
@pytest.mark.parametrize("loss,beta,skew", VARIANTS)
def test_student_equal_to_teacher_gives_zero(loss, beta, skew, rule):
    _, teacher, targets = random_batch(seed=7)
    settings = KDLossSettings(loss=loss, temperature=1.5, beta=beta, skew=skew, outside_top_k=rule)
    full = kd_of(teacher, targets, settings, teacher_logits=teacher)
    log_probs, ids = top_k_of(teacher, K)
    top_k = kd_of(teacher, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    assert full.abs().max() < 1e-5 and top_k.abs().max() < 1e-5
    if (loss, skew) != ("skew-kl", 1.0):  # skew 1 is 0 for every student
        assert kd_of(teacher * 0.3, targets, settings, teacher_logits=teacher).max() > 1e-3


@pytest.mark.parametrize("beta", [0.0, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6, 1.0])
def test_jsd_is_non_negative_and_finite(beta):
    for seed in range(3):
        student, teacher, targets = random_batch(seed=10 + seed, scale=4.0)
        for temperature in TEMPERATURES:
            settings = KDLossSettings(loss="jsd", beta=beta, temperature=temperature)
            log_probs, ids = top_k_of(teacher, K)
            for teacher_args in ({"teacher_logits": teacher}, {"teacher_log_probs": log_probs, "teacher_ids": ids}):
                kd = kd_of(student, targets, settings, **teacher_args)
                assert torch.isfinite(kd).all() and (kd >= -1e-6).all()


def test_jsd_endpoints_are_forward_and_reverse_kl_and_interior_tends_to_zero():
    student, teacher, targets = random_batch(seed=8)

    def kd(**kw):
        return kd_of(student, targets, KDLossSettings(**kw), teacher_logits=teacher)

    torch.testing.assert_close(kd(loss="jsd", beta=0.0), kd(loss="forward-kl"))
    torch.testing.assert_close(kd(loss="jsd", beta=1.0), kd(loss="reverse-kl"))
    assert kd(loss="jsd", beta=1e-6).max() < 1e-4  # the raw formula vanishes at the ends
    torch.testing.assert_close(kd(loss="skew-kl", skew=0.0), kd(loss="forward-kl"))
    assert torch.equal(kd(loss="skew-kl", skew=1.0), torch.zeros(len(counted_positions(targets))))


# --------------------------------------------------------------------------- masking, mixing, reduction

@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_prompt_and_padding_positions_change_nothing(loss):
    student, teacher, targets = random_batch(seed=9)
    log_probs, ids = top_k_of(teacher, K)
    settings = KDLossSettings(loss=loss, alpha=0.6)
    masked = targets == IGNORE_INDEX
    student_a = student.clone().requires_grad_(True)
    base = distillation_loss(student_a, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    base.mean().backward()
    assert (student_a.grad[masked] == 0).all() and student_a.grad[~masked].abs().sum() > 0

    student_b = student.clone()
    student_b[masked] = float("nan")
    log_probs_b, ids_b = log_probs.clone(), ids.clone()
    log_probs_b[masked] = 0.0
    ids_b[masked] = 0
    other = distillation_loss(student_b, targets, settings, teacher_log_probs=log_probs_b, teacher_ids=ids_b)
    assert torch.equal(base.per_token.detach(), other.per_token)

    changed = student.clone()
    changed[~masked] *= 1.5
    assert not torch.allclose(base.per_token.detach(), distillation_loss(
        changed, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids).per_token)


def test_compact_teacher_layout_equals_batch_layout():
    student, teacher, targets = random_batch(seed=11)
    log_probs, ids = top_k_of(teacher, K)
    counted = targets != IGNORE_INDEX
    settings = KDLossSettings(loss="jsd", temperature=2.0)
    batch = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
    compact = kd_of(student, targets, settings, teacher_log_probs=log_probs[counted], teacher_ids=ids[counted])
    assert torch.equal(batch, compact)


def test_alpha_mixes_kd_with_the_label_cross_entropy_of_core_lm():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 7, VOCAB, generator=g)
    teacher = torch.randn(2, 7, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 7), generator=g)
    labels[:, :3] = IGNORE_INDEX  # §4.5 labels: prompt masked, not yet shifted
    student, targets = shift_for_next_token(logits, labels)
    teacher_aligned, _ = shift_for_next_token(teacher, labels)

    reference_ce = per_token_losses(logits, labels)[labels[:, 1:] != IGNORE_INDEX]
    labels_only = distillation_loss(student, targets, KDLossSettings(alpha=0.0))  # no teacher needed
    torch.testing.assert_close(labels_only.per_token, reference_ce)
    assert labels_only.kd is None

    kd_only = distillation_loss(student, targets, KDLossSettings(alpha=1.0), teacher_logits=teacher_aligned)
    mixed = distillation_loss(student, targets, KDLossSettings(alpha=0.3), teacher_logits=teacher_aligned)
    torch.testing.assert_close(mixed.per_token, 0.3 * kd_only.per_token + 0.7 * reference_ce)
    torch.testing.assert_close(mixed.label_ce, reference_ce)


def test_mean_is_over_counted_tokens_and_row_means_per_row():
    student, teacher, targets = random_batch(seed=13)
    result = distillation_loss(student, targets, KDLossSettings(alpha=0.5), teacher_logits=teacher)
    per_token = result.per_token.tolist()
    positions = counted_positions(targets)
    assert result.mean().item() == pytest.approx(sum(per_token) / len(positions), rel=1e-6)
    rows = result.row_means()
    for b in range(BATCH):
        mine = [v for v, (row, _) in zip(per_token, positions) if row == b]
        if mine:
            assert rows[b].item() == pytest.approx(sum(mine) / len(mine), rel=1e-6)
        else:
            assert math.isnan(rows[b].item())
    assert math.isnan(rows[2].item())  # the fixture's row with no response token


# --------------------------------------------------------------------------- τ = 0

def test_zero_temperature_is_cross_entropy_on_the_teacher_argmax():
    student, teacher, targets = random_batch(seed=14)
    log_probs, ids = top_k_of(teacher, K, shuffle_seed=6)  # argmax not in the first column
    expected = []
    for b, t in counted_positions(targets):
        p_s = bf_softmax(student[b, t].tolist())
        expected.append(-math.log(p_s[int(teacher[b, t].argmax())]))
    for loss in ("forward-kl", "tvd"):  # whatever the divergence
        settings = KDLossSettings(loss=loss, temperature=0.0)
        top_k = kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids)
        full = kd_of(student, targets, settings, teacher_logits=teacher)
        np.testing.assert_allclose(top_k.numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(full.numpy(), expected, rtol=1e-5)


def test_losses_are_float32_from_bfloat16_inputs():
    student, teacher, targets = random_batch(seed=15)
    log_probs, ids = top_k_of(teacher, K)
    got = kd_of(student.bfloat16(), targets, KDLossSettings(), teacher_log_probs=log_probs.bfloat16(), teacher_ids=ids.int())
    assert got.dtype == torch.float32
    reference = kd_of(student.bfloat16().float(), targets, KDLossSettings(),
                      teacher_log_probs=log_probs.bfloat16().float(), teacher_ids=ids)
    torch.testing.assert_close(got, reference)


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,words", [
    ({"loss": "kld"}, "unknown distillation loss"),
    ({"beta": 1.5}, "--beta"),
    ({"skew": -0.1}, "--skew"),
    ({"alpha": 2.0}, "--alpha"),
    ({"temperature": -1.0}, "--temperature"),
    ({"temperature": float("nan")}, "--temperature"),
    ({"outside_top_k": "drop"}, "outside the top-k"),
])
def test_bad_settings_are_usage_errors(kwargs, words):
    with pytest.raises(UsageError, match=words):
        KDLossSettings(**kwargs)


def test_aliases():
    assert KDLossSettings(loss="kl").loss == "forward-kl"
    assert KDLossSettings(outside_top_k="renormalize").outside_top_k == "renormalise"


def test_bad_teacher_inputs():
    student, teacher, targets = random_batch(seed=16)
    settings = KDLossSettings()
    flat = student[targets != IGNORE_INDEX]
    too_many = torch.zeros(flat.shape[0], VOCAB + 1)
    with pytest.raises(UsageError, match=r"top-k \(14\) is larger than the student's vocabulary \(13\)"):
        kd_token_losses_top_k(flat, too_many, torch.zeros_like(too_many, dtype=torch.long), settings)
    log_probs, ids = top_k_of(teacher, K)
    with pytest.raises(DataError, match="outside the student's vocabulary"):
        kd_of(student, targets, settings, teacher_log_probs=log_probs, teacher_ids=ids + VOCAB)
    with pytest.raises(UsageError, match="needs a teacher"):
        distillation_loss(student, targets, settings)
    with pytest.raises(UsageError, match="fit neither"):
        kd_of(student, targets, settings, teacher_log_probs=log_probs[:, :2], teacher_ids=ids[:, :2])
    with pytest.raises(UsageError, match="teacher vocabulary"):
        kd_token_losses_full(flat, torch.zeros(flat.shape[0], VOCAB + 2), settings)


def test_a_nan_teacher_logit_gives_a_nan_loss_not_a_silent_zero():
    import math

    import torch

    from dyn.distill.losses import KDLossSettings, kd_token_losses_full

    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    teacher[1, 2] = float("nan")
    losses = kd_token_losses_full(student, teacher, KDLossSettings())
    assert math.isnan(losses[1].item()) and torch.isfinite(losses[[0, 2]]).all()
