"""The `dyn distill` recipe: a language-model student trained from a teacher's checkpoints
(progressive distillation, DESIGN §4.4), by the same loop as `dyn train`.

A plain sequence of library calls:
  teacher checkpoints (a `dyn train` run folder, and/or a `dyn distill cache` folder)
  -> rows read in the format the teacher was trained with -> the student (a preset, a JSON config
  built with the teacher's tokenizer, or a model folder) -> vocabulary guard (before any work)
  -> token ids -> the cache checked against them (never silently reused) -> the step plan
  -> the schedule over the plan's steps -> the loop with `DistillObjective` (`distill/teaching.py`)
  -> checkpoints in the `dyn train` layout, the final model, run.json with which checkpoint
  taught at which step.

Everything `dyn train` guarantees carries over: each step trains on the same rows whatever the
number of processes or of --grad-accum micro-batches, and --resume repeats an unbroken run (the
cache is read by dyn_index and an online teacher is deterministic in eval mode).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

from dyn.core.errors import DataError, UsageError
from dyn.distill.trainer import TrainRequest

STATE_FORMAT = "dyn-distill/1"
# Settings, beyond dyn train's, that define a distillation run's trajectory (checked on --resume).
_DISTILL_SETTINGS = (
    "teacher", "teacher_cache", "schedule", "multiplier", "intermediate_step", "switch_step", "salt_steps",
    "salt_fraction", "salt_decay", "loss", "temperature", "alpha", "beta", "skew", "outside_top_k",
)


@dataclass
class DistillRequest(TrainRequest):
    """`dyn distill`'s flags: dyn train's (the student is `model`) plus the teacher's."""

    model_flag: ClassVar[str] = "--student"
    trajectory_settings: ClassVar[tuple] = TrainRequest.trajectory_settings + _DISTILL_SETTINGS
    path_settings: ClassVar[tuple] = TrainRequest.path_settings + ("teacher", "teacher_cache")

    teacher: str | None = None
    teacher_cache: str | None = None
    schedule: str = "progressive"
    multiplier: float = 1.0
    intermediate_step: int | None = None
    switch_step: int | None = None
    salt_steps: int | None = None
    salt_fraction: float | None = None
    salt_decay: str = "step"
    loss: str = "forward-kl"
    temperature: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    outside_top_k: str = "tail"


def check_distill_request(req: DistillRequest):
    """Flag checks that need no data; returns the loss settings."""
    from dyn.distill.losses import KDLossSettings
    from dyn.distill.schedules import SCHEDULES
    from dyn.distill.trainer import check_request

    if not req.model:
        raise UsageError("--student is required: tiny, small, a JSON config file or a model folder")
    check_request(req)
    if req.lora_r is not None or req.train_tokenizer:
        raise UsageError("dyn distill trains the whole student with the teacher's tokenizer: drop --lora-r / --train-tokenizer")
    if req.schedule not in SCHEDULES:
        raise UsageError(f"--schedule {req.schedule}: choose one of {', '.join(SCHEDULES)}")
    if req.schedule != "none" and not (req.teacher or req.teacher_cache):
        raise UsageError(f"--schedule {req.schedule} needs a teacher: --teacher RUN_FOLDER and/or --teacher-cache CACHE_FOLDER")
    return KDLossSettings(loss=req.loss, temperature=req.temperature, beta=req.beta, skew=req.skew,
                          outside_top_k=req.outside_top_k, alpha=req.alpha)


def run_distillation(req: DistillRequest) -> dict | None:
    """Distil and write the run folder; returns the summary on rank 0 (None on other ranks)."""
    from dyn.core import progress
    from dyn.core.distributed import barrier, world
    from dyn.core.embeddings import resolve_device, resolve_precision
    from dyn.core.io import read_rows
    from dyn.core.models import resolve_model_source
    from dyn.core.runrecord import RunRecord
    from dyn.distill.schedules import build_schedule
    from dyn.distill.trainer import (
        LR_FRESH_MODEL, LR_PRETRAINED, TrainingLoop, _check_same_run, _clear_run_folder, _model, _tokenizer,
        _trajectory_settings, examples_and_plan, held_out_evaluator, prepare_run_folder, row_namer, run_loop,
    )

    settings_kd = check_distill_request(req)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = resolve_device(req.device)
    w = world()
    resume_from = prepare_run_folder(req)
    source = resolve_model_source(req.model, flag="--student")
    teacher = TeacherSide.find(req)
    settings = _trajectory_settings(req)
    if resume_from is not None:
        _check_same_run(resume_from, settings)

    record = RunRecord("distill", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
        fmt, saved_length = teacher.example_format(loaded, req.template, req.response_field)
    with record.phase("load model"):
        if source.is_fresh and not req.tokenizer:
            req.tokenizer = teacher.tokenizer_folder()
        tokenizer = _tokenizer(req, source, resume_from, loaded, fmt, record)
        model, config, _, _ = _model(req, source, tokenizer, resume_from, Path(req.output))
    shared = teacher.check_vocabulary(tokenizer, model)
    if shared is not None and shared.notice:
        progress.info(shared.notice)
    examples, loaded, train_rows, plan, max_length = examples_and_plan(req, loaded, fmt, tokenizer, config, record, saved_length)
    schedule = build_schedule(
        req.schedule, teacher.checkpoints, plan.total, multiplier=req.multiplier,
        intermediate_step=req.intermediate_step, switch_step=req.switch_step, salt_steps=req.salt_steps,
        salt_fraction=req.salt_fraction, salt_decay=req.salt_decay,
        log_history=teacher.log_history() if req.schedule == "two-shot" and req.intermediate_step is None else None,
    )
    names = row_namer(loaded)
    precision = resolve_precision(req.precision, device, flag="--precision")
    source_of_teacher = teacher.source(schedule, examples, tokenizer, fmt, loaded, shared, device, precision, names)
    lr = req.lr or (LR_FRESH_MODEL if source.is_fresh else LR_PRETRAINED)
    progress.info(
        f"distilling on {len(train_rows)} of {len(examples)} rows ({fmt.describe()}), {plan.total} steps, "
        f"schedule {schedule.kind}, teacher {'none' if source_of_teacher is None else source_of_teacher.kind}, lr {lr:g}"
    )
    evaluator = held_out_evaluator(req, fmt, tokenizer, max_length, record)
    # Only now, with the input checked, is anything written (or an old run deleted).
    if w.is_main:
        _clear_run_folder(Path(req.output), req.overwrite and resume_from is None)
    barrier()

    from dyn.distill.teaching import DistillObjective

    objective = DistillObjective(schedule, source_of_teacher, settings_kd, shared)
    loop = TrainingLoop(req, model, tokenizer, examples, train_rows, plan, lr, settings, fmt, None, record,
                        objective=objective, evaluator=evaluator, row_names=names, state_format=STATE_FORMAT)
    return run_loop(loop, resume_from, record, lambda: _finish_distill_record(
        record, req, loop, loaded, examples, train_rows, source, config, fmt, lr, schedule, teacher,
        source_of_teacher, settings_kd, shared))


class TeacherSide:
    """The teacher as `--teacher` (a run folder, a checkpoint folder, or folders comma-separated)
    and/or `--teacher-cache` name it: its checkpoints, tokenizer, trained example format and loss
    curve, and the source the objective reads it from."""

    def __init__(self, req, checkpoints, cache):
        self.req, self.checkpoints, self.cache = req, checkpoints, cache

    @classmethod
    def find(cls, req) -> "TeacherSide":
        """Checkpoints from --teacher (all of them), or the cache's complete ones; with both, the
        cache must hold every --teacher checkpoint, from the same weights."""
        from dyn.distill.checkpoints import Checkpoint
        from dyn.distill.teacher_cache import TeacherCache, teacher_checkpoints, teacher_sha256

        if req.schedule == "none" and not (req.teacher or req.teacher_cache):
            return cls(req, (), None)
        checkpoints = teacher_checkpoints(_folders(req.teacher)) if req.teacher else None
        cache = None
        if req.teacher_cache:
            cache = TeacherCache.open(req.teacher_cache, steps=[c.step for c in checkpoints] if checkpoints else None)
            if checkpoints:
                cache.check_teacher({c.step: teacher_sha256(c) for c in checkpoints})
            else:
                if not cache.steps:
                    raise DataError(f"--teacher-cache {req.teacher_cache}: holds no complete checkpoint; finish it with `dyn distill cache`")
                paths = {int(c["step"]): Path(c["path"]) for c in cache.meta["checkpoints"]}
                checkpoints = [Checkpoint(step, paths[step]) for step in cache.steps]
        return cls(req, tuple(checkpoints), cache)

    def _first_folder(self) -> Path | None:
        for checkpoint in self.checkpoints:
            if (checkpoint.path / "config.json").is_file():
                return checkpoint.path
        return None

    def tokenizer_folder(self) -> str:
        """Where a fresh student's tokenizer comes from: the teacher's first checkpoint."""
        folder = self._first_folder()
        if folder is None:
            raise UsageError(
                "a fresh --student takes the teacher's tokenizer, but no teacher checkpoint folder is at hand "
                "(none given, or the cache's recorded paths are gone); name the teacher's run folder with --teacher"
            )
        return str(folder)

    def example_format(self, loaded, template, response_field):
        """(ExampleFormat, max_length or None): the user's flags, else the cache's, else the
        format the teacher run trained with (`trained_example_format`)."""
        from dyn.core.lm import ExampleFormat, check_format_columns
        from dyn.distill.checkpoints import trained_example_format

        if self.cache is not None and template is None and response_field is None:
            fmt = ExampleFormat.from_dict(self.cache.spec["example_format"])
            check_format_columns(loaded, fmt)
            return fmt, int(self.cache.spec["max_length"])
        folder = self._first_folder()
        if folder is None:
            from dyn.core.lm import resolve_example_format

            return resolve_example_format(loaded.dataset.column_names, template, response_field, loaded.source), None
        fmt, length = trained_example_format(folder, loaded, template, response_field)
        return fmt, (int(self.cache.spec["max_length"]) if self.cache is not None else length)

    def log_history(self) -> list:
        from dyn.distill.checkpoints import read_trainer_state

        final = self.checkpoints[-1].path
        if not final.is_dir():
            raise UsageError(f"--schedule two-shot: the final teacher checkpoint {final} is gone, so its loss curve cannot be read; give --intermediate-step")
        return read_trainer_state(final).get("log_history", [])

    def check_vocabulary(self, student_tokenizer, student):
        """The shared vocabulary (`distill/vocabulary.py`), checked before any work; None when
        no teacher teaches."""
        from dyn.distill.teacher_cache import tokenizer_sha256
        from dyn.distill.vocabulary import check_vocabularies, output_rows

        if not self.checkpoints:
            return None
        folder = self._first_folder()
        if folder is not None:
            from dyn.core.models import load_tokenizer

            teacher_tokenizer = load_tokenizer(str(folder), "--teacher")
        elif tokenizer_sha256(student_tokenizer) == self.cache.spec["tokenizer_sha256"]:
            teacher_tokenizer = student_tokenizer
        else:
            raise DataError(f"--teacher-cache {self.cache.folder}: built with another tokenizer than the student's; "
                            "the student must use the teacher's tokenizer")
        return check_vocabularies(teacher_tokenizer, student_tokenizer, teacher_rows=self._teacher_rows(folder),
                                  student_rows=output_rows(student), teacher_name=f"the teacher ({folder or self.cache.folder})",
                                  student_name=f"the student ({self.req.model})")

    def _teacher_rows(self, folder) -> int:
        if self.cache is not None:
            widths = {int(c["vocab_size"]) for c in self.cache.meta["checkpoints"] if c.get("vocab_size")}
            if len(widths) == 1:
                return widths.pop()
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(str(folder)).vocab_size)

    def source(self, schedule, examples, tokenizer, fmt, loaded, shared, device, precision, row_names):
        """CachedTeacher or OnlineTeacher (None with the `none` schedule). A cache is checked
        against the run's token ids here: built for other data, rows, length, format or
        tokenizer, it is refused."""
        import torch

        from dyn.distill.teacher_cache import CacheSpec
        from dyn.distill.teaching import CachedTeacher, OnlineTeacher

        if schedule.kind == "none":
            return None
        if self.cache is None:
            return OnlineTeacher(device, shared, torch.bfloat16 if precision == "bfloat16" else None)
        spec = CacheSpec.describe(examples, tokenizer, top_k=self.cache.top_k, example_format=fmt,
                                  dyn_index=loaded.source_index)
        self.cache.check_spec(spec)
        return CachedTeacher(self.cache, loaded.source_index, shared, row_names)


def _folders(teacher: str):
    """--teacher: one folder, or several comma-separated."""
    parts = [p for p in teacher.split(",") if p]
    return parts[0] if len(parts) == 1 else parts


def _finish_distill_record(record, req, loop, loaded, examples, train_rows, source, config, fmt, lr, schedule,
                           teacher, source_of_teacher, settings_kd, shared) -> dict:
    from dyn.distill.trainer import _finish_record

    record.data["schedule"] = schedule.summary()
    record.data["loss"] = asdict(settings_kd)
    record.data["teacher"] = {
        "checkpoints": [{"step": c.step, "path": str(c.path)} for c in teacher.checkpoints],
        **(source_of_teacher.describe() if source_of_teacher is not None else {"teacher": "none"}),
        "shared_vocabulary": None if shared is None else shared.size,
    }
    if teacher.cache is not None:
        record.add_input(str(teacher.cache.folder), int(teacher.cache.spec["rows"]), role="teacher cache")
    for checkpoint in teacher.checkpoints:
        record.add_model(f"teacher checkpoint-{checkpoint.step}", str(checkpoint.path), _teacher_hash(teacher, checkpoint))
    summary = _finish_record(record, req, loop, loaded, examples, train_rows, source, config, None, fmt, lr)
    return summary | {"schedule": record.data["schedule"], "teacher": record.data["teacher"]}


def _teacher_hash(teacher, checkpoint) -> str:
    from dyn.distill.teacher_cache import teacher_sha256

    if teacher.cache is not None:
        return teacher.cache.teacher_sha256(checkpoint.step)
    return teacher_sha256(checkpoint)
