"""`dyn distill` end to end on GSM8K rows: a tiny teacher trained by `dyn train` with checkpoints,
cached by `dyn distill cache`, and tiny students distilled from it. Checks which checkpoint
taught each step, the first step's loss against a brute-force float64 formula, the cache at
k = vocabulary against the online teacher, `--schedule none` against `dyn train`, resume after a
real kill, two processes against one, held-out evaluation, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import invoke as dyn

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k-train.jsonl"
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
FORMAT = ["--template", "{question}", "--response-field", "answer"]




def worker_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DYN_DEBUG", raising=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, write_jsonl):
    """48 GSM8K rows; a tiny teacher trained 8 steps with checkpoints at 2, 4, 6, 8 (its own
    vocabulary: 384 BPE ids), and its cache at top-k 16."""
    if not GSM8K.exists():
        pytest.skip(f"real data not found at {GSM8K}")
    folder = tmp_path_factory.mktemp("distill")
    with open(GSM8K, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, 48)]
    data = write_jsonl(folder / "train.jsonl", rows)
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    run = folder / "teacher"
    trained = dyn("train", data, *FORMAT, "--model", config, "--train-tokenizer", "--vocab-size", "384", "--batch-size", "8",
                  "--lr", "3e-3", "--max-steps", "8", "--save-every", "2", "--max-length", "192", "-o", run, "-q")
    assert trained.exit_code == 0, trained.stderr
    cache = folder / "cache"
    cached = dyn("distill", "cache", "--teacher", run, "--data", data, "-o", cache, "--top-k", "16", "-q")
    assert cached.exit_code == 0, cached.stderr
    return {"folder": folder, "data": data, "config": config, "run": run, "cache": cache, "rows": rows}


def student_args(teacher, *extra) -> list:
    return ["distill", "--student", teacher["config"], "--data", teacher["data"], "--batch-size", "8", "--lr", "2e-3",
            "--warmup-ratio", "0", *extra]


def log_of(run: Path) -> list[dict]:
    return [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_progressive_run_records_which_checkpoint_taught_each_step(teacher, tmp_path):
    out = tmp_path / "student"
    result = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--schedule", "progressive", "--multiplier", "2",
                               "--max-steps", "4", "--save-every", "2", "-o", out, "--json"))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    # Student step t follows the first teacher checkpoint with step >= 2t.
    assert [e["teacher_step"] for e in log_of(out)] == [2, 4, 6, 8]
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "distill" and record["teacher"]["teacher"] == "cache"
    assert [(s["from_step"], s["to_step"], s["teacher_step"]) for s in record["schedule"]["segments"]] == [
        (1, 1, 2), (2, 2, 4), (3, 3, 6), (4, 4, 8)]
    assert summary["schedule"] == record["schedule"]
    assert {m["role"] for m in record["models"]} >= {"teacher checkpoint-2", "teacher checkpoint-8"}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["dyn"]["format"] == "dyn-distill/1"
    assert (out / "checkpoint-2" / "optimizer.pt").is_file() and (out / "model.safetensors").is_file()


def test_each_schedule_teaches_with_the_checkpoints_and_weights_it_names(teacher, tmp_path):
    cases = {
        ("one-shot",): ([8, 8, 8, 8], [1, 1, 1, 1]),
        ("two-shot", "--intermediate-step", "4", "--switch-step", "1"): ([4, 8, 8, 8], [1, 1, 1, 1]),
        ("salt", "--salt-steps", "2", "--salt-decay", "linear"): ([8, 8, None, None], [1, 0.5, 0, 0]),
        ("none",): ([None] * 4, [0, 0, 0, 0]),
    }
    for flags, (teachers, weights) in cases.items():
        out = tmp_path / flags[0]
        result = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--schedule", *flags, "--max-steps", "4",
                                   "-o", out, "-q"))
        assert result.exit_code == 0, (flags, result.stderr)
        log = log_of(out)
        assert [e["teacher_step"] for e in log] == teachers, flags
        assert [e["kd_weight"] for e in log] == pytest.approx(weights), flags


def test_two_shot_picks_the_intermediate_checkpoint_from_the_teachers_loss_curve(teacher, tmp_path):
    from dyn.distill.schedules import checkpoint_at_or_after, steepest_loss_drop
    from dyn.distill.checkpoints import list_checkpoints

    log_history = json.loads((teacher["run"] / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    expected = checkpoint_at_or_after(list_checkpoints(teacher["run"]), steepest_loss_drop(log_history)).step
    out = tmp_path / "two-shot"
    result = dyn(*student_args(teacher, "--teacher", teacher["run"], "--teacher-cache", teacher["cache"], "--schedule", "two-shot",
                               "--max-steps", "4", "-o", out, "-q"))
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "run.json").read_text())["schedule"]
    assert record["intermediate_step"] == expected and record["switch_step"] == 2
    assert "steepest logged loss drop" in record["intermediate_chosen_by"]
    assert [e["teacher_step"] for e in log_of(out)] == [expected, expected, 8, 8]


def _first_step_rows(teacher):
    """The rows of the student's first step and their collated batch, rebuilt with the library."""
    from dyn.core.io import read_rows
    from dyn.core.lm import ExampleFormat, build_lm_examples, pad_token_id
    from dyn.core.models import load_tokenizer
    from dyn.distill.trainer import plan_steps

    tokenizer = load_tokenizer(str(teacher["run"] / "checkpoint-2"))
    examples, _ = build_lm_examples(read_rows(str(teacher["data"])), ExampleFormat("{question}", "answer"), tokenizer, 192)
    usable = examples.with_response()
    plan = plan_steps(examples.lengths[usable], batch_size=8, batch_tokens=None, epochs=1.0, max_steps=1, seed=0)
    return examples.batch(usable[plan.steps[0]], pad_token_id(tokenizer)), tokenizer


def test_first_step_loss_equals_a_brute_force_float64_formula(teacher, tmp_path):
    """Online teacher, forward KL at τ = 2 mixed with the label CE at α = 0.3: step 1's logged
    loss is the mean over its rows of each row's mean over its response tokens."""
    from transformers import AutoConfig

    from dyn.core.models import build_fresh_model, load_causal_lm

    out = tmp_path / "online"
    result = dyn(*student_args(teacher, "--teacher", teacher["run"], "--schedule", "one-shot", "--temperature", "2",
                               "--alpha", "0.3", "--max-steps", "1", "-o", out, "-q"))
    assert result.exit_code == 0, result.stderr
    logged = log_of(out)[0]["loss"]

    batch, tokenizer = _first_step_rows(teacher)
    config = AutoConfig.from_pretrained(str(out))
    student = build_fresh_model(config, seed=0).double().eval()
    teacher_model = load_causal_lm(str(teacher["run"] / "checkpoint-8")).double().eval()
    with torch.no_grad():
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        z_t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    row_means = []
    for r in range(targets.shape[0]):
        terms = []
        for t in torch.nonzero(targets[r] != -100).flatten().tolist():
            p_t = torch.softmax(z_t[r, t] / 2, -1)
            p_s = torch.softmax(z_s[r, t] / 2, -1)
            kl = float((p_t * (p_t.log() - p_s.log())).sum())
            ce = float(-torch.log_softmax(z_s[r, t], -1)[targets[r, t]])
            terms.append(0.3 * kl + 0.7 * ce)
        row_means.append(np.mean(terms))
    assert logged == pytest.approx(float(np.mean(row_means)), rel=1e-4)


def test_a_cache_of_the_whole_vocabulary_gives_the_online_teachers_loss(teacher, tmp_path):
    from dyn.core.models import load_tokenizer

    vocab = len(load_tokenizer(str(teacher["run"] / "checkpoint-2")))
    full = tmp_path / "cache-full"
    built = dyn("distill", "cache", "--teacher", teacher["run"] / "checkpoint-4", "--data", teacher["data"], "-o", full,
                "--top-k", vocab, "-q")
    assert built.exit_code == 0, built.stderr
    losses = {}
    for name, source in (("cache", ["--teacher-cache", full]), ("online", ["--teacher", teacher["run"] / "checkpoint-4"])):
        out = tmp_path / name
        result = dyn(*student_args(teacher, *source, "--schedule", "one-shot", "--max-steps", "3", "-o", out, "-q"))
        assert result.exit_code == 0, result.stderr
        losses[name] = [e["loss"] for e in log_of(out)]
    # The cache stores float16 log-probabilities (relative error <= |log p| 2^-11).
    assert losses["cache"] == pytest.approx(losses["online"], rel=2e-3)


def test_schedule_none_is_dyn_train(teacher, tmp_path):
    """Labels only through the distillation objective gives dyn train's losses and weights."""
    from safetensors.torch import load_file

    common = ["--batch-size", "8", "--lr", "2e-3", "--warmup-ratio", "0", "--max-steps", "3", "--max-length", "192", "-q"]
    trained = dyn("train", teacher["data"], *FORMAT, "--model", teacher["config"], "--tokenizer", teacher["run"] / "checkpoint-2",
                  *common, "-o", tmp_path / "train")
    assert trained.exit_code == 0, trained.stderr
    distilled = dyn("distill", "--student", teacher["config"], "--data", teacher["data"], "--teacher", teacher["run"],
                    "--schedule", "none", *common, "-o", tmp_path / "none")
    assert distilled.exit_code == 0, distilled.stderr
    assert [e["loss"] for e in log_of(tmp_path / "none")] == pytest.approx([e["loss"] for e in log_of(tmp_path / "train")], rel=1e-6)
    a, b = load_file(tmp_path / "train" / "model.safetensors"), load_file(tmp_path / "none" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_after_a_kill_gives_the_unbroken_run(teacher, tmp_path):
    from safetensors.torch import load_file

    args = [*student_args(teacher, "--teacher-cache", teacher["cache"], "--schedule", "progressive", "--multiplier", "0.5"),
            "--max-steps", "40", "--save-every", "4", "-q"]
    unbroken = dyn(*args, "-o", tmp_path / "unbroken")
    assert unbroken.exit_code == 0, unbroken.stderr

    broken = tmp_path / "broken"
    process = subprocess.Popen([sys.executable, "-m", "dyn.cli", *map(str, args), "-o", str(broken)],
                               env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (broken / "checkpoint-8").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (broken / "run.json").exists(), "the run finished before it could be killed"
    again = dyn(*args, "-o", broken, "--resume", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["figures"]["resumed_from"] is not None
    a, b = load_file(tmp_path / "unbroken" / "model.safetensors"), load_file(broken / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in log_of(broken)] == [e["loss"] for e in log_of(tmp_path / "unbroken")]


def test_two_processes_match_one(teacher, tmp_path):
    from safetensors.torch import load_file

    args = [*student_args(teacher, "--teacher-cache", teacher["cache"], "--schedule", "progressive", "--multiplier", "2"),
            "--max-steps", "3", "-q"]
    one = dyn(*args, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "dyn.cli", *map(str, args), "-o", str(tmp_path / "two"), "--num-processes", "2"],
                         capture_output=True, text=True, env=worker_env(), timeout=300)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert [e["loss"] for e in log_of(tmp_path / "two")] == pytest.approx([e["loss"] for e in log_of(tmp_path / "one")], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_gradient_accumulation_gives_the_same_steps(teacher, tmp_path):
    """--grad-accum splits a step into micro-batches for memory only: the same losses and weights."""
    from safetensors.torch import load_file

    runs = {}
    for accum in ("1", "3"):
        out = tmp_path / f"accum-{accum}"
        result = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--max-steps", "3", "--grad-accum", accum,
                                   "-o", out, "-q"))
        assert result.exit_code == 0, result.stderr
        runs[accum] = out
    assert [e["loss"] for e in log_of(runs["3"])] == pytest.approx([e["loss"] for e in log_of(runs["1"])], rel=1e-5)
    a, b = load_file(runs["1"] / "model.safetensors"), load_file(runs["3"] / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_student_with_padding_rows_learns_over_the_shared_ids(teacher, tmp_path):
    """A student folder whose embedding has 64 padding rows past the teacher's tokenizer: the run
    says so and distils over the shared ids, from the online teacher and from the cache."""
    from dyn.core.models import build_fresh_model, fresh_config, load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(str(teacher["run"] / "checkpoint-2"))
    model = build_fresh_model(fresh_config(resolve_model_source(str(teacher["config"])), tokenizer), seed=0)
    model.resize_token_embeddings(len(tokenizer) + 64)
    folder = tmp_path / "padded-student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, source in (("online", ["--teacher", teacher["run"]]), ("cache", ["--teacher-cache", teacher["cache"]])):
        out = tmp_path / name
        result = dyn("distill", "--student", folder, "--data", teacher["data"], *source, "--max-steps", "2", "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        assert f"the loss uses the {len(tokenizer)} ids they share" in result.stderr
        assert json.loads(result.stdout)["teacher"]["shared_vocabulary"] == len(tokenizer)
        assert all(np.isfinite(e["loss"]) for e in log_of(out))


def test_held_out_evaluation_is_logged(teacher, tmp_path, write_jsonl):
    held = write_jsonl(tmp_path / "held.jsonl", teacher["rows"][:8])
    out = tmp_path / "student"
    result = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--max-steps", "4", "--eval-data", held,
                               "--eval-every", "2", "--eval-metric", "final-answer", "--eval-max-new-tokens", "8", "-o", out, "--json"))
    assert result.exit_code == 0, result.stderr
    evaluations = json.loads(result.stdout)["figures"]["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4]
    assert all(e["eval_rows"] + e["eval_rows_without_response"] == 8 and e["eval_generated_rows"] == e["eval_rows"]
               and 0 <= e["eval_exact_match"] <= 1 and np.isfinite(e["eval_loss"]) for e in evaluations)
    state = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in state if "eval_loss" in e] == [2, 4]


def test_a_bad_held_out_file_leaves_the_run_being_overwritten_alone(teacher, tmp_path, write_jsonl):
    """The held-out file is read before --overwrite deletes anything."""
    out = tmp_path / "student"
    first = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--max-steps", "1", "-o", out, "-q"))
    assert first.exit_code == 0, first.stderr
    before = sorted(p.name for p in out.iterdir())
    no_answer = write_jsonl(tmp_path / "held.jsonl", [{"question": "q", "reply": "r"}])
    again = dyn(*student_args(teacher, "--teacher-cache", teacher["cache"], "--max-steps", "1", "-o", out, "--overwrite",
                              "--eval-data", no_answer))
    assert again.exit_code == 3 and "held.jsonl" in again.stderr and "answer" in again.stderr, again.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_non_finite_teacher_stops_the_run_naming_the_step_and_rows(teacher, tmp_path):
    """Position embeddings past 100 set to NaN: only rows longer than that get a NaN loss."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-teacher" / "checkpoint-8"
    shutil.copytree(teacher["run"] / "checkpoint-8", broken)
    weights = load_file(broken / "model.safetensors")
    weights["transformer.wpe.weight"][100:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    result = dyn(*student_args(teacher, "--teacher", broken, "--schedule", "one-shot", "--max-steps", "2", "-o", tmp_path / "s"))
    assert result.exit_code == 3
    message = result.stderr.strip().splitlines()[-1]
    assert "at step 1" in message and "line" in message, message
    assert not (tmp_path / "s" / "run.json").exists()


def test_bad_inputs_exit_with_one_line_naming_the_problem(teacher, tmp_path, write_jsonl):
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    other_data = write_jsonl(tmp_path / "other.jsonl", teacher["rows"][:20])
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"n_layer": 2, "n_embd": 30, "n_head": 4}))
    other_tokenizer = tmp_path / "other-student"
    tokenizer = train_bpe_tokenizer([r["question"] for r in teacher["rows"]][::-1] + ["zz qq xx"], 300, model_max_length=256)
    tokenizer.save_pretrained(str(other_tokenizer))
    made = dyn("train", teacher["data"], *FORMAT, "--model", teacher["config"], "--tokenizer", other_tokenizer, "--max-steps", "1",
               "-o", tmp_path / "other-run", "-q")
    assert made.exit_code == 0, made.stderr

    cases = [
        ((*student_args(teacher, "--teacher", empty), "-o", tmp_path / "a"), 3, "no checkpoint"),
        (("distill", "--data", teacher["data"], "--teacher", teacher["run"], "-o", tmp_path / "b"), 2, "--student"),
        ((*student_args(teacher), "-o", tmp_path / "c"), 2, "needs a teacher"),
        (("distill", "--student", teacher["config"], "--data", other_data, "--teacher-cache", teacher["cache"], "-o", tmp_path / "d"), 3, "refusing to reuse"),
        (("distill", "--student", bad_config, "--data", teacher["data"], "--teacher", teacher["run"], "-o", tmp_path / "e"), 2, "--student"),
        (("distill", "--student", tmp_path / "other-run", "--data", teacher["data"], "--teacher", teacher["run"], "-o", tmp_path / "f"), 3, "tokenizer"),
        ((*student_args(teacher, "--teacher", teacher["run"], "--schedule", "salt"), "-o", tmp_path / "g"), 2, "--salt-steps"),
        ((*student_args(teacher, "--teacher", teacher["run"], "--loss", "jsd", "--beta", "2"), "-o", tmp_path / "h"), 2, "--beta"),
    ]
    for args, code, words in cases:
        result = dyn(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert words in result.stderr, (words, result.stderr)
        assert "Traceback" not in result.stderr
    for name in "abcdefgh":
        assert not (tmp_path / name / "run.json").exists()
