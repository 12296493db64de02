"""`dyn train` end to end on GSM8K rows with a tiny GPT-2 (2 layers, hidden 32) and a tokenizer
trained on the same rows: checkpoint layout, learning-rate weights from the real trainer_state.json,
optimizer state by name, exact resume, LoRA, two processes, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import invoke

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k-train.jsonl"
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 512}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
CHECKPOINT_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "optimizer.pt", "scheduler.pt", "param_names.json", "trainer_state.json",
}


def gsm8k_rows(n: int) -> list[dict]:
    if not GSM8K.exists():
        pytest.skip(f"real data not found at {GSM8K}")
    with open(GSM8K, encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train(*args):
    return invoke("train", *args)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DYN_DEBUG", raising=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """64 GSM8K rows and two tiny configs (with GPT-2's dropout, and without)."""
    folder = tmp_path_factory.mktemp("inputs")
    data = write_jsonl(folder / "gsm8k-64.jsonl", gsm8k_rows(64))
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    exact = folder / "tiny-no-dropout.json"
    exact.write_text(json.dumps(TINY | NO_DROPOUT))
    return {"data": data, "config": config, "no_dropout": exact, "folder": folder}


def common(inputs, config_key="config") -> list[str]:
    return [inputs["data"], "--template", "{question}", "--response-field", "answer", "--model", inputs[config_key],
            "--train-tokenizer", "--vocab-size", "512", "--batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0.2"]


@pytest.fixture(scope="module")
def main_run(inputs):
    """12 steps, a checkpoint every 4 steps, logged every step, dropout on."""
    run = inputs["folder"] / "run"
    result = train(*common(inputs), "-o", run, "--save-every", "4", "--max-steps", "12", "--json")
    assert result.exit_code == 0, result.stderr
    return run, json.loads(result.stdout)


def test_checkpoint_layout_and_trainer_state(main_run):
    run, summary = main_run
    from dyn.distill.checkpoints import list_checkpoints, read_trainer_state

    assert [c.step for c in list_checkpoints(run)] == [4, 8, 12]
    assert {p.name for p in run.iterdir()} == {
        "checkpoint-4", "checkpoint-8", "checkpoint-12", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "run.json",
    }
    for checkpoint in list_checkpoints(run):
        assert {p.name for p in checkpoint.path.iterdir()} == CHECKPOINT_FILES
        state = read_trainer_state(checkpoint.path)
        assert state["global_step"] == checkpoint.step and state["max_steps"] == 12
        assert state["num_train_epochs"] == 1 and state["logging_steps"] == 1 and state["save_steps"] == 4
        assert [e["step"] for e in state["log_history"]] == list(range(1, checkpoint.step + 1))
        for entry in state["log_history"]:
            assert {"step", "loss", "learning_rate", "epoch", "grad_norm", "num_tokens"} <= set(entry)
        assert state["dyn"]["example_format"] == {"template": "{question}", "response_field": "answer", "messages_field": None, "separator": "\n"}
    final = json.loads((run / "trainer_state.json").read_text())
    log = final["log_history"]
    # Warm-up over ceil(0.2 * 12) = 3 steps to 3e-3, then linear decay over the 9 steps after it.
    assert [e["learning_rate"] for e in log[:5]] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3 * 8 / 9])
    assert np.mean([e["loss"] for e in log[-3:]]) < np.mean([e["loss"] for e in log[:3]]) - 0.3, "the loss goes down"
    assert not list(run.glob(".*dyn-tmp*")), "no temporary folder left"

    record = json.loads((run / "run.json").read_text())
    assert record["command"] == "train" and record["world_size"] == 1
    figures = record["figures"]
    assert figures["steps"] == 12 and figures["rows_trained"] == 64 and figures["tokens_per_s"] > 0
    assert figures["final_loss"] == pytest.approx(log[-1]["loss"])
    assert figures["checkpoints"] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert record["inputs"][0]["rows"] == 64 and len(record["inputs"][0]["sha256"]) == 64
    assert summary["figures"]["final_loss"] == figures["final_loss"]


def test_mean_learning_rates_from_the_real_trainer_state(main_run):
    run, _ = main_run
    from dyn.distill.checkpoints import list_checkpoints, mean_learning_rates

    logged = {e["step"]: e["learning_rate"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"]}
    expected = {4: np.mean([logged[s] for s in range(1, 5)]), 8: np.mean([logged[s] for s in range(5, 9)]),
                12: np.mean([logged[s] for s in range(9, 13)])}
    assert mean_learning_rates(run) == pytest.approx(expected, rel=1e-12)
    # A chosen subset: segments run between the checkpoints given.
    chosen = [c.path for c in list_checkpoints(run)][::2]
    assert mean_learning_rates(chosen) == pytest.approx({4: expected[4], 12: np.mean([logged[s] for s in range(5, 13)])})


def test_optimizer_state_by_parameter_name(main_run):
    run, _ = main_run
    from dyn.core.models import load_model_and_tokenizer
    from dyn.distill.checkpoints import load_optimizer_state

    state = load_optimizer_state(run / "checkpoint-8")
    model, _ = load_model_and_tokenizer(str(run / "checkpoint-8"))
    params = dict(model.named_parameters())
    mapping = state.for_model(model)
    assert set(mapping.values()) == set(state.names())
    tied = {"lm_head.weight"}  # shares its tensor with transformer.wte.weight
    assert set(params) - tied == set(state.names())
    for name in state.names():
        assert state.exp_avg[name].shape == params[name].shape and state.step[name] == 8
        assert (state.exp_avg_sq[name] >= 0).all()
    names = json.loads((run / "checkpoint-8" / "param_names.json").read_text())
    assert sorted(names) == sorted(state.names())
    from dyn.distill.checkpoints import canonical_param_name

    wrapped = "module._fsdp_wrapped_module.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    assert canonical_param_name(wrapped) == "transformer.h.0.attn.c_attn.lora_A.default.weight"


def test_resume_gives_the_same_weights_as_an_unbroken_run(main_run, tmp_path, inputs):
    run, _ = main_run
    from safetensors.torch import load_file

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for name in ("checkpoint-12", "run.json", "model.safetensors", "trainer_state.json"):
        target = broken / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    refused = train(*common(inputs), "-o", broken, "--save-every", "4", "--max-steps", "12")
    assert refused.exit_code == 2 and "--resume" in refused.stderr

    result = train(*common(inputs), "-o", broken, "--save-every", "4", "--max-steps", "12", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["figures"]["resumed_from"].endswith("checkpoint-8")
    unbroken, resumed = load_file(run / "model.safetensors"), load_file(broken / "model.safetensors")
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name
    a = json.loads((run / "trainer_state.json").read_text())["log_history"]
    b = json.loads((broken / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in a] == [e["loss"] for e in b]

    changed = train(*common(inputs), "-o", broken, "--save-every", "4", "--max-steps", "12", "--resume", "--seed", "1")
    assert changed.exit_code == 2 and "seed 0 -> 1" in changed.stderr


def test_lora_run_saves_an_adapter_and_its_base(inputs, tmp_path):
    from dyn.core.models import load_model_and_tokenizer
    from dyn.distill.checkpoints import load_optimizer_state

    run = tmp_path / "lora"
    result = train(*common(inputs), "-o", run, "--lora-r", "4", "--max-steps", "2", "--save-every", "1", "-q")
    assert result.exit_code == 0, result.stderr
    checkpoint = run / "checkpoint-1"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files
    record = json.loads((run / "run.json").read_text())
    base = record["lora"]["base_model"]
    assert Path(base) == (run / "base-model").resolve() and (Path(base) / "model.safetensors").is_file()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == base

    model, _ = load_model_and_tokenizer(str(checkpoint))
    trainable_on_disk = load_optimizer_state(checkpoint).names()
    assert trainable_on_disk and all(".lora_A." in n or ".lora_B." in n for n in trainable_on_disk)
    lora_names = {n.removeprefix("base_model.model.") for n, _ in model.named_parameters() if "lora_" in n}
    assert set(trainable_on_disk) == lora_names
    mapping = load_optimizer_state(checkpoint).for_model(model)
    assert sorted(mapping.values()) == sorted(lora_names) and all(k.startswith("base_model.model.") for k in mapping)


def test_two_processes_write_one_set_of_checkpoints_and_match_one_process(inputs, tmp_path):
    args = [*common(inputs, "no_dropout"), "--max-steps", "2", "--fraction", "0.5", "--save-every", "1", "-q"]
    one = train(*args, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    two = subprocess.run(["dyn", "train", *map(str, args), "-o", str(tmp_path / "two"), "--num-processes", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert not list((tmp_path / "two").glob(".*"))
    records = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two")]
    assert [r["world_size"] for r in records] == [1, 2]
    assert records[0]["training_rows"] == records[1]["training_rows"] and len(records[0]["training_rows"]) == 32
    losses = [[e["loss"] for e in json.loads((tmp_path / n / "trainer_state.json").read_text())["log_history"]] for n in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_plan_with_a_token_budget_keeps_each_step_within_it():
    from dyn.distill.trainer import plan_steps

    lengths = np.random.default_rng(0).integers(10, 200, size=50)
    plan = plan_steps(lengths, batch_size=None, batch_tokens=600, epochs=2, max_steps=None, seed=0)
    assert plan.total == 2 * plan.steps_per_epoch
    for rows in plan.steps:
        assert len(rows) * lengths[rows].max() <= 600
    first_epoch = np.concatenate(plan.steps[: plan.steps_per_epoch])
    assert sorted(first_epoch.tolist()) == list(range(50)), "an epoch visits every row once"
    again = plan_steps(lengths, batch_size=None, batch_tokens=600, epochs=2, max_steps=None, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(plan.steps, again.steps))


# --------------------------------------------------------------------------- bad input

def assert_one_error_line(result, code: int, *fragments: str) -> None:
    """Exit code, one `dyn: error:` line naming the problem, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dyn: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_inputs_exit_with_one_line_naming_the_problem(inputs, tmp_path):
    data, config = inputs["data"], inputs["config"]
    base = ["--model", config, "--train-tokenizer", "--max-steps", "1", "-q"]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_error_line(train(empty, *base, "-o", tmp_path / "a"), 3, f"{empty}: file is empty")

    result = train(data, "--template", "{question}", "--response-field", "solution", *base, "-o", tmp_path / "b")
    assert_one_error_line(result, 3, f"{data}: no column 'solution'", "columns are: question, answer")
    assert_one_error_line(train(data, *base, "-o", tmp_path / "c"), 2, "columns are: question, answer")

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"n_embd": 30, "n_head": 4}))
    result = train(data, "--template", "{question}", "--response-field", "answer", "--model", invalid, "--train-tokenizer", "-o", tmp_path / "d")
    assert_one_error_line(result, 2, str(invalid), "not divisible")

    result = train(data, "--template", "{question}", "--response-field", "answer", "--model", config, "-o", tmp_path / "e")
    assert_one_error_line(result, 2, "--train-tokenizer or --tokenizer")

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    result = train(data, "--template", "{question}", "--response-field", "answer", *base, "-o", occupied, "--overwrite")
    assert_one_error_line(result, 2, f"-o {occupied}: folder exists and is not a dyn run")
    assert (occupied / "notes.txt").read_text() == "mine"

    no_answers = write_jsonl(tmp_path / "no-answers.jsonl", [{"question": r["question"], "answer": " "} for r in gsm8k_rows(4)])
    result = train(no_answers, "--template", "{question}", "--response-field", "answer", *base, "-o", tmp_path / "f")
    assert_one_error_line(result, 3, f"{no_answers}: no row has a response token", "empty response: 4")
    assert not any((tmp_path / name).exists() for name in "abcdef"), "a failed run writes no run folder"
