#!/usr/bin/env python
"""Benchmark of GRACE's gradient pass (`dyn teachers rank`): dyn's batched projected path next to
the plain way, in one process, on the same student and responses (DESIGN §4.4, §6).

Student: a fresh GPT-2 (default: the `tiny` preset's shape, 2 layers, hidden 64, 2 heads, with a
byte-level BPE trained on the rows; `--layers/--hidden/--heads/--vocab` change it). Speed does not
depend on the weights, so nothing is trained. Candidates: for each of n GSM8K train questions, G
responses (candidate c takes the gold answers of questions i, i+c+1, …, so candidates differ but
all are real text) — the n×G (prompt, response) rows of one candidate, the loss on the response.
Methods, each producing the (n·G) × d matrix of projected per-response gradients ÷ √D, then the
same `grace_score`:

- plain: the definition done the obvious way — batch size 1, autograd, the full flattened
  gradient (D numbers), a dense seeded ±1/√d Rademacher projection of every buffer of 16 rows;
  the d × D matrix is generated once and held in memory, its generation NOT charged (the fairest
  case for the plain way);
- plain, regenerating (first candidate only): the same, with `grace.DenseRademacherProjection.project`
  regenerating the matrix chunk by chunk at every buffer (what keeps memory bounded when d × D
  does not fit: TRAK's CPU scheme);
- dyn dense (`--projection rademacher`): the same matrix, per-sample gradients materialised from
  layer hooks for a whole token-budget batch at once (one forward, one activation backward);
- forward only (the floor, first candidate): the same batches without any gradient;
- dyn factored (the default): per-layer LoGra projections of the hooks' per-token factors (no
  per-sample gradient formed), then the dense d × K second stage.

The score check compares like with like: dyn dense against plain (the same projection matrix)
must agree to 1e-3 relative; dyn factored is another projection of the same gradients, so its
score differs by projection noise (reported, not checked). Reported per candidate: seconds for
the n·G gradients, rows/s and speed relative to plain. Also the GRACE scoring time itself.
These machines are shared and noisy: read the ratios, not the absolute times.

    python bench/grace.py --threads 1                         # 64 prompts x G=4, 2 candidates, d = 512
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from benchlib import DATA, now, read_jsonl


def build(args):
    """The student, each candidate's examples and prompt ids, and the padding id."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dyn.core.lm import encode_prompt_response, pad_token_id
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    rows = read_jsonl(DATA / "gsm8k-train.jsonl", args.prompts + args.g * args.candidates + 8)
    tokenizer = train_bpe_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], args.vocab, model_max_length=args.max_length)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, n_positions=512, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    candidates = []
    for c in range(args.candidates):
        prompts, responses, ids = [], [], []
        for i in range(args.prompts):
            for g in range(args.g):
                source = i if g == 0 else i + g * (c + 1)
                prompts.append(rows[i]["question"] + "\n")
                responses.append(rows[source]["answer"])
                ids.append(i)
        candidates.append((encode_prompt_response(prompts, responses, tokenizer, args.max_length), np.asarray(ids)))
    return model, candidates, pad_token_id(tokenizer)


def plain_way(model, params, examples, pad, matrix, interval: int = 16) -> torch.Tensor:
    """Batch size 1, full flattened gradient, dense projection of every `interval` gradients."""
    from dyn.influence.exact import exact_row_gradients

    scale = 1.0 / math.sqrt(params.numel)
    out, buffer = [], []
    for i in range(len(examples)):
        buffer.append(exact_row_gradients(model, params, examples.batch([i], pad))[1])
        if len(buffer) == interval or i == len(examples) - 1:
            out.append(torch.cat(buffer) @ matrix.T * scale)
            buffer = []
    return torch.cat(out)


def plain_way_regenerating(model, params, examples, pad, dense, interval: int = 16) -> torch.Tensor:
    """The plain way with `grace.DenseRademacherProjection.project`, which regenerates the matrix
    chunk by chunk at every call so that it never holds more than one chunk (bounded memory)."""
    from dyn.influence.exact import exact_row_gradients

    scale = 1.0 / math.sqrt(params.numel)
    out, buffer = [], []
    for i in range(len(examples)):
        buffer.append(exact_row_gradients(model, params, examples.batch([i], pad))[1])
        if len(buffer) == interval or i == len(examples) - 1:
            out.append(dense.project(torch.cat(buffer)) * scale)
            buffer = []
    return torch.cat(out)


def dyn_way(gradients, examples, pad, batch_tokens: int) -> torch.Tensor:
    """dyn's path: token-budget batches (`core.lm_batches`), `GraceGradients.batch` on each."""
    from dyn.core.embeddings import plan_batches

    out = torch.zeros(len(examples), gradients.projection.dim)
    for positions in plan_batches(examples.lengths, max_tokens=batch_tokens, max_rows=64):
        out[positions] = gradients.batch(examples.batch(positions, pad)).features.detach()
    return out


def dyn_floor(model, examples, pad, batch_tokens: int) -> None:
    """The same batches, forward only (no gradient): what any per-sample gradient costs at least."""
    from dyn.core.embeddings import plan_batches
    from dyn.influence.losses import batch_row_losses

    with torch.no_grad():
        for positions in plan_batches(examples.lengths, max_tokens=batch_tokens, max_rows=64):
            batch_row_losses(model, examples.batch(positions, pad))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="n prompts per candidate")
    parser.add_argument("-g", type=int, default=4, help="G responses per prompt")
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--no-regenerating", action="store_true", help="skip the plain way that regenerates its matrix per buffer (slow at large d)")
    parser.add_argument("--dense-max-gb", type=float, default=8.0, help="hold the dense d x D matrix up to this size (both dense methods)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dyn.distill.grace import grace_score
    from dyn.distill.grace_gradients import DenseProjection, FactoredProjection, GraceGradients
    from dyn.influence.parameters import select_parameters

    model, candidates, pad = build(args)
    params = select_parameters(model)
    rows = len(candidates[0][0])
    tokens = int(candidates[0][0].lengths.sum())
    start = now()
    dense = DenseProjection(params, args.dim, seed=0, max_held_entries=int(args.dense_max_gb * 2**30 / 4))
    if dense.held is None:
        raise SystemExit(f"the dense {args.dim} x {params.numel} matrix is larger than --dense-max-gb; raise it, or choose a smaller model or --dim")
    dense_setup = now() - start
    start = now()
    factored = FactoredProjection(params, args.dim, seed=0)
    factored_setup = now() - start
    dyn_dense, dyn_factored = GraceGradients(model, params, dense), GraceGradients(model, params, factored)
    print(f"student: GPT-2 {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {model.config.vocab_size}, "
          f"{params.numel / 1e6:.3f}M parameters (D); {args.candidates} candidates of {args.prompts} prompts x G={args.g} = "
          f"{rows} responses ({tokens} tokens each candidate); d = {args.dim}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"projection set-up (once, not charged): dense {args.dim} x {params.numel} matrix {dense_setup:.1f}s; "
          f"factored (first stage {factored.block_dim}/parameter -> K = {factored.stage_one_dim}, then {args.dim} x K) "
          f"{factored_setup:.1f}s")

    from dyn.influence.exact import exact_row_gradients

    examples0, _ = candidates[0]
    warm = examples0.batch(list(range(4)), pad)  # lazy imports and kernels
    dyn_dense.batch(warm), dyn_factored.batch(warm), exact_row_gradients(model, params, examples0.batch([0], pad))

    seconds = {"plain": [], "dense": [], "factored": []}
    scores = {"plain": [], "dense": [], "factored": []}
    score_seconds = []
    for examples, ids in candidates:
        for name, run in (("plain", lambda: plain_way(model, params, examples, pad, dense.held)),
                          ("dense", lambda: dyn_way(dyn_dense, examples, pad, args.batch_tokens)),
                          ("factored", lambda: dyn_way(dyn_factored, examples, pad, args.batch_tokens))):
            start = now()
            features = run()
            seconds[name].append(now() - start)
            start = now()
            scores[name].append(grace_score(features.double().numpy(), ids).score)
            score_seconds.append(now() - start)

    examples, ids = candidates[0]
    if not args.no_regenerating:
        start = now()
        features = plain_way_regenerating(model, params, examples, pad, dense.dense)
        seconds["regenerating"] = [now() - start]
        scores["regenerating"] = [grace_score(features.double().numpy(), ids).score]
    start = now()
    dyn_floor(model, examples, pad, args.batch_tokens)
    seconds["forward"] = [now() - start]

    plain = np.mean(seconds["plain"])
    print(f"\nGRACE score itself (10 splits, d = {args.dim}): {np.mean(score_seconds):.2f}s per candidate\n")
    header = f"| {'method':<52} | {'s / candidate':>13} | {'responses/s':>11} | {'x plain speed':>13} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    labels = {"forward": "forward pass only, batched (the floor)",
              "regenerating": "plain, matrix regenerated per buffer (1st candidate)",
              "plain": "plain (batch 1, full gradient, dense projection)",
              "dense": "dyn, --projection rademacher (hooks, batched)",
              "factored": "dyn, factored (default)"}
    for name, label in labels.items():
        if name not in seconds:
            continue
        s = float(np.mean(seconds[name]))
        print(f"| {label:<52} | {s:>13.2f} | {rows / s:>11.1f} | {plain / s:>13.1f} |")
    if "regenerating" in scores:
        rel = abs(scores["regenerating"][0] - scores["plain"][0]) / abs(scores["plain"][0])
        print(f"\nplain with the matrix regenerated per buffer: the same matrix, GRACE {scores['regenerating'][0]:.6g} "
              f"(relative difference to plain {rel:.1e})")
    print("\nGRACE per candidate (lower is better):")
    for c in range(args.candidates):
        rel_dense = abs(scores["dense"][c] - scores["plain"][c]) / abs(scores["plain"][c])
        rel_factored = abs(scores["factored"][c] - scores["plain"][c]) / abs(scores["plain"][c])
        print(f"  candidate {c}: plain {scores['plain'][c]:.6g}, dyn dense {scores['dense'][c]:.6g} (relative difference "
              f"{rel_dense:.1e}, must be <= 1e-3: {'ok' if rel_dense <= 1e-3 else 'FAIL'}), dyn factored "
              f"{scores['factored'][c]:.6g} (another projection: {rel_factored:.1%} apart)")
    order = lambda key: list(np.argsort(scores[key]))  # noqa: E731
    print(f"ranking of the candidates: plain {order('plain')}, dyn dense {order('dense')}, dyn factored {order('factored')}")


if __name__ == "__main__":
    main()
