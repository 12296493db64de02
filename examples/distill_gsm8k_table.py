"""The table for examples/distill_gsm8k.sh: held-out loss (mean next-token cross-entropy over the
answer tokens of the GSM8K test slice) of each student at each evaluated step, one row per
schedule, read from the students' run.json files; the teacher's own held-out loss at the same
steps (and at its last step) is the reference row. Lower is better; the best student in each
column is in bold.

    python examples/distill_gsm8k_table.py examples/out/distill-gsm8k
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEDULES = ("none", "one-shot", "two-shot", "progressive", "salt")


def evaluations(run: Path) -> dict[int, float]:
    """{step: eval_loss} from a dyn train / dyn distill run folder's run.json."""
    record = json.loads((run / "run.json").read_text())
    return {e["step"]: e["eval_loss"] for e in record["figures"].get("evaluations", [])}


def how_taught(run: Path) -> str:
    """The schedule's segments as "steps a-b: teacher step s" (labels where no teacher)."""
    record = json.loads((run / "run.json").read_text())
    parts = []
    for segment in record.get("schedule", {}).get("segments", []):
        teacher = segment.get("teacher_step")
        who = f"teacher step {teacher}" if teacher is not None else "labels"
        weight = segment.get("kd_weight_first")
        if teacher is not None and weight is not None and weight != 1.0:
            who += f" (KD weight {weight:g})"
        parts.append(f"{segment['from_step']}-{segment['to_step']}: {who}")
    return "; ".join(parts) or "labels only"


def main(folder: str) -> None:
    out = Path(folder)
    students = {s: evaluations(out / f"student-{s}") for s in SCHEDULES if (out / f"student-{s}" / "run.json").exists()}
    steps = sorted({step for losses in students.values() for step in losses})
    teacher = evaluations(out / "teacher") if (out / "teacher" / "run.json").exists() else {}

    print("| model | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    best = {s: min((l[s] for l in students.values() if s in l), default=None) for s in steps}
    for name, losses in students.items():
        cells = []
        for s in steps:
            if s not in losses:
                cells.append("")
            elif losses[s] == best[s]:
                cells.append(f"**{losses[s]:.3f}**")
            else:
                cells.append(f"{losses[s]:.3f}")
        print(f"| student: {name} | " + " | ".join(cells) + " |")
    if teacher:
        cells = [f"{teacher[s]:.3f}" if s in teacher else "" for s in steps]
        last = max(teacher)
        print(f"| teacher (reference) | " + " | ".join(cells) + f" |\n\nteacher's held-out loss at its last step ({last}): {teacher[last]:.3f}")
    print()
    for name in students:
        print(f"- {name}: {how_taught(out / f'student-{name}')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/out/distill-gsm8k")
