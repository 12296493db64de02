"""The fused top-k/outside split of the KD loss (`distill.losses.student_top_k_and_outside`, made
for speed, see docs/benchmarks.md "distillation: dyn distill trainer") against the plain formula it
replaced, values and gradients, including rows so peaked that the outside underflows; and a smoke
run of bench/distill.py's arms on a few rows."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from dyn.distill.losses import student_top_k_and_outside


def _plain(logits, ids):
    inside = logits.gather(-1, ids)
    outside = torch.logsumexp(logits.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return inside, outside


@pytest.mark.parametrize("peaked", [False, True])
def test_fused_outside_equals_scatter_logsumexp(peaked):
    generator = torch.Generator().manual_seed(0)
    n, vocab, k = 64, 300, 8
    logits = torch.randn(n, vocab, generator=generator) * 3
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(n)])
    if peaked:  # top-k far above the rest: outside/overall < 2**-60 for half the rows, or exp underflows
        logits[: n // 2].scatter_(-1, ids[: n // 2], 150.0)
        logits[: n // 4].scatter_(-1, ids[: n // 4], 1000.0)
    weights_in = torch.randn(n, k, generator=generator)
    weights_out = torch.randn(n, 1, generator=generator)
    results = []
    for fn in (student_top_k_and_outside, _plain):
        x = logits.clone().requires_grad_()
        inside, outside = fn(x, ids)
        ((inside * weights_in).sum() + (outside * weights_out).sum()).backward()
        results.append((inside.detach(), outside.detach(), x.grad))
    (fi, fo, fg), (pi, po, pg) = results
    assert torch.equal(fi, pi)
    assert torch.isfinite(fo).all() and torch.isfinite(fg).all()
    torch.testing.assert_close(fo, po, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fg, pg, rtol=1e-5, atol=1e-7)


def test_fused_outside_keeps_nan():
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    _, outside = student_top_k_and_outside(logits, torch.tensor([[0, 1], [0, 1]]))
    assert torch.isfinite(outside[0]).all() and torch.isnan(outside[1]).all()


def test_bench_distill_smoke(tmp_path, monkeypatch, capsys):
    """Every dyn arm of the benchmark runs through the library on a few rows (TRL skipped) and
    reports a rate, both ratios, the cache's 6k + 4 bytes per token and a finite final loss."""
    path = Path(__file__).resolve().parents[1] / "bench" / "distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["distill.py", "--rows", "24", "--steps", "4", "--warmup-steps", "1",
                                      "--repeats", "1", "--teacher", "tiny", "--teacher-steps", "2",
                                      "--vocab-size", "300", "--top-k", "4", "--max-length", "128",
                                      "--arms", "cached,online,plain", "--no-memory", "--workdir", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    for name in ("dyn distill, cached teacher", "dyn distill, online teacher", "dyn train, plain CE (no teacher)"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert float(row.split("|")[2]) > 0, row
    assert re.search(r"cached / online = \d+\.\d+", out) and re.search(r"cached / plain CE = \d+\.\d+", out)
    assert "(6k+4 = 28)" in out
    for arm in ("cached", "online", "plain"):
        loss = re.search(rf"^{arm}: first step .*, final loss ([0-9.e+-]+),", out, re.M)
        assert loss and math.isfinite(float(loss.group(1))), out


@pytest.mark.parametrize("teacher_kind", ["top-k", "logits"])
def test_unshifted_logits_give_identical_losses_and_gradients(teacher_kind):
    """`DistillObjective` uses the logits whole with `next_token_targets` (for speed); the losses
    and gradients are bit-identical to the `shift_for_next_token` layout."""
    from dyn.distill.losses import KDLossSettings, distillation_loss, next_token_targets, shift_for_next_token

    generator = torch.Generator().manual_seed(1)
    batch, seq, vocab, k = 3, 9, 50, 5
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[:, :3] = -100
    labels[2, 6:] = -100
    logits = torch.randn(batch, seq, vocab, generator=generator)
    teacher_logits = torch.randn(batch, seq, vocab, generator=generator)
    n = int((labels[:, 1:] != -100).sum())
    top = torch.randn(n, vocab, generator=generator).log_softmax(-1).topk(k, dim=-1)
    settings = KDLossSettings(alpha=0.7)
    results = []
    for shifted in (True, False):
        x = logits.clone().requires_grad_()
        if shifted:
            student, targets = shift_for_next_token(x, labels)
            teacher = teacher_logits[:, :-1]
        else:
            student, targets, teacher = x, next_token_targets(labels), teacher_logits
        inputs = {"teacher_logits": teacher} if teacher_kind == "logits" else {"teacher_log_probs": top.values, "teacher_ids": top.indices}
        rows = distillation_loss(student, targets, settings, **inputs).row_means()
        rows.sum().backward()
        results.append((rows.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
