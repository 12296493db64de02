"""`dyn teachers`: choose a teacher before distilling. `rank` is GRACE (DESIGN §4.4). Thin: parse
flags, call the recipe in dyn.distill.teacher_ranking, print the ranking."""

from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

# "\b" keeps Click from re-wrapping the paragraph that follows (long commands stay copyable).
EXAMPLES = """
Examples:

\b
  dyn teachers rank --student student/ --teacher big=teacher-a/ --teacher mid=teacher-b/ \\
      --prompts ../shared/data/gsm8k-train.jsonl --prompt-field question -n 512 -g 4 -o ranking.json

\b
  dyn teachers rank --student student/ --teacher run=warmup/ --teacher early=warmup/checkpoint-20 \\
      --temperature 0.7,1.0 --prompts questions.jsonl --template "{question}" -n 100 -o ranking.json --plot

\b
  dyn teachers rank --student student/ --responses a=gens-a.jsonl --responses b=gens-b.jsonl -o ranking.json --json
"""


class Projection(str, Enum):
    factored = "factored"
    rademacher = "rademacher"


teachers_app = typer.Typer(
    name="teachers",
    help="Choose the teacher to distil from, before distilling.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@teachers_app.command("rank", epilog=EXAMPLES, no_args_is_help=True)
def rank_command(
    ctx: typer.Context,
    student: Optional[str] = typer.Option(None, "--student", help="Required: the student model folder (save_pretrained, with its tokenizer; a PEFT adapter folder scores its LoRA weights), e.g. a `dyn train` run."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Required: the ranking, a .json file; its run record goes to <output>.dyn.json and generations to <output>.generations/."),
    teacher: Optional[List[str]] = typer.Option(None, "--teacher", help="A candidate teacher folder, NAME=DIR (repeat); each --temperature makes it one candidate named NAME@T."),
    responses: Optional[List[str]] = typer.Option(None, "--responses", help="A candidate's own responses, NAME=FILE (repeat): rows with prompt_id, prompt, response (e.g. from vLLM); every candidate must answer the same prompts."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="With --teacher: the prompts file (.jsonl/.json/.parquet/.csv/.arrow, a save_to_disk folder); ids from its prompt_id column, else the row number."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Column holding the prompt."),
    template: Optional[str] = typer.Option(None, "--template", help='Prompt as a Python format string over columns, e.g. "{question}" (instead of --prompt-field).'),
    separator: str = typer.Option("\n", "--separator", help="Text between the prompt and the response, as `dyn train` puts it (unused where a tokenizer has a chat template)."),
    n: Optional[int] = typer.Option(None, "-n", "--num-prompts", help="Use the first n prompts (at least 10; hundreds give a stable ranking)."),
    responses_per_prompt: Optional[int] = typer.Option(None, "-g", "--responses-per-prompt", help="Responses each teacher generates per prompt, G ≥ 2 (default 4)."),
    temperature: Optional[List[str]] = typer.Option(None, "--temperature", help="Sampling temperature(s) of the teachers, repeat or comma-separate (default 1.0; 0 is greedy)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Longest response a teacher generates, in its tokens (default 256); longer ones are cut and counted as truncated."),
    dim: int = typer.Option(512, "--dim", help="Projected size d of each response's gradient (the score inverts a d×d covariance: keep d below the number of responses)."),
    projection: Projection = typer.Option(Projection.factored, "--projection", help="factored: per-layer LoGra projections from layer hooks, then a dense d×K map (fast); rademacher: one dense seeded ±1/√d matrix on the full flattened gradient (the plain definition)."),
    modules: Optional[str] = typer.Option(None, "--modules", help="Take gradients of the parameters whose name matches this regex only (default: all, or a PEFT student's LoRA adapters)."),
    nu: float = typer.Option(1e-3, "--nu", help="GRACE's regularisation ν: Σ̃ = (1−ν)Σ_tr + ν(tr Σ_tr/d)I."),
    num_splits: int = typer.Option(10, "--num-splits", help="Prompt-level splits (10% of the prompts held out in each); the score is their mean."),
    seed: int = typer.Option(0, "--seed", help="Seed for the generations, the projection and the splits."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Cut the student's (prompt + response) examples to this many tokens (default: its context)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Padded tokens per gradient batch (default: 2048 on CPU, 16384 on CUDA)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] for generation and gradients."),
    regenerate: bool = typer.Option(False, "--regenerate", help="Generate again even where <output>.generations/ holds matching responses."),
    plot: bool = typer.Option(False, "--plot", help="Also write a bar chart of the scores, <output>.scores.png (needs matplotlib)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Run as N worker processes (torch.distributed; gloo on CPU): generation and gradient batches are shared out, the ranking is identical."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags given here win."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary on stderr."),
) -> None:
    """Rank candidate teachers for a student with GRACE (Panigrahi et al., ICLR 2026), without
    training the student. For each candidate (a teacher at one temperature, or a responses file):
    the student's gradients on G responses to each of n prompts, at its given weights, projected to
    d dims and divided by sqrt(#parameters); over 10 prompt-level splits (10% held out), score =
    tr(S~^-1 S_te), S~ = (1-nu) S_tr + nu (tr S_tr / d) I, S_tr the mean of the train part's
    unit-normalised g g^T, S_te of the held-out part's raw g g^T. GRACE is the mean over splits:
    LOWER IS BETTER. Writes ranking.json (best first, with the spread over splits, the held-out
    gradient norm, the spectrum entropy of S_tr, counts and warnings), the run record beside it,
    and the generations in <output>.generations/ (reused on reruns)."""
    from dyn.cli.launch import command_arguments
    from dyn.core.errors import UsageError

    values, json_out, silent = command_arguments(ctx)
    if not values.get("student"):
        raise UsageError("--student DIR is required (here or in --config)")
    if not values.get("output"):
        raise UsageError("-o/--output FILE.json is required (here or in --config)")
    for name in ("teacher", "responses", "temperature"):
        values[name] = list(values[name] or [])

    from dyn.distill.teacher_ranking import TeacherRankRequest, run_teacher_ranking

    summary = run_teacher_ranking(TeacherRankRequest(**values, extra={"command": "teachers rank"}))
    if summary is not None:
        report_ranking(summary, json_output=json_out, quiet=silent)


def report_ranking(summary: dict, *, json_output: bool, quiet: bool) -> None:
    """The ranking as JSON on stdout (--json) and as a table on stderr (unless quiet)."""
    import json

    from dyn.cli.summary import _plain

    if json_output:
        print(json.dumps(summary, default=_plain), flush=True)
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    prompts = summary["prompts"]
    table = Table(title=f"dyn teachers rank: GRACE, lower is better ({prompts['scored']} prompts)", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("candidate", no_wrap=True)
    for column in ("GRACE", "± splits", "held-out ‖g‖", "entropy", "scored", "warnings"):
        table.add_column(column, justify="right")
    for entry in summary["candidates"]:
        counts = entry["counts"]
        table.add_row(str(entry["rank"]), entry["name"], f"{entry['score']:.4g}", f"{entry['split_std']:.2g}",
                      f"{entry['heldout_grad_norm']:.3g}", f"{entry['spectrum_entropy']:.3f}",
                      f"{counts['responses_scored']}/{counts['responses']}", str(len(entry["warnings"])))
    console = Console(stderr=True, highlight=False)
    console.print(table)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings_s"].items())
    written = [summary["output"], summary["run_record"]] + [p for p in (summary.get("plot"), summary.get("generations")) if p]
    console.print(f"best: {summary['best']}; time: {timings}")
    console.print("wrote " + ", ".join(written))
