"""Gradient quality scores on corrupted GSM8K answers (issue 3's real check, DESIGN §4.2), end to
end through the CLI.

1. the first `--rows` GSM8K train rows, `--corrupt` of them (seeded) given another corrupted row's
   answer (never their own), with a `corrupted` column;
2. a warm-up run, `dyn train` on those rows (question -> answer), checkpointed every
   `--save-every` steps: a fresh preset with a BPE tokenizer trained on the rows, or a model folder;
3. anchors: the first `--anchors` rows of the GSM8K test split (clean by construction);
4. `dyn score --method grad` over every row (each `--similarity`), and the AUROC of `dyn_score`
   and of each `dyn_score_ckpt{step}` for clean vs corrupted (1 = every clean row above every
   corrupted one; 0.5 = chance). For reference, the AUROC of the final model's own per-row loss
   (lower loss = clean): how much the warmed-up model conditions its answer on the question.

    OMP_NUM_THREADS=1 python examples/grad_gsm8k.py --workdir grad-gsm8k/            # 2,000 rows
    OMP_NUM_THREADS=1 python examples/grad_gsm8k.py --quick --workdir /tmp/grad-quick/

Writes WORKDIR/auroc.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from examplelib import DATA, answer_losses, dyn, read_jsonl, write_jsonl


def corrupted_rows(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """`rows` with a seeded `fraction` of them given the next chosen row's answer (a cycle, so no
    row keeps its own), each marked in a `corrupted` column."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=int(len(rows) * fraction), replace=False))
    answers = {int(i): rows[int(j)]["answer"] for i, j in zip(chosen, np.roll(chosen, -1))}
    return [{"question": r["question"], "answer": answers.get(i, r["answer"]), "corrupted": i in answers}
            for i, r in enumerate(rows)]


def main() -> None:
    from dyn.influence.scores import auroc

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="grad-gsm8k", help="Where the data, the warm-up run, the scores and auroc.json go.")
    p.add_argument("--quick", action="store_true", help="A smoke-sized run (about a minute).")
    p.add_argument("--rows", type=int, default=2000, help="GSM8K train rows (the first ones).")
    p.add_argument("--corrupt", type=float, default=0.2, help="Fraction of rows given another row's answer.")
    p.add_argument("--anchors", type=int, default=64, help="Clean GSM8K test rows as the anchor set.")
    p.add_argument("--model", default=None, help="A preset, a config JSON or a model folder (dyn train --model; "
                                                 "default small, tiny with --quick).")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE size when the model is fresh (preset or config).")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--similarity", default="dot,cosine", help="Comma-separated: dot (directional engine), cosine (store).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.rows, args.anchors, args.steps, args.save_every = 200, 16, 40, 20
    args.model = args.model or ("tiny" if args.quick else "small")

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = corrupted_rows(read_jsonl(DATA / "gsm8k-train.jsonl")[: args.rows], args.corrupt, args.seed)
    data = write_jsonl(work / "train.jsonl", rows)
    anchor = write_jsonl(work / "anchor.jsonl", [{"question": r["question"], "answer": r["answer"]}
                                                 for r in read_jsonl(DATA / "gsm8k-test.jsonl")[: args.anchors]])
    fresh = not Path(args.model).is_dir()
    tokenizer = ["--train-tokenizer", "--vocab-size", args.vocab_size] if fresh else []
    run = work / "warmup"
    dyn("train", data, "--model", args.model, *tokenizer, "--template", "{question}", "--response-field", "answer",
        "--max-length", args.max_length, "--max-steps", args.steps, "--save-every", args.save_every,
        "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed, "-o", run, "--overwrite", "-q")

    clean = np.array([not r["corrupted"] for r in rows])
    table = {"loss (final model, reference)": auroc(-answer_losses(run, rows, args.max_length)[0], clean)}
    for similarity in args.similarity.split(","):
        out = work / f"scores-{similarity}.jsonl"
        dyn("score", "--method", "grad", data, "--anchor", anchor, "--checkpoints", run, "--similarity", similarity,
            "-o", out, "-q")
        scored = read_jsonl(out)
        for column in [c for c in scored[0] if c.startswith("dyn_score")]:
            values = np.array([np.nan if r[column] is None else r[column] for r in scored], dtype=np.float64)
            known = ~np.isnan(values)
            table[f"{similarity}: {column}"] = auroc(values[known], clean[known])

    print(f"\nAUROC, clean vs corrupted ({len(rows)} rows, {int((~clean).sum())} corrupted, {args.anchors} anchors, "
          f"model {args.model}, {args.steps} steps):")
    for name, value in table.items():
        print(f"  {name:<40} {value:.3f}")
    result = {"settings": vars(args), "auroc": table, "seconds": round(time.perf_counter() - start, 1)}
    (work / "auroc.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {work / 'auroc.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
