"""The slm-hard score of each row: the median of a small LM's per-token losses over the row's
"learnable" tokens (DESIGN §4.3; SALT, Rawat et al., arXiv 2410.18779).

A response token is learnable when its true id is among the small LM's `top_k` highest logits at
that position (ties with the k-th logit count as in). A row's score is the median of the
cross-entropies of its learnable tokens (numpy's median: the mean of the two middle values for an
even count); a row with no learnable token gets NaN and no score. High scores mark rows that are
hard for the small model yet within its reach.

Only response tokens count (prompt and padding carry label -100, as everywhere in dyn: core.lm).
Where the model takes `logits_to_keep` (Hugging Face causal LMs do), its output layer runs only at
the positions that predict a response token of some row in the batch, so the vocabulary-wide
logits of prompt tokens are never formed: with long prompts and a large vocabulary that is most of
a plain forward pass's memory traffic. The softmax and top-k then run only at response positions.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX, response_logits

DEFAULT_TOP_K = 10


@dataclass
class SlmScores:
    """Per row, aligned with the tokenised rows: the score (NaN: no learnable token), how many
    response tokens were learnable, and how many response tokens were scored."""

    score: np.ndarray
    learnable_tokens: np.ndarray
    tokens: np.ndarray


def learnable_token_losses(logits, targets, top_k: int):
    """(losses, learnable, counted, finite), each shaped like `targets` (batch, positions), where
    `logits[:, p]` predicts `targets[:, p]` (IGNORE_INDEX: not counted): float32 cross-entropy at
    the counted positions, whether the true id is in the top_k there, which positions count, and
    whether the loss there is finite. Losses are +inf outside the learnable positions (so a sort
    puts them last)."""
    import torch

    counted = targets != IGNORE_INDEX
    losses = torch.full(targets.shape, float("inf"), dtype=torch.float32, device=logits.device)
    learnable = torch.zeros_like(counted)
    finite = torch.ones_like(counted)
    if not counted.any():
        return losses, learnable, counted, finite
    picked = logits[counted].float()
    true_ids = targets[counted]
    true_logit = picked.gather(1, true_ids.unsqueeze(1)).squeeze(1)
    kth_logit = picked.topk(top_k, dim=1).values[:, -1]
    in_top_k = true_logit >= kth_logit
    token_loss = torch.logsumexp(picked, dim=1) - true_logit
    losses[counted] = torch.where(in_top_k, token_loss, torch.full_like(token_loss, float("inf")))
    learnable[counted] = in_top_k
    finite[counted] = torch.isfinite(token_loss)
    return losses, learnable, counted, finite


def median_of_learnable(losses, learnable):
    """Each row's median over its learnable positions (mean of the two middle values for an even
    count); NaN for a row with none. `losses` holds +inf elsewhere, so sorting puts them last."""
    import torch

    if losses.shape[1] == 0:
        return torch.full(losses.shape[:1], float("nan"), dtype=losses.dtype, device=losses.device)
    ordered = losses.sort(dim=1).values
    count = learnable.sum(dim=1)
    low = ((count - 1).clamp_min(0) // 2).unsqueeze(1)
    high = (count // 2).clamp_max(max(losses.shape[1] - 1, 0)).unsqueeze(1)
    middle = (ordered.gather(1, low) + ordered.gather(1, high)).squeeze(1) / 2
    return torch.where(count > 0, middle, torch.full_like(middle, float("nan")))


def batch_scores(model, batch: dict, top_k: int, autocast_dtype=None) -> tuple[np.ndarray, ...]:
    """(score, learnable tokens, tokens, has a non-finite loss) for the rows of one collated batch
    (core.lm)."""
    import torch

    device_type = batch["input_ids"].device.type
    context = torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with torch.inference_mode():
        with context:
            logits, next_labels = response_logits(model, batch)
        losses, learnable, counted, finite = learnable_token_losses(logits, next_labels, top_k)
        score = median_of_learnable(losses, learnable)
    return (score.cpu().numpy().astype(np.float64), learnable.sum(1).cpu().numpy(), counted.sum(1).cpu().numpy(),
            (~finite).any(1).cpu().numpy())


def score_rows(model, rows, top_k: int, precision: str = "float32") -> SlmScores:
    """Score every tokenised row (`core.lm_batches.RowBatches`), batches shared out over the ranks;
    every rank gets all scores. A non-finite logit names its row."""
    import torch

    from dyn.core.lm_batches import map_batches

    output_layer = model.get_output_embeddings()
    if output_layer is not None and top_k > output_layer.weight.shape[0]:
        raise UsageError(f"--top-k {top_k}: larger than the small LM's vocabulary ({output_layer.weight.shape[0]} ids)")
    autocast_dtype = torch.bfloat16 if precision == "bfloat16" else None
    model.eval()

    results = map_batches(rows, lambda j, batch: batch_scores(model, batch, top_k, autocast_dtype),
                          "scoring with the small LM")
    n = len(rows)
    out = SlmScores(np.full(n, np.nan), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    non_finite = np.zeros(n, dtype=bool)
    for positions, (score, learnable, tokens, bad) in zip(rows.batches, results):
        out.score[positions], out.learnable_tokens[positions], out.tokens[positions] = score, learnable, tokens
        non_finite[positions] = bad
    if non_finite.any():
        first = int(np.flatnonzero(non_finite)[0])
        raise DataError(f"{rows.where(first)}: the small LM's loss is not finite there (NaN or inf logits); check the model")
    return out
