"""`dyn distill cache` end to end on a `dyn train` run: the teacher's own example format is used,
the cache equals the online teacher, a rerun computes nothing, and a request for another k is
refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_runner import invoke as cli




# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_cache_command_builds_reuses_and_refuses(tmp_path, t0_rows, write_jsonl):
    import torch

    from dyn.core.io import read_rows
    from dyn.core.lm import build_lm_examples, pad_token_id
    from dyn.core.models import load_model_and_tokenizer
    from dyn.distill.checkpoints import trained_example_format
    from dyn.distill.teacher_cache import TeacherCache, teacher_top_k

    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in t0_rows(120) if len(r["prompt"]) < 400][:40]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run = tmp_path / "teacher"
    trained = cli("train", data, "--model", "tiny", "--train-tokenizer", "--vocab-size", 400, "--template", "{question}",
                  "--response-field", "answer", "--max-length", 128, "--max-steps", 4, "--save-every", 2,
                  "--batch-size", 8, "-o", run, "-q")
    assert trained.exit_code == 0, trained.output
    cache_dir = tmp_path / "cache"
    first = cli("distill", "cache", "--teacher", run, "--data", data, "-o", cache_dir, "--top-k", 8,
                "--shard-tokens", 300, "--precision", "float32", "--json", "-q")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["figures"]["checkpoints"] == [2, 4] and summary["figures"]["cache"]["complete"]
    assert "question" in summary["figures"]["example_format"], "the teacher run's own format"

    cache = TeacherCache.open(cache_dir)
    model, tokenizer = load_model_and_tokenizer(str(run / "checkpoint-4"))
    loaded = read_rows(str(data))
    fmt, _ = trained_example_format(run / "checkpoint-4", loaded, None, None)
    examples, _ = build_lm_examples(loaded, fmt, tokenizer, 128)
    picked = [5, 0, 17]
    online = teacher_top_k(model.eval(), examples.batch(picked, pad_token_id(tokenizer)), 8).as_stored()
    stored = cache.read(4, picked)
    assert torch.equal(stored.ids, online.ids)
    np.testing.assert_allclose(stored.log_probs.numpy(), online.log_probs.numpy(), atol=1e-6)

    shards = sorted(p.stat().st_mtime_ns for p in cache_dir.rglob("shard-*"))
    again = cli("distill", "cache", "--teacher", run, "--data", data, "-o", cache_dir, "--top-k", 8,
                "--shard-tokens", 300, "--precision", "float32", "-q")
    assert again.exit_code == 0, again.output
    assert sorted(p.stat().st_mtime_ns for p in cache_dir.rglob("shard-*")) == shards, "nothing recomputed"

    refused = cli("distill", "cache", "--teacher", run, "--data", data, "-o", cache_dir, "--top-k", 4, "--precision", "float32")
    assert refused.exit_code == 3, refused.output
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("dyn: error:") and "top_k" in line, line

    missing = cli("distill", "cache", "--teacher", tmp_path / "nothing", "--data", data, "-o", tmp_path / "c2")
    assert missing.exit_code in (2, 3) and "nothing" in missing.stderr.strip().splitlines()[-1]
