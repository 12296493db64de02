"""`dyn teachers rank` (GRACE, DESIGN §4.4) end to end: the student's projected per-response
gradients against the exact batch-1 oracle (dense path = an explicit matrix product; factored
path = the oracle through its stage-two matrix when its first stage is exact, and within
projection noise at its default), the CLI on teachers trained by `dyn train` on a GSM8K slice
(generations, temperatures, reuse on rerun, --plot, --json), the same ranking from --responses
files, 1 process equal to 2 byte for byte, and bad input with exit codes and one-line messages."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_runner import invoke as cli

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k-train.jsonl"


def gsm8k(start: int, n: int, max_question_chars: int = 160) -> list[dict]:
    if not GSM8K_TRAIN.exists():
        pytest.skip(f"real data not found at {GSM8K_TRAIN}")
    with open(GSM8K_TRAIN, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [r for r in rows if len(r["question"]) <= max_question_chars][start:start + n]




def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teachers: a tiny GPT-2 trained by `dyn train` for 20 steps on 64 short GSM8K rows, its
    checkpoint at step 10 and its final model. Student: a fresh, smaller GPT-2 (hidden 32) with the
    same tokenizer. Prompts: 14 other GSM8K questions."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("teachers")
    train = write_jsonl(root / "train.jsonl", gsm8k(0, 64))
    run = root / "run"
    result = cli("train", train, "--model", "tiny", "--train-tokenizer", "--vocab-size", 400, "--template", "{question}",
                 "--response-field", "answer", "--max-length", 128, "--max-steps", 20, "--save-every", 10,
                 "--batch-size", 16, "--lr", 3e-3, "-o", run, "-q")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    student = root / "student"
    GPT2LMHeadModel(config).save_pretrained(student)
    tokenizer.save_pretrained(student)
    prompts = write_jsonl(root / "prompts.jsonl", gsm8k(100, 14))
    return {"root": root, "run": run, "student": student, "prompts": prompts}


def rank(setup, out, *flags, teachers=True):
    base = ["teachers", "rank", "--student", setup["student"], "-o", out]
    if teachers:
        base += ["--teacher", f"late={setup['run']}", "--teacher", f"early={setup['run'] / 'checkpoint-10'}",
                 "--prompts", setup["prompts"], "--prompt-field", "question", "-n", 12, "-g", 2, "--max-new-tokens", 16]
    return cli(*base, "--dim", 32, *flags)


# --------------------------------------------------------------------------- gradients vs the oracle

def _student_batch(setup, rows: int = 8, lora: bool = False):
    from dyn.core.lm import encode_prompt_response, pad_token_id
    from dyn.core.models import apply_lora, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(setup["student"]), attn_implementation="eager")
    if lora:
        import torch

        model = apply_lora(model, r=2)
        with torch.no_grad():  # B starts at zero, which would make A's gradients vanish
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    data = gsm8k(200, rows)
    examples = encode_prompt_response([r["question"] + "\n" for r in data], [r["answer"] for r in data], tokenizer, 128)
    return model.eval(), examples.batch(list(range(rows)), pad_token_id(tokenizer))


def _explicit(total: int, dim: int, seed: int, key: str):
    import torch

    from dyn.distill.grace import DenseRademacherProjection

    dense = DenseRademacherProjection(total, dim, seed, key)
    return torch.cat([dense.chunk(c) for c in range(dense.num_chunks)], dim=1).double()


@pytest.mark.parametrize("scope", ["all", "modules", "lora"])
def test_projected_gradients_equal_the_oracle_through_explicit_matrices(setup, scope):
    """The oracle is batch-size-1 autograd (influence.exact). Dense: features = P g / √D with P
    built here from its seeded chunks. Factored with an exact first stage (block_dim ≥ every
    parameter): features = P₂ g / √D. Both also through the batch-1 fallback route."""
    from dyn.distill.grace_gradients import GraceGradients, make_projection
    from dyn.influence.exact import exact_row_gradients
    from dyn.influence.parameters import select_parameters

    model, batch = _student_batch(setup, lora=scope == "lora")
    params = select_parameters(model, "attn" if scope == "modules" else None)
    if scope == "lora":
        assert all("lora_" in k for k in params.keys)
    _, flat = exact_row_gradients(model, params, batch)
    oracle = flat.double() / math.sqrt(params.numel)
    dim, seed = 24, 5
    for kind, key, block_dim in (("rademacher", "grace/dense", None), ("factored", "grace/factored-stage2", 10**9)):
        projection = make_projection(kind, params, dim, seed, block_dim=block_dim)
        if kind == "factored":
            assert projection.stage_one_dim == params.numel, "an exact first stage keeps every number"
        expected = oracle @ _explicit(params.numel, dim, seed, key).T
        gradients = GraceGradients(model, params, projection)
        assert gradients.hooks, "GPT-2 and LoRA layers are covered by the hooks"
        got = gradients.batch(batch).features.double()
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= 2e-5 * scale, (kind, scope)
        gradients.hooks = False  # the batch-1 autograd fallback: the same numbers
        fallback = gradients.batch(batch).features.double()
        assert (fallback - expected).abs().max() <= 2e-5 * scale, (kind, scope, "fallback")


def test_factored_inner_products_match_the_exact_ones_within_projection_noise(setup):
    """At d = 512 and the default first stage (4d per parameter), the projected Gram matrix is
    within projection noise of the exact one, no noisier than 2× a dense projection's, and
    unbiased: its mean over seeds comes closer."""
    from dyn.distill.grace_gradients import GraceGradients, make_projection
    from dyn.influence.exact import exact_row_gradients
    from dyn.influence.parameters import select_parameters

    model, batch = _student_batch(setup, rows=10)
    params = select_parameters(model)
    _, flat = exact_row_gradients(model, params, batch)
    oracle = flat.double() / math.sqrt(params.numel)
    exact = oracle @ oracle.T

    def gram(kind, seed):
        projection = make_projection(kind, params, 512, seed)
        features = GraceGradients(model, params, projection).batch(batch).features.double()
        return features @ features.T

    def error(g):
        return float((g - exact).norm() / exact.norm())

    factored = [gram("factored", seed) for seed in range(4)]
    dense = [gram("rademacher", seed) for seed in range(4)]
    single = np.mean([error(g) for g in factored])
    assert single < 0.35, single
    assert single < 2.0 * np.mean([error(g) for g in dense])
    assert error(sum(factored) / 4) < 0.75 * single, "the mean over seeds is closer: the projection is unbiased"
    norms = np.sqrt(np.diag(factored[0].numpy()) / np.diag(exact.numpy()))
    assert np.all(np.abs(norms - 1) < 0.35), norms


# --------------------------------------------------------------------------- the CLI

def test_rank_with_generations_plot_json_and_reuse(setup, tmp_path):
    out = tmp_path / "ranking.json"
    result = rank(setup, out, "--temperature", "0.7,1.0", "--plot", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ranking = json.loads(out.read_text())
    names = [c["name"] for c in ranking["candidates"]]
    assert sorted(names) == ["early@0.7", "early@1.0", "late@0.7", "late@1.0"]
    scores = [c["score"] for c in ranking["candidates"]]
    assert scores == sorted(scores) and all(np.isfinite(scores)) and ranking["lower_is_better"]
    assert [c["rank"] for c in ranking["candidates"]] == [1, 2, 3, 4]
    assert summary["candidates"] == ranking["candidates"] and summary["best"] == names[0]
    for entry in ranking["candidates"]:
        assert entry["counts"]["responses"] == 24 and entry["counts"]["prompts"] == 12
        assert len(entry["split_scores"]) == 10 and entry["split_std"] >= 0
        assert entry["heldout_grad_norm"] > 0 and entry["spectrum_entropy"] > 0
        assert entry["temperature"] in (0.7, 1.0) and entry["generated"]
        rows = read_jsonl(entry["responses_file"])
        assert len(rows) == 24 and set(rows[0]) == {"prompt_id", "prompt", "response", "truncated"}
        assert [r["prompt_id"] for r in rows] == [i for i in range(12) for _ in range(2)]
        assert rows[0]["prompt"] == gsm8k(100, 1)[0]["question"]
        assert entry["counts"]["truncated"] == sum(r["truncated"] for r in rows)
    assert ranking["settings"]["projection"]["projection"] == "factored"
    assert (tmp_path / "ranking.json.scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "ranking.json.dyn.json").read_text())
    assert record["command"] == "teachers rank" and [m["role"] for m in record["models"]] == ["student", "teacher late", "teacher early"]
    assert record["figures"]["teachers"]["late"]["candidates"] == {"late@0.7": "generated", "late@1.0": "generated"}

    before = out.read_bytes()
    files = {p.name: p.read_bytes() for p in (tmp_path / "ranking.json.generations").iterdir()}
    again = rank(setup, out, "--temperature", "0.7,1.0")
    assert again.exit_code == 0, again.output
    assert again.stderr.count("reusing") == 4 and out.read_bytes() == before
    fresh = rank(setup, out, "--temperature", "0.7,1.0", "--regenerate", "-q")
    assert fresh.exit_code == 0 and "reusing" not in fresh.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "ranking.json.generations").iterdir()} == files, "seeded: the same text"
    # a changed setting or a hand-edited file is regenerated, never silently reused
    edited = tmp_path / "ranking.json.generations" / "late@1.0.jsonl"
    edited.write_text(edited.read_text().replace('"response": "', '"response": "x', 1))
    third = rank(setup, out, "--temperature", "0.7,1.0")
    assert third.exit_code == 0 and third.stderr.count("reusing") == 3 and out.read_bytes() == before
    assert edited.read_bytes() == files["late@1.0.jsonl"]


def test_responses_files_rank_like_the_generations_and_empty_responses_are_counted(setup, tmp_path):
    generated = tmp_path / "gen.json"
    assert rank(setup, generated, "-q").exit_code == 0
    gen_scores = {c["name"]: c["score"] for c in json.loads(generated.read_text())["candidates"]}
    folder = tmp_path / "gen.json.generations"
    a = write_jsonl(tmp_path / "a.jsonl", [{**r, "source": "mine"} for r in read_jsonl(folder / "late@1.0.jsonl")])
    b = tmp_path / "b.jsonl"
    shutil.copy(folder / "early@1.0.jsonl", b)
    out = tmp_path / "files.json"
    result = rank(setup, out, "--responses", f"a={a}", "--responses", f"b={b}", "--json", "-q", teachers=False)
    assert result.exit_code == 0, result.output
    scores = {c["name"]: c["score"] for c in json.loads(out.read_text())["candidates"]}
    assert scores == {"a": gen_scores["late@1.0"], "b": gen_scores["early@1.0"]}

    rows = read_jsonl(a)
    for i in (0, 1, 5):  # both responses to prompt 0, one to prompt 2
        rows[i]["response"] = "  "
    write_jsonl(a, rows)
    result = rank(setup, out, "--responses", f"a={a}", "--responses", f"b={b}", "-n", 12, teachers=False)
    assert result.exit_code == 0, result.output
    ranking = json.loads(out.read_text())
    entry = {c["name"]: c for c in ranking["candidates"]}
    assert entry["a"]["counts"]["responses_left_out"] == {"empty response": 3}
    assert entry["b"]["counts"]["responses_left_out"] == {"prompt left out for every candidate": 2}
    assert entry["a"]["counts"]["empty"] == 3 and entry["a"]["counts"]["responses_scored"] == 21
    assert ranking["prompts"]["scored"] == 11 and ranking["prompts"]["left_out"] == 1
    assert any("3 of 24 responses (12.5%) are empty" in w for w in entry["a"]["warnings"])
    assert "left out for every candidate" in result.stderr

    # --max-length at the longest prompt's length: that prompt's responses lose every token
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(setup["student"]))
    lengths = {r["prompt_id"]: 1 + len(tokenizer(r["prompt"] + "\n", add_special_tokens=False)["input_ids"]) for r in read_jsonl(b)}
    longest = max(lengths.values())
    cut = sum(1 for v in lengths.values() if v == longest)
    assert cut <= 2
    result = rank(setup, out, "--responses", f"b={b}", "--max-length", longest, "-q", teachers=False)
    assert result.exit_code == 0, result.output
    ranking = json.loads(out.read_text())
    assert ranking["candidates"][0]["counts"]["responses_left_out"] == {"prompt fills --max-length (no response token left)": 2 * cut}
    assert ranking["prompts"]["scored"] == 12 - cut and ranking["settings"]["max_length"] == longest


def test_dense_projection_score_equals_grace_of_the_oracle_gradients(setup, tmp_path):
    """--projection rademacher through the CLI = grace_score of batch-1 autograd gradients times
    the explicit seeded matrix: the plain definition, computed independently."""
    from dyn.core.lm import encode_prompt_response, pad_token_id
    from dyn.core.models import load_model_and_tokenizer
    from dyn.distill.grace import grace_score
    from dyn.influence.exact import exact_row_gradients
    from dyn.influence.parameters import select_parameters

    rows = []
    for i, r in enumerate(gsm8k(300, 10)):
        steps = r["answer"].split("\n")
        rows += [{"prompt_id": f"q{i}", "prompt": r["question"], "response": r["answer"]},
                 {"prompt_id": f"q{i}", "prompt": r["question"], "response": "\n".join(steps[-2:])}]
    responses = write_jsonl(tmp_path / "gold.jsonl", rows)
    out = tmp_path / "dense.json"
    result = rank(setup, out, "--responses", f"gold={responses}", "--projection", "rademacher", "--seed", 3, "-q", teachers=False)
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())["candidates"][0]

    model, tokenizer = load_model_and_tokenizer(str(setup["student"]), attn_implementation="eager")
    model.eval()
    params = select_parameters(model)
    examples = encode_prompt_response([r["prompt"] + "\n" for r in rows], [r["response"] for r in rows], tokenizer, 256)
    _, flat = exact_row_gradients(model, params, examples.batch(list(range(len(rows))), pad_token_id(tokenizer)))
    features = (flat.double() / math.sqrt(params.numel)) @ _explicit(params.numel, 32, 3, "grace/dense").T
    expected = grace_score(features.numpy(), [r["prompt_id"] for r in rows], seed=3)
    assert got["score"] == pytest.approx(expected.score, rel=1e-4)
    assert got["heldout_grad_norm"] == pytest.approx(expected.heldout_grad_norm, rel=1e-4)
    assert got["spectrum_entropy"] == pytest.approx(expected.spectrum_entropy, rel=1e-4)


def test_two_processes_give_the_same_ranking_as_one(setup, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.chdir(one)
    assert rank(setup, "ranking.json", "-q").exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["dyn", "teachers", "rank", "--student", str(setup["student"]), "-o", "ranking.json",
               "--teacher", f"late={setup['run']}", "--teacher", f"early={setup['run'] / 'checkpoint-10'}",
               "--prompts", str(setup["prompts"]), "--prompt-field", "question", "-n", "12", "-g", "2",
               "--max-new-tokens", "16", "--dim", "32", "-q", "--num-processes", "2"]
    result = subprocess.run(command, cwd=two, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (one / "ranking.json").read_bytes() == (two / "ranking.json").read_bytes()
    for path in (one / "ranking.json.generations").glob("*.jsonl"):
        assert path.read_bytes() == (two / "ranking.json.generations" / path.name).read_bytes()
    assert json.loads((two / "ranking.json.dyn.json").read_text())["world_size"] == 2


# --------------------------------------------------------------------------- bad input

def _fails(result, code: int, *phrases: str, folder: Path):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("dyn: error:"), result.stderr
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]
    assert not list(folder.glob("out*")), "nothing written on failure"


def _unreadable_teacher(root: Path) -> Path:
    """A tiny GPT-2 whose word-level tokenizer knows a handful of words: GSM8K prompts are mostly
    its unknown token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", "[PAD]", "the", "a", "of", "and"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]")
    torch.manual_seed(0)
    folder = root / "wordy"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, n_positions=64, vocab_size=len(vocab))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_input(setup, tmp_path):
    out = tmp_path / "out.json"
    gen = tmp_path / "gen.json"
    assert rank(setup, gen, "-q").exit_code == 0
    good = gen.with_name("gen.json.generations") / "late@1.0.jsonl"
    rows = read_jsonl(good)

    _fails(rank(setup, out, "-g", 1), 2, "-g 1", "at least 2 responses per prompt", folder=tmp_path)
    _fails(rank(setup, out, "-n", 5), 2, "-n 5", "at least 10 prompts", "hold one out", folder=tmp_path)
    few = write_jsonl(tmp_path / "few.jsonl", gsm8k(0, 6))
    _fails(cli("teachers", "rank", "--student", setup["student"], "--teacher", f"t={setup['run']}", "--prompts", few,
               "--prompt-field", "question", "-o", out), 3, str(few), "has 6 prompts", "at least 10", folder=tmp_path)
    _fails(rank(setup, out, teachers=False), 2, "--teacher", "--responses", folder=tmp_path)
    _fails(cli("teachers", "rank", "--student", setup["student"], "--teacher", f"t={setup['run']}", "-o", out), 2,
           "--prompts", folder=tmp_path)
    _fails(rank(setup, out, "--responses", f"a={good}", "--prompts", setup["prompts"], teachers=False), 2,
           "--prompts", "no --teacher", folder=tmp_path)
    _fails(rank(setup, tmp_path / "out.jsonl", "--responses", f"a={good}", teachers=False), 2, "JSON file", folder=tmp_path)
    _fails(rank(setup, out, "--teacher", f"late={setup['run']}"), 2, "two candidates are named 'late@1.0'", folder=tmp_path)
    _fails(rank(setup, out, "--temperature", "-1"), 2, "--temperature -1", folder=tmp_path)
    _fails(rank(setup, gen, "--responses", f"a={good}"), 2, "this run regenerates that file", folder=tmp_path)
    _fails(cli("teachers", "rank", "--student", tmp_path / "nowhere", "--responses", f"a={good}", "-o", out), 2,
           "--student", "not a folder", folder=tmp_path)

    wordy = _unreadable_teacher(tmp_path)
    _fails(rank(setup, out, "--teacher", f"wordy={wordy}"), 3, f"--teacher wordy={wordy}", "unknown token", "cannot read",
           folder=tmp_path)

    def responses(name, changed):
        return write_jsonl(tmp_path / f"{name}.jsonl", changed)

    missing_id = responses("noid", [{k: v for k, v in r.items() if not (i == 3 and k == "prompt_id")} for i, r in enumerate(rows)])
    _fails(rank(setup, out, "--responses", f"a={good}", "--responses", f"b={missing_id}", teachers=False), 3,
           f"{missing_id} line 4", "prompt_id is null", folder=tmp_path)
    fewer = responses("fewer", [r for r in rows if r["prompt_id"] != 7])
    _fails(rank(setup, out, "--responses", f"a={good}", "--responses", f"b={fewer}", teachers=False), 3,
           str(fewer), "no response to prompt 7", "first differing prompt id: 7", folder=tmp_path)
    other = responses("other", [{**r, "prompt": "What is 2+2?"} if r["prompt_id"] == 4 else r for r in rows])
    _fails(rank(setup, out, "--responses", f"a={good}", "--responses", f"b={other}", teachers=False), 3,
           str(other), "prompt 4", "first differing prompt id: 4", folder=tmp_path)
    changing = responses("changing", [{**r, "prompt": "What is 2+2?"} if i == 5 else r for i, r in enumerate(rows)])
    _fails(rank(setup, out, "--responses", f"a={changing}", teachers=False), 3, f"{changing} line 6", "one prompt id must name one prompt",
           folder=tmp_path)
    single = responses("single", rows[::2])
    _fails(rank(setup, out, "--responses", f"a={single}", teachers=False), 3, str(single), "G ≥ 2", folder=tmp_path)
    no_column = responses("nocol", [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "text": r["response"]} for r in rows])
    _fails(rank(setup, out, "--responses", f"a={no_column}", teachers=False), 3, str(no_column), "response", folder=tmp_path)
    empty = responses("empty", [{**r, "response": ""} if r["prompt_id"] >= 3 else r for r in rows])
    _fails(rank(setup, out, "--responses", f"a={empty}", teachers=False), 3, "only 3 prompts", "at least 10", folder=tmp_path)
