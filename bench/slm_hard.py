#!/usr/bin/env python
"""Benchmark of slm-hard scoring (`dyn select --method slm-hard`; DESIGN §4.3): dyn's batched
scorer next to a plain per-row Hugging Face loop computing the same score, and next to the floor —
forward passes alone over the same batches — in one process, on the same model and rows.

Model: a fresh GPT-2 (default the `small` preset: 4 layers, hidden 256, 4 heads) with an output
layer of `--vocab` ids (real small LMs have 32k-50k, which is where the softmax and top-k over the
vocabulary cost the most; the rows are tokenised by a byte-level BPE trained on them); rows: the real instruction mix (prompt -> completion,
scored on the completion). Speed does not depend on the weights, so nothing is trained. Methods:

- forward: the model's forward pass (logits for every position) over dyn's token-budget batches,
  nothing else — the floor, since the score needs one forward pass;
- dyn: `selection.slm_score.score_rows` — the same batches, softmax and top-k only at response
  positions, the median on the batch;
- dyn-bf16: the same with bfloat16 autocast (what `--precision bfloat16` does);
- plain: one row at a time, `model(ids).logits`, `log_softmax` over every position, `topk`
  membership and `numpy.median` per row — what a user writes first.

Reported: rows/s, dyn relative to the forward floor (target >= 0.8) and to the plain loop, and the
largest score difference between dyn and plain (they compute the same number). These machines are
shared and noisy: read the ratios, not the absolute times.

    python bench/slm_hard.py --rows 512 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import DATA, read_jsonl


def build(args):
    """A fresh GPT-2 with a byte-level BPE trained on the rows, and the rows tokenised by dyn."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dyn.core.lm import encode_prompt_response, pad_token_id
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    rows = read_jsonl(DATA / "t0-mix.jsonl.gz", args.rows)
    prompts = [r["prompt"] + "\n" for r in rows]
    responses = [r["completion"] for r in rows]
    tokenizer = train_bpe_tokenizer(prompts + responses, vocab_size=min(args.vocab, 8192))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, n_positions=args.max_length,
                        vocab_size=max(len(tokenizer), args.vocab), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    examples = encode_prompt_response(prompts, responses, tokenizer, args.max_length)
    return model, examples, pad_token_id(tokenizer)


def plain_scores(model, examples, top_k: int) -> np.ndarray:
    """Row by row over the whole sequence, as a user would write it first."""
    scores = np.full(len(examples), np.nan)
    for i, ids in enumerate(examples.input_ids):
        start = max(int(examples.prompt_lengths[i]), 1)
        if examples.response_tokens[i] == 0:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids).unsqueeze(0)).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logits, top_k, dim=-1).indices
        targets = torch.as_tensor(ids[start:])
        positions = torch.arange(start - 1, len(ids) - 1)
        inside = (top[positions] == targets.unsqueeze(1)).any(dim=1)
        losses = -log_probs[positions, targets][inside]
        if len(losses):
            scores[i] = float(np.median(losses.numpy()))
    return scores


def bf16_agreement(full: np.ndarray, half: np.ndarray) -> str:
    """How far bfloat16 autocast moves the scores: relative difference, rank correlation, and the
    overlap of the top 30% each would keep."""
    both = np.isfinite(full) & np.isfinite(half)
    a, b = full[both], half[both]
    relative = np.abs(a - b) / np.maximum(np.abs(a), 1e-12)
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    spearman = float(np.corrcoef(ranks_a, ranks_b)[0, 1])
    keep = max(1, int(0.3 * len(a)))
    overlap = len(set(np.argsort(-a)[:keep].tolist()) & set(np.argsort(-b)[:keep].tolist())) / keep
    return (f"median relative difference {np.median(relative):.1e} (max {relative.max():.1e}), Spearman {spearman:.4f}, "
            f"top-30% overlap {overlap:.1%}, rows scored by one only {int((np.isfinite(full) != np.isfinite(half)).sum())}")


def forward_only(model, rows) -> None:
    with torch.inference_mode():
        for j in range(len(rows.batches)):
            batch = rows.batch(j)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.sum()


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--plain-rows", type=int, default=128, help="rows the plain loop scores (it is slow)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--check-top-k", type=int, default=2000,
                        help="top-k for the agreement checks: an untrained model rarely ranks the true id in its top 10")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dyn.core.lm_batches import plan_row_batches
    from dyn.selection.slm_score import score_rows

    model, examples, pad = build(args)
    rows = plan_row_batches(examples, pad, lambda i: f"row {i}", max(args.batch_tokens, int(examples.lengths.max())))
    n = len(examples)
    tokens = int(examples.lengths.sum())
    results = {}
    results["forward"] = timed(lambda: forward_only(model, rows), args.repeats)
    results["dyn"] = timed(lambda: score_rows(model, rows, args.top_k, "float32"), args.repeats)
    results["dyn-bf16"] = timed(lambda: score_rows(model, rows, args.top_k, "bfloat16"), args.repeats)
    subset = min(args.plain_rows, n)
    plain_examples = type(examples)(examples.input_ids[:subset], examples.prompt_lengths[:subset], examples.response_tokens[:subset],
                                    examples.truncated[:subset])
    start = time.perf_counter()
    plain = plain_scores(model, plain_examples, args.top_k)
    plain_rate = subset / (time.perf_counter() - start)
    plain = plain_scores(model, plain_examples, args.check_top_k)
    full32 = score_rows(model, rows, args.check_top_k, "float32").score
    full16 = score_rows(model, rows, args.check_top_k, "bfloat16").score
    dyn_scores = full32[:subset]
    difference = float(np.nanmax(np.abs(dyn_scores - plain) / np.maximum(np.abs(plain), 1e-12)))
    same_missing = bool(np.array_equal(np.isnan(dyn_scores), np.isnan(plain)))
    bf16 = bf16_agreement(full32, full16)

    print(f"# slm-hard scoring: {n} rows ({tokens} tokens), GPT-2 {args.layers}x{args.hidden}, vocab {model.config.vocab_size}, "
          f"top-{args.top_k}, batch tokens {args.batch_tokens}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("| method | rows/s | vs forward floor | vs plain loop |")
    print("|---|---:|---:|---:|")
    rates = {name: n / seconds for name, seconds in results.items()}
    rates["plain"] = plain_rate
    for name in ("forward", "dyn", "dyn-bf16", "plain"):
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / rates['forward']:.2f} | {rates[name] / plain_rate:.1f}x |")
    print(f"\nAgreement at top-{args.check_top_k}: dyn vs plain on {subset} rows, largest relative score difference "
          f"{difference:.2e}, same unscored rows: {same_missing}; bfloat16 vs float32 on {n} rows: {bf16}")


if __name__ == "__main__":
    main()
