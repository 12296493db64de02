"""`dyn train`: causal-LM fine-tuning with checkpoints (warm-up and teacher runs). Thin: parse
flags, call the recipe in dyn.distill.trainer, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from dyn.cli.select import Precision

# "\b" keeps Click from re-wrapping the paragraph that follows (long commands stay copyable).
EXAMPLES = """
Examples:

\b
  dyn train ../shared/data/gsm8k-train.jsonl --template "{question}" --response-field answer \\
      --model tiny --train-tokenizer -o warmup/ --save-every 20 --max-steps 60

\b
  dyn train data.jsonl --model gpt2-config.json --train-tokenizer --fraction 0.05 \\
      --epochs 4 --save-every-epoch -o warmup/ --json

\b
  dyn train chats.jsonl --model my-model/ --lora-r 8 -o lora-run/ --save-every 100 --num-processes 2
"""


class EvalMetric(str, Enum):
    loss = "loss"
    exact_match = "exact-match"
    final_answer = "final-answer"


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


def train_command(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="Training rows: prompt+completion, chat messages, or --template/--response-field columns; .jsonl/.json/.parquet/.csv/.arrow (or .gz), a save_to_disk folder, or a cached hub dataset name."),
    output: str = typer.Option(..., "-o", "--output", help="Run folder: checkpoint-<step>/ folders, the final model and run.json."),
    model: Optional[str] = typer.Option(None, "--model", help="Required (here or in --config): tiny | small (fresh GPT-2 presets), a JSON config file (GPT2Config keys), or a local model folder."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder for a fresh model (instead of --train-tokenizer)."),
    train_tokenizer: bool = typer.Option(False, "--train-tokenizer", help="Train a byte-level BPE on this data for a fresh model; saved with it."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary size of the trained tokenizer."),
    template: Optional[str] = typer.Option(None, "--template", help='Prompt as a Python format string over columns, e.g. "{question}".'),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="Column holding the response (the tokens the loss is on)."),
    separator: str = typer.Option("\n", "--separator", help="Text between a non-empty prompt and the response (counts as prompt)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate examples to this many tokens (default: the model's context)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the training rows (--max-steps wins when given)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per optimizer step, over all processes (default 8)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Instead of --batch-size: padded tokens per optimizer step (length-sorted batches)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Split each process's share of a step into this many micro-batches (memory only; same result)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 1e-3 fresh model, 2e-4 LoRA, 5e-5 pretrained)."),
    lr_schedule: Schedule = typer.Option(Schedule.linear, "--lr-schedule", help="Decay after warm-up: linear or cosine to 0, or constant."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Fraction of the steps spent warming the learning rate up linearly from 0."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay (not on biases and norms)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm to this (0: no clipping)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the initial weights, the row order, --fraction and dropout."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Train on a seeded random fraction of the rows, in (0, 1] (LESS warms up on 0.05)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Write checkpoint-<step>/ every N steps (one is always written at the last step)."),
    save_every_epoch: bool = typer.Option(False, "--save-every-epoch", help="Write a checkpoint at the end of every epoch."),
    log_every: int = typer.Option(1, "--log-every", help="Log loss and learning rate to trainer_state.json every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its latest checkpoint (same flags; same result as an unbroken run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the dyn run in -o and start again."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="Train LoRA adapters of this rank (peft) on the attention and MLP layers instead of all weights."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scaling alpha (default 2 x rank)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: Precision = typer.Option(Precision.auto, "--precision", help="auto: bfloat16 autocast on CUDA, float32 on CPU."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip malformed rows, counting them in the run record, instead of stopping."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a save_to_disk folder or hub dataset."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out rows (same format as the training rows): loss, and --eval-metric, logged as eval_* entries in trainer_state.json and run.json."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate on --eval-data every N steps (always at the last step)."),
    eval_metric: EvalMetric = typer.Option(EvalMetric.loss, "--eval-metric", help="loss only; exact-match (greedy generation equals the response, whitespace-normalised); final-answer (GSM8K: the text after the last '####', numbers compared as numbers)."),
    eval_max_new_tokens: int = typer.Option(256, "--eval-max-new-tokens", help="Generation length limit for --eval-metric exact-match / final-answer."),
    num_processes: int = typer.Option(1, "--num-processes", help="Run as N worker processes (DDP; gloo on CPU): each step's rows are shared out, the result is that of one process."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags given here win."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary on stderr."),
) -> None:
    """Fine-tune a causal LM on prompt/response rows with the loss on response tokens only
    (each row's mean over its own response tokens, averaged over the step's rows). Writes
    checkpoint-<step>/ folders in the Hugging Face Trainer layout (model, tokenizer, optimizer.pt,
    scheduler.pt, trainer_state.json with the loss and learning-rate log), the final model at the
    folder's root and run.json; `dyn select --method grad` reads them."""
    from dyn.cli.launch import command_arguments
    from dyn.distill.trainer import TrainRequest, run_training

    args, json_output, quiet = command_arguments(ctx)
    request = TrainRequest(**args)
    summary = run_training(request)
    if summary is not None:
        _report(summary, json_output=json_output, quiet=quiet)


def _report(summary: dict, *, json_output: bool, quiet: bool) -> None:
    from dyn.cli.summary import report_table

    figures = summary["figures"]
    no_response = sum(figures["rows_without_response_tokens"].values())
    rows = [
        ("rows in / trained on", f"{summary['rows_in']} / {summary['rows_trained']}"),
        ("rows cut to --max-length", f"{figures['rows_truncated']} (max length {figures['max_length']})"),
        ("rows with no response token (no loss)", str(no_response)),
        ("steps (epochs)", f"{figures['steps']} ({figures['epochs']:g})"),
        ("loss first / final step", _loss(figures["first_loss"]) + " / " + _loss(figures["final_loss"])),
        ("tokens/s", f"{figures['tokens_per_s']:.0f}"),
        ("checkpoints", ", ".join(figures["checkpoints"]) or "none"),
        ("time", ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings_s"].items())),
    ]
    skipped = sum(summary.get("skipped_rows", {}).values())
    if skipped:
        rows.insert(1, ("rows skipped (see run record)", str(skipped)))
    report_table("dyn train", rows, summary, json_output=json_output, quiet=quiet,
                 footer=f"wrote {summary['output']} (final model) and {summary['run_record']}")


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"

