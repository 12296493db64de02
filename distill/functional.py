"""A library API for distilling into models that are not language models (DESIGN §4.4, issue 5
part 6): a `torch.nn.Module`, a function giving its logits (N, C) on a batch, and a teacher's
checkpoints. A plain training loop, in the spirit of a torchtune recipe: everything it does is
in `distill()` below, one step after another, so a reader can follow it and a user can copy it.

    from dyn.distill.functional import distill, schedule_for
    from dyn.distill.losses import KDLossSettings

    teachers = {100: "teacher/step-100.pt", 200: state_dict_200, 500: state_dict_500}
    schedule = schedule_for("progressive", teachers, total_steps=2000)
    result = distill(student, lambda model, batch: model(batch[0]), batches,
                     schedule=schedule, teachers=teachers, teacher_factory=make_teacher,
                     settings=KDLossSettings(loss="forward-kl", temperature=1.0, alpha=1.0),
                     optimizer_factory=lambda params: torch.optim.Adam(params, lr=1e-3),
                     eval_fn=lambda step: {"accuracy": accuracy(student)}, eval_every=50,
                     stop_at=("accuracy", 0.95))
    result.reached_step, result.segments

Each student step t (1-based, t = the t-th optimizer update, as in `distill/schedules.py`):
  1. the schedule names the teaching checkpoint (`schedule.teacher_at(t)`, None = labels only)
     and the KD weight w(t); the teacher's weights are loaded only when the checkpoint changes;
  2. the teacher's logits on the batch, without gradients, in eval mode;
  3. loss = `distillation_loss` with α·w(t) in place of α, i.e. α·w·KD + (1 − α·w)·CE: the
     mixing, temperature and divergence are exactly those of the LM trainer (`distill/losses.py`);
  4. a non-finite loss, or gradient, stops the run with a DataError naming the step and the
     teacher (before the optimizer step, so the student's weights stay finite);
  5. backward, optimizer step; then, every `eval_every` steps, `eval_fn(t)`, stopping early once
     `stop_at`'s metric reaches its threshold.

The run record (`DistillResult.record()`) holds which checkpoint taught over which steps (the
segments actually run, so an early stop cuts the last one short), the schedule's plan, the
training-loss log and every evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX
from dyn.distill.losses import KDLossSettings, distillation_loss
from dyn.distill.schedules import TeacherSchedule, build_schedule

IN_MEMORY_PREFIX = "in-memory:checkpoint-"


def schedule_for(kind: str, teachers: Mapping[int, Any], total_steps: int, **options) -> TeacherSchedule:
    """`build_schedule` over a {step: state_dict or path} mapping. Paths keep their name in the run
    record; in-memory state dicts are named `in-memory:checkpoint-<step>`. `options` go to
    `build_schedule` (multiplier, intermediate_step, switch_step, log_history, salt_steps, ...)."""
    pairs = [(int(step), value if isinstance(value, (str, Path)) else f"{IN_MEMORY_PREFIX}{int(step)}")
             for step, value in teachers.items()]
    return build_schedule(kind, pairs, total_steps, **options)


@dataclass
class DistillResult:
    """What a run did. `steps`: optimizer steps taken; `reached_step`: the step at which
    `stop_at` was first met (None if never); `segments`: [{from_step, to_step, teacher_step,
    teacher, kd_weight_first, kd_weight_last}] over the steps run; `teacher_loads`: how many times
    teacher weights were loaded; `losses`: [{step, loss}] every `log_every` steps (the mean since
    the last entry); `evals`: [{step, **metrics}]; `schedule`: the schedule's summary (its plan)."""

    steps: int = 0
    reached_step: int | None = None
    segments: list = field(default_factory=list)
    teacher_loads: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-ready run record."""
        return dataclasses.asdict(self)


def _load_state(value):
    """A checkpoint's state dict: given directly, or read from a torch-saved file."""
    if isinstance(value, (str, Path)):
        import torch

        path = Path(value)
        if not path.is_file():
            raise UsageError(f"teacher checkpoint {path} is not a file")
        return torch.load(path, map_location="cpu", weights_only=True)
    return value


def _note_segment(segments: list, step: int, teacher_step, teacher_name, weight: float) -> None:
    """Extend the last segment when the teacher is unchanged, else open a new one."""
    if segments and segments[-1]["teacher_step"] == teacher_step:
        segments[-1]["to_step"] = step
        segments[-1]["kd_weight_last"] = weight
        return
    segments.append({"from_step": step, "to_step": step, "teacher_step": teacher_step, "teacher": teacher_name,
                     "kd_weight_first": weight, "kd_weight_last": weight})


def distill(student, logits_fn: Callable, batches: Iterable, *, schedule: TeacherSchedule,
            settings: KDLossSettings, optimizer_factory: Callable,
            teachers: Mapping[int, Any] | None = None, teacher_factory: Callable | None = None,
            labels_fn: Callable = lambda batch: batch[-1],
            eval_fn: Callable | None = None, eval_every: int = 0,
            stop_at: tuple[str, float] | None = None, log_every: int = 0) -> DistillResult:
    """Train `student` for `schedule.total_steps` steps (or until `stop_at` is met); see the
    module doc for what one step does.

    `logits_fn(module, batch)` -> logits (N, C), for the student and the teacher alike.
    `batches`: an iterable of batches, one per step (it may be endless; running out early ends
    the run). `labels_fn(batch)` -> class ids (N,), IGNORE_INDEX (-100) for rows to skip (with
    α = 1 they only mask). `teachers`: {teacher step: state_dict or path}, the steps matching the
    schedule's checkpoints; `teacher_factory()` -> a fresh teacher module the states load into
    (built once, reused across checkpoints). Neither is needed for the `none` schedule.
    `optimizer_factory(parameters)` -> a torch optimizer over the student's parameters.
    `eval_fn(step)` -> {metric: value}, called every `eval_every` steps (and at the last step);
    `stop_at = (metric, threshold)` stops once metric >= threshold. `log_every` > 0 logs the mean
    training loss every that many steps.
    """
    import torch

    if eval_every < 0 or log_every < 0:
        raise UsageError("eval_every and log_every must be >= 0")
    if stop_at is not None and (eval_fn is None or eval_every < 1):
        raise UsageError("stop_at needs eval_fn and eval_every >= 1")
    teachers = dict(teachers or {})
    needed = {c.step for c in schedule.checkpoints} if schedule.kind != "none" else set()
    missing = sorted(needed - set(teachers))
    if missing:
        raise UsageError(f"the schedule names teacher step(s) {', '.join(map(str, missing))} that `teachers` lacks")
    if needed and teacher_factory is None:
        raise UsageError(f"schedule {schedule.kind} needs a teacher_factory to build the teacher module")

    result = DistillResult(schedule=schedule.summary())
    optimizer = optimizer_factory(student.parameters())
    teacher = None
    loaded_step = None
    running, counted = 0.0, 0
    student.train()
    iterator = iter(batches)
    for step in range(1, schedule.total_steps + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        checkpoint = schedule.teacher_at(step)
        weight = schedule.kd_weight(step) if checkpoint is not None else 0.0
        _note_segment(result.segments, step, checkpoint.step if checkpoint else None,
                      str(checkpoint.path) if checkpoint else None, weight)

        teacher_logits = None
        if checkpoint is not None and weight > 0 and settings.alpha > 0:
            if teacher is None:
                teacher = teacher_factory()
                teacher.eval()
                for parameter in teacher.parameters():
                    parameter.requires_grad_(False)
            if loaded_step != checkpoint.step:  # reload only on change
                teacher.load_state_dict(_load_state(teachers[checkpoint.step]))
                loaded_step = checkpoint.step
                result.teacher_loads += 1
            with torch.no_grad():
                teacher_logits = logits_fn(teacher, batch)

        logits = logits_fn(student, batch)
        labels = labels_fn(batch)
        if labels is None:  # pure distillation: every row counts
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        step_settings = dataclasses.replace(settings, alpha=settings.alpha * weight)
        loss = distillation_loss(
            logits.unsqueeze(1), labels.view(-1, 1).long(), step_settings,
            teacher_logits=None if teacher_logits is None else teacher_logits.unsqueeze(1),
        ).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            who = f"teacher checkpoint {checkpoint.step}" if teacher_logits is not None else "labels only"
            raise DataError(f"non-finite loss ({value}) at student step {step} ({who})")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A NaN the loss masks (a NaN teacher probability weighs its term by 0) still poisons the
        # gradient: check it too, before the optimizer spreads it into the weights.
        grads = [p.grad.norm() for p in student.parameters() if p.grad is not None]
        if grads and not math.isfinite(float(torch.stack(grads).sum())):
            who = f"teacher checkpoint {checkpoint.step}" if teacher_logits is not None else "labels only"
            raise DataError(f"non-finite gradient at student step {step} ({who}; loss {value})")
        optimizer.step()
        result.steps = step
        running += value
        counted += 1
        if log_every and step % log_every == 0:
            result.losses.append({"step": step, "loss": running / counted})
            running, counted = 0.0, 0

        last = step == schedule.total_steps
        if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
            student.eval()
            with torch.no_grad():
                metrics = dict(eval_fn(step))
            student.train()
            result.evals.append({"step": step, **metrics})
            if stop_at is not None and metrics.get(stop_at[0], -math.inf) >= stop_at[1]:
                result.reached_step = step
                break
    return result


__all__ = ["DistillResult", "IGNORE_INDEX", "distill", "schedule_for"]
