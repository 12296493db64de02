"""The library API for non-LM distillation (distill/functional.py) and the sparse-parity example
(examples/sparse_parity.py) in its --quick setting."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dyn.core.errors import DataError, UsageError
from dyn.distill.functional import distill, schedule_for
from dyn.distill.losses import KDLossSettings
from dyn.distill.schedules import steepest_loss_drop

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sparse_parity.py"


def tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def stream(seed=0, batch=16):
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch, 4, generator=generator)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def logits_fn(module, batch):
    return module(batch[0])


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class CountingFactory:
    """A teacher factory whose modules count state-dict loads, with the step each load carried."""

    def __init__(self):
        self.loaded = []

    def __call__(self):
        module = tiny(99)
        original = module.load_state_dict
        factory = self

        def load(state, *args, **kwargs):
            factory.loaded.append(int(state["marker"]))
            state = {k: v for k, v in state.items() if k != "marker"}
            return original(state, *args, **kwargs)

        module.load_state_dict = load
        return module


def teachers(steps=(10, 20, 30)):
    found = {}
    for step in steps:
        state = dict(tiny(step).state_dict())
        state["marker"] = torch.tensor(step)
        found[step] = state
    return found


@pytest.mark.parametrize("kind, expected", [
    ("progressive", [(1, 10, 10), (11, 20, 20), (21, 40, 30)]),
    ("one-shot", [(1, 40, 30)]),
    ("none", [(1, 40, None)]),
])
def test_teacher_switches_where_the_schedule_says_and_segments_are_recorded(kind, expected):
    states = teachers()
    schedule = schedule_for(kind, states, 40)
    factory = CountingFactory()
    result = distill(tiny(), logits_fn, stream(), schedule=schedule, settings=KDLossSettings(alpha=0.5),
                     optimizer_factory=sgd, teachers=states, teacher_factory=factory)
    got = [(s["from_step"], s["to_step"], s["teacher_step"]) for s in result.segments]
    assert got == expected
    # the segments run equal the schedule's plan when nothing stops the run early
    assert [(s["from_step"], s["to_step"], s["teacher_step"]) for s in schedule.segments()] == expected
    # weights are loaded only when the teacher changes, in the order they teach
    taught = [t for _, _, t in expected if t is not None]
    distinct = [t for i, t in enumerate(taught) if i == 0 or taught[i - 1] != t]
    assert factory.loaded == distinct
    assert result.teacher_loads == len(distinct)
    assert result.steps == 40
    assert result.record()["segments"] == result.segments
    assert result.schedule["schedule"] == kind
    if kind == "progressive":
        assert result.segments[0]["teacher"] == "in-memory:checkpoint-10"


def test_two_shot_reads_the_loss_log_and_switches_at_the_switch_step():
    states = teachers((10, 20, 30, 40))
    log = [{"step": s, "loss": loss} for s, loss in
           [(5, 0.69), (10, 0.69), (15, 0.69), (20, 0.68), (25, 0.3), (30, 0.05), (35, 0.02), (40, 0.01)]]
    schedule = schedule_for("two-shot", states, 30, log_history=log, switch_step=12)
    drop = steepest_loss_drop(log)
    assert 20 < drop < 30 and schedule.intermediate.step == 30  # the first checkpoint at or after the drop
    result = distill(tiny(), logits_fn, stream(), schedule=schedule, settings=KDLossSettings(),
                     optimizer_factory=sgd, teachers=states, teacher_factory=CountingFactory())
    got = [(s["from_step"], s["to_step"], s["teacher_step"]) for s in result.segments]
    assert got == [(1, 12, 30), (13, 30, 40)]


def test_early_stop_cuts_the_last_segment_and_records_the_step():
    states = teachers()
    schedule = schedule_for("progressive", states, 40)
    calls = []

    def evaluate(step):
        calls.append(step)
        return {"accuracy": 1.0 if step >= 15 else 0.0}

    result = distill(tiny(), logits_fn, stream(), schedule=schedule, settings=KDLossSettings(),
                     optimizer_factory=sgd, teachers=states, teacher_factory=CountingFactory(),
                     eval_fn=evaluate, eval_every=5, stop_at=("accuracy", 0.95))
    assert calls == [5, 10, 15]
    assert result.reached_step == 15 and result.steps == 15
    assert result.segments[-1] == {"from_step": 11, "to_step": 15, "teacher_step": 20,
                                   "teacher": "in-memory:checkpoint-20", "kd_weight_first": 1.0, "kd_weight_last": 1.0}
    assert [e["step"] for e in result.evals] == [5, 10, 15]


def test_teacher_equal_to_student_with_alpha_one_gives_zero_kd_loss():
    student = tiny(3)
    states = {100: copy.deepcopy(student.state_dict())}
    schedule = schedule_for("one-shot", states, 1)
    before = copy.deepcopy(student.state_dict())
    result = distill(student, logits_fn, stream(), schedule=schedule,
                     settings=KDLossSettings(loss="forward-kl", temperature=2.0, alpha=1.0),
                     optimizer_factory=sgd, teachers=states, teacher_factory=lambda: tiny(7), log_every=1)
    assert result.losses[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    # zero loss, zero gradient: the student does not move
    for name, value in student.state_dict().items():
        assert torch.allclose(value, before[name], atol=1e-7)


def test_labels_only_is_plain_cross_entropy():
    student = tiny(4)
    batch = next(stream())
    expected = torch.nn.functional.cross_entropy(student(batch[0]), batch[1]).item()
    result = distill(student, logits_fn, stream(), schedule=schedule_for("none", {}, 1),
                     settings=KDLossSettings(alpha=1.0), optimizer_factory=sgd, log_every=1)
    assert result.losses[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_nan_loss_raises_with_the_step():
    def poisoned(seed=0):
        for i, (x, y) in enumerate(stream(seed), start=1):
            if i == 7:
                x = x.clone()
                x[0, 0] = float("nan")
            yield x, y

    states = teachers()
    for kind, alpha in (("progressive", 1.0), ("progressive", 0.5), ("none", 0.0)):
        student = tiny()
        with pytest.raises(DataError, match="student step 7 "):
            distill(student, logits_fn, poisoned(), schedule=schedule_for(kind, states, 20),
                    settings=KDLossSettings(alpha=alpha), optimizer_factory=sgd, teachers=states,
                    teacher_factory=CountingFactory())
        assert all(torch.isfinite(p).all() for p in student.parameters())


def test_bad_setup_is_a_usage_error():
    states = teachers()
    schedule = schedule_for("progressive", states, 5)
    with pytest.raises(UsageError, match="lacks"):
        distill(tiny(), logits_fn, stream(), schedule=schedule, settings=KDLossSettings(), optimizer_factory=sgd,
                teachers={10: states[10]}, teacher_factory=CountingFactory())
    with pytest.raises(UsageError, match="teacher_factory"):
        distill(tiny(), logits_fn, stream(), schedule=schedule, settings=KDLossSettings(), optimizer_factory=sgd,
                teachers=states)
    with pytest.raises(UsageError, match="stop_at"):
        distill(tiny(), logits_fn, stream(), schedule=schedule_for("none", {}, 5), settings=KDLossSettings(),
                optimizer_factory=sgd, stop_at=("accuracy", 0.9))


def test_teacher_checkpoints_as_files(tmp_path):
    states = {}
    for step in (10, 20):
        path = tmp_path / f"teacher-{step}.pt"
        torch.save(tiny(step).state_dict(), path)
        states[step] = str(path)
    result = distill(tiny(), logits_fn, stream(), schedule=schedule_for("progressive", states, 20),
                     settings=KDLossSettings(), optimizer_factory=sgd, teachers=states, teacher_factory=lambda: tiny(0))
    assert [s["teacher"] for s in result.segments] == [states[10], states[20]]
    assert result.teacher_loads == 2


def test_sparse_parity_quick_progressive_beats_labels_only():
    """--quick (n=24, k=4, teacher width 256, student width 8, 1500 steps), seed 0. On this seed
    labels alone do not reach 95% in 1500 steps while progressive distillation reaches it at
    ~900; across seeds 0-4 progressive reached it 5/5, labels only 2/5 (and on one of those two,
    seed 3, labels only was faster), so the test pins seed 0 rather than claiming a per-seed law."""
    spec = importlib.util.spec_from_file_location("sparse_parity_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    outcome = example.main(["--quick", "--seeds", "0", "--schedules", "none", "progressive"])
    rows = outcome["rows"]
    assert rows["teacher"][0] is not None
    progressive, labels_only = rows["progressive"][0], rows["none"][0]
    assert progressive is not None
    assert labels_only is None or progressive <= labels_only
    detail = outcome["details"][0]["students"]["progressive"]
    assert detail["segments"][0]["teacher_step"] == 50 and len(detail["segments"]) > 5
