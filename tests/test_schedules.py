"""Teacher schedules (distill/schedules.py): the checkpoint and KD weight at each student step,
and two-shot's automatic choice on a logged loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dyn.core.errors import DataError, UsageError
from dyn.distill.checkpoints import Checkpoint, list_checkpoints
from dyn.distill.schedules import (
    build_schedule,
    logged_losses,
    running_median,
    steepest_loss_drop,
)

TEACHER_STEPS = (100, 200, 300, 400, 500)


def teacher(steps=TEACHER_STEPS):
    return [(s, f"teacher/checkpoint-{s}") for s in reversed(steps)]  # any order is accepted


def taught(schedule, total):
    return [schedule.teacher_at(t).step if schedule.teacher_at(t) else None for t in range(1, total + 1)]


def loss_curve_with_spike():
    """Logged every 10 steps to 1000: flat at 5 with one noisy spike (9 at step 150), a sharp drop
    between steps 410 and 420 (4.6 -> 3.0, the steepest), then a slower fall and a plateau."""
    losses = {s: 5.0 for s in range(10, 410, 10)}
    losses[150] = 9.0
    losses.update({410: 4.6, 420: 3.0, 430: 1.8, 440: 1.2})
    losses.update({s: 1.0 for s in range(450, 1010, 10)})
    history = [{"step": s, "epoch": s / 1000, "loss": v, "learning_rate": 1e-3} for s, v in sorted(losses.items())]
    history.insert(20, {"step": 200, "eval_loss": 0.1})  # eval entries carry no `loss`: ignored
    return history


# --------------------------------------------------------------------------- progressive

def test_progressive_follows_the_first_checkpoint_at_or_after_t_times_multiplier():
    schedule = build_schedule("progressive", teacher(), 12, multiplier=50)
    # t*50: 50 100 | 150 200 | 250 300 | 350 400 | 450 500 | 550.. -> past the last: the final one
    assert taught(schedule, 12) == [100, 100, 200, 200, 300, 300, 400, 400, 500, 500, 500, 500]
    assert all(schedule.kd_weight(t) == 1.0 for t in range(1, 13))
    assert schedule.teacher_at(3).path == Path("teacher/checkpoint-200")


def test_progressive_with_a_fractional_multiplier_and_exact_boundaries():
    schedule = build_schedule("progressive", teacher(), 1000, multiplier=0.5)
    assert schedule.teacher_at(1).step == 100
    assert schedule.teacher_at(200).step == 100   # 200 * 0.5 = 100: at, not after
    assert schedule.teacher_at(201).step == 200
    assert schedule.teacher_at(1000).step == 500
    segments = schedule.segments()
    assert [(s["from_step"], s["to_step"], s["teacher_step"]) for s in segments] == [
        (1, 200, 100), (201, 400, 200), (401, 600, 300), (601, 800, 400), (801, 1000, 500)]


# --------------------------------------------------------------------------- one-shot, none, salt

def test_one_shot_is_the_final_checkpoint_and_none_is_labels_only():
    one_shot = build_schedule("one-shot", teacher(), 7)
    assert taught(one_shot, 7) == [500] * 7
    none = build_schedule("none", [], 7)
    assert taught(none, 7) == [None] * 7
    assert [none.kd_weight(t) for t in range(1, 8)] == [0.0] * 7
    assert none.summary()["segments"] == [{"from_step": 1, "to_step": 7, "teacher_step": None, "teacher": None,
                                           "kd_weight_first": 0.0, "kd_weight_last": 0.0}]


def test_salt_step_decay_teaches_the_first_n_steps_then_labels_only():
    schedule = build_schedule("salt", teacher(), 10, salt_steps=4)
    assert taught(schedule, 10) == [500] * 4 + [None] * 6
    assert [schedule.kd_weight(t) for t in range(1, 11)] == [1.0] * 4 + [0.0] * 6


def test_salt_linear_decay_and_fraction():
    schedule = build_schedule("salt", teacher(), 10, salt_fraction=0.4, salt_decay="linear")
    assert schedule.kd_steps == 4
    assert [schedule.kd_weight(t) for t in range(1, 11)] == [1.0, 0.75, 0.5, 0.25] + [0.0] * 6
    assert taught(schedule, 10) == [500] * 4 + [None] * 6
    first, second = schedule.summary()["segments"]
    assert (first["from_step"], first["to_step"], first["kd_weight_first"], first["kd_weight_last"]) == (1, 4, 1.0, 0.25)
    assert (second["from_step"], second["to_step"], second["teacher"]) == (5, 10, None)


# --------------------------------------------------------------------------- two-shot

def test_two_shot_with_a_named_intermediate_and_switch_step():
    schedule = build_schedule("two-shot", teacher(), 9, intermediate_step=200, switch_step=3)
    assert taught(schedule, 9) == [200] * 3 + [500] * 6
    default_switch = build_schedule("two-shot", teacher(), 9, intermediate_step=200)
    assert taught(default_switch, 9) == [200] * 4 + [500] * 5  # switch at half the steps (9 // 2)
    summary = default_switch.summary()
    assert summary["intermediate_step"] == 200 and summary["switch_step"] == 4
    assert summary["intermediate_chosen_by"] == "given"


def test_steepest_drop_ignores_a_single_noisy_spike():
    history = loss_curve_with_spike()
    assert steepest_loss_drop(history) == 415.0
    # Without smoothing the spike's fall (9 -> 5 at 150..160) would win: smoothing is what decides.
    assert steepest_loss_drop(history, window=1) == 155.0


def test_two_shot_picks_the_checkpoint_at_or_after_the_drop(tmp_path):
    steps = (100, 200, 300, 400, 500, 600, 800, 1000)
    automatic = build_schedule("two-shot", teacher(steps), 100, log_history=loss_curve_with_spike())
    assert automatic.intermediate.step == 500 and automatic.drop_step == 415.0
    assert taught(automatic, 100) == [500] * 50 + [1000] * 50
    assert "step 415" in automatic.summary()["intermediate_chosen_by"]

    # The same choice read from the final checkpoint's trainer_state.json.
    for step in steps:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        history = [e for e in loss_curve_with_spike() if e["step"] <= step]
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    from_files = build_schedule("two-shot", list_checkpoints(tmp_path), 100, switch_step=30)
    assert from_files.intermediate == Checkpoint(500, tmp_path / "checkpoint-500")
    assert taught(from_files, 100) == [500] * 30 + [1000] * 70


def test_two_shot_uses_the_final_checkpoint_when_the_drop_is_after_every_other():
    schedule = build_schedule("two-shot", teacher((100, 200, 1000)), 10, log_history=loss_curve_with_spike())
    assert schedule.intermediate.step == 1000


def test_logged_losses_and_running_median():
    history = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.5},
               {"step": 3, "loss": float("nan")}, {"step": 4, "eval_loss": 1.0}, {"loss": 1.0}, "junk"]
    assert logged_losses(history) == [(1, 4.0), (2, 2.5)]
    assert running_median([1.0, 9.0, 1.0, 1.0, 5.0], 3) == [5.0, 1.0, 1.0, 1.0, 3.0]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind,kwargs,error,words", [
    ("curriculum", {}, UsageError, "unknown schedule"),
    ("progressive", {"multiplier": 0}, UsageError, "--multiplier"),
    ("salt", {}, UsageError, "exactly one of --salt-steps or --salt-fraction"),
    ("salt", {"salt_steps": 2, "salt_fraction": 0.5}, UsageError, "exactly one"),
    ("salt", {"salt_steps": 11}, UsageError, "--salt-steps"),
    ("salt", {"salt_fraction": 1.5}, UsageError, "--salt-fraction"),
    ("salt", {"salt_steps": 2, "salt_decay": "cosine"}, UsageError, "unknown salt decay"),
    ("two-shot", {"intermediate_step": 250}, UsageError, "no teacher checkpoint at step 250"),
    ("two-shot", {"intermediate_step": 200, "switch_step": 11}, UsageError, "--switch-step"),
    ("two-shot", {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}, DataError, "too few"),
    ("two-shot", {"log_history": [{"step": s, "loss": 1.0 + s} for s in range(1, 6)]}, DataError, "never falls"),
    ("two-shot", {"log_history": loss_curve_with_spike(), "smoothing_window": 4}, UsageError, "odd"),
])
def test_bad_arguments(kind, kwargs, error, words):
    with pytest.raises(error, match=words):
        build_schedule(kind, teacher(), 10, **kwargs)


def test_bad_steps_and_checkpoints():
    with pytest.raises(UsageError, match="at least one teacher checkpoint"):
        build_schedule("one-shot", [], 10)
    with pytest.raises(UsageError, match="repeat step"):
        build_schedule("one-shot", [(100, "a"), (100, "b")], 10)
    with pytest.raises(UsageError, match="positive integer"):
        build_schedule("one-shot", teacher(), 0)
    schedule = build_schedule("one-shot", teacher(), 10)
    for step in (0, 11):
        with pytest.raises(UsageError, match="outside 1..10"):
            schedule.teacher_at(step)
    with pytest.raises(DataError, match="trainer_state.json"):
        build_schedule("two-shot", [(100, "/nonexistent/checkpoint-100")], 10)
