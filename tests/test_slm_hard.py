"""`dyn select --method slm-hard` and `dyn score`: the score against a brute-force per-row
computation on a tiny GPT-2 trained by `dyn train` on real rows, batching that changes no score,
the keep rules' edges, lineage over chained runs, 1 process equal to 2, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_runner import invoke as cli




def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def slm(tmp_path_factory, t0_rows):
    """A tiny GPT-2 trained by `dyn train` for 20 steps on 64 short real instruction-mix rows, and a
    pool of 60 other short rows (one with an empty completion) to score."""
    root = tmp_path_factory.mktemp("slm")
    rows = [r for r in t0_rows(400) if len(r["prompt"]) + len(r["completion"]) < 500][:130]
    train, pool = root / "train.jsonl", root / "pool.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    pool_rows = rows[70:130]
    pool_rows[3] = {**pool_rows[3], "completion": ""}
    pool.write_text("".join(json.dumps(r) + "\n" for r in pool_rows))
    run = root / "run"
    result = cli("train", train, "--model", "tiny", "--train-tokenizer", "--vocab-size", 400, "--max-length", 160,
                 "--max-steps", 20, "--batch-size", 16, "--lr", 3e-3, "-o", run, "-q")
    assert result.exit_code == 0, result.output
    return {"root": root, "pool": pool, "run": run, "rows": pool_rows}


def brute_force_scores(model, examples, top_k: int) -> np.ndarray:
    """Row by row: the full softmax, explicit top-k id sets, numpy's median."""
    import torch

    scores = np.full(len(examples), np.nan)
    for i, ids in enumerate(examples.input_ids):
        start = int(examples.prompt_lengths[i])
        if examples.response_tokens[i] == 0:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids).unsqueeze(0)).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1).numpy()
        top = torch.topk(logits, top_k, dim=-1).indices.numpy()
        losses = [-log_probs[t - 1, ids[t]] for t in range(max(start, 1), len(ids)) if ids[t] in set(top[t - 1].tolist())]
        if losses:
            scores[i] = float(np.median(losses))
    return scores


def _tokenised(slm, top_k=10):
    from dyn.core.io import read_rows
    from dyn.core.lm import build_lm_examples, pad_token_id, resolve_example_format
    from dyn.core.lm_batches import plan_row_batches
    from dyn.core.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(slm["run"]))
    loaded = read_rows(str(slm["pool"]))
    fmt = resolve_example_format(loaded.dataset.column_names, None, None, loaded.source)
    examples, loaded = build_lm_examples(loaded, fmt, tokenizer, 160)
    return model.eval(), examples, pad_token_id(tokenizer), loaded


def test_score_equals_the_brute_force_and_batching_changes_nothing(slm):
    from dyn.core.lm_batches import RowBatches, plan_row_batches
    from dyn.selection.slm_score import score_rows

    model, examples, pad, loaded = _tokenised(slm)
    expected = brute_force_scores(model, examples, top_k=10)
    assert np.isfinite(expected).sum() >= 25, "the tiny model must find learnable tokens in many rows"
    batched = plan_row_batches(examples, pad, loaded.where, 160 * 32)
    assert max(len(b) for b in batched.batches) >= 16, "padding must be exercised"
    one_by_one = RowBatches(examples, [np.array([i]) for i in range(len(examples))], pad, loaded.where,
                            np.zeros(len(examples), dtype=np.int64), ["all"])
    got = score_rows(model, batched, top_k=10)
    single = score_rows(model, one_by_one, top_k=10)
    assert np.array_equal(np.isnan(got.score), np.isnan(expected))
    np.testing.assert_allclose(got.score, expected, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(single.score, got.score, rtol=1e-5, equal_nan=True)
    assert np.array_equal(single.learnable_tokens, got.learnable_tokens)
    assert np.array_equal(got.tokens, examples.response_tokens)
    assert got.tokens[3] == 0 and np.isnan(got.score[3]), "the empty completion gets no score"
    wider = score_rows(model, batched, top_k=50)
    assert (wider.learnable_tokens >= got.learnable_tokens).all() and wider.learnable_tokens.sum() > got.learnable_tokens.sum()


def test_median_of_learnable_even_and_odd_counts():
    import torch

    from dyn.selection.slm_score import median_of_learnable

    inf = float("inf")
    losses = torch.tensor([[3.0, inf, 1.0, 2.0], [4.0, 1.0, inf, inf], [inf, inf, inf, inf]])
    learnable = torch.isfinite(losses)
    got = median_of_learnable(losses, learnable)
    assert got[0].item() == 2.0 and got[1].item() == 2.5 and np.isnan(got[2].item())


def select(slm, out: Path, *flags, command="select"):
    return cli(command, "--method", "slm-hard", slm["pool"], "--slm", slm["run"], "-o", out, "-q", *flags)


def test_select_keeps_the_hardest_rows_and_reports_groups(slm, tmp_path):
    out = tmp_path / "hard.jsonl"
    result = select(slm, out, "--fraction", 0.3, "--group-field", "task", "--plot", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    chosen = read_jsonl(out)
    scores = [r["dyn_score"] for r in chosen]
    assert scores == sorted(scores, reverse=True) and [r["dyn_rank"] for r in chosen] == list(range(len(chosen)))
    assert len(chosen) == round(0.3 * summary["rows_scored"])
    for r in chosen:
        original = slm["rows"][r["dyn_index"]]
        assert r["prompt"] == original["prompt"] and r["task"] == original["task"]
        assert 1 <= r["dyn_learnable_tokens"] <= r["dyn_tokens"]
    figures = json.loads((tmp_path / "hard.jsonl.dyn.json").read_text())["figures"]
    assert figures["scores_kept"]["mean"] > figures["scores_random_subset"]["mean"]
    empty = [i for i, r in enumerate(slm["rows"]) if not r["completion"].strip()]
    assert 3 in empty and figures["rows_without_score"]["reasons"]["empty response"] == len(empty)
    assert 3 in figures["rows_without_score"]["dyn_index"]
    groups = figures["groups"]
    assert sum(g["rows"] for g in groups) == len(slm["rows"])
    means = [g["mean_score"] for g in groups if g["mean_score"] is not None]
    assert means == sorted(means, reverse=True)
    assert (tmp_path / "hard.jsonl.scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_rule_edges(slm, tmp_path):
    scored = tmp_path / "scored.jsonl"
    assert select(slm, scored, command="score").exit_code == 0
    rows = read_jsonl(scored)
    scores = np.array([np.nan if r["dyn_score"] is None else r["dyn_score"] for r in rows])
    finite = scores[np.isfinite(scores)]

    everything = tmp_path / "band-all.jsonl"
    assert select(slm, everything, "--band", "0:1").exit_code == 0
    assert len(read_jsonl(everything)) == len(finite)

    band = tmp_path / "band.jsonl"
    assert select(slm, band, "--band", "0.5:0.9").exit_code == 0
    low, high = np.quantile(finite, [0.5, 0.9])
    assert sorted(r["dyn_index"] for r in read_jsonl(band)) == [i for i, s in enumerate(scores) if np.isfinite(s) and low <= s <= high]

    top = tmp_path / "top.jsonl"
    assert select(slm, top, "-k", 5).exit_code == 0
    order = sorted((i for i in range(len(scores)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))
    assert [r["dyn_index"] for r in read_jsonl(top)] == order[:5]

    learnable = np.array([r["dyn_learnable_tokens"] for r in rows])
    floor = int(np.median(learnable[np.isfinite(scores)]))
    many = tmp_path / "many.jsonl"
    assert select(slm, many, "--fraction", 1, "--min-learnable", floor).exit_code == 0
    assert {r["dyn_index"] for r in read_jsonl(many)} == {i for i in range(len(rows)) if np.isfinite(scores[i]) and learnable[i] >= floor}

    too_many = select(slm, tmp_path / "out.jsonl", "-k", len(finite) + 1)
    assert too_many.exit_code == 2 and "rows with a score" in too_many.stderr


def test_score_keeps_every_row_and_chained_runs_keep_lineage(slm, tmp_path):
    scored = tmp_path / "pool.scored.parquet"
    assert select(slm, scored, command="score").exit_code == 0
    import pyarrow.parquet as pq

    table = pq.read_table(scored).to_pylist()
    assert [r["dyn_index"] for r in table] == list(range(len(slm["rows"])))
    assert table[3]["dyn_score"] is None and table[3]["dyn_tokens"] == 0

    hard = tmp_path / "hard.parquet"
    assert cli("select", "--method", "slm-hard", scored, "--slm", slm["run"], "--fraction", 0.5, "-o", hard, "-q").exit_code == 0
    final = tmp_path / "final.jsonl"
    result = cli("select", "--method", "hmin", hard, "-k", 5, "--template", "{prompt}", "-o", final, "-q")
    assert result.exit_code == 0, result.output
    for r in read_jsonl(final):
        assert r["prompt"] == slm["rows"][r["dyn_index"]]["prompt"], "dyn_index points into the original pool"
        assert isinstance(r["dyn_score"], float), "the slm-hard score column travels along"
    parent = json.loads((tmp_path / "final.jsonl.dyn.json").read_text())["inputs"][0]
    assert parent["parent_run_record"] == str(hard) + ".dyn.json"
    grandparent = json.loads((tmp_path / "hard.parquet.dyn.json").read_text())["inputs"][0]
    assert grandparent["parent_run_record"] == str(scored) + ".dyn.json"


def test_two_processes_give_the_same_output_as_one(slm, tmp_path):
    env = {**os.environ, "DYN_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    flags = ["--method", "slm-hard", str(slm["pool"]), "--slm", str(slm["run"]), "--batch-tokens", "640", "-q"]
    assert cli("score", *flags, "-o", one).exit_code == 0
    result = subprocess.run(["dyn", "score", *flags, "-o", str(two), "--num-processes", "2"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert one.read_bytes() == two.read_bytes()
    assert json.loads((tmp_path / "two.jsonl.dyn.json").read_text())["world_size"] == 2


def _fails(result, code: int, *phrases: str, folder: Path):
    assert result.exit_code == code, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dyn: error:"), result.stderr
    for phrase in phrases:
        assert phrase in line, line
    assert not list(folder.glob("out*")), "nothing written on failure"


def test_bad_input(slm, tmp_path):
    out = tmp_path / "out.jsonl"
    _fails(cli("select", "--method", "slm-hard", slm["pool"], "--fraction", 0.3, "-o", out), 2, "--slm", folder=tmp_path)
    _fails(select(slm, out), 2, "-k N, --fraction F or --band", folder=tmp_path)
    _fails(select(slm, out, "-k", 3, "--fraction", 0.2), 2, "-k and --fraction", folder=tmp_path)
    _fails(select(slm, out, "--band", "0.9:0.5"), 2, "0 <= LO < HI <= 1", folder=tmp_path)
    _fails(select(slm, out, "--band", "half"), 2, "LO:HI", folder=tmp_path)
    _fails(select(slm, out, "-k", 3, "--top-k", 100000), 2, "vocabulary", folder=tmp_path)
    _fails(select(slm, out, "-k", 3, "--metric", "l2"), 2, "--metric is a --method hmin flag", folder=tmp_path)
    _fails(select(slm, out, "-k", 3, command="score"), 2, "dyn score keeps every row", folder=tmp_path)
    _fails(cli("select", "--method", "hmin", slm["pool"], "-k", 3, "--slm", slm["run"], "-o", out), 2,
           "--slm is a --method slm-hard flag", folder=tmp_path)

    no_tokenizer = tmp_path / "bare"
    shutil.copytree(slm["run"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    _fails(cli("select", "--method", "slm-hard", slm["pool"], "--slm", no_tokenizer, "-k", 3, "-o", out), 2,
           str(no_tokenizer), "no tokenizer", folder=tmp_path)

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "why?", "answer": "because"}) + "\n")
    _fails(cli("select", "--method", "slm-hard", questions, "--slm", slm["run"], "-k", 1, "-o", out), 2,
           str(questions), "--response-field", folder=tmp_path)
    _fails(cli("select", "--method", "slm-hard", questions, "--slm", slm["run"], "-k", 1, "--text-field", "text", "-o", out), 3,
           str(questions), "'text'", folder=tmp_path)


def test_text_field_scores_whole_rows_and_long_rows_are_cut_with_a_count(slm, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in slm["rows"][:20]))
    out = tmp_path / "scored.jsonl"
    result = cli("score", "--method", "slm-hard", texts, "--slm", slm["run"], "--text-field", "text", "--max-length", 32,
                 "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert all(r["dyn_tokens"] <= 31 for r in rows) and sum(r["dyn_tokens"] == 31 for r in rows) >= 10
    figures = json.loads(result.stdout)["figures"]
    assert figures["tokens"]["rows_truncated"] == sum(r["dyn_tokens"] == 31 for r in rows)


def test_unknown_token_rate_is_reported_when_the_vocabulary_does_not_cover_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "a"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    folder = tmp_path / "word-lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(words))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "the cat", "completion": "sat on the mat"}, {"prompt": "a dog", "completion": "ran far away"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("score", "--method", "slm-hard", data, "--slm", folder, "--top-k", 8, "-o", tmp_path / "out.jsonl", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["figures"]["tokens"]
    assert figures["unknown_tokens"] == 4 and figures["unknown_token_rate"] == pytest.approx(4 / 13)
    assert "unknown token" in result.stderr



def test_the_format_a_dyn_train_run_trained_with_is_the_default(tmp_path):
    gsm8k = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k-train.jsonl"
    if not gsm8k.exists():
        pytest.skip(f"real data not found at {gsm8k}")
    rows = [json.loads(line) for line in open(gsm8k, encoding="utf-8")][:16]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    trained = cli("train", data, "--model", "tiny", "--train-tokenizer", "--vocab-size", 300, "--template", "{question}",
                  "--response-field", "answer", "--max-length", 256, "--max-steps", 2, "-o", run, "-q")
    assert trained.exit_code == 0, trained.output
    result = cli("score", "--method", "slm-hard", data, "--slm", run, "--top-k", 50, "-o", tmp_path / "out.jsonl", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["figures"]["tokens"]["example_format"] == "prompt '{question}', response column 'answer'"
