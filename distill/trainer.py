"""`dyn train`: causal-LM fine-tuning with loss on response tokens only, checkpoints in the Hugging
Face Trainer layout, exact resume, and Accelerate for several processes.

The recipe (`run_training`) is a plain sequence of library calls: read rows -> prompt/response
examples -> model and tokenizer -> a step plan -> the loop -> checkpoints -> final model + run.json.

What one optimizer step computes: the step's rows are a fixed set chosen by the plan (independent
of the number of processes and of gradient accumulation). The step's loss is the mean of
`per_row_loss` (each row's own mean over its response tokens) over those rows; only rows with at
least one response token are ever planned. Each process takes every world-size-th row of the step,
splits its share into `grad_accum` micro-batches and back-propagates
sum(row losses) * world_size / rows_in_step; DistributedDataParallel averages over processes, so
the gradient is exactly that of the step's mean whatever the world size.

Resume repeats an unbroken run: the plan depends only on (seed, epoch), dropout is reseeded from
(seed, step, rank) at every step, and weights, AdamW moments and the schedule are restored from the
latest checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np

from dyn.core.errors import DataError, UsageError

# Default learning rates by what is trained (recorded in run.json).
LR_FRESH_MODEL = 1e-3
LR_LORA = 2e-4
LR_PRETRAINED = 5e-5
DEFAULT_BATCH_ROWS = 8
STATE_FORMAT = "dyn-train/1"
# Settings that define the training trajectory: a resumed run must have the same ones.
_TRAJECTORY_SETTINGS = (
    "data", "model", "tokenizer", "train_tokenizer", "vocab_size", "template", "response_field",
    "separator", "max_length", "epochs", "max_steps", "batch_size", "batch_tokens", "grad_accum",
    "lr", "lr_schedule", "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "fraction",
    "lora_r", "lora_alpha", "lora_dropout", "split", "precision",
)


@dataclass
class TrainRequest:
    # The flag that names the model being trained, for error messages (dyn distill: --student).
    model_flag: ClassVar[str] = "--model"
    # What a --resume must repeat, and which of those are paths (compared resolved).
    trajectory_settings: ClassVar[tuple] = _TRAJECTORY_SETTINGS
    path_settings: ClassVar[tuple] = ("data", "model", "tokenizer")

    data: str
    output: str
    model: str | None = None
    tokenizer: str | None = None
    train_tokenizer: bool = False
    vocab_size: int = 4096
    template: str | None = None
    response_field: str | None = None
    separator: str = "\n"
    max_length: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None
    batch_tokens: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    fraction: float | None = None
    save_every: int | None = None
    save_every_epoch: bool = False
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    device: str = "auto"
    precision: str = "auto"
    skip_bad_rows: bool = False
    split: str | None = None
    eval_data: str | None = None
    eval_every: int | None = None
    eval_metric: str = "loss"
    eval_max_new_tokens: int = 256
    extra: dict = field(default_factory=dict)


def check_request(req: TrainRequest) -> None:
    """Flag checks that need no data, so a bad command fails before any work."""
    if not req.model:
        raise UsageError("--model is required: tiny, small, a JSON config file or a model folder")
    if req.batch_size is not None and req.batch_tokens is not None:
        raise UsageError("--batch-size and --batch-tokens are alternatives; give one")
    positive = {"--batch-size": req.batch_size, "--batch-tokens": req.batch_tokens, "--max-steps": req.max_steps,
                "--save-every": req.save_every, "--max-length": req.max_length}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if req.grad_accum < 1 or req.log_every < 1:
        raise UsageError("--grad-accum and --log-every must be at least 1")
    if not req.epochs > 0:
        raise UsageError(f"--epochs {req.epochs}: must be positive")
    if req.fraction is not None and not 0 < req.fraction <= 1:
        raise UsageError(f"--fraction {req.fraction}: must be in (0, 1]")
    if req.lr is not None and not req.lr > 0:
        raise UsageError(f"--lr {req.lr}: must be positive")
    if not 0 <= req.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio {req.warmup_ratio}: must be in [0, 1)")
    if req.lr_schedule not in ("linear", "cosine", "constant"):
        raise UsageError(f"--lr-schedule {req.lr_schedule}: choose linear, cosine or constant")
    if req.precision not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--precision {req.precision}: choose auto, float32 or bfloat16")
    if req.resume and req.overwrite:
        raise UsageError("--resume and --overwrite are alternatives; give one")
    if req.lora_r is not None and req.lora_r < 1:
        raise UsageError(f"--lora-r {req.lora_r}: must be at least 1")
    check_eval_flags(req)


def check_eval_flags(req) -> None:
    """--eval-every and --eval-metric need --eval-data; the metric must be known."""
    from dyn.distill.evaluation import check_metric

    check_metric(req.eval_metric)
    if req.eval_every is not None and req.eval_every < 1:
        raise UsageError(f"--eval-every {req.eval_every}: must be at least 1")
    if req.eval_data is None and (req.eval_every is not None or req.eval_metric != "loss"):
        raise UsageError("--eval-every and --eval-metric evaluate on a held-out file: give it with --eval-data")
    if req.eval_max_new_tokens < 1:
        raise UsageError(f"--eval-max-new-tokens {req.eval_max_new_tokens}: must be at least 1")


# --------------------------------------------------------------------------- the run folder

def prepare_run_folder(req: TrainRequest):
    """Check `-o` and return the checkpoint to resume from (None: start from scratch).

    A new or empty folder is used as it is. A folder holding a dyn run needs `--resume` (continue
    from its latest checkpoint; none yet: start again) or `--overwrite` (delete it and start again).
    Anything else is refused, so a mistyped `-o` never deletes a user's folder."""
    from dyn.distill.checkpoints import is_dyn_run, latest_checkpoint

    out, data = Path(req.output), Path(req.data)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {req.output}: exists and is not a folder")
    if data.exists():
        resolved, source = out.resolve(), data.resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise UsageError(f"-o {req.output}: the run folder would hold or replace the input {req.data}")
    if not out.exists() or not any(p for p in out.iterdir() if ".dyn-tmp-" not in p.name):
        return None
    if not is_dyn_run(out):
        raise UsageError(f"-o {req.output}: folder exists and is not a dyn run; choose a new folder")
    if req.resume:
        return latest_checkpoint(out)
    if req.overwrite:
        return None
    raise UsageError(f"-o {req.output}: holds a dyn run; pass --resume to continue it or --overwrite to start again")


def _clear_run_folder(output: Path, overwrite: bool) -> None:
    """Rank 0: start the folder afresh (with --overwrite) and remove temporaries of killed saves."""
    if overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    for leftover in output.glob(".*.dyn-tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()


# --------------------------------------------------------------------------- the step plan

@dataclass
class StepPlan:
    """Which rows each optimizer step trains on (positions into the training rows)."""

    steps: list[np.ndarray]
    steps_per_epoch: int
    epochs: int

    @property
    def total(self) -> int:
        return len(self.steps)


def plan_steps(lengths: np.ndarray, *, batch_size: int | None, batch_tokens: int | None,
               epochs: float, max_steps: int | None, seed: int) -> StepPlan:
    """The rows of every step. Epoch e visits every row once in an order seeded by (seed, e):
    with `batch_size`, consecutive chunks of a permutation; with `batch_tokens`, the length-sorted
    token-budget batches of `core.embeddings.plan_batches` (padded tokens <= budget), in a seeded
    batch order. `max_steps` (if given) wins over `epochs`; the last epoch may be partial."""
    from dyn.core.embeddings import plan_batches

    n = len(lengths)
    if batch_tokens is not None:
        if batch_tokens < int(lengths.max()):
            raise UsageError(f"--batch-tokens {batch_tokens}: smaller than the longest example ({int(lengths.max())} tokens); raise it or lower --max-length")
        base = plan_batches(lengths, max_tokens=batch_tokens, max_rows=n)
        per_epoch = len(base)
    else:
        rows = batch_size or DEFAULT_BATCH_ROWS
        per_epoch = math.ceil(n / rows)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * per_epoch))
    steps: list[np.ndarray] = []
    epoch = 0
    while len(steps) < total:
        rng = np.random.default_rng([seed, epoch])
        if batch_tokens is not None:
            steps.extend(base[i] for i in rng.permutation(len(base)))
        else:
            order = rng.permutation(n)
            steps.extend(order[i:i + rows] for i in range(0, n, rows))
        epoch += 1
    return StepPlan(steps[:total], per_epoch, math.ceil(total / per_epoch))


def choose_fraction(positions: np.ndarray, fraction: float | None, seed: int) -> np.ndarray:
    """A seeded random `fraction` of `positions` (kept in input order); all when None."""
    if fraction is None or fraction >= 1:
        return positions
    keep = max(1, int(round(fraction * len(positions))))
    rng = np.random.default_rng([seed, 0x5EED])
    return np.sort(rng.choice(positions, size=keep, replace=False))


# --------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW over the trainable parameters, by name (torch saves `param_names` with the state);
    no weight decay on biases and normalisation weights (1-D tensors)."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    names = [n for g in groups for n, _ in g["params"]]  # optimizer index order
    return torch.optim.AdamW(groups, lr=lr), names


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warm-up from 0 over
    `warmup_steps`, then constant, linear decay to 0, or cosine decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str):
    import functools

    import torch

    factor = functools.partial(lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed for optimizer step `step` on `rank` (dropout masks)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# --------------------------------------------------------------------------- the recipe

def run_training(req: TrainRequest) -> dict | None:
    """Train and write the run folder; returns the summary on rank 0 (None on other ranks)."""
    from dyn.core import progress
    from dyn.core.distributed import barrier, world
    from dyn.core.embeddings import resolve_device
    from dyn.core.io import read_rows
    from dyn.core.lm import resolve_example_format
    from dyn.core.models import resolve_model_source
    from dyn.core.runrecord import RunRecord

    check_request(req)
    warnings.filterwarnings("ignore", category=FutureWarning)
    resolve_device(req.device)  # an unusable --device fails before any work
    w = world()
    resume_from = prepare_run_folder(req)
    source = resolve_model_source(req.model)
    if req.train_tokenizer and not source.is_fresh:
        raise UsageError(f"--train-tokenizer: --model {req.model} is a trained model with its own tokenizer; drop the flag")
    if req.train_tokenizer and req.tokenizer:
        raise UsageError("--train-tokenizer and --tokenizer are alternatives; give one")
    if source.is_fresh and not (req.train_tokenizer or req.tokenizer or resume_from):
        raise UsageError(f"--model {req.model} builds a fresh model: give it a tokenizer with --train-tokenizer or --tokenizer FOLDER")
    output = Path(req.output)
    settings = _trajectory_settings(req)
    if resume_from is not None:
        _check_same_run(resume_from, settings)

    record = RunRecord("train", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
        fmt = resolve_example_format(loaded.dataset.column_names, req.template, req.response_field, loaded.source, req.separator)
    with record.phase("load model"):
        tokenizer = _tokenizer(req, source, resume_from, loaded, fmt, record)
        model, config, base_path, base_to_save = _model(req, source, tokenizer, resume_from, output)
    examples, loaded, train_rows, plan, max_length = examples_and_plan(req, loaded, fmt, tokenizer, config, record)
    lr = req.lr or (LR_LORA if req.lora_r else LR_FRESH_MODEL if source.is_fresh else LR_PRETRAINED)
    progress.info(
        f"training on {len(train_rows)} of {len(examples)} rows ({fmt.describe()}), "
        f"{plan.total} steps, {plan.steps_per_epoch} per epoch, lr {lr:g}"
    )
    evaluator = held_out_evaluator(req, fmt, tokenizer, max_length, record)
    # Only now, with the input checked, is anything written (or an old run deleted).
    if w.is_main:
        _clear_run_folder(output, req.overwrite and resume_from is None)
        if base_to_save is not None:
            base_to_save.save_pretrained(base_path, safe_serialization=True)
            tokenizer.save_pretrained(base_path)
    barrier()

    loop = TrainingLoop(req, model, tokenizer, examples, train_rows, plan, lr, settings, fmt, base_path, record,
                        evaluator=evaluator, row_names=row_namer(loaded))
    return run_loop(loop, resume_from, record, lambda: _finish_record(
        record, req, loop, loaded, examples, train_rows, source, config, base_path, fmt, lr))


def examples_and_plan(req, loaded, fmt, tokenizer, config, record, saved_length: int | None = None):
    """Token ids of every row, the rows trained on and the step plan:
    (examples, rows, train_rows, plan, max_length). max_length is --max-length, else
    `saved_length` (a teacher's), else the model's context."""
    from dyn.core.lm import build_lm_examples
    from dyn.core.models import context_length

    max_length = req.max_length or saved_length or context_length(config)
    if max_length > context_length(config):
        raise UsageError(f"--max-length {max_length}: {req.model_flag} {req.model} attends over at most {context_length(config)} positions")
    tokenizer.model_max_length = max_length
    with record.phase("tokenize"):
        examples, loaded = build_lm_examples(loaded, fmt, tokenizer, max_length, skip_bad_rows=req.skip_bad_rows)
    usable = examples.with_response()
    if len(usable) == 0:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in examples.no_response.items())
        raise DataError(f"{loaded.source}: no row has a response token to learn ({reasons})")
    train_rows = choose_fraction(usable, req.fraction, req.seed)
    plan = plan_steps(examples.lengths[train_rows], batch_size=req.batch_size, batch_tokens=req.batch_tokens,
                      epochs=req.epochs, max_steps=req.max_steps, seed=req.seed)
    return examples, loaded, train_rows, plan, max_length


def run_loop(loop, resume_from, record, finish) -> dict | None:
    """Restore, train, save the final model; on rank 0 `finish()` writes the run record and
    returns the summary (None on other ranks)."""
    from dyn.core.distributed import barrier, world

    loop.restore(resume_from)
    with record.phase("train"):
        loop.run()
    if not world().is_main:
        barrier()
        return None
    with record.phase("save"):
        loop.save_final()
    summary = finish()
    barrier()
    return summary


def row_namer(loaded):
    """Names rows (positions into the tokenised examples) in an error: their file rows."""
    def name(positions) -> str:
        return "; ".join(loaded.where(int(p)) for p in positions) or "no single row's loss was non-finite"
    return name


def held_out_evaluator(req, fmt, tokenizer, max_length: int, record):
    """With --eval-data: the held-out rows read in the training rows' format, and a function
    (model, step) -> metrics that every rank calls; None without it."""
    if not req.eval_data:
        return None
    from dyn.core.lm import pad_token_id
    from dyn.distill.evaluation import evaluate, load_held_out

    with record.phase("read held-out"):
        held_out = load_held_out(req.eval_data, fmt, tokenizer, max_length, skip_bad_rows=req.skip_bad_rows)
    record.add_input(req.eval_data, held_out.rows_in)
    pad_id = pad_token_id(tokenizer)

    def evaluator(model, step: int) -> dict:
        device = next(model.parameters()).device
        return evaluate(model, held_out, metric=req.eval_metric, pad_token_id=pad_id, device=device,
                        max_new_tokens=req.eval_max_new_tokens)

    return evaluator


def _trajectory_settings(req: TrainRequest) -> dict:
    """The settings a resumed run must share; local paths made absolute, so a resume from
    another working folder matches."""
    values = asdict(req)
    for name in req.path_settings:
        if values[name] and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    return {name: values[name] for name in req.trajectory_settings}


def _check_same_run(checkpoint, settings: dict) -> None:
    from dyn.distill.checkpoints import read_trainer_state

    saved = read_trainer_state(checkpoint.path).get("dyn", {}).get("settings")
    if saved is None:
        raise UsageError(f"--resume: {checkpoint.path} was not written by dyn train (no dyn settings in its trainer_state.json)")
    changed = [k for k in settings if saved.get(k) != settings[k]]
    if changed:
        detail = ", ".join(f"{k.replace('_', '-')} {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise UsageError(f"--resume: the run in {checkpoint.path.parent} was started with other settings ({detail}); use the same flags or --overwrite")


def _tokenizer(req, source, resume_from, loaded, fmt, record):
    """The run's tokenizer: the checkpoint's on resume, the model folder's, --tokenizer, or one
    trained here on every row's prompt and response (on rank 0, then handed to the others)."""
    from dyn.core.distributed import broadcast_object, world
    from dyn.core.lm import row_prompts_and_responses
    from dyn.core.models import context_length, load_tokenizer
    from dyn.core.tokenizer_training import tokenizer_json, train_bpe_tokenizer, wrap_tokenizer

    if resume_from is not None:
        return load_tokenizer(str(resume_from.path), "--resume")
    if not source.is_fresh:
        return load_tokenizer(source.name)
    if req.tokenizer:
        return load_tokenizer(req.tokenizer, "--tokenizer")
    limit = req.max_length or context_length(_preview_config(source))
    serialized = None
    if world().is_main:
        prompts, responses, _ = row_prompts_and_responses(loaded, fmt, None, skip_bad_rows=req.skip_bad_rows)
        tokenizer = train_bpe_tokenizer(prompts + responses, req.vocab_size, model_max_length=limit)
        serialized = tokenizer_json(tokenizer)
    serialized = broadcast_object(serialized)
    tokenizer = wrap_tokenizer(serialized, model_max_length=limit)
    record.data["tokenizer_trained"] = {"vocab_size_requested": req.vocab_size, "vocab_size": len(tokenizer)}
    return tokenizer


def _preview_config(source):
    """The config keys of a fresh model before its vocabulary is known (for its context length)."""
    from transformers import GPT2Config

    keys = {k: v for k, v in source.config.items() if k != "model_type"}
    try:
        return GPT2Config(**keys) if source.config.get("model_type", "gpt2") == "gpt2" else _generic_config(source)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--model {source.name}: invalid config ({exc})") from None


def _generic_config(source):
    from transformers import AutoConfig

    keys = dict(source.config)
    return AutoConfig.for_model(keys.pop("model_type"), **keys)


def _model(req, source, tokenizer, resume_from, output: Path):
    """(model, config, base_model_path, base_to_save): fresh, from a folder, or from the checkpoint
    on resume; wrapped with LoRA when asked. A fresh model under LoRA is returned as
    `base_to_save` too (a copy taken before the adapters went in), to be saved as RUN_DIR/base-model."""
    import copy

    from dyn.core.models import adapter_base_path, apply_lora, build_fresh_model, fresh_config, load_causal_lm
    from dyn.distill.checkpoints import BASE_MODEL_FOLDER

    base_path = None
    if req.lora_r:
        base_path = str((output / BASE_MODEL_FOLDER).resolve()) if source.is_fresh else str(Path(source.name).resolve())
    if resume_from is not None:
        if req.lora_r:
            from peft import PeftModel

            base = load_causal_lm(base_path, flag="--resume")
            model = PeftModel.from_pretrained(base, str(resume_from.path), is_trainable=True)
        else:
            model = load_causal_lm(str(resume_from.path), flag="--resume")
        return model, _base_config(model), base_path, None
    base_to_save = None
    if source.is_fresh:
        config = fresh_config(source, tokenizer, flag=req.model_flag)
        model = build_fresh_model(config, req.seed, flag=req.model_flag)
        if req.lora_r:
            base_to_save = copy.deepcopy(model)
    else:
        if adapter_base_path(source.name) is not None:
            raise UsageError(f"{req.model_flag} {source.name}: holds a LoRA adapter, not a full model; train on its base model (with --lora-r), or continue its run with --resume")
        model = load_causal_lm(source.name, flag=req.model_flag)
        config = model.config
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise UsageError(f"{req.model_flag} {source.name}: its tokenizer has {len(tokenizer)} tokens, more than the model's {model.get_input_embeddings().num_embeddings} embeddings")
    if req.lora_r:
        model = apply_lora(model, req.lora_r, req.lora_alpha, req.lora_dropout)
        model.peft_config["default"].base_model_name_or_path = base_path
    return model, config, base_path, base_to_save


def _base_config(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


# --------------------------------------------------------------------------- the loop

class LabelObjective:
    """`dyn train`'s objective: each row's mean next-token cross-entropy over its response tokens.

    The loop asks an objective for `row_losses(model, batch, positions, step)` (positions: the
    rows' places in the examples; step: 0-based optimizer step) and logs `log_entry(step)` with
    the step's loss; `dyn distill` injects its own (`distill.teaching.DistillObjective`)."""

    def row_losses(self, model, batch, positions, step: int):
        from dyn.core.lm import model_row_losses

        return model_row_losses(model, batch)

    def log_entry(self, step: int) -> dict:
        return {}


class TrainingLoop:
    """The optimisation loop over a `StepPlan`, with logging, evaluation and checkpoints (see the
    module doc). `objective` gives each row's loss (default `LabelObjective`); `evaluator(model,
    step)` -> {metric: value} runs on every rank every --eval-every steps and at the last step;
    `row_names(positions)` names rows in errors."""

    def __init__(self, req, model, tokenizer, examples, train_rows, plan, lr, settings, fmt, base_path, record,
                 *, row_names, objective=None, evaluator=None, state_format: str = STATE_FORMAT):
        import torch
        from accelerate import Accelerator

        from dyn.core.embeddings import resolve_device
        from dyn.core.lm import pad_token_id

        self.req, self.tokenizer, self.examples, self.plan = req, tokenizer, examples, plan
        self.train_rows, self.lr, self.settings, self.fmt = train_rows, lr, settings, fmt
        self.base_path, self.record = base_path, record
        device = resolve_device(req.device)
        on_cuda = device.startswith("cuda")
        precision = "bfloat16" if req.precision == "auto" and on_cuda else ("float32" if req.precision == "auto" else req.precision)
        self.precision = precision
        self.accelerator = Accelerator(cpu=not on_cuda, mixed_precision="bf16" if precision == "bfloat16" else "no")
        self.model = self.accelerator.prepare_model(model)
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.optimizer, self.param_names = make_optimizer(self.unwrapped, lr, req.weight_decay)
        self.warmup_steps = math.ceil(req.warmup_ratio * plan.total)
        self.scheduler = make_scheduler(self.optimizer, self.warmup_steps, plan.total, req.lr_schedule)
        self.pad_id = pad_token_id(tokenizer)
        self.global_step = 0
        self.log_history: list[dict] = []
        self.tokens_seen = 0
        self.tokens_at_start = 0
        self.train_seconds = 0.0
        self.saved: list[str] = []
        self.resumed_from: str | None = None
        self.objective = objective or LabelObjective()
        self.evaluator = evaluator
        self.row_names = row_names
        self.state_format = state_format
        self.evaluations: list[dict] = []
        self._torch = torch

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def restore(self, checkpoint) -> None:
        """Continue from `checkpoint`: optimizer and schedule state, step, log (weights were loaded
        with the model)."""
        if checkpoint is None:
            return
        from dyn.distill.checkpoints import OPTIMIZER_FILE, SCHEDULER_FILE, read_trainer_state

        torch = self._torch
        state = read_trainer_state(checkpoint.path)
        for name in (OPTIMIZER_FILE, SCHEDULER_FILE):
            if not (checkpoint.path / name).is_file():
                raise DataError(f"--resume: {checkpoint.path} has no {name}")
        self.optimizer.load_state_dict(torch.load(checkpoint.path / OPTIMIZER_FILE, map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(checkpoint.path / SCHEDULER_FILE, weights_only=True))
        self.global_step = int(state["global_step"])
        self.log_history = list(state.get("log_history", []))
        self.tokens_seen = self.tokens_at_start = int(state.get("num_input_tokens_seen", 0))
        self.resumed_from = str(checkpoint.path)
        from dyn.core import progress

        progress.info(f"resuming from {checkpoint.path} (step {self.global_step} of {self.plan.total})")

    def run(self) -> None:
        from dyn.core import progress

        self.model.train()
        interval_losses: list[float] = []
        last_print = time.monotonic()
        with progress.progress("training", self.plan.total, unit="steps") as bar:
            bar.advance(self.global_step)
            while self.global_step < self.plan.total:
                started = time.perf_counter()
                loss, rows, tokens, grad_norm, lr = self._one_step(self.global_step)
                self.train_seconds += time.perf_counter() - started
                self.global_step += 1
                self.tokens_seen += tokens
                interval_losses.append(loss)
                bar.advance(1)
                last = self.global_step == self.plan.total
                if self.global_step % self.req.log_every == 0 or last:
                    self.log_history.append({
                        "step": self.global_step,
                        "epoch": round(self.global_step / self.plan.steps_per_epoch, 6),
                        "loss": float(np.mean(interval_losses)),
                        "learning_rate": lr,
                        "grad_norm": grad_norm,
                        "num_tokens": self.tokens_seen,
                        **self.objective.log_entry(self.global_step - 1),
                    })
                    interval_losses = []
                if self._evaluation_due(last):
                    self.evaluate()
                now = time.monotonic()
                if now - last_print >= progress.PLAIN_INTERVAL_S or last:
                    last_print = now
                    progress.info(
                        f"step {self.global_step}/{self.plan.total}: loss {loss:.4f}, lr {lr:.3g}, "
                        f"{self.tokens_per_second():.0f} tokens/s"
                    )
                if self._save_due(last):
                    self.save_checkpoint()

    def tokens_per_second(self) -> float:
        """Non-padding tokens per second of training in this invocation (a resumed run counts
        from where it resumed), over all processes."""
        return (self.tokens_seen - self.tokens_at_start) / max(self.train_seconds, 1e-9)

    def _evaluation_due(self, last: bool) -> bool:
        every = self.req.eval_every
        return self.evaluator is not None and (last or bool(every and self.global_step % every == 0))

    def evaluate(self) -> None:
        """Run the evaluator on the unwrapped model (every rank) and log its metrics as their own
        log_history entry, the Hugging Face Trainer's way."""
        from dyn.core import progress

        started = time.perf_counter()
        metrics = self.evaluator(self.unwrapped, self.global_step)
        entry = {"step": self.global_step, "epoch": round(self.global_step / self.plan.steps_per_epoch, 6), **metrics,
                 "eval_seconds": round(time.perf_counter() - started, 3)}
        self.log_history.append(entry)
        self.evaluations.append(entry)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        progress.info(f"step {self.global_step}: {shown}")

    def _save_due(self, last: bool) -> bool:
        step, req = self.global_step, self.req
        return (last or bool(req.save_every and step % req.save_every == 0)
                or bool(req.save_every_epoch and step % self.plan.steps_per_epoch == 0))

    def _one_step(self, step: int):
        """One optimizer step; returns (step loss, rows, tokens, grad norm, lr used), all global.
        A non-finite loss stops the run before the optimizer step (the weights stay finite), naming
        the step and the rows whose loss was not finite."""
        torch = self._torch
        rows = self.train_rows[self.plan.steps[step]]
        mine = rows[self.rank::self.world_size]
        micro_batches = np.array_split(mine, self.req.grad_accum)
        torch.manual_seed(step_seed(self.req.seed, step, self.rank))
        scale = self.world_size / len(rows)
        loss_sum, tokens, bad_rows = 0.0, 0, []
        for i, micro in enumerate(micro_batches):
            dummy = len(micro) == 0  # every rank runs the same number of backward passes
            positions = rows[:1] if dummy else micro
            batch = self.examples.batch(positions, self.pad_id, device=self.device)
            syncing = i == len(micro_batches) - 1
            with self.accelerator.no_sync(self.model) if not syncing else contextlib.nullcontext():
                row_losses = self.objective.row_losses(self.model, batch, positions, step)
                loss = row_losses.sum() * (0.0 if dummy else scale)
                self.accelerator.backward(loss)
            if not dummy:
                values = row_losses.detach().float().cpu().numpy()
                bad_rows.extend(int(p) for p in np.asarray(positions)[~np.isfinite(values)])
                loss_sum += float(values.sum())
                tokens += int(batch["attention_mask"].sum())
        totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        step_loss = float(totals[0]) / len(rows)
        if not math.isfinite(step_loss):
            self._stop_on_bad_loss(step, step_loss, bad_rows)
        max_norm = self.req.max_grad_norm if self.req.max_grad_norm > 0 else float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, len(rows), int(totals[1]), grad_norm, lr

    def _stop_on_bad_loss(self, step: int, step_loss: float, bad_rows: list[int]) -> None:
        """Every rank gets here together (the loss is summed over ranks): gather the rows whose loss
        was not finite and stop with one line naming the step and those rows."""
        from dyn.core.distributed import all_gather_objects

        everywhere = sorted({p for part in all_gather_objects(bad_rows) for p in part}) if self.world_size > 1 else sorted(set(bad_rows))
        named = self.row_names(everywhere[:5]) + (f" and {len(everywhere) - 5} more" if len(everywhere) > 5 else "")
        raise DataError(
            f"training loss became {step_loss} at step {step + 1} ({named}); "
            "lower --lr, check those rows, or check the teacher"
        )

    # ----------------------------------------------------------------- saving

    def trainer_state(self) -> dict:
        """trainer_state.json in the Hugging Face Trainer's keys, plus a "dyn" section."""
        return {
            "global_step": self.global_step,
            "max_steps": self.plan.total,
            "num_train_epochs": self.plan.epochs,
            "epoch": round(self.global_step / self.plan.steps_per_epoch, 6),
            "logging_steps": self.req.log_every,
            "save_steps": self.req.save_every or 0,
            "train_batch_size": self.req.batch_size or (None if self.req.batch_tokens else DEFAULT_BATCH_ROWS),
            "num_input_tokens_seen": self.tokens_seen,
            "total_flos": 0,
            "best_metric": None,
            "best_model_checkpoint": None,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": self.log_history,
            "dyn": {
                "format": self.state_format,
                "settings": self.settings,
                "learning_rate": self.lr,
                "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "example_format": self.fmt.to_dict(),
                "max_length": self.examples.max_length,
                "world_size": self.world_size,
                "precision": self.precision,
                "lora": None if not self.req.lora_r else {
                    "r": self.req.lora_r, "alpha": self.req.lora_alpha or 2 * self.req.lora_r,
                    "dropout": self.req.lora_dropout, "base_model": self.base_path,
                },
            },
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes checkpoint-<step> atomically; the other ranks wait for it."""
        from dyn.core import progress
        from dyn.core.distributed import barrier
        from dyn.distill.checkpoints import save_checkpoint

        if self.rank == 0:
            path = save_checkpoint(
                self.req.output, self.global_step, model=self.unwrapped, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=self.trainer_state(),
                param_names=self.param_names,
            )
            self.saved.append(path.name)
            progress.info(f"saved {path}")
        barrier()

    def save_final(self) -> None:
        """The final model, tokenizer and trainer_state.json at the run folder's root: written to a
        temporary folder, then each file moved in (run.json, written after, marks completion)."""
        import os

        from dyn.core.atomic import temporary_name
        from dyn.distill.checkpoints import save_model_files

        root = Path(self.req.output)
        tmp = temporary_name(root / "final")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model_files(tmp, self.unwrapped, self.tokenizer, self.trainer_state())
        for item in tmp.iterdir():
            os.replace(item, root / item.name)
        tmp.rmdir()


def _finish_record(record, req, loop, loaded, examples, train_rows, source, config, base_path, fmt, lr) -> dict:
    from dyn.core.models import model_content_hash
    from dyn.distill.checkpoints import RUN_RECORD_FILE

    record.add_input(req.data, loaded.rows_in_source)
    record.add_skipped(loaded.skipped)
    record.add_model("start", source.name, model_content_hash(source, config), kind=source.kind)
    record.data["device"] = str(loop.device)
    record.data["seeds"] = {"init_order_dropout": req.seed}
    losses = [entry["loss"] for entry in loop.log_history if "loss" in entry]
    figures = {
        "steps": loop.global_step,
        "epochs": round(loop.global_step / loop.plan.steps_per_epoch, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": round(loop.tokens_per_second(), 1),
        "tokens_trained": loop.tokens_seen,
        "rows_trained": int(len(train_rows)),
        "learning_rate": lr,
        "warmup_steps": loop.warmup_steps,
        "checkpoints": loop.saved,
        "resumed_from": loop.resumed_from,
        "precision": loop.precision,
        "example_format": fmt.describe(),
        **examples.figures(),
    }
    if loop.evaluations:
        figures["evaluations"] = loop.evaluations
    record.data["figures"] = figures
    if req.fraction is not None and req.fraction < 1:
        record.data["training_rows"] = loaded.source_index[train_rows].tolist()
    if req.lora_r:
        record.data["lora"] = {"r": req.lora_r, "alpha": req.lora_alpha or 2 * req.lora_r,
                               "dropout": req.lora_dropout, "base_model": base_path}
    run_record = str(Path(req.output) / RUN_RECORD_FILE)
    record.write(run_record)
    return {
        "output": req.output,
        "run_record": run_record,
        "rows_in": loaded.rows_in_source,
        "rows_trained": int(len(train_rows)),
        "skipped_rows": dict(loaded.skipped),
        "figures": figures,
        "timings_s": record.data["timings_s"],
    }
