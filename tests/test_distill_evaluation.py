"""Held-out evaluation (distill/evaluation.py) on tiny GPT-2s built in-process and real GSM8K rows:
the loss against a row-by-row float64 brute force, the answer comparisons, batched left-padded
generation against one-at-a-time and cache-free greedy decoding, exact match that fails on an
untrained model and passes on one trained to give a fixed answer, bad input, and two processes
(gloo) returning the same figures as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dyn.core.errors import DataError, UsageError

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k-test.jsonl"
MAX_LENGTH = 128
FIXED_ANSWER = "#### 42"

# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def gsm8k_rows(n: int) -> list[dict]:
    """The n shortest questions of the first 400 GSM8K test rows (question, answer)."""
    if not GSM8K.exists():
        pytest.skip(f"real data not found at {GSM8K}")
    with open(GSM8K, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(400), handle)]
    return sorted(rows, key=lambda r: len(r["question"]))[:n]


def gsm8k_format():
    from dyn.core.lm import ExampleFormat

    return ExampleFormat(template="{question}", response_field="answer")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tiny_gpt2(folder: Path, tokenizer, seed: int, initializer_range: float = 0.02):
    """A 2-layer GPT-2 (hidden 32) from config, saved with its tokenizer and loaded back."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dyn.core.models import load_model_and_tokenizer

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=160, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, initializer_range=initializer_range)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model_and_tokenizer(str(folder))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on real GSM8K text; an untrained tiny GPT-2, one with spread-out weights
    (decisive logits, for exact token comparisons), and one trained to answer FIXED_ANSWER."""
    import torch

    from dyn.core.lm import encode_prompt_response, model_row_losses, pad_token_id
    from dyn.core.models import load_causal_lm
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("evaluation")
    rows = gsm8k_rows(120)
    tokenizer = train_bpe_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=800,
                                    model_max_length=160)
    plain, tokenizer = tiny_gpt2(root / "plain", tokenizer, seed=0)
    spread, _ = tiny_gpt2(root / "spread", tokenizer, seed=1, initializer_range=0.5)
    trained, _ = tiny_gpt2(root / "trained-start", tokenizer, seed=2)

    train_rows = rows[:40]
    examples = encode_prompt_response([r["question"] + "\n" for r in train_rows], [FIXED_ANSWER] * len(train_rows),
                                      tokenizer, MAX_LENGTH)
    pad = pad_token_id(tokenizer)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    trained.train()
    for step in range(40):
        loss = model_row_losses(trained, examples.batch(np.arange(step % 5 * 8, step % 5 * 8 + 8), pad)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained.save_pretrained(root / "trained")
    tokenizer.save_pretrained(root / "trained")
    return {"root": root, "tokenizer": tokenizer, "pad": pad, "plain": plain, "spread": spread,
            "trained": load_causal_lm(str(root / "trained")), "trained_folder": root / "trained", "rows": rows}


def brute_force_loss(model, examples) -> float:
    """Each row alone, float64 log-softmax, the mean over its response tokens; the mean over rows."""
    import torch

    per_row = []
    for i, ids in enumerate(examples.input_ids):
        if examples.response_tokens[i] == 0:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids).unsqueeze(0)).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1).numpy()
        start = max(int(examples.prompt_lengths[i]), 1)
        per_row.append(np.mean([-log_probs[t - 1, ids[t]] for t in range(start, len(ids))]))
    return float(np.mean(per_row))


def test_loss_equals_the_brute_force_and_rows_without_response_are_counted(tiny, tmp_path):
    from dyn.distill.evaluation import evaluate, load_held_out

    rows = [dict(r) for r in tiny["rows"][60:84]]
    rows[3]["answer"] = ""
    rows[7]["question"] = " ".join([rows[7]["question"]] * 8)  # the prompt fills --max-length
    path = write_jsonl(tmp_path / "held.jsonl", rows)
    held = load_held_out(path, gsm8k_format(), tiny["tokenizer"], MAX_LENGTH)
    assert held.rows_in == 24 and held.source == path and held.references == [r["answer"] for r in rows]
    assert held.examples.response_tokens[3] == 0 and held.examples.response_tokens[7] == 0
    assert held.examples.truncated.sum() >= 2, "some long rows are cut, response tokens kept"

    model = tiny["plain"]
    model.train()
    small = evaluate(model, held, pad_token_id=tiny["pad"], device="cpu", batch_tokens=MAX_LENGTH * 3)
    assert model.training, "the model goes back to training mode"
    model.eval()
    large = evaluate(model, held, pad_token_id=tiny["pad"], device="cpu")
    assert not model.training
    assert set(small) == {"eval_loss", "eval_rows", "eval_rows_without_response"}
    assert small["eval_rows"] == 22 and small["eval_rows_without_response"] == 2
    expected = brute_force_loss(model, held.examples)
    assert small["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert large["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - np.log(len(tiny["tokenizer"]))) < 0.5, "an untrained model is near log(vocabulary)"


@pytest.mark.parametrize("generated, reference, metric, match", [
    ("The answer is  42\n", " The answer is 42", "exact-match", True),
    ("The answer is 42", "the answer is 42", "exact-match", False),
    ("a\tb\n\nc", "a b c", "exact-match", True),
    ("so #### 1,234", "Work: 617*2=1234\n#### 1234", "final-answer", True),
    ("#### 72.0", "#### 72", "final-answer", True),
    ("#### -3", "#### -3.00", "final-answer", True),
    ("#### 73", "#### 72", "final-answer", False),
    ("The answer is 72", "#### 72", "final-answer", False),
    ("#### 5 #### 7", "#### 7", "final-answer", True),
    ("#### 7 #### 5", "#### 7", "final-answer", False),
    ("#### $72", "#### 72", "final-answer", False),
    ("####  ten apples ", "#### ten  apples", "final-answer", True),
    ("#### 1,2", "#### 12", "final-answer", True),
])
def test_answers_match(generated, reference, metric, match):
    from dyn.distill.evaluation import answers_match

    assert answers_match(generated, reference, metric) is match


def test_metric_names_and_references_without_a_final_answer():
    from dyn.distill.evaluation import EVAL_METRICS, answers_match, check_metric

    assert EVAL_METRICS == ("loss", "exact-match", "final-answer")
    for metric in EVAL_METRICS:
        assert check_metric(metric) == metric
    with pytest.raises(UsageError, match="--eval-metric accuracy"):
        check_metric("accuracy")
    with pytest.raises(DataError, match="####"):
        answers_match("#### 3", "three", "final-answer")


def cache_free_greedy(model, prompt, new_tokens: int, stop: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence re-run for every token, no padding, no cache."""
    import torch

    ids = list(prompt)
    out = []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor([ids]), use_cache=False).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == stop:
            break
        out.append(token)
        ids.append(token)
    return out


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    from dyn.core.lm import encode_prompt_response
    from dyn.core.lm import left_padded
    from dyn.distill.evaluation import generate_greedy

    tokenizer, pad, model = tiny["tokenizer"], tiny["pad"], tiny["spread"].eval()
    rows = tiny["rows"][:120:15]
    examples = encode_prompt_response([r["question"] + "\n" for r in rows], [r["answer"] for r in rows], tokenizer, MAX_LENGTH)
    prompts = [ids[: int(n)] for ids, n in zip(examples.input_ids, examples.prompt_lengths)]
    assert len({len(p) for p in prompts}) >= 6, "prompts of many lengths: left padding is exercised"
    new = 16
    free = generate_greedy(model, left_padded(prompts, pad), max_new_tokens=new, pad_token_id=pad,
                           stop_ids=[tokenizer.eos_token_id])
    # Stop at a token some rows emit and others don't: rows end at different steps.
    counts = {t: sum(t in row for row in free) for t in {t for row in free for t in row[1:]}}
    stop = max((t for t, c in counts.items() if c < len(free)), key=lambda t: (counts[t], -t))
    batched = generate_greedy(model, left_padded(prompts, pad), max_new_tokens=new, pad_token_id=pad, stop_ids=[stop])
    alone = [generate_greedy(model, left_padded([p], pad), max_new_tokens=new, pad_token_id=pad, stop_ids=[stop])[0]
             for p in prompts]
    slow = [cache_free_greedy(model, p, new, stop) for p in prompts]
    assert batched == alone == slow
    assert len({tuple(t) for t in batched}) > 1 and len({len(t) for t in batched}) > 2 and max(map(len, batched)) == new
    # The check can fail: without the attention mask, padding shifts the positions and the tokens.
    unmasked = left_padded(prompts, pad)
    unmasked["attention_mask"] = unmasked["attention_mask"].clone().fill_(1)
    assert generate_greedy(model, unmasked, max_new_tokens=new, pad_token_id=pad, stop_ids=[stop]) != batched


def held_answers(tiny, tmp_path) -> str:
    """Eleven unseen questions: answers FIXED_ANSWER (4), "#### 42.0" (2), "#### 7" (2), an empty
    answer (not generated), and two whose prompt fills --max-length."""
    rows = [dict(r) for r in tiny["rows"][80:91]]
    answers = [FIXED_ANSWER] * 4 + ["Half of 84.\n#### 42.0"] * 2 + ["#### 7"] * 2 + ["", FIXED_ANSWER, FIXED_ANSWER]
    for row, answer in zip(rows, answers):
        row["answer"] = answer
    for row in rows[-2:]:
        row["question"] = " ".join([row["question"]] * 8)
    return write_jsonl(tmp_path / "held.jsonl", rows)


def test_exact_match_fails_untrained_and_passes_trained(tiny, tmp_path):
    from dyn.distill.evaluation import evaluate, load_held_out

    held = load_held_out(held_answers(tiny, tmp_path), gsm8k_format(), tiny["tokenizer"], MAX_LENGTH)
    common = dict(pad_token_id=tiny["pad"], device="cpu", max_new_tokens=12, batch_tokens=4 * MAX_LENGTH)
    trained = tiny["trained"]
    exact = evaluate(trained, held, metric="exact-match", **common)
    final = evaluate(trained, held, metric="final-answer", **common)
    assert exact["eval_generated_rows"] == final["eval_generated_rows"] == exact["eval_rows"] == 8
    assert exact["eval_rows_without_response"] == 3
    assert exact["eval_exact_match"] == 4 / 8, "the trained model answers FIXED_ANSWER to every question"
    assert final["eval_exact_match"] == 6 / 8, "'#### 42' and '#### 42.0' are the same final answer"
    assert exact["eval_loss"] == final["eval_loss"] == evaluate(trained, held, **common)["eval_loss"]
    assert evaluate(tiny["plain"], held, metric="exact-match", **common)["eval_exact_match"] == 0.0


def test_bad_held_out_input(tiny, tmp_path):
    from dyn.distill.evaluation import evaluate, load_held_out

    rows = [dict(r) for r in tiny["rows"][90:94]]
    fmt, tokenizer = gsm8k_format(), tiny["tokenizer"]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{**r, "answer": " "} for r in rows])
    with pytest.raises(DataError, match=r"empty\.jsonl: no held-out row has a response token"):
        load_held_out(empty, fmt, tokenizer, MAX_LENGTH)
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "answer": None}, rows[2], rows[3]])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: column 'answer' is null"):
        load_held_out(bad, fmt, tokenizer, MAX_LENGTH)
    held = load_held_out(bad, fmt, tokenizer, MAX_LENGTH, skip_bad_rows=True)
    assert held.references == [rows[0]["answer"], rows[2]["answer"], rows[3]["answer"]] and held.rows_in == 4
    assert held.where(1) == f"{bad} line 3"
    with pytest.raises(DataError, match="no column"):
        load_held_out(bad, type(fmt)(template="{prompt}", response_field="answer"), tokenizer, MAX_LENGTH)
    no_mark = write_jsonl(tmp_path / "plain.jsonl", [rows[0], {**rows[1], "answer": "eighteen"}])
    held = load_held_out(no_mark, fmt, tokenizer, MAX_LENGTH)
    with pytest.raises(DataError, match=r"plain\.jsonl line 2: the response has no '####'"):
        evaluate(tiny["plain"], held, metric="final-answer", pad_token_id=tiny["pad"], device="cpu")
    with pytest.raises(UsageError, match="--eval-metric bleu"):
        evaluate(tiny["plain"], held, metric="bleu", pad_token_id=tiny["pad"], device="cpu")


WORKER = """
import json, sys
from dyn.core.distributed import world
from dyn.core.lm import ExampleFormat, pad_token_id
from dyn.core.models import load_model_and_tokenizer
from dyn.distill.evaluation import evaluate, load_held_out

folder, data, out, batch_tokens = sys.argv[1:5]
model, tokenizer = load_model_and_tokenizer(folder)
held = load_held_out(data, ExampleFormat(template="{question}", response_field="answer"), tokenizer, %d)
figures = evaluate(model, held, metric="final-answer", pad_token_id=pad_token_id(tokenizer), device="cpu",
                   batch_tokens=int(batch_tokens), max_new_tokens=12)
w = world()
json.dump({"rank": w.rank, "size": w.size, "figures": figures}, open(f"{out}/rank-{w.rank}.json", "w"))
""" % MAX_LENGTH


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_return_the_same_figures_as_one(tiny, tmp_path):
    """Two workers joined over gloo (the environment torch.distributed.run sets) share the batches
    out; both return exactly the one-process figures."""
    from dyn.distill.evaluation import evaluate, load_held_out

    data = held_answers(tiny, tmp_path)
    batch_tokens = 2 * MAX_LENGTH
    held = load_held_out(data, gsm8k_format(), tiny["tokenizer"], MAX_LENGTH)
    from dyn.core.lm_batches import plan_row_batches

    assert len(plan_row_batches(held.examples, tiny["pad"], held.where, batch_tokens).batches) >= 4, "both ranks work"
    one = evaluate(tiny["trained"], held, metric="final-answer", pad_token_id=tiny["pad"], device="cpu",
                   batch_tokens=batch_tokens, max_new_tokens=12)
    script, out = tmp_path / "worker.py", tmp_path / "out"
    script.write_text(WORKER)
    out.mkdir()
    common = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    logs = [open(tmp_path / f"rank-{r}.log", "w") for r in (0, 1)]
    workers = [
        subprocess.Popen([sys.executable, str(script), str(tiny["trained_folder"]), data, str(out), str(batch_tokens)],
                         env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]
    for r, worker in enumerate(workers):
        worker.wait(timeout=300)
        logs[r].close()
        assert worker.returncode == 0, (tmp_path / f"rank-{r}.log").read_text()[-3000:]
    done = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [d["size"] for d in done] == [2, 2]
    assert done[0]["figures"] == done[1]["figures"] == one
    assert one["eval_exact_match"] == 6 / 8
