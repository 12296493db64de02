"""`dyn distill …`: train a student from a teacher's checkpoints (`dyn distill --teacher …`), and
`dyn distill cache`, which writes a teacher's top-k log-probabilities once for many students and
sweeps. Thin: parse flags, call the recipe, print the summary.

`dyn distill` takes the teacher's flags and every `dyn train` flag that applies to a student (one
definition: those parameters are read from `train_command`'s signature), with `--student` for
`--model` and the data as `--data`.
"""

from __future__ import annotations

import inspect
import typing
from enum import Enum
from typing import Optional

import typer

from dyn.cli.select import Precision
from dyn.cli.train import train_command
from dyn.distill.losses import LOSS_NAMES, OUTSIDE_TOP_K_RULES
from dyn.distill.schedules import SALT_DECAYS, SCHEDULES

DISTILL_EXAMPLES = """
Examples:

\b
  dyn distill --teacher teacher-run/ --student student-config.json --data train.jsonl -o student/ \\
      --schedule progressive --loss kl --temperature 1.0 --max-steps 200

\b
  dyn distill cache --teacher teacher-run/ --data train.jsonl -o teacher-cache/ --top-k 64
  dyn distill --teacher-cache teacher-cache/ --student small --data train.jsonl -o student/ --schedule two-shot

\b
  dyn distill --teacher teacher-run/ --student tiny --data ../shared/data/gsm8k-train.jsonl -o student/ \\
      --eval-data ../shared/data/gsm8k-test.jsonl --eval-every 50 --eval-metric final-answer --num-processes 2
"""

CACHE_EXAMPLES = """
Examples:

\b
  dyn distill cache --teacher teacher-run/ --data ../shared/data/gsm8k-train.jsonl -o teacher-cache/ --top-k 64

\b
  dyn distill cache --teacher teacher-run/checkpoint-200 --data train.jsonl --template "{question}" \\
      --response-field answer -o teacher-cache/ --num-processes 2 --json
"""

distill_app = typer.Typer(
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


def _choices(name: str, values) -> type:
    """A str Enum of the library's own names, so the CLI's choices never drift from them."""
    return Enum(name, {value: value for value in values}, type=str)


ScheduleName = _choices("ScheduleName", SCHEDULES)
LossName = _choices("LossName", ("kl", *LOSS_NAMES))
OutsideTopK = _choices("OutsideTopK", OUTSIDE_TOP_K_RULES)
SaltDecay = _choices("SaltDecay", SALT_DECAYS)


def _distill_flags(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The teacher: a `dyn train` run folder (all its checkpoint-* folders), or checkpoint folders, comma-separated. Without --teacher-cache it runs forward on every batch (exact full-vocabulary distributions)."),
    teacher_cache: Optional[str] = typer.Option(None, "--teacher-cache", help="A `dyn distill cache` folder for these rows: the teacher's top-k log-probabilities, read instead of running the teacher."),
    student: Optional[str] = typer.Option(None, "--student", help="Required: tiny | small (fresh GPT-2 presets with the teacher's tokenizer), a JSON config file, or a model folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Required: the training rows (read in the format the teacher was trained with unless --template/--response-field say otherwise)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Required: the student's run folder: checkpoint-<step>/ folders (the dyn train layout), the final model and run.json."),
    schedule: ScheduleName = typer.Option(ScheduleName("progressive"), "--schedule", help="Which teacher checkpoint teaches when: progressive (step t follows the first checkpoint with step >= t x --multiplier), two-shot, one-shot (final only), salt (KD for the first steps, then labels), none (labels only)."),
    multiplier: float = typer.Option(1.0, "--multiplier", help="progressive: teacher steps per student step."),
    intermediate_step: Optional[int] = typer.Option(None, "--intermediate-step", help="two-shot: the intermediate checkpoint's step (default: the first at or after the teacher's steepest logged loss drop)."),
    switch_step: Optional[int] = typer.Option(None, "--switch-step", help="two-shot: the last student step taught by the intermediate checkpoint (default: half the steps)."),
    salt_steps: Optional[int] = typer.Option(None, "--salt-steps", help="salt: distil for this many steps, then labels only."),
    salt_fraction: Optional[float] = typer.Option(None, "--salt-fraction", help="salt: distil for this fraction of the steps instead."),
    salt_decay: SaltDecay = typer.Option(SaltDecay("step"), "--salt-decay", help="salt: the KD weight falls to 0 at once (step) or linearly over the KD steps."),
    loss: LossName = typer.Option(LossName("forward-kl"), "--loss", help="Divergence: forward-kl (kl), reverse-kl, jsd (with --beta), skew-kl (with --skew), tvd; float32."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature for both sides (0: the teacher's argmax as labels)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Weight of the distillation term; 1 - alpha goes to the label cross-entropy."),
    beta: float = typer.Option(0.5, "--beta", help="jsd: mixing beta (0 = forward KL, 1 = reverse KL)."),
    skew: float = typer.Option(0.1, "--skew", help="skew-kl: KL(p_T || skew p_T + (1 - skew) p_S)."),
    outside_top_k: OutsideTopK = typer.Option(OutsideTopK("tail"), "--outside-top-k", help="A cached teacher's mass outside its top-k: one tail bucket (exact at temperature 1), or renormalise over the top-k."),
):
    """The teacher's flags (the rest come from `dyn train`)."""


_NOT_FOR_A_STUDENT = {"data", "output", "model", "tokenizer", "train_tokenizer", "vocab_size", "lora_r", "lora_alpha", "lora_dropout"}


def _combined_signature():
    """ctx, the teacher's flags, then dyn train's flags that apply to a student, with their types."""
    own = inspect.signature(_distill_flags).parameters
    train = inspect.signature(train_command).parameters
    hints = typing.get_type_hints(_distill_flags) | typing.get_type_hints(train_command)
    params = [train["ctx"]] + list(own.values()) + [p for name, p in train.items() if name != "ctx" and name not in _NOT_FOR_A_STUDENT]
    annotations = {p.name: hints[p.name] for p in params}
    return inspect.Signature([p.replace(annotation=annotations[p.name]) for p in params]), annotations


def distill_command(ctx: typer.Context, **_flags) -> None:
    """Train a student from a teacher's checkpoints: each row's loss is alpha x KD(teacher || student)
    + (1 - alpha) x the label cross-entropy over its response tokens, with the teacher checkpoint
    the schedule names at each step (run.json records which taught when). The teacher comes from a
    cache (`dyn distill cache`, below: build it once for many students) or runs online. Checkpoints,
    --resume and --num-processes work as in `dyn train`; --eval-data evaluates on held-out rows."""
    if ctx.invoked_subcommand is not None:
        return
    from dyn.cli.launch import command_arguments
    from dyn.distill.recipe import DistillRequest, run_distillation

    args, json_output, quiet = command_arguments(ctx)
    for flag in ("student", "data", "output"):
        if not args.get(flag):
            raise typer.BadParameter(f"--{flag} is required", param_hint=f"--{flag}")
    args["model"] = args.pop("student")
    summary = run_distillation(DistillRequest(**args, extra={"command": "distill"}))
    if summary is not None:
        _report(summary, json_output=json_output, quiet=quiet)


distill_command.__signature__, distill_command.__annotations__ = _combined_signature()
distill_app.callback(invoke_without_command=True, epilog=DISTILL_EXAMPLES)(distill_command)


def _report(summary: dict, *, json_output: bool, quiet: bool) -> None:
    from dyn.cli.summary import report_table
    from dyn.cli.train import _loss

    figures = summary["figures"]
    schedule = summary["schedule"]
    taught = "; ".join(
        f"{s['from_step']}-{s['to_step']}: " + ("labels only" if s["teacher_step"] is None else f"checkpoint-{s['teacher_step']}")
        for s in schedule["segments"]
    )
    rows = [
        ("rows in / trained on", f"{summary['rows_in']} / {summary['rows_trained']}"),
        ("rows with no response token (no loss)", str(sum(figures["rows_without_response_tokens"].values()))),
        ("schedule (student steps: teacher)", f"{schedule['schedule']} ({taught})"),
        ("teacher", summary["teacher"]["teacher"]),
        ("steps (epochs)", f"{figures['steps']} ({figures['epochs']:g})"),
        ("loss first / final step", _loss(figures["first_loss"]) + " / " + _loss(figures["final_loss"])),
        ("tokens/s", f"{figures['tokens_per_s']:.0f}"),
        ("checkpoints", ", ".join(figures["checkpoints"]) or "none"),
        ("time", ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings_s"].items())),
    ]
    for entry in figures.get("evaluations", [])[-1:]:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k.startswith("eval_") and k != "eval_seconds" and isinstance(v, float))
        rows.append((f"held-out at step {entry['step']}", shown))
    report_table("dyn distill", rows, summary, json_output=json_output, quiet=quiet,
                 footer=f"wrote {summary['output']} (final student) and {summary['run_record']}")
