"""GRACE evidence experiment (issue 6, DESIGN §4.4), at a size that runs on a CPU.

Does `dyn teachers rank` predict which teacher distils the better student?

1. one teacher run with `dyn train` (tiny GPT-2, its own BPE tokenizer, a GSM8K train slice,
   question -> answer), checkpointed every N steps: checkpoints x temperatures = candidates of
   different quality;
2. `dyn teachers rank` (through the CLI) with a fresh student sharing the teacher's tokenizer, on
   n prompts (GSM8K train questions not used to train the teacher) x G responses: the GRACE score
   of each candidate (lower is better) and the generations it saved;
3. the same fresh student distilled from each candidate: `dyn train --model STUDENT` on that
   candidate's generations (prompt -> response), same steps, same seed;
4. each distilled student's mean per-token loss on held-out GSM8K test answers (question -> answer;
   lower is better), and the Spearman correlation of GRACE with it (positive: GRACE predicts).

    OMP_NUM_THREADS=1 python examples/grace_evidence.py --workdir grace-evidence/
    OMP_NUM_THREADS=1 python examples/grace_evidence.py --quick --workdir /tmp/grace-quick/

Writes WORKDIR/evidence.json (the table and the correlation) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from examplelib import DATA, answer_losses, dyn, read_jsonl, write_jsonl


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties averaged."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else float("nan")


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = math.sqrt(sum((a - mx) ** 2 for a in x))
    vy = math.sqrt(sum((b - my) ** 2 for b in y))
    return cov / (vx * vy) if vx and vy else float("nan")


def heldout_loss(model_dir: Path, rows: list[dict], max_length: int) -> float:
    """Mean per-token cross-entropy over the answer tokens of `rows` (every answer token weighs the
    same, whatever its row's length)."""
    losses, counts = answer_losses(model_dir, rows, max_length)
    kept = counts > 0
    return float((losses[kept] * counts[kept]).sum() / counts[kept].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="grace-evidence", help="Where the runs, generations and evidence.json go.")
    p.add_argument("--quick", action="store_true", help="A smoke-sized run (about 2 minutes).")
    p.add_argument("--teacher-rows", type=int, default=2000, help="GSM8K train rows the teacher trains on.")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--checkpoints", default="25,50,100,300", help="Teacher checkpoints (steps) to use as candidates.")
    p.add_argument("--temperatures", default="0.7,1.2")
    p.add_argument("-n", type=int, default=64, help="Prompts for ranking and distillation.")
    p.add_argument("-g", type=int, default=4, help="Responses per prompt.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dim", type=int, default=128, help="GRACE projection size (keep below n*G*0.9).")
    p.add_argument("--student-embd", type=int, default=32, help="Hidden size of the fresh 2-layer GPT-2 student.")
    p.add_argument("--distill-steps", type=int, default=120)
    p.add_argument("--distill-lr", type=float, default=3e-3)
    p.add_argument("--heldout", type=int, default=300, help="GSM8K test rows for the held-out loss.")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.teacher_rows, args.teacher_steps, args.save_every, args.checkpoints = 256, 40, 10, "10,20,40"
        args.temperatures, args.n, args.g, args.max_new_tokens, args.dim = "0.7,1.2", 12, 2, 32, 16
        args.distill_steps, args.heldout, args.max_length = 10, 32, 160

    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_rows = read_jsonl(DATA / "gsm8k-train.jsonl")
    test_rows = read_jsonl(DATA / "gsm8k-test.jsonl")[:args.heldout]
    teacher_data = write_jsonl(work / "teacher-train.jsonl", train_rows[:args.teacher_rows])
    # Prompts the teacher never saw: the next rows of the train file.
    prompts = write_jsonl(work / "prompts.jsonl", train_rows[args.teacher_rows:args.teacher_rows + args.n])

    # 1. the teacher run
    teacher = work / "teacher"
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    if not (teacher / "run.json").exists():
        print("1. teacher: dyn train", flush=True)
        dyn("train", teacher_data, "--model", "tiny", "--train-tokenizer", "--vocab-size", args.vocab_size,
            "--template", "{question}", "--response-field", "answer", "--max-length", args.max_length,
            "--max-steps", args.teacher_steps, "--save-every", args.save_every, "--batch-size", 16,
            "--lr", 3e-3, "--seed", args.seed, "-o", teacher, "-q")

    # the fresh student, sharing the teacher's tokenizer
    student = work / "student"
    if not (student / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(teacher))
        torch.manual_seed(args.seed)
        config = GPT2Config(n_layer=2, n_embd=args.student_embd, n_head=2, n_positions=512, vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        GPT2LMHeadModel(config).save_pretrained(student)
        tokenizer.save_pretrained(student)

    # 2. GRACE through the CLI
    print("2. dyn teachers rank", flush=True)
    ranking_path = work / "ranking.json"
    teacher_flags = []
    for step in checkpoints:
        folder = teacher if step == args.teacher_steps else teacher / f"checkpoint-{step}"
        teacher_flags += ["--teacher", f"step{step}={folder}"]
    dyn("teachers", "rank", "--student", student, *teacher_flags, "--prompts", prompts, "--prompt-field", "question",
        "-n", args.n, "-g", args.g, "--temperature", args.temperatures, "--max-new-tokens", args.max_new_tokens,
        "--dim", args.dim, "--max-length", args.max_length, "--seed", args.seed, "-o", ranking_path, "-q")
    ranking = json.loads(ranking_path.read_text())
    generations = work / "ranking.json.generations"

    # 3 + 4. distil the student from each candidate, held-out loss
    print("3. distil the student from each candidate; 4. held-out loss", flush=True)
    table = []
    for entry in ranking["candidates"]:
        name = entry["name"]
        gens = generations / f"{name}.jsonl"
        rows = read_jsonl(gens)
        out = work / "distilled" / name
        if not (out / "run.json").exists():
            dyn("train", gens, "--model", student, "--template", "{prompt}", "--response-field", "response",
                "--max-length", args.max_length, "--max-steps", args.distill_steps, "--batch-size", 16,
                "--lr", args.distill_lr, "--seed", args.seed, "-o", out, "-q")
        loss = heldout_loss(out, test_rows, args.max_length)
        truncated = sum(bool(r.get("truncated")) for r in rows) / len(rows)
        mean_chars = sum(len(r["response"]) for r in rows) / len(rows)
        table.append({"name": name, "grace": entry["score"], "heldout_loss": loss,
                      "truncated_fraction": truncated, "mean_response_chars": mean_chars})
    fresh_loss = heldout_loss(student, test_rows, args.max_length)
    teacher_loss = {f"step{s}": heldout_loss(teacher if s == args.teacher_steps else teacher / f"checkpoint-{s}",
                                             test_rows, args.max_length) for s in checkpoints}

    grace = [r["grace"] for r in table]
    losses = [r["heldout_loss"] for r in table]
    for row, rg, rl in zip(table, ranks(grace), ranks(losses)):
        row["grace_rank"], row["loss_rank"] = rg, rl
    rho = spearman(grace, losses)
    result = {
        "spearman_grace_vs_heldout_loss": rho,
        "pearson_grace_vs_heldout_loss": pearson(grace, losses),
        "candidates": table,
        "fresh_student_heldout_loss": fresh_loss,
        "teacher_heldout_loss": teacher_loss,
        "settings": {k: v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
    }
    (work / "evidence.json").write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'candidate':<14} {'GRACE':>10} {'held-out loss':>14} {'GRACE rank':>10} {'loss rank':>9} {'trunc':>6}")
    for row in sorted(table, key=lambda r: r["grace"]):
        print(f"{row['name']:<14} {row['grace']:>10.4g} {row['heldout_loss']:>14.4f} {row['grace_rank']:>10.1f} "
              f"{row['loss_rank']:>9.1f} {row['truncated_fraction']:>6.2f}")
    print(f"\nSpearman(GRACE, held-out loss) = {rho:.3f}   (positive: GRACE predicts; the paper: 0.86)")
    print(f"fresh student held-out loss {fresh_loss:.4f}; teachers: "
          + ", ".join(f"{k} {v:.4f}" for k, v in teacher_loss.items()))
    print(f"{result['seconds']:.0f} s; written {work / 'evidence.json'}")


if __name__ == "__main__":
    main()
