"""Progressive distillation on sparse parity (Panigrahi et al., "Progressive distillation induces
an implicit curriculum", ICLR 2025), with the library API `dyn.distill.functional`.

The task: x uniform on {±1}^n, label = the product of k fixed coordinates (the support, drawn
from the seed), as class 1 when the product is +1 and class 0 when it is −1. Every batch is a
fresh sample. A wide one-hidden-layer ReLU MLP (the teacher) is trained on labels, saving its
weights every --teacher-save-every steps and logging its training loss (for two-shot's automatic
choice of the checkpoint at its steepest loss drop). A narrow MLP (the student) is then trained
from the same initialisation and the same sample stream under each schedule:

    none         labels only (the baseline)
    one-shot     KD from the final teacher only
    two-shot     KD from the checkpoint at the teacher's steepest logged loss drop, then the final
    progressive  student step t learns from the first teacher checkpoint at or after step t

and we report the student step at which held-out accuracy first reaches --target (95%), per seed,
as a markdown table. The paper's finding: one-shot from the final teacher helps little, while
progressive lets the student learn about as fast as the teacher — much faster than labels alone —
because the teacher's intermediate checkpoints carry a low-degree signal about the support (an
implicit curriculum) that its final, near-one-hot outputs no longer show.

    python examples/sparse_parity.py              # the full table (n=80, k=4; ~4 min of one CPU thread)
    python examples/sparse_parity.py --quick      # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from dyn.distill.functional import distill, schedule_for
from dyn.distill.losses import KDLossSettings

SCHEDULES = ("none", "one-shot", "two-shot", "progressive")
# --quick: a tiny setting that runs in seconds (what tests/test_distill_functional.py runs).
QUICK = dict(n=24, k=4, teacher_width=256, student_width=8, teacher_steps=1500, student_steps=1500,
             teacher_save_every=50, eval_every=25, log_every=10, held_out=1000, seeds=[0])


def mlp(n: int, width: int) -> torch.nn.Module:
    """One hidden ReLU layer, two output logits."""
    return torch.nn.Sequential(torch.nn.Linear(n, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def sample(generator: torch.Generator, batch: int, n: int, support: torch.Tensor):
    """A fresh batch: x in {±1}^n, label 1 where the product over the support is +1, else 0."""
    x = torch.randint(0, 2, (batch, n), generator=generator).float() * 2 - 1
    y = (x[:, support].prod(dim=1) > 0).long()
    return x, y


def batches(seed: int, batch: int, n: int, support: torch.Tensor):
    """An endless, seeded stream of fresh batches (the same stream for every schedule)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample(generator, batch, n, support)


def logits_fn(module, batch):
    return module(batch[0])


def accuracy(module, held_out) -> float:
    x, y = held_out
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).float().mean())


def train_teacher(args, seed: int, support, held_out):
    """Train the wide teacher on labels; its checkpoints {step: state_dict}, its loss log
    [{step, loss}], and the step it first reached the target accuracy (None if it did not)."""
    torch.manual_seed(10_000 + seed)
    teacher = mlp(args.n, args.teacher_width)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=args.teacher_lr, momentum=args.momentum)
    stream = batches(20_000 + seed, args.batch_size, args.n, support)
    checkpoints, log, reached, running = {}, [], None, []
    for step in range(1, args.teacher_steps + 1):
        x, y = next(stream)
        loss = torch.nn.functional.cross_entropy(teacher(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step % args.log_every == 0:
            log.append({"step": step, "loss": sum(running) / len(running)})
            running = []
        if step % args.teacher_save_every == 0 or step == args.teacher_steps:
            checkpoints[step] = copy.deepcopy(teacher.state_dict())
        if reached is None and step % args.eval_every == 0 and accuracy(teacher, held_out) >= args.target:
            reached = step
    return checkpoints, log, reached, accuracy(teacher, held_out)


def train_student(args, seed: int, kind: str, support, held_out, checkpoints, log):
    """One student run under schedule `kind`; the step it reached the target (None if not) and
    its run record."""
    schedule = schedule_for(kind, checkpoints, args.student_steps, multiplier=args.multiplier,
                            log_history=log, **({"switch_step": args.switch_step} if args.switch_step else {}))
    torch.manual_seed(30_000 + seed)  # the same initial student for every schedule
    student = mlp(args.n, args.student_width)
    settings = KDLossSettings(loss=args.loss, temperature=args.temperature, alpha=args.alpha)
    result = distill(
        student, logits_fn, batches(40_000 + seed, args.batch_size, args.n, support),
        schedule=schedule, settings=settings,
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=args.student_lr, momentum=args.momentum),
        teachers=checkpoints, teacher_factory=lambda: mlp(args.n, args.teacher_width),
        eval_fn=lambda step: {"accuracy": accuracy(student, held_out)}, eval_every=args.eval_every,
        stop_at=("accuracy", args.target),
    )
    return result.reached_step, result


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = {kind: [] for kind in ("teacher", *args.schedules)}
    details = []
    for seed in args.seeds:
        support_generator = torch.Generator().manual_seed(seed)
        support = torch.randperm(args.n, generator=support_generator)[: args.k]
        held_out = sample(torch.Generator().manual_seed(50_000 + seed), args.held_out, args.n, support)
        started = time.time()
        checkpoints, log, teacher_reached, teacher_accuracy = train_teacher(args, seed, support, held_out)
        rows["teacher"].append(teacher_reached)
        record = {"seed": seed, "support": support.tolist(), "teacher_reached": teacher_reached,
                  "teacher_final_accuracy": teacher_accuracy, "students": {}}
        print(f"seed {seed}: support {sorted(support.tolist())}; teacher reached {args.target:.0%} at "
              f"{teacher_reached} (final accuracy {teacher_accuracy:.3f}, {time.time() - started:.0f}s)",
              file=sys.stderr, flush=True)
        for kind in args.schedules:
            started = time.time()
            reached, result = train_student(args, seed, kind, support, held_out, checkpoints, log)
            rows[kind].append(reached)
            record["students"][kind] = {
                "reached_step": reached, "steps": result.steps,
                "final_accuracy": result.evals[-1]["accuracy"] if result.evals else None,
                "segments": [{k: s[k] for k in ("from_step", "to_step", "teacher_step")} for s in result.segments],
                "two_shot_intermediate": result.schedule.get("intermediate_step"),
            }
            print(f"  {kind:<12} reached at {reached} (last accuracy {record['students'][kind]['final_accuracy']:.3f}, "
                  f"{time.time() - started:.0f}s)", file=sys.stderr, flush=True)
        details.append(record)
    return {"rows": rows, "details": details}


def cell(value, limit: int) -> str:
    return f"not reached by {limit}" if value is None else str(value)


def table(args, outcome: dict) -> str:
    """The markdown table: mean (over seeds that reached the target) and per-seed steps."""
    lines = ["| schedule | steps to {:.0%} (mean) | reached | per seed ({}) |".format(args.target, ", ".join(map(str, args.seeds))),
             "|---|---:|---:|---|"]
    for kind, values in outcome["rows"].items():
        limit = args.teacher_steps if kind == "teacher" else args.student_steps
        hit = [v for v in values if v is not None]
        mean = f"{statistics.mean(hit):.0f}" if len(hit) == len(values) else (
            f"> {limit}" if not hit else f"{statistics.mean(hit):.0f} (of {len(hit)})")
        name = f"teacher (width {args.teacher_width}, labels)" if kind == "teacher" else f"student: {kind}"
        lines.append(f"| {name} | {mean} | {len(hit)}/{len(values)} | {', '.join(cell(v, limit) for v in values)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=80, help="input bits")
    parser.add_argument("--k", type=int, default=4, help="parity degree (support size)")
    parser.add_argument("--teacher-width", type=int, default=1000)
    parser.add_argument("--student-width", type=int, default=50)
    parser.add_argument("--teacher-steps", type=int, default=12000)
    parser.add_argument("--teacher-save-every", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-lr", type=float, default=0.05)
    parser.add_argument("--student-lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--loss", default="forward-kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="KD weight against the label cross-entropy")
    parser.add_argument("--multiplier", type=float, default=1.0, help="progressive: student step t follows teacher step t*multiplier")
    parser.add_argument("--switch-step", type=int, default=0, help="two-shot: last step on the intermediate (0 = half the steps)")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=50, help="teacher loss log interval (two-shot reads it)")
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the per-seed details here")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds (tests)")
    quick, _ = parser.parse_known_args(argv)
    if quick.quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    outcome = run(args)
    print(table(args, outcome))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), **outcome}, handle, indent=1)
    return outcome


if __name__ == "__main__":
    main()
