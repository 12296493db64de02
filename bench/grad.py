#!/usr/bin/env python
"""Benchmark of gradient scoring (`dyn select --method grad`): dyn's engines next to the LESS/CLUES
way, in one process, on the same model and rows (DESIGN §4.2, §6).

Model: a fresh 4-layer GPT-2 (default hidden 64, 2 heads; `--hidden 256 --heads 4` is the `small`
preset) with eager attention and a byte-level BPE trained on the rows; rows: GSM8K train
(question -> answer, loss on the answer), anchors: GSM8K test. Speed does not depend on the
weights, so nothing is trained. Methods:

- forward: per-row losses only (no gradient) — the floor every method pays;
- directional: dyn's default engine — every row's exact ⟨∇ℓ_i, ḡ⟩ (ḡ: the anchor mean gradient,
  computed once and timed apart), by its two routes: layer hooks (one forward + one activation
  backward, sum((u ḡ) ⊙ v) per layer; what dyn uses for GPT-2) and one forward-mode JVP per batch
  (dyn's route for parameters the hooks do not cover);
- store: dyn's store engine, per-sample gradients from layer hooks projected per layer with a
  factored (LoGra) projection of `--proj-dim` per parameter, float16 rows (no disk);
- less: the LESS/CLUES way — batch size 1, the full per-sample gradient by autograd, a dense
  Rademacher projection to 8192 dims of every buffer of 16 gradients (as LESS projects every 16
  samples), then the dot product with the projected anchor mean. The D x 8192 matrix is generated
  once and held in memory when it fits `--less-matrix-gb` (its generation is timed apart and NOT
  charged per row: the fairest case for LESS, like TRAK's fused CUDA kernel that makes it on the
  fly); otherwise it is regenerated block by block at every projection (TRAK's CPU
  `BasicProjector` scheme). Its cost grows with D x 8192, which is why the default model is small:
  at the `small` preset's 4.5M parameters the matrix is 150 GB and regenerating it takes minutes
  per buffer on this CPU (run that with `--less-rows 0`).

Reported: rows/s, time relative to forward, speed relative to `less`, and the peak resident memory
each method adds over the model and rows (forward/directional/store each in a fresh subprocess,
sampled resident size above the level just before it runs, after `malloc_trim`, since freed memory
the allocator keeps would hide it in a shared process; for `less`, the held projection matrix plus
a buffer of 16 gradients). Also the agreement of directional with the exact per-sample gradients on a few rows.
These machines are shared and noisy: read the ratios, not the absolute times.

Peers, each run only where its package imports (run the script with an interpreter that has it; a
row says "not run: <reason>" otherwise), on the same model and the first `--peer-rows` rows (the
rows LESS scores), each through its own public API, timed apart from its anchor side where the API
separates it; reported next to `less` and directional with the agreement (Spearman, relative
error) of its scores with dyn's exact directional scores on those rows:

- bergson (`InMemoryCollector` + `CollectorComputer` + `Scorer`): per-sample gradients of the
  Linear/Conv1D layers it hooks (weights and biases; no embeddings or layer norms), each projected
  on both sides to √`--peer-dim` (so `--peer-dim` per module), dot with the mean projected anchor
  gradient, rows in dyn's batches;
- dattri (`TracInAttributor`, one checkpoint, weight 1, unnormalised = Grad-Dot): vmap per-sample
  gradients of all parameters, dense Rademacher projection (`random_project`) to `--peer-dim`; the
  anchors' gradients are recomputed for every row batch (TracIn's loop), so they are charged;
- traker (`FunctionalGradientComputer` + `BasicProjector`, the pieces LESS itself uses): vmap
  per-sample gradients of all parameters, dense Rademacher projection to `--peer-dim` (no 1/√k:
  scores are divided by k for the relative error). `TRAKer`'s own score adds (XᵀX)⁻¹ and is a
  different quantity, so it is not used.

dattri and traker batch `--peer-batch` rows padded to the batch's longest (vmap needs one shape).

    python bench/grad.py --threads 1                                   # 128 rows, less on 32
    python bench/grad.py --threads 1 --hidden 256 --heads 4 --vocab 4096 --less-rows 0   # `small`
    /tmp/peer-bergson/bin/python bench/grad.py --threads 1            # + bergson (side venvs:
    /tmp/peer-dattri/bin/python bench/grad.py --threads 1             #   docs/benchmarks.md, grad)
    /tmp/peer-traker/bin/python bench/grad.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import DATA, now, read_jsonl


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dyn.core.lm import encode_prompt_response, pad_token_id
    from dyn.core.models import PRESETS  # noqa: F401 - the `small` preset's context length
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    rows = read_jsonl(DATA / "gsm8k-train.jsonl", args.rows)
    anchors = read_jsonl(DATA / "gsm8k-test.jsonl", args.anchors)
    tokenizer = train_bpe_tokenizer([r["question"] + "\n" + r["answer"] for r in rows + anchors], args.vocab, model_max_length=args.max_length)
    encode = lambda rs: encode_prompt_response([r["question"] + "\n" for r in rs], [r["answer"] for r in rs], tokenizer, args.max_length)  # noqa: E731
    torch.manual_seed(0)
    shape = {**PRESETS["small"], "n_embd": args.hidden, "n_head": args.heads, "n_layer": args.layers}
    config = GPT2Config(**shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    return model, encode(rows), encode(anchors), pad_token_id(tokenizer)


def batches(examples, pad, max_tokens):
    from dyn.core.embeddings import plan_batches

    return [examples.batch(b, pad) for b in plan_batches(examples.lengths, max_tokens=max_tokens, max_rows=64)]


# --------------------------------------------------------------------------------------------
# the methods: each returns per-row values (in batch order) so they can be checked


def forward_only(model, params, row_batches, _):
    from dyn.influence.losses import batch_row_losses

    with torch.no_grad():
        return [batch_row_losses(model, b) for b in row_batches]


def directional(model, params, row_batches, mean):
    """The hooks route (dyn's default for these layers)."""
    from dyn.influence.directional import hooked_directional_derivatives
    from dyn.influence.exact import unflatten

    direction = [unflatten(mean, params)]
    return [hooked_directional_derivatives(model, params, b, direction)[1][:, 0] for b in row_batches]


def directional_jvp(model, params, row_batches, mean):
    from dyn.influence.directional import directional_derivatives
    from dyn.influence.exact import unflatten

    direction = [unflatten(mean, params)]
    return [directional_derivatives(model, params, b, direction)[1][:, 0] for b in row_batches]


def store(model, params, row_batches, mean, proj_dim):
    from dyn.influence.features import GradientFeatures

    features = GradientFeatures(model, params, proj_dim=proj_dim, seed=0)
    return [features.compute(b)["features"].to(torch.float16) for b in row_batches]


class DenseRademacher:
    """A dense (D x k) ±1/√k projection, generated block by block from its seed: held whole in
    memory when it fits `max_gb` (generated once), else regenerated at every call (TRAK's CPU
    `BasicProjector` scheme)."""

    def __init__(self, dim: int, k: int, block_rows: int = 8192, seed: int = 0, max_gb: float = 10.0):
        self.dim, self.k, self.block_rows, self.seed = dim, k, block_rows, seed
        self.held = None
        self.setup_seconds = 0.0
        if dim * k * 4 <= max_gb * 2**30:
            start = now()
            self.held = [self._block(b, s) for b, s in enumerate(range(0, dim, block_rows))]
            self.setup_seconds = now() - start

    def _block(self, b: int, start: int) -> torch.Tensor:
        stop = min(start + self.block_rows, self.dim)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        return torch.empty(stop - start, self.k).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.k)
        for b, start in enumerate(range(0, self.dim, self.block_rows)):
            block = self.held[b] if self.held is not None else self._block(b, start)
            out += grads[:, start:start + block.shape[0]] @ block
        return out / math.sqrt(self.k)


def less_way(model, params, rows, pad, projector, target, interval: int = 16):
    """Batch size 1, full gradient, dense projection of every `interval` gradients, dot with the
    projected anchor mean."""
    from dyn.influence.exact import exact_row_gradients

    scores, buffer = [], []
    for i in range(len(rows)):
        batch = rows.batch([i], pad)
        buffer.append(exact_row_gradients(model, params, batch)[1])
        if len(buffer) == interval or i == len(rows) - 1:
            scores.append(projector.project(torch.cat(buffer)) @ target)
            buffer = []
    return scores


# --------------------------------------------------------------------------------------------
# peers: each scores `rows` (an LMExamples) against `anchors` and returns scores in row order


PEERS = {"bergson": "bergson", "dattri": "dattri", "traker": "trak"}  # distribution -> module


def peer_available(name: str) -> str | None:
    """None when the peer's package imports, else why not."""
    try:
        __import__(PEERS[name])
        return None
    except Exception as exc:  # noqa: BLE001 - any failure is the reason reported
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def batch_plan(examples, max_tokens):
    """Row indices of each batch `batches` makes (longest rows first)."""
    from dyn.core.embeddings import plan_batches

    return [[int(i) for i in b] for b in plan_batches(examples.lengths, max_tokens=max_tokens, max_rows=64)]


def padded_loader(examples, pad, batch_size):
    """The rows longest first, `batch_size` at a time, each batch right-padded to its longest row
    as (input_ids, labels); and that row order."""
    order = sorted(range(len(examples)), key=lambda i: -int(examples.lengths[i]))
    loader = torch.utils.data.DataLoader(order, batch_size=batch_size, collate_fn=lambda b: collate(examples, b, pad))
    return loader, order


def collate(examples, positions, pad):
    batch = examples.batch(positions, pad)
    return batch["input_ids"], batch["labels"]


def functional_loss(model, weights, ids, labels):
    """One unbatched row's mean response-token loss (dyn's ℓ), torch.func style; right padding
    needs no attention mask under causal attention."""
    from dyn.core.lm import per_row_loss

    logits = torch.func.functional_call(model, weights, (ids.unsqueeze(0),), {"use_cache": False}).logits
    return per_row_loss(logits, labels.unsqueeze(0))[0]


def bergson_dataset(examples):
    from datasets import Dataset

    ids = [[int(t) for t in x] for x in examples.input_ids]
    labels = [[-100] * int(p) + x[int(p):] for x, p in zip(ids, examples.prompt_lengths)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def bergson_collect(model, examples, plan, dim, query=None):
    """bergson's in-memory collector over the batches of `plan`: each module's mean projected
    gradient (query None), or every row's score against `query` (such means)."""
    import tempfile

    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector, Scorer
    from bergson.score.score_writer import InMemorySequenceScoreWriter

    side = math.isqrt(dim)
    data = bergson_dataset(examples)
    with tempfile.TemporaryDirectory() as work:
        cfg = IndexConfig(run_path=work + "/run", projection_dim=side, loss_reduction="mean", include_bias=True)
        Path(cfg.partial_run_path).mkdir()
        processor = GradientProcessor(projection_dim=side, include_bias=True, projection_seed=0)
        scorer = None if query is None else Scorer(query, list(query), InMemorySequenceScoreWriter(len(data), 1), torch.device("cpu"), torch.float32)
        collector = InMemoryCollector(model=model.base_model, data=data, cfg=cfg, processor=processor, scorer=scorer)
        CollectorComputer(model, data, collector=collector, batches=plan, cfg=cfg).run_with_collector_hooks()
    if query is None:
        return {m: g.float().mean(0, keepdim=True) for m, g in collector.gradients.items()}
    return collector.scores[:, 0].float()


def dattri_scores(model, rows, anchors, pad, dim, batch_size):
    """dattri's TracIn (one checkpoint, weight 1, unnormalised: Grad-Dot), mean over the anchors."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    task = AttributionTask(loss_func=lambda w, data: functional_loss(model, w, *data), model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, device="cpu",
                                  projector_kwargs={"proj_dim": dim, "proj_type": "rademacher", "proj_seed": 0})
    train, order = padded_loader(rows, pad, batch_size)
    test, _ = padded_loader(anchors, pad, len(anchors))
    scores = torch.empty(len(rows))
    scores[torch.tensor(order)] = attributor.attribute(train, test).mean(1)
    return scores


def traker_project(model, examples, pad, projector, batch_size):
    """trak's vmap per-sample gradients of `functional_loss`, projected by `projector`, row order."""
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import AbstractModelOutput

    class RowLoss(AbstractModelOutput):
        def __init__(self):
            pass

        def get_output(self, model, weights, buffers, ids, labels):
            return functional_loss(model, {**weights, **buffers}, ids, labels)

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0])

    computer = FunctionalGradientComputer(model, RowLoss(), projector.grad_dim, torch.float32, torch.device("cpu"))
    loader, order = padded_loader(examples, pad, batch_size)
    out = torch.empty(len(examples), projector.proj_dim)
    done = 0
    for ids, labels in loader:
        grads = computer.compute_per_sample_grad((ids, labels))
        out[torch.tensor(order[done:done + len(ids)])] = projector.project(grads, model_id=0)
        done += len(ids)
    return out


def spearman(a, b) -> float:
    rank = lambda x: np.argsort(np.argsort(np.asarray(x, dtype=np.float64)))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def timed(label, fn, rows_count):
    start = now()
    out = fn()
    seconds = now() - start
    return {"method": label, "rows": rows_count, "seconds": seconds, "rows_per_s": rows_count / seconds, "out": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--less-rows", type=int, default=32, help="rows the slow LESS way scores (its rows/s is per row); 0 skips it")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--less-matrix-gb", type=float, default=10.0, help="hold LESS's dense projection in memory up to this size")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--proj-dim", type=int, default=1024, help="store engine: projected size per parameter")
    parser.add_argument("--less-dim", type=int, default=8192)
    parser.add_argument("--peer-rows", type=int, default=32, help="rows each peer package scores (the first ones, as LESS); 0 skips peers")
    parser.add_argument("--peer-dim", type=int, default=1024, help="peers' projected size (bergson: per module, sqrt of it per side)")
    parser.add_argument("--peer-batch", type=int, default=8, help="rows per vmap batch (dattri, traker)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one method's memory in a child
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        return measure_memory_only(args)

    from dyn.influence.exact import exact_row_gradients
    from dyn.influence.mean_gradient import mean_gradient
    from dyn.influence.parameters import select_parameters

    model, rows, anchors, pad = build(args)
    params = select_parameters(model)
    row_batches = batches(rows, pad, args.batch_tokens)
    tokens = int(rows.lengths.sum())
    print(f"model: GPT-2 {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {model.config.vocab_size}, {params.numel / 1e6:.2f}M parameters; "
          f"{len(rows)} rows ({tokens} tokens, {len(row_batches)} batches of <= {args.batch_tokens} padded tokens), "
          f"{len(anchors)} anchors; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}")

    start = now()
    mean = mean_gradient(model, params, batches(anchors, pad, args.batch_tokens)).vector
    anchor_seconds = now() - start
    forward_only(model, params, row_batches[:1], None)  # warm up kernels and lazy imports
    directional(model, params, row_batches[:1], mean)
    directional_jvp(model, params, row_batches[:1], mean)
    store(model, params, row_batches[:1], mean, args.proj_dim)

    memory = {name: child_peak_mb(name) for name in ("forward", "directional", "jvp", "store")}
    results = [
        timed("forward (floor)", lambda: forward_only(model, params, row_batches, None), len(rows)),
        timed("directional, hooks (dyn default)", lambda: directional(model, params, row_batches, mean), len(rows)),
        timed("directional, forward-mode JVP", lambda: directional_jvp(model, params, row_batches, mean), len(rows)),
        timed(f"store (dyn, LoGra {args.proj_dim}/parameter)", lambda: store(model, params, row_batches, mean, args.proj_dim), len(rows)),
    ]
    less_note = "LESS way skipped (--less-rows 0)"
    if args.less_rows:
        with PeakMemory() as held:
            projector = DenseRademacher(params.numel, args.less_dim, max_gb=args.less_matrix_gb)
        memory["less"] = held.added_mb + 16 * params.numel * 4 / 2**20  # the matrix + a buffer of 16 gradients
        target = projector.project(mean.view(1, -1))[0]
        less_rows = rows_subset(rows, args.less_rows)
        results.append(timed(f"LESS/CLUES way (batch 1, dense {args.less_dim})", lambda: less_way(model, params, less_rows, pad, projector, target), len(less_rows)))
        less_note = (f"LESS dense projection {params.numel} x {args.less_dim}: "
                     + (f"held in memory ({held.added_mb:.0f} MB, generated once in {projector.setup_seconds:.1f}s, not charged per row)"
                        if projector.held is not None else "regenerated block by block at every projection (too large to hold)"))

    # agreement with exact per-sample gradients on the first rows of the first batch
    check = {k: v[:4] for k, v in row_batches[0].items()}
    _, exact = exact_row_gradients(model, params, check)
    exact_scores = exact.double() @ mean.double()
    relative = {name: float((fn(model, params, [check], mean)[0] - exact_scores).abs().max() / exact_scores.abs().max())
                for name, fn in (("hooks", directional), ("JVP", directional_jvp))}

    floor = results[0]["seconds"] / results[0]["rows"]
    less = results[-1]["seconds"] / results[-1]["rows"] if args.less_rows else float("nan")
    print(f"\n{less_note}")
    print(f"anchor mean gradient (once per checkpoint): {anchor_seconds:.2f}s for {len(anchors)} anchors")
    print("directional vs exact per-sample gradients, max relative difference: "
          + ", ".join(f"{name} {value:.2e}" for name, value in relative.items()) + "\n")
    header = f"| {'method':<40} | {'rows':>5} | {'rows/s':>8} | {'x forward time':>14} | {'x LESS speed':>12} | {'peak +MB':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r, name in zip(results, ("forward", "directional", "jvp", "store", "less")):
        per_row = r["seconds"] / r["rows"]
        print(f"| {r['method']:<40} | {r['rows']:>5} | {r['rows_per_s']:>8.2f} | {per_row / floor:>14.2f} | {less / per_row:>12.1f} | {memory[name]:>8.0f} |")
    if args.peer_rows:
        exact = torch.empty(len(rows))  # dyn's exact directional scores, in row order
        exact[torch.tensor([i for b in batch_plan(rows, args.batch_tokens) for i in b])] = torch.cat(results[1]["out"]).float()
        run_peers(args, model, params, rows, anchors, pad, exact, results[1], results[4] if args.less_rows else None)


def run_peers(args, model, params, rows, anchors, pad, exact, directional_result, less_result):
    """Time each peer package that imports on the first `--peer-rows` rows; print a table."""
    from importlib.metadata import version

    subset = rows_subset(rows, args.peer_rows)
    n, dim = len(subset), args.peer_dim
    measured, notes = [], {}
    if less_result is not None:
        measured.append(dict(less_result, method="LESS/CLUES way (reference)", scores=torch.cat(less_result["out"])))
    for name in PEERS:
        reason = peer_available(name)
        if reason is not None:
            notes[name] = f"not run: {reason}"
            continue
        start = now()
        if name == "bergson":
            query = bergson_collect(model, anchors, batch_plan(anchors, args.batch_tokens), dim)
            run = lambda: bergson_collect(model, subset, batch_plan(subset, args.batch_tokens), dim, query)  # noqa: E731
        elif name == "dattri":
            dattri_scores(model, rows_subset(rows, 2), anchors, pad, dim, args.peer_batch)  # warm-up (vmap, imports)
            run = lambda: dattri_scores(model, subset, anchors, pad, dim, args.peer_batch)  # noqa: E731
        else:
            from trak.projectors import BasicProjector, ProjectionType

            projector = BasicProjector(params.numel, dim, 0, ProjectionType.rademacher, torch.device("cpu"))
            target = traker_project(model, anchors, pad, projector, args.peer_batch).mean(0)
            run = lambda: traker_project(model, subset, pad, projector, args.peer_batch) @ target / dim  # noqa: E731
        notes[name] = (f"{name}: warm-up {now() - start:.1f}s; the anchors' gradients are recomputed for every row batch, inside the time"
                       if name == "dattri" else f"{name}: anchor side (projected mean anchor gradient) {now() - start:.1f}s, not charged per row")
        result = timed(f"{name} {version(name)}", run, n)
        measured.append(dict(result, scores=result["out"]))

    direct = directional_result["seconds"] / directional_result["rows"]
    less = less_result["seconds"] / less_result["rows"] if less_result is not None else float("nan")
    print(f"\npeers: the first {n} rows, projected size {dim}; agreement with dyn's exact directional scores on the same rows")
    header = f"| {'method':<40} | {'rows':>5} | {'rows/s':>8} | {'x LESS speed':>12} | {'x directional speed':>19} | {'Spearman':>8} | {'rel. error':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in measured:
        per_row, scores = r["seconds"] / r["rows"], r["scores"].double()
        reference = exact[: len(scores)].double()
        error = float((scores - reference).norm() / reference.norm())
        print(f"| {r['method']:<40} | {r['rows']:>5} | {r['rows_per_s']:>8.2f} | {less / per_row:>12.2f} | {direct / per_row:>19.3f} | "
              f"{spearman(scores, reference):>8.3f} | {error:>10.3f} |")
    for name, note in notes.items():
        if note.startswith("not run"):
            print(f"| {name:<40} | {note} | | | | | |")
    for note in notes.values():
        if not note.startswith("not run"):
            print(note)


def child_peak_mb(method: str) -> float:
    """Peak memory `method` adds, measured in a fresh process with the same arguments."""
    import subprocess
    import sys

    argv = [a for a in sys.argv[1:]]
    out = subprocess.run([sys.executable, __file__, *argv, "--only", method], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_added_mb"])


def measure_memory_only(args):
    """In a child: build the same model and rows, run one method, print the memory it added."""
    import ctypes
    import gc

    from dyn.influence.mean_gradient import mean_gradient
    from dyn.influence.parameters import select_parameters

    model, rows, anchors, pad = build(args)
    params = select_parameters(model)
    row_batches = batches(rows, pad, args.batch_tokens)
    mean = mean_gradient(model, params, batches(anchors, pad, args.batch_tokens)).vector
    run = {"forward": lambda: forward_only(model, params, row_batches, None),
           "directional": lambda: directional(model, params, row_batches, mean),
           "jvp": lambda: directional_jvp(model, params, row_batches, mean),
           "store": lambda: store(model, params, row_batches, mean, args.proj_dim)}[args.only]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand cached free memory back, so growth shows in RSS
    with PeakMemory() as peak:
        run()
    print(json.dumps({"method": args.only, "peak_added_mb": peak.added_mb}))


def rows_subset(examples, n):
    """The first n rows as their own LMExamples (the LESS way is slow; it scores fewer rows)."""
    from dyn.core.lm import LMExamples

    n = min(n, len(examples))
    return LMExamples(
        input_ids=examples.input_ids[:n], prompt_lengths=examples.prompt_lengths[:n],
        response_tokens=examples.response_tokens[:n], truncated=examples.truncated[:n], max_length=examples.max_length,
    )


if __name__ == "__main__":
    main()
