"""The teacher top-k cache (distill/teacher_cache.py) on a tiny GPT-2 teacher trained by `dyn train`
with two checkpoints: the online numbers against a float64 brute force, the cache against the
online computation (exactly, up to the documented float16 rounding) and through
`distillation_loss`, refusals of a cache built for something else, resume after a kill mid-build,
and 1 process equal to 2 (gloo), byte for byte."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dyn.core.errors import DataError, UsageError

TOP_K = 8
SHARD_TOKENS = 96
BATCH_TOKENS = 1024
MAX_LENGTH = 160


# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, t0_rows):
    """A tiny GPT-2 trained 4 steps by `dyn train` (checkpoints at steps 2 and 4) on 48 short real
    rows; the data to cache is those rows, one with an empty completion."""
    root = tmp_path_factory.mktemp("teacher")
    rows = [r for r in t0_rows(600) if len(r["prompt"]) + len(r["completion"]) < 220][:48]
    assert len(rows) == 48
    rows[5] = {**rows[5], "completion": ""}
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from typer.testing import CliRunner

    from dyn.cli.app import app

    run = root / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--model", "tiny", "--train-tokenizer", "--vocab-size", "300",
                                      "--max-length", str(MAX_LENGTH), "--max-steps", "4", "--save-every", "2",
                                      "--batch-size", "12", "--lr", "3e-3", "-o", str(run), "-q"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "run": run}


def tokenised(data: Path, run: Path, max_length: int = MAX_LENGTH):
    """(examples, example format, loaded rows, tokenizer): the data tokenised as the cache sees it."""
    from dyn.core.io import read_rows
    from dyn.core.lm import build_lm_examples, resolve_example_format
    from dyn.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(run))
    loaded = read_rows(str(data))
    fmt = resolve_example_format(loaded.dataset.column_names, None, None, loaded.source)
    examples, loaded = build_lm_examples(loaded, fmt, tokenizer, max_length)
    return examples, fmt, loaded, tokenizer


@pytest.fixture(scope="module")
def data(teacher):
    examples, fmt, loaded, tokenizer = tokenised(teacher["data"], teacher["run"])
    assert (examples.response_tokens > 0).sum() >= 40 and examples.response_tokens[5] == 0
    return {"examples": examples, "fmt": fmt, "loaded": loaded, "tokenizer": tokenizer}


def build(folder, teacher_folder, data, **kwargs):
    """`build_teacher_cache` of `data` with the test's settings; `teacher_folder`: a run or a
    checkpoint folder."""
    from dyn.distill.teacher_cache import build_teacher_cache

    settings = dict(top_k=TOP_K, example_format=data["fmt"], dyn_index=data["loaded"].source_index,
                    shard_tokens=SHARD_TOKENS, batch_tokens=BATCH_TOKENS)
    settings.update(kwargs)
    return build_teacher_cache(folder, teacher_folder, data["examples"], data["tokenizer"], **settings)


@pytest.fixture(scope="module")
def built(teacher, data):
    """One unbroken single-process build, and the shards it computed."""
    computed = []
    cache = build(teacher["root"] / "cache-one", teacher["run"], data, on_shard=lambda step, shard: computed.append((step, shard)))
    return {"cache": cache, "computed": computed}


def model_at(run: Path, step: int):
    from dyn.core.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(run / f"checkpoint-{step}"))
    return model.eval()


def folder_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- online numbers

def test_online_top_k_is_the_full_softmax_top_k_with_an_exact_tail(teacher, data):
    """Against float64 row by row: values, ids (descending), the tail log(1 - sum top-k), and the
    compact layout (row-major over the batch, response positions ascending)."""
    import torch

    from dyn.distill.teacher_cache import teacher_top_k, top_k_from_logits

    examples = data["examples"]
    model = model_at(teacher["run"], 4)
    positions = [7, 5, 0, 12, 3]  # an order of our choosing, with the row that has no response
    batch = examples.batch(positions, pad_token_id=0)
    got = teacher_top_k(model, batch, TOP_K)
    assert got.log_probs.dtype == torch.float32 and got.ids.dtype == torch.int64 and got.tail_log_prob.dtype == torch.float32
    expected_values, expected_ids, expected_tail = [], [], []
    for p in positions:
        ids = examples.input_ids[p]
        start = max(int(examples.prompt_lengths[p]), 1)
        if examples.response_tokens[p] == 0:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.as_tensor(ids).unsqueeze(0)).logits[0].double(), dim=-1)
        for t in range(start, len(ids)):  # position t-1 predicts token t
            values, top = logp[t - 1].topk(TOP_K)
            outside = torch.ones(logp.shape[-1], dtype=torch.bool)
            outside[top] = False
            expected_values.append(values)
            expected_ids.append(top)
            expected_tail.append(torch.log(logp[t - 1][outside].exp().sum()))
    assert len(got) == sum(int(examples.response_tokens[p]) for p in positions) == len(expected_ids)
    assert torch.equal(got.ids, torch.stack(expected_ids))
    torch.testing.assert_close(got.log_probs.double(), torch.stack(expected_values), rtol=0, atol=2e-5)
    torch.testing.assert_close(got.tail_log_prob.double(), torch.stack(expected_tail), rtol=0, atol=2e-5)
    assert (got.log_probs[:, :-1] >= got.log_probs[:, 1:]).all()
    # k = the whole vocabulary: nothing outside, the log-probabilities sum to one.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = logits.shape[-1]
    every = top_k_from_logits(logits, batch["labels"], vocab)
    assert torch.isneginf(every.tail_log_prob).all()
    torch.testing.assert_close(every.log_probs.exp().sum(-1), torch.ones(len(every)), rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="larger than"):
        top_k_from_logits(logits, batch["labels"], vocab + 1)


# --------------------------------------------------------------------------- round trip

def test_cache_equals_the_online_computation_up_to_float16_rounding(built, teacher, data):
    """Over the builder's own batches the cache holds exactly the online numbers with the
    log-probabilities rounded to float16 (round to nearest: within |x|*2^-11), ids and float32
    tails bit for bit; every row of every shard is covered."""
    import torch

    from dyn.distill.teacher_cache import _plan_batches, teacher_top_k

    cache, examples = built["cache"], data["examples"]
    assert cache.complete and cache.steps == [2, 4]
    assert cache.meta["storage"]["shards"] >= 4, "the test must span several shards"
    assert sorted(built["computed"]) == [(s, i) for s in (2, 4) for i in range(cache.meta["storage"]["shards"])]
    dyn_index = data["loaded"].source_index
    rows = _plan_batches(examples, data["tokenizer"], str, cache.shard_starts, BATCH_TOKENS, "cpu")
    assert max(len(b) for b in rows.batches) >= 4, "padding must be exercised"
    for step in (2, 4):
        model = model_at(teacher["run"], step)
        for j, positions in enumerate(rows.batches):
            online = teacher_top_k(model, rows.batch(j), TOP_K)
            stored = cache.read(step, dyn_index[positions])
            assert torch.equal(stored.ids, online.ids)
            assert torch.equal(stored.tail_log_prob, online.tail_log_prob)
            assert torch.equal(stored.log_probs, online.as_stored().log_probs)
            error = (stored.log_probs - online.log_probs).abs()
            assert (error <= torch.clamp(online.log_probs.abs() * 2.0 ** -11, min=2.0 ** -25)).all()
    assert cache.response_tokens(dyn_index).tolist() == examples.response_tokens.tolist()
    # The shards are plain safetensors files: the library reads what the reader reads.
    from safetensors.numpy import load_file

    shard = load_file(str(cache.folder / "step-4" / "shard-00001.safetensors"))
    first = int(cache.shard_starts[1])
    rows_in_shard = dyn_index[first:int(cache.shard_starts[2])]
    read = cache.read(4, rows_in_shard)
    assert shard["log_probs"].dtype == np.float16 and shard["ids"].dtype == np.int32 and shard["tail_log_prob"].dtype == np.float32
    assert np.array_equal(shard["log_probs"].astype(np.float32), read.log_probs.numpy())
    assert np.array_equal(shard["ids"], read.ids.numpy()) and np.array_equal(shard["tail_log_prob"], read.tail_log_prob.numpy())


def test_a_student_batch_reads_the_compact_layout_and_gives_the_online_loss(built, teacher, data):
    """Rows in a student's order (across shards, with a row that has no response token): the
    reader's entries line up with `collate_lm_batch` of those rows, and `distillation_loss` from
    the cache equals the loss from the online teacher within float16 tolerance."""
    import torch

    from dyn.distill.losses import KDLossSettings, distillation_loss, shift_for_next_token
    from dyn.distill.teacher_cache import teacher_top_k

    cache, examples = built["cache"], data["examples"]
    dyn_index = data["loaded"].source_index
    positions = np.array([40, 3, 5, 22, 0, 47, 11, 30])
    batch = examples.batch(positions, pad_token_id=0)
    stored = cache.read(4, dyn_index[positions])
    online = teacher_top_k(model_at(teacher["run"], 4), batch, TOP_K)
    assert len(stored) == len(online) == int((batch["labels"][:, 1:] != -100).sum())
    assert (stored.ids == online.ids).float().mean() > 0.99
    # Row-major: the batch read at once is the rows read one by one, concatenated in batch order.
    one_by_one = [cache.read(4, [dyn_index[p]]) for p in positions]
    assert torch.equal(stored.ids, torch.cat([r.ids for r in one_by_one]))
    assert torch.equal(stored.log_probs, torch.cat([r.log_probs for r in one_by_one]))

    student = model_at(teacher["run"], 2)
    logits, targets = shift_for_next_token(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    for settings in (KDLossSettings("forward-kl"), KDLossSettings("jsd", beta=0.3, temperature=2.0),
                     KDLossSettings("reverse-kl", outside_top_k="renormalise", alpha=0.5)):
        from_cache = distillation_loss(logits, targets, settings, **stored.loss_inputs())
        from_online = distillation_loss(logits, targets, settings, **online.loss_inputs())
        torch.testing.assert_close(from_cache.mean(), from_online.mean(), rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(from_cache.row_means(), from_online.row_means(), rtol=5e-3, atol=1e-4, equal_nan=True)
        assert torch.isnan(from_cache.row_means()[2])  # the empty completion counts no token
    from_cache.mean().backward()  # the cached teacher is a constant in the student's graph


# --------------------------------------------------------------------------- refusals

def test_a_cache_for_something_else_is_refused_naming_the_field(built, teacher, data, tmp_path):
    import torch

    from dyn.distill.teacher_cache import CacheSpec, TeacherCache

    folder = built["cache"].folder
    examples, fmt, loaded, tokenizer = data["examples"], data["fmt"], data["loaded"], data["tokenizer"]

    def spec(rows=examples, tok=tokenizer, index=loaded.source_index, top_k=TOP_K):
        return CacheSpec.describe(rows, tok, top_k=top_k, example_format=fmt, dyn_index=index)

    TeacherCache.open(folder, spec(), steps=[2, 4])  # the matching request opens
    with pytest.raises(DataError, match="top_k"):
        TeacherCache.open(folder, spec(top_k=4))
    other_rows, _, other_loaded, _ = tokenised(teacher["data"], teacher["run"], max_length=MAX_LENGTH - 40)
    with pytest.raises(DataError, match="data_sha256"):
        TeacherCache.open(folder, spec(rows=other_rows, index=other_loaded.source_index))
    other_tokenizer = tokenised(teacher["data"], teacher["run"])[3]
    other_tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(DataError, match="tokenizer_sha256"):
        TeacherCache.open(folder, spec(tok=other_tokenizer))
    with pytest.raises(DataError, match="tokenizer_sha256"):
        build(folder, teacher["run"], {**data, "tokenizer": other_tokenizer})
    with pytest.raises(DataError, match="top_k"):
        build(folder, teacher["run"], data, top_k=4)
    with pytest.raises(DataError, match="checkpoint-6"):
        TeacherCache.open(folder, spec(), steps=[6])
    with pytest.raises(DataError, match="dyn_index 999"):
        built["cache"].read(2, [loaded.source_index[0], 999])

    # Other teacher weights under the same step: a run whose checkpoint-4 is the step-2 model.
    impostor = tmp_path / "impostor"
    shutil.copytree(teacher["run"] / "checkpoint-2", impostor / "checkpoint-2")
    shutil.copytree(teacher["run"] / "checkpoint-2", impostor / "checkpoint-4")
    before = folder_bytes(folder)
    with pytest.raises(DataError, match="teacher_sha256"):
        build(folder, impostor, data)
    assert folder_bytes(folder) == before, "a refused request leaves the cache untouched"

    with pytest.raises(UsageError, match="larger than the tokenizer"):
        build(tmp_path / "big-k", teacher["run"], data, top_k=len(tokenizer) + 1)
    assert not (tmp_path / "big-k").exists()
    (tmp_path / "no-ckpt").mkdir()
    with pytest.raises(DataError, match="no checkpoint"):
        build(tmp_path / "c", tmp_path / "no-ckpt", data)
    # A cache is finished in the precision it was started in (bfloat16 autocast stays close).
    half = build(tmp_path / "bf16", teacher["run"] / "checkpoint-2", data, precision="bfloat16")
    assert half.meta["teacher_precision"] == "bfloat16"
    rows = loaded.source_index[:12]
    torch.testing.assert_close(half.read(2, rows).log_probs, built["cache"].read(2, rows).log_probs, rtol=0, atol=0.1)
    with pytest.raises(DataError, match="teacher_precision"):
        build(tmp_path / "bf16", teacher["run"], data)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a teacher cache"):
        build(tmp_path / "busy", teacher["run"], data)
    with pytest.raises(UsageError, match="not a teacher cache"):
        TeacherCache.open(tmp_path / "busy")


# --------------------------------------------------------------------------- resume

class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way out treats it as handled."""


def test_a_killed_build_resumes_by_shard_to_the_same_bytes(built, teacher, data, tmp_path):
    """Killed after 3 shards (and with a half-written shard left behind): the cache is not marked
    complete, a rerun computes exactly the missing shards, and the result is byte-identical to an
    unbroken build. A cache of checkpoint-2 alone is then extended by checkpoint-4 only."""
    from dyn.distill.teacher_cache import TeacherCache

    folder = tmp_path / "resumed"
    done = []

    def kill_after_three(step, shard):
        done.append((step, shard))
        if len(done) == 3:
            raise Killed

    with pytest.raises(Killed):
        build(folder, teacher["run"], data, on_shard=kill_after_three)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] is False and not any(c["complete"] for c in meta["checkpoints"])
    (folder / "step-2" / ".shard-00003.safetensors.dyn-tmp-99999").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="no complete checkpoint-2"):
        TeacherCache(folder).read(2, [0])

    again = []
    cache = build(folder, teacher["run"], data, on_shard=lambda step, shard: again.append((step, shard)))
    assert cache.complete
    assert sorted(again) == sorted(set(built["computed"]) - set(done))
    assert folder_bytes(folder) == folder_bytes(built["cache"].folder)
    nothing = []
    build(folder, teacher["run"], data, on_shard=lambda step, shard: nothing.append(shard))
    assert nothing == []

    partial = tmp_path / "extended"
    first = build(partial, teacher["run"] / "checkpoint-2", data)
    assert first.complete and first.steps == [2]
    added = []
    build(partial, teacher["run"], data, on_shard=lambda step, shard: added.append(step))
    assert set(added) == {4}
    assert folder_bytes(partial) == folder_bytes(built["cache"].folder)


# --------------------------------------------------------------------------- 1 process = 2

WORKER = """
import json
import pickle
import sys

import torch

torch.set_num_threads(1)
from dyn.core.distributed import world
from dyn.core.models import load_tokenizer
from dyn.distill.teacher_cache import build_teacher_cache

with open(sys.argv[1], "rb") as handle:
    job = pickle.load(handle)
computed = []
cache = build_teacher_cache(job["out"], job["run"], job["examples"], load_tokenizer(job["run"]),
                            on_shard=lambda step, shard: computed.append([step, shard]), **job["settings"])
report = {"rank": world().rank, "size": world().size, "computed": computed, "complete": cache.complete}
with open(job["reports"] + f"/rank-{world().rank}.json", "w") as handle:
    json.dump(report, handle)
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_build_the_same_bytes_as_one(built, teacher, data, tmp_path):
    """Two workers joined over gloo (started with the environment torch.distributed.run sets)
    share the shards out and write the same bytes as the single-process build."""
    out, reports = tmp_path / "cache-two", tmp_path / "reports"
    reports.mkdir()
    script, job = tmp_path / "worker.py", tmp_path / "job.pkl"
    script.write_text(WORKER)
    # The workers get the tokenised rows as the test has them (no second read of the data).
    settings = dict(top_k=TOP_K, example_format=data["fmt"].to_dict(), dyn_index=data["loaded"].source_index,
                    shard_tokens=SHARD_TOKENS, batch_tokens=BATCH_TOKENS)
    job.write_bytes(pickle.dumps({"out": str(out), "run": str(teacher["run"]), "reports": str(reports),
                                  "examples": data["examples"], "settings": settings}))
    common = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    logs = [open(tmp_path / f"rank-{r}.log", "w") for r in (0, 1)]
    workers = [
        subprocess.Popen([sys.executable, str(script), str(job)], env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=logs[r], stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]
    for r, worker in enumerate(workers):
        worker.wait(timeout=300)
        logs[r].close()
        assert worker.returncode == 0, (tmp_path / f"rank-{r}.log").read_text()[-3000:]
    done = [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [d["size"] for d in done] == [2, 2] and all(d["complete"] for d in done)
    assert all(d["computed"] for d in done), "both ranks compute shards"
    mine = [tuple(c) for d in done for c in d["computed"]]
    assert sorted(mine) == sorted(built["computed"]), "each shard computed by exactly one rank"
    assert folder_bytes(out) == folder_bytes(built["cache"].folder)
