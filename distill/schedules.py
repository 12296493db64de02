"""Which teacher checkpoint teaches the student at each step, and with what weight (DESIGN §4.4).

Student steps are numbered 1..total_steps: step t is the t-th optimizer update (after it the
student's global_step is t, the `step` it logs and the `checkpoint-<t>` it saves). The teacher's
checkpoints are (step, path) pairs sorted by step; the last one is the final teacher.

    progressive  step t: the first checkpoint whose step ≥ t·multiplier; the last one if none is.
    two-shot     steps 1..switch_step: an intermediate checkpoint; later steps: the final one.
                 Defaults: switch_step = total_steps // 2; intermediate = the first checkpoint at
                 or after the teacher's steepest logged loss drop (`steepest_loss_drop`).
    one-shot     the final checkpoint at every step.
    salt         the final checkpoint for the first N steps (N given, or round(fraction·total)),
                 then no teacher. KD weight 1 for t ≤ N then 0 ("step"), or (N − t + 1)/N for
                 t ≤ N then 0 ("linear").
    none         no teacher, KD weight 0: labels only (the baseline).

`kd_weight(t)` is 1 wherever a teacher teaches, except during salt's linear decay, and 0 where
`teacher_at(t)` is None; the trainer multiplies it into --alpha (`distill/losses.py`).

The steepest loss drop, from the teacher's trainer_state.json `log_history`:
  1. the logged training losses: entries with a finite `loss` and a `step`, by step (a repeated
     step keeps its last entry);
  2. smoothed by a centred running median over `window` logged points (default 5; narrower at
     the ends), so one noisy logged step never decides: a median of three or more points ignores
     a single outlier;
  3. the drop rate between consecutive points (s[i−1] − s[i]) / (step[i] − step[i−1]); the
     steepest is the largest (the earliest on a tie), and the drop's step is that interval's
     midpoint. A loss that never falls, or fewer than 3 logged losses, is a data error: name the
     intermediate checkpoint instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dyn.core.errors import DataError, UsageError
from dyn.distill.checkpoints import Checkpoint, read_trainer_state

SCHEDULES = ("progressive", "two-shot", "one-shot", "salt", "none")
SALT_DECAYS = ("step", "linear")
DEFAULT_SMOOTHING_WINDOW = 5
MIN_LOGGED_LOSSES = 3


@dataclass(frozen=True)
class TeacherSchedule:
    """A resolved schedule: every default filled in. Build one with `build_schedule`.

    `intermediate` (two-shot) and `kd_steps` (salt, the N of the module doc) are set only for their
    schedule; `drop_step` records where an automatic two-shot choice came from.
    """

    kind: str
    checkpoints: tuple
    total_steps: int
    multiplier: float = 1.0
    intermediate: Checkpoint | None = None
    switch_step: int | None = None
    kd_steps: int | None = None
    salt_decay: str = "step"
    drop_step: float | None = None
    smoothing_window: int | None = None

    @property
    def final(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def teacher_at(self, step: int) -> Checkpoint | None:
        """The checkpoint that teaches student step `step` (1-based), or None: labels only."""
        self._check_step(step)
        if self.kind == "none":
            return None
        if self.kind == "one-shot":
            return self.final
        if self.kind == "two-shot":
            return self.intermediate if step <= self.switch_step else self.final
        if self.kind == "salt":
            return self.final if step <= self.kd_steps else None
        target = step * self.multiplier
        for checkpoint in self.checkpoints:
            if checkpoint.step >= target:
                return checkpoint
        return self.final

    def kd_weight(self, step: int) -> float:
        """The KD term's weight at student step `step` (1-based), in [0, 1]."""
        self._check_step(step)
        if self.kind == "none":
            return 0.0
        if self.kind != "salt":
            return 1.0
        if step > self.kd_steps:
            return 0.0
        if self.salt_decay == "step":
            return 1.0
        return (self.kd_steps - step + 1) / self.kd_steps

    def segments(self) -> list[dict]:
        """Consecutive step ranges with one teacher each: from_step, to_step (inclusive),
        teacher_step and teacher (None: labels only), kd_weight_first and kd_weight_last."""
        found: list[dict] = []
        for step in range(1, self.total_steps + 1):
            teacher = self.teacher_at(step)
            weight = self.kd_weight(step)
            if found and found[-1]["teacher_step"] == (teacher.step if teacher else None):
                found[-1]["to_step"] = step
                found[-1]["kd_weight_last"] = weight
                continue
            found.append({
                "from_step": step, "to_step": step,
                "teacher_step": teacher.step if teacher else None,
                "teacher": str(teacher.path) if teacher else None,
                "kd_weight_first": weight, "kd_weight_last": weight,
            })
        return found

    def summary(self) -> dict:
        """The plan for the run record: settings, and which checkpoint taught over which steps."""
        record: dict = {
            "schedule": self.kind,
            "total_steps": self.total_steps,
            "teacher_checkpoints": [c.step for c in self.checkpoints],
        }
        if self.kind == "progressive":
            record["multiplier"] = self.multiplier
        if self.kind == "two-shot":
            record["intermediate_step"] = self.intermediate.step
            record["switch_step"] = self.switch_step
            record["intermediate_chosen_by"] = (
                "given" if self.drop_step is None
                else f"steepest logged loss drop at step {self.drop_step:g} (running median over {self.smoothing_window} points)"
            )
        if self.kind == "salt":
            record["kd_steps"] = self.kd_steps
            record["salt_decay"] = self.salt_decay
        record["segments"] = self.segments()
        return record

    def _check_step(self, step: int) -> None:
        if not 1 <= step <= self.total_steps:
            raise UsageError(f"student step {step} is outside 1..{self.total_steps}")


def build_schedule(kind: str, checkpoints, total_steps: int, *, multiplier: float = 1.0,
                   intermediate_step: int | None = None, switch_step: int | None = None,
                   log_history: list | None = None, smoothing_window: int = DEFAULT_SMOOTHING_WINDOW,
                   salt_steps: int | None = None, salt_fraction: float | None = None,
                   salt_decay: str = "step") -> TeacherSchedule:
    """Check the arguments and resolve the defaults of one schedule (see the module doc).

    `checkpoints`: the teacher's checkpoints, as `Checkpoint`s or (step, path) pairs (any order).
    two-shot without `intermediate_step` reads the loss curve from `log_history`, else from the
    final checkpoint's trainer_state.json. salt needs exactly one of `salt_steps`, `salt_fraction`.
    """
    if kind not in SCHEDULES:
        raise UsageError(f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UsageError(f"the student's total steps must be a positive integer, got {total_steps!r}")
    ordered = _as_checkpoints(checkpoints)
    if kind == "none":
        return TeacherSchedule("none", ordered, total_steps)
    if not ordered:
        raise UsageError(f"schedule {kind} needs at least one teacher checkpoint; none were given")
    if kind == "progressive":
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise UsageError(f"--multiplier must be a positive number, got {multiplier}")
        return TeacherSchedule("progressive", ordered, total_steps, multiplier=float(multiplier))
    if kind == "one-shot":
        return TeacherSchedule("one-shot", ordered, total_steps)
    if kind == "salt":
        return TeacherSchedule("salt", ordered, total_steps, kd_steps=_salt_steps(salt_steps, salt_fraction, total_steps),
                               salt_decay=_salt_decay(salt_decay))
    return _two_shot(ordered, total_steps, intermediate_step, switch_step, log_history, smoothing_window)


def _as_checkpoints(checkpoints) -> tuple:
    found = []
    for item in checkpoints or ():
        if isinstance(item, Checkpoint):
            found.append(item)
            continue
        try:
            step, path = item
        except (TypeError, ValueError):
            raise UsageError(f"a teacher checkpoint must be a (step, path) pair, got {item!r}") from None
        found.append(Checkpoint(int(step), Path(path)))
    found.sort()
    steps = [c.step for c in found]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        raise UsageError(f"teacher checkpoints repeat step(s) {', '.join(map(str, repeated))}")
    return tuple(found)


def _salt_steps(salt_steps, salt_fraction, total_steps: int) -> int:
    if (salt_steps is None) == (salt_fraction is None):
        raise UsageError("schedule salt needs exactly one of --salt-steps or --salt-fraction")
    if salt_steps is not None:
        if isinstance(salt_steps, bool) or not isinstance(salt_steps, int) or not 0 <= salt_steps <= total_steps:
            raise UsageError(f"--salt-steps must be an integer in 0..{total_steps}, got {salt_steps!r}")
        return salt_steps
    if not 0.0 <= salt_fraction <= 1.0:
        raise UsageError(f"--salt-fraction must lie in [0, 1], got {salt_fraction}")
    return round(salt_fraction * total_steps)


def _salt_decay(decay: str) -> str:
    if decay not in SALT_DECAYS:
        raise UsageError(f"unknown salt decay {decay!r}; choose one of: {', '.join(SALT_DECAYS)}")
    return decay


def _two_shot(ordered: tuple, total_steps: int, intermediate_step, switch_step, log_history,
              window: int) -> TeacherSchedule:
    if switch_step is None:
        switch_step = total_steps // 2
    if isinstance(switch_step, bool) or not isinstance(switch_step, int) or not 0 <= switch_step <= total_steps:
        raise UsageError(f"--switch-step must be an integer in 0..{total_steps}, got {switch_step!r}")
    drop_step = None
    if intermediate_step is not None:
        matches = [c for c in ordered if c.step == intermediate_step]
        if not matches:
            raise UsageError(
                f"no teacher checkpoint at step {intermediate_step}; the steps are: {', '.join(str(c.step) for c in ordered)}"
            )
        intermediate = matches[0]
    else:
        if log_history is None:
            log_history = read_trainer_state(ordered[-1].path).get("log_history", [])
        drop_step = steepest_loss_drop(log_history, window)
        intermediate = checkpoint_at_or_after(ordered, drop_step)
    return TeacherSchedule("two-shot", ordered, total_steps, intermediate=intermediate, switch_step=switch_step,
                           drop_step=drop_step, smoothing_window=window if drop_step is not None else None)


def checkpoint_at_or_after(checkpoints, step: float) -> Checkpoint:
    """The first checkpoint whose step is ≥ `step`; the last one when none is."""
    for checkpoint in checkpoints:
        if checkpoint.step >= step:
            return checkpoint
    return checkpoints[-1]


# --------------------------------------------------------------------------- the teacher's loss curve

def logged_losses(log_history: list) -> list[tuple[int, float]]:
    """(step, loss) of each logged training loss, by step; a repeated step keeps its last entry."""
    by_step: dict[int, float] = {}
    for entry in log_history or ():
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        loss = entry.get("loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        by_step[int(entry["step"])] = float(loss)
    return sorted(by_step.items())


def running_median(values: list[float], window: int) -> list[float]:
    """Centred running median over `window` points (odd), narrower at the ends."""
    half = window // 2
    smoothed = []
    for i in range(len(values)):
        part = sorted(values[max(0, i - half): i + half + 1])
        middle = len(part) // 2
        smoothed.append(part[middle] if len(part) % 2 else (part[middle - 1] + part[middle]) / 2)
    return smoothed


def steepest_loss_drop(log_history: list, window: int = DEFAULT_SMOOTHING_WINDOW) -> float:
    """The step of the teacher's steepest logged loss drop (the rule in the module doc)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise UsageError(f"the loss smoothing window must be an odd positive integer, got {window!r}")
    curve = logged_losses(log_history)
    if len(curve) < MIN_LOGGED_LOSSES:
        raise DataError(
            f"the teacher's log_history holds {len(curve)} logged loss(es), too few to find its loss drop; "
            "name the intermediate checkpoint instead"
        )
    steps = [s for s, _ in curve]
    smoothed = running_median([loss for _, loss in curve], window)
    rates = [(smoothed[i - 1] - smoothed[i]) / (steps[i] - steps[i - 1]) for i in range(1, len(curve))]
    best = max(range(len(rates)), key=lambda i: (rates[i], -i))
    if rates[best] <= 0:
        raise DataError("the teacher's logged loss never falls; name the intermediate checkpoint instead")
    return (steps[best] + steps[best + 1]) / 2
