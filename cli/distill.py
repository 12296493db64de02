"""`dyn distill …`: distillation commands. `cache` writes a teacher's top-k log-probabilities
once, for many students and sweeps. Thin: parse flags, call the recipe, print the summary."""

from __future__ import annotations

from typing import Optional

import typer

from dyn.cli.select import Precision

CACHE_EXAMPLES = """
Examples:

\b
  dyn distill cache --teacher teacher-run/ --data ../shared/data/gsm8k-train.jsonl -o teacher-cache/ --top-k 64

\b
  dyn distill cache --teacher teacher-run/checkpoint-200 --data train.jsonl --template "{question}" \\
      --response-field answer -o teacher-cache/ --num-processes 2 --json
"""

distill_app = typer.Typer(
    help="Distil students from teacher checkpoints (the trainer is still to come; `cache` is built).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@distill_app.command("cache", epilog=CACHE_EXAMPLES, no_args_is_help=True)
def cache_command(
    ctx: typer.Context,
    teacher: str = typer.Option(..., "--teacher", help="A `dyn train` run folder (all its checkpoint-* folders), or checkpoint / model folders, comma-separated."),
    data: str = typer.Option(..., "--data", help="The rows students will train on: the same formats as every dyn command."),
    output: str = typer.Option(..., "-o", "--output", help="Cache folder: meta.json, index.safetensors, step-<N>/shard-*.safetensors, run.json."),
    top_k: int = typer.Option(64, "--top-k", help="Log-probabilities kept per response token (the exact mass outside them is kept too)."),
    template: Optional[str] = typer.Option(None, "--template", help='Prompt as a Python format string over columns (default: what the teacher was trained with).'),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="Column holding the response (default: what the teacher was trained with)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate examples to this many tokens (default: the teacher run's, else its context)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Padded tokens per teacher forward batch."),
    shard_tokens: Optional[int] = typer.Option(None, "--shard-tokens", help="Response tokens per shard file (a killed build resumes by shard; default 65536)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: Precision = typer.Option(Precision.auto, "--precision", help="Teacher forward pass: auto (bfloat16 on CUDA and CPUs with native bf16), float32 or bfloat16; the softmax is float32."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip malformed rows, counting them in the run record, instead of stopping."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a save_to_disk folder or hub dataset."),
    num_processes: int = typer.Option(1, "--num-processes", help="Run as N worker processes: shards are shared out, the cache is identical."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags given here win."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary on stderr."),
) -> None:
    """Cache every teacher checkpoint's top-k next-token log-probabilities (float16, with int32 ids
    and the exact float32 mass outside them) for every response token of every row, in shards
    keyed by dyn_index. A rerun computes only missing shards; a cache built for other data, another
    tokenizer, another k or other teacher weights is refused, never silently reused."""
    from dyn.cli.launch import command_arguments
    from dyn.cli.summary import report_table
    from dyn.distill.cache_recipe import CacheRequest, run_teacher_cache

    args, json_output, quiet = command_arguments(ctx)
    summary = run_teacher_cache(CacheRequest(**args, extra={"command": "distill cache"}))
    if summary is None:
        return
    figures = summary["figures"]
    cache = figures["cache"]
    rows = [
        ("rows in / used", f"{summary['rows_in']} / {summary['rows_used']}"),
        ("rows without a response token", str(sum(figures["tokens"]["rows_without_response_tokens"].values()))),
        ("response tokens cached", str(summary["response_tokens"])),
        ("teacher checkpoints", ", ".join(str(s) for s in figures["checkpoints"])),
        ("top-k / shards / bytes per token", f"{figures['top_k']} / {cache['shards']} / {cache['bytes_per_token']}"),
        ("time", ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings_s"].items())),
    ]
    report_table("dyn distill cache", rows, summary, json_output=json_output, quiet=quiet,
                 footer=f"wrote {summary['output']} and {summary['run_record']}")
