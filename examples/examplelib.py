"""What the Python examples share: the data folder, jsonl in and out, and running one `dyn` command
as a subprocess (the CLI exactly as a user runs it). Examples run as scripts, so this folder is on
their import path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dyn(*args) -> None:
    """Run one `dyn` command as a subprocess (one intra-op thread unless the caller set more)."""
    cmd = [sys.executable, "-m", "dyn.cli", *[str(a) for a in args]]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}")
    print(f"  [{time.perf_counter() - start:6.1f}s] dyn {' '.join(str(a) for a in args[:2])} ...", flush=True)


def answer_losses(model_dir, rows: list[dict], max_length: int):
    """Each row's mean cross-entropy over its answer tokens (question + newline -> answer, laid out
    as `dyn train` lays a row out) under the model in `model_dir`, and its count of answer tokens:
    two numpy arrays (NaN loss where truncation left no answer token)."""
    import torch

    from dyn.core.lm import encode_prompt_response, model_row_losses, pad_token_id
    from dyn.core.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    model.eval()
    examples = encode_prompt_response([r["question"] + "\n" for r in rows], [r["answer"] for r in rows], tokenizer, max_length)
    losses, counts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = examples.batch(range(start, min(start + 16, len(rows))), pad_token_id(tokenizer))
            losses.append(model_row_losses(model, batch).double())
            counts.append((batch["labels"][:, 1:] != -100).sum(dim=1))
    return torch.cat(losses).numpy(), torch.cat(counts).numpy()
