#!/usr/bin/env python
"""Benchmark of `dyn distill`'s student training (DESIGN §4.4, §6): steps/s and peak memory of the
same student on the same rows, side by side in one process, taught four ways:

- cached: `dyn distill --teacher-cache CACHE` — the teacher's top-k log-probabilities read from a
  `dyn distill cache` folder by dyn_index (`distill.teaching.CachedTeacher`);
- online: `dyn distill --teacher RUN` — the teacher run forward on every batch, full logits
  (`distill.teaching.OnlineTeacher`);
- plain CE: `dyn train` — labels only, no teacher (`distill.trainer.run_training`); the floor;
- TRL GKD: `trl.experimental.gkd.GKDTrainer` with β = 0 (forward KL, the GKD convention), λ = 0
  (no on-policy generation), seq_kd off — an online teacher, full logits — fed exactly dyn's
  batches (a collator that returns dyn's step plan, so every arm sees the same rows in the same
  order). Run only where `trl` imports (run this script with an interpreter that has it).

Models: the teacher is a `dyn train` run of `--teacher` (default the `small` preset: GPT-2, 4
layers, hidden 256, 4 heads) on the rows with a byte-level BPE of `--vocab-size` ids trained on
them, `--teacher-steps` steps, one checkpoint; the student is a fresh `--student` (default `tiny`:
2 layers, hidden 64) with the teacher's tokenizer. Rows: the first `--rows` GSM8K train rows,
question -> answer. KD: forward KL at τ = 1, α = 1 (the defaults), one-shot schedule (the one
checkpoint). All three dyn arms go through the library entry points the CLI calls
(`distill.recipe.run_distillation` with a `DistillRequest`, `distill.trainer.run_training`).

Timing: every arm is run once to warm up (threads, allocator, page cache), then `--repeats` times
interleaved (cached, online, plain, trl, cached, ...). Each optimizer step is timed by wrapping
`TrainingLoop._one_step` (dyn) or by a TrainerCallback (TRL), so model loading, tokenising and
saving are excluded; the first `--warmup-steps` steps of each run are dropped (the online teacher
is loaded inside the first step) and steps/s = steps / their summed time. Per repeat the ratio
against the other arms of the same round is taken; the table gives the median over rounds.
The cache build (a one-off cost, amortised over every student and sweep that reads it) is timed
separately, with its size per response token.

Memory: peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) of a fresh Python
process that runs one arm (the same code, `--one-arm`), next to the same process's RSS after its
imports, before the arm (so "above baseline" is what the arm itself adds: models, optimizer,
activations, mapped cache shards). On CUDA also `torch.cuda.max_memory_allocated` in that process.

    python bench/distill.py --threads 1                      # CPU defaults: about 4 minutes, 5 with TRL
    /tmp/trl-venv/bin/python bench/distill.py                # the same with the TRL arm
    python bench/distill.py --device cuda --rows 4096 --steps 100 --batch-size 32   # on a GPU

These machines are shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import DATA, now


ARMS = ("cached", "online", "plain", "trl")
STEP_TIMES: list[float] = []
MEMORY_STEPS = 10  # steps of the fresh-process memory runs (the peak is reached in the first steps)


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS: VmHWM where /proc has it, else ru_maxrss (which a child inherits from the parent
    it was forked from, so it can overstate a small child)."""
    return status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def instrument_dyn_steps() -> None:
    """Time each optimizer step of dyn's loop (what `TrainingLoop.train_seconds` sums, per step)."""
    from dyn.distill.trainer import TrainingLoop

    original = TrainingLoop._one_step
    if getattr(original, "_bench", False):
        return

    def timed(self, step):
        sync(self.device)
        started = now()
        result = original(self, step)
        sync(self.device)
        STEP_TIMES.append(now() - started)
        return result

    timed._bench = True
    TrainingLoop._one_step = timed


def sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- setup (one-off)

def prepare(args, work: Path) -> dict:
    """Rows, the teacher run, the cache. Returns paths and one-off figures."""
    from dyn.core import progress  # noqa: F401  (logging set-up)
    from dyn.distill.cache_recipe import CacheRequest, run_teacher_cache
    from dyn.distill.trainer import TrainRequest, run_training

    data = work / "gsm8k.jsonl"
    with open(DATA / "gsm8k-train.jsonl", encoding="utf-8") as source, open(data, "w", encoding="utf-8") as out:
        for i, line in enumerate(source):
            if i == args.rows:
                break
            out.write(line)
    teacher = work / "teacher"
    if not (teacher / "run.json").is_file():
        started = now()
        run_training(TrainRequest(
            data=str(data), output=str(teacher), model=args.teacher, train_tokenizer=True, vocab_size=args.vocab_size,
            template="{question}", response_field="answer", max_length=args.max_length, max_steps=args.teacher_steps,
            save_every=args.teacher_steps, batch_size=args.batch_size, device=args.device, overwrite=True,
        ))
        print(f"# teacher run: {now() - started:.1f} s", file=sys.stderr)
    cache = work / f"cache-k{args.top_k}"
    build_s = None
    if not (cache / "meta.json").is_file() or not json.loads((cache / "meta.json").read_text()).get("complete"):
        shutil.rmtree(cache, ignore_errors=True)
        started = now()
        run_teacher_cache(CacheRequest(teacher=str(teacher), data=str(data), output=str(cache), top_k=args.top_k,
                                       device=args.device))
        build_s = now() - started
    meta = json.loads((cache / "meta.json").read_text())
    shard_bytes = sum(p.stat().st_size for p in cache.glob("step-*/*.safetensors"))
    tokens = int(meta["spec"]["response_tokens"])
    return {
        "data": str(data), "teacher": str(teacher), "cache": str(cache), "cache_build_s": build_s,
        "cache_response_tokens": tokens, "cache_rows": int(meta["spec"]["rows"]),
        "bytes_per_token_meta": meta["storage"]["bytes_per_token"], "bytes_per_token_disk": shard_bytes / tokens,
        "cache_bytes": shard_bytes + (cache / "index.safetensors").stat().st_size,
        "tokenizer": str(next(teacher.glob("checkpoint-*"))),
    }


# --------------------------------------------------------------------------- the arms

def common(args) -> dict:
    return dict(max_steps=args.run_steps, batch_size=args.batch_size, device=args.device, seed=0, overwrite=True,
                save_every=None, log_every=10)


def run_cached(args, setup, out: Path) -> dict:
    from dyn.distill.recipe import DistillRequest, run_distillation

    return run_distillation(DistillRequest(data=setup["data"], output=str(out), model=args.student,
                                           teacher_cache=setup["cache"], schedule="one-shot", **common(args)))


def run_online(args, setup, out: Path) -> dict:
    from dyn.distill.recipe import DistillRequest, run_distillation

    return run_distillation(DistillRequest(data=setup["data"], output=str(out), model=args.student,
                                           teacher=setup["teacher"], schedule="one-shot", **common(args)))


def run_plain(args, setup, out: Path) -> dict:
    from dyn.distill.trainer import TrainRequest, run_training

    return run_training(TrainRequest(data=setup["data"], output=str(out), model=args.student, tokenizer=setup["tokenizer"],
                                     template="{question}", response_field="answer", max_length=args.max_length,
                                     **common(args)))


def trl_available() -> str | None:
    """None when TRL's GKDTrainer imports, else why not."""
    try:
        import trl

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: F401

        return None
    except Exception as exc:  # noqa: BLE001 - any failure is the reason reported
        return f"{type(exc).__name__}: {exc}"


def run_trl(args, setup, out: Path) -> dict:
    """GKDTrainer (β = 0, λ = 0) on exactly dyn's step plan and batches."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from dyn.core.io import read_rows
    from dyn.core.lm import build_lm_examples, pad_token_id
    from dyn.core.models import build_fresh_model, fresh_config, load_causal_lm, load_tokenizer, resolve_model_source
    from dyn.distill.checkpoints import trained_example_format
    from dyn.distill.trainer import LR_FRESH_MODEL, plan_steps

    tokenizer = load_tokenizer(setup["tokenizer"])
    loaded = read_rows(setup["data"])
    fmt, saved_length = trained_example_format(setup["tokenizer"], loaded, None, None)
    examples, loaded = build_lm_examples(loaded, fmt, tokenizer, saved_length or args.max_length)
    train_rows = examples.with_response()
    plan = plan_steps(examples.lengths[train_rows], batch_size=args.batch_size, batch_tokens=None, epochs=1.0,
                      max_steps=args.run_steps, seed=0)
    pad = pad_token_id(tokenizer)
    student = build_fresh_model(fresh_config(resolve_model_source(args.student), tokenizer), 0)
    teacher = load_causal_lm(setup["tokenizer"])

    class PlanCollator:
        """Ignores the sampler's rows: step s gets dyn's plan.steps[s], collated by dyn."""

        def __init__(self):
            self.step = 0

        def __call__(self, features):
            positions = train_rows[plan.steps[self.step % plan.total]]
            self.step += 1
            return examples.batch(positions, pad)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(args.device)
            self.started = now()

        def on_step_end(self, a, state, control, **kw):
            sync(args.device)
            STEP_TIMES.append(now() - self.started)

    dataset = Dataset.from_dict({"dyn_position": list(range(args.run_steps * args.batch_size))})
    config = GKDConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.run_steps,
        learning_rate=LR_FRESH_MODEL, lr_scheduler_type="linear", warmup_steps=max(1, round(0.03 * args.run_steps)),
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=args.max_length, save_strategy="no",
        report_to=[], logging_steps=10, use_cpu=not str(args.device).startswith("cuda"), disable_dropout=False,
        bf16=str(args.device).startswith("cuda"), dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=PlanCollator(), callbacks=[StepTimer()])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs on stdout
        result = trainer.train()
    return {"figures": {"final_loss": result.training_loss, "steps": result.global_step}}


RUNNERS = {"cached": run_cached, "online": run_online, "plain": run_plain, "trl": run_trl}


def timed_arm(arm: str, args, setup, work: Path, tag: str, steps: int | None = None) -> dict:
    """One run of an arm (`steps` optimizer steps, default --steps): per-step times after the
    warm-up steps, and the run's own figures."""
    args.run_steps = steps or args.steps
    STEP_TIMES.clear()
    out = work / f"{arm}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    started = now()
    summary = RUNNERS[arm](args, setup, out) or {}
    wall = now() - started
    steps = list(STEP_TIMES)
    steady = steps[args.warmup_steps:] or steps
    figures = summary.get("figures", {})
    shutil.rmtree(out, ignore_errors=True)
    return {
        "steps_per_s": len(steady) / sum(steady), "first_step_s": steps[0] if steps else None,
        "steps": len(steps), "wall_s": wall, "final_loss": figures.get("final_loss"),
        "tokens_trained": figures.get("tokens_trained"), "run_tokens_per_s": figures.get("tokens_per_s"),
    }


# --------------------------------------------------------------------------- memory (fresh processes)

def one_arm(args) -> None:
    """Child process: run one arm once, print its peak RSS and baseline as JSON."""
    import torch  # noqa: F401  - every import the arm needs is made before the baseline
    import transformers  # noqa: F401

    import dyn.distill.recipe  # noqa: F401
    import dyn.distill.trainer  # noqa: F401

    if args.one_arm == "trl":
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    instrument_dyn_steps()
    setup = json.loads(Path(args.setup_json).read_text())
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    baseline = rss_mib()
    timed_arm(args.one_arm, args, setup, Path(args.workdir), "memory", steps=min(args.steps, MEMORY_STEPS))
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
                      "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def memory_of(arm: str, args, setup_json: Path) -> dict:
    command = [sys.executable, __file__, "--one-arm", arm, "--setup-json", str(setup_json), "--workdir", args.workdir,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--student", args.student,
               "--device", args.device, "--max-length", str(args.max_length), "--warmup-steps", str(args.warmup_steps)] + (["--threads", str(args.threads)] if args.threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="GSM8K train rows (teacher run, cache, student)")
    parser.add_argument("--steps", type=int, default=25, help="student optimizer steps per timed run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="first steps of each run left out of steps/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--teacher", default="small", help="teacher preset or JSON config (trained here)")
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--student", default="tiny", help="student preset or JSON config")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-arm fresh-process memory runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keeps the teacher run and cache between invocations")
    parser.add_argument("--one-arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--setup-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_arm:
        one_arm(args)
        return
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="dyn-bench-distill-")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    trl_reason = trl_available() if "trl" in arms else "not asked for"
    if trl_reason is not None and "trl" in arms:
        arms.remove("trl")
    instrument_dyn_steps()

    load = os.getloadavg()
    setup = prepare(args, work)
    setup_json = work / "setup.json"
    setup_json.write_text(json.dumps(setup))

    results = {arm: [] for arm in arms}
    for arm in arms:  # warm-up round, not counted
        timed_arm(arm, args, setup, work, "warm", steps=args.warmup_steps + 2)
    for r in range(args.repeats):
        for arm in arms:
            results[arm].append(timed_arm(arm, args, setup, work, str(r)))
    load_after = os.getloadavg()
    memory = {arm: memory_of(arm, args, setup_json) for arm in arms} if not args.no_memory else {}

    def ratio(a: str, b: str) -> float | None:
        if a not in results or b not in results:
            return None
        return statistics.median(x["steps_per_s"] / y["steps_per_s"] for x, y in zip(results[a], results[b]))

    import transformers

    names = {"cached": "dyn distill, cached teacher", "online": "dyn distill, online teacher",
             "plain": "dyn train, plain CE (no teacher)", "trl": "TRL GKDTrainer (β=0, λ=0, online)"}
    print(f"# dyn distill student training: {args.student} student, {args.teacher} teacher ({args.teacher_steps} steps), "
          f"{setup['cache_rows']} GSM8K rows, vocab {args.vocab_size}, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.steps} steps per run ({args.warmup_steps} warm-up steps dropped), {args.repeats} interleaved rounds, "
          f"top-k {args.top_k}, device {args.device}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    print(f"# load average before {load[0]:.2f}, after {load_after[0]:.2f}")
    print("| arm | steps/s (median) | per round | vs online | vs plain CE | peak RSS MiB | above baseline MiB |"
          + (" CUDA peak MiB |" if str(args.device).startswith("cuda") else ""))
    print("|---|---:|---|---:|---:|---:|---:|" + ("---:|" if str(args.device).startswith("cuda") else ""))
    for arm in arms:
        rates = [x["steps_per_s"] for x in results[arm]]
        m = memory.get(arm, {})
        vs_online, vs_plain = ratio(arm, "online"), ratio(arm, "plain")
        cells = [names[arm], f"{statistics.median(rates):.2f}", ", ".join(f"{x:.2f}" for x in rates),
                 f"{vs_online:.2f}" if vs_online else "-", f"{vs_plain:.2f}" if vs_plain else "-",
                 f"{m['peak_rss_mib']:.0f}" if "peak_rss_mib" in m else m.get("error", "-"),
                 f"{m['peak_rss_mib'] - m['baseline_rss_mib']:.0f}" if "peak_rss_mib" in m else "-"]
        if str(args.device).startswith("cuda"):
            cells.append(f"{m['cuda_peak_mib']:.0f}" if m.get("cuda_peak_mib") is not None else "-")
        print("| " + " | ".join(cells) + " |")
    if trl_reason is not None:
        print(f"| {names['trl']} | not run: {trl_reason} | | | | | |")
    print()
    c, p = ratio("cached", "online"), ratio("cached", "plain")
    if c is not None:
        print(f"cached / online = {c:.2f} (target >= 1.5): {'met' if c >= 1.5 else 'MISSED'}")
    if p is not None:
        print(f"cached / plain CE = {p:.2f} (target >= 0.85): {'met' if p >= 0.85 else 'MISSED'}")
    build = f"{setup['cache_build_s']:.1f} s" if setup["cache_build_s"] is not None else "reused from --workdir"
    print(f"cache: {setup['cache_response_tokens']} response tokens of {setup['cache_rows']} rows, top-{args.top_k}: "
          f"{setup['bytes_per_token_disk']:.1f} bytes/token on disk (6k+4 = {setup['bytes_per_token_meta']}), "
          f"{setup['cache_bytes'] / 2**20:.2f} MiB in all; build (one-off, teacher forward over every row): {build}")
    for arm in arms:
        x = results[arm][-1]
        print(f"{arm}: first step {x['first_step_s']:.2f} s, final loss {x['final_loss']}, tokens trained {x['tokens_trained']}, "
              f"run.json tokens/s {x['run_tokens_per_s']}")
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
