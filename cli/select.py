"""`dyn select`: choose a subset of rows. Thin: parse flags, call the recipe, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

EXAMPLES = """
Examples:

  dyn select --method hmin ../shared/data/t0-mix.jsonl.gz -k 1000 --template "{prompt}\\n{completion}" -o picked.jsonl

  dyn select --method hmin data.parquet --fraction 0.1 --stratify task --group-field task -o picked.parquet --json

  dyn select --method grad train.jsonl --anchor anchor.jsonl --checkpoints warmup/ -o good.jsonl --num-processes 2

  dyn select --method slm-hard pool.jsonl --slm small-lm/ --fraction 0.3 -o hard.jsonl --plot
"""


class Method(str, Enum):
    hmin = "hmin"
    grad = "grad"
    slm_hard = "slm-hard"


class Metric(str, Enum):
    cosine = "cosine"
    l2 = "l2"


class Storage(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Precision(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class Engine(str, Enum):
    auto = "auto"
    directional = "directional"
    store = "store"
    exact = "exact"


class Similarity(str, Enum):
    dot = "dot"
    cosine = "cosine"


class Precondition(str, Enum):
    none = "none"
    adam = "adam"


# Flags only some methods read: giving one to another method is a usage error, never ignored.
METHOD_FLAGS = {
    "hmin": (
        "text_field", "embedding_model", "embedding_field", "metric", "start", "storage", "embed_precision",
        "group_field", "stratify", "stratify_clusters", "near_dup_radius", "cache_dir", "no_cache",
    ),
    "grad": (
        "anchor", "checkpoints", "engine", "similarity", "precondition", "weights", "threshold",
        "anchor_group_field", "modules", "store", "proj_dim", "response_field", "max_length",
    ),
    "slm-hard": (
        "slm", "band", "min_learnable", "top_k", "precision", "text_field", "group_field", "response_field",
        "max_length",
    ),
}


def select_command(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="Input rows: .jsonl/.json/.parquet/.csv/.arrow (or .gz), a save_to_disk folder, or a cached hub dataset name."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the chosen rows; the format follows the suffix (no suffix: a save_to_disk folder)."),
    method: Method = typer.Option(Method.hmin, "--method", help="hmin (max-min distance diversity), grad (gradient agreement with --anchor rows over --checkpoints; CLUES/LESS) or slm-hard (hard-but-learnable rows for a small LM; SALT)."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="How many rows to keep."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Keep this fraction of the rows, in (0, 1]."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column holding the text to embed (hmin) or to score whole, with no prompt (slm-hard)."),
    template: Optional[str] = typer.Option(None, "--template", help='Python format string over columns, e.g. "{prompt}\\n{completion}".'),
    embedding_model: Optional[str] = typer.Option(None, "--embedding-model", help="Local encoder folder (default: the bundled MiniLM-L6)."),
    embedding_field: Optional[str] = typer.Option(None, "--embedding-field", help="Column of precomputed vectors; nothing is embedded."),
    metric: Metric = typer.Option(Metric.cosine, "--metric", help="cosine (unit-normalised, then Euclidean) or l2."),
    start: str = typer.Option("random", "--start", help="First row: random (seeded), medoid (nearest the centroid) or a row number."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random start and the random comparison subset."),
    storage: Storage = typer.Option(Storage.float32, "--storage", help="Matrix type in the greedy loop; float16/bfloat16 read half the bytes (distances to ~3-4 digits)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] for embedding and the greedy loop."),
    embed_precision: Precision = typer.Option(Precision.auto, "--embed-precision", help="auto: bfloat16 autocast where the CPU has native bf16, or on CUDA."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Token budget per embedding batch, padded tokens (default: 2048 on CPU, 65536 on CUDA)."),
    group_field: Optional[str] = typer.Option(None, "--group-field", help="Label column: report how many groups the selection covers next to a random subset (hmin), or each group's mean score (slm-hard)."),
    stratify: Optional[str] = typer.Option(None, "--stratify", help="Label column: greedy within each group, budget split by group size."),
    stratify_clusters: Optional[int] = typer.Option(None, "--stratify-clusters", help="Stratify over N k-means clusters of the vectors (FAISS) when no label column exists."),
    near_dup_radius: float = typer.Option(0.05, "--near-dup-radius", help="Distance under which two chosen rows count as near-duplicates in the report."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", envvar="DYN_CACHE_DIR", help="Embedding cache folder (default ~/.cache/dyn)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the embedding cache."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip malformed rows, counting them in the run record, instead of stopping."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a save_to_disk folder or hub dataset (default: the only one, or train)."),
    anchor: Optional[str] = typer.Option(None, "--anchor", help="grad: the trusted rows (same columns as DATA) whose mean gradient rows are compared with."),
    checkpoints: Optional[List[str]] = typer.Option(None, "--checkpoints", "--model", help="grad: a `dyn train` run folder (all its checkpoint-* folders), or checkpoint / model folders; repeat or comma-separate."),
    engine: Engine = typer.Option(Engine.auto, "--engine", help="grad: directional (exact dot scores by forward-mode JVP; default), store (projected per-sample gradients; default for cosine or adam) or exact (batch-1 oracle)."),
    similarity: Similarity = typer.Option(Similarity.dot, "--similarity", help="grad: dot (CLUES) or cosine (LESS: unit gradients, mean within an anchor group, max over groups)."),
    precondition: Precondition = typer.Option(Precondition.none, "--precondition", help="grad: Γ_c applied to the rows' gradients: none, or adam (LESS's Adam direction from each checkpoint's optimizer.pt)."),
    weights: str = typer.Option("lr", "--weights", help="grad: checkpoint weights: lr (mean logged learning rate since the previous checkpoint), uniform, or v1,v2,... in step order."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="grad: keep rows scoring at least this (default: the mean anchor score)."),
    anchor_group_field: Optional[str] = typer.Option(None, "--anchor-group-field", help="grad: anchor column of group labels: mean within a group, max over groups."),
    modules: Optional[str] = typer.Option(None, "--modules", help="grad: score only parameters whose name matches this regex (default: all, or a PEFT checkpoint's LoRA adapters)."),
    store: Optional[str] = typer.Option(None, "--store", help="grad, store engine: keep the projected gradients in this folder and reuse them on reruns."),
    proj_dim: int = typer.Option(1024, "--proj-dim", help="grad, store engine: projected size of each parameter's gradient (about sqrt a side for matrices)."),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="grad, slm-hard: column holding the response (the loss is on its tokens); --template gives the prompt. Default: what the model was trained with (a `dyn train` run), else prompt + completion or messages columns."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="grad, slm-hard: truncate examples to this many tokens (default: the warm-up run's, else the model's context)."),
    slm: Optional[str] = typer.Option(None, "--slm", help="slm-hard: the small causal LM folder, with its tokenizer (e.g. a `dyn train` run folder)."),
    band: Optional[str] = typer.Option(None, "--band", help="slm-hard: keep rows whose score lies between these quantiles of the scores, LO:HI, e.g. 0.5:0.9."),
    min_learnable: int = typer.Option(1, "--min-learnable", help="slm-hard: keep only rows with at least this many learnable tokens."),
    top_k: int = typer.Option(10, "--top-k", help="slm-hard: a token is learnable when its true id is in the small LM's top k."),
    precision: Precision = typer.Option(Precision.auto, "--precision", help="slm-hard: auto (bfloat16 autocast on CUDA and on CPUs with native bf16, else float32), float32 or bfloat16."),
    plot: bool = typer.Option(False, "--plot", help="Also write a histogram of the scores, <output>.scores.png (needs matplotlib)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Run as N worker processes (torch.distributed; gloo on CPU): the embedding (hmin) or scoring (grad, slm-hard) pass is sharded, the output is identical."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags given here win."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary on stderr."),
) -> None:
    """Choose rows. hmin: the greedy farthest-point order over embeddings maximises the minimum
    pairwise distance (h_min) between chosen rows; adds dyn_rank and dyn_hmin_at.
    grad: score(z) = sum over checkpoints of eta_c <grad loss(z), mean anchor gradient>; keeps rows
    scoring at least the mean anchor score (or -k / --fraction / --threshold) and adds dyn_rank,
    dyn_score and dyn_score_ckpt<step>.
    slm-hard: score = median of the small LM's losses over the response tokens it has in its top-k;
    keeps the highest (-k / --fraction) or a --band of percentiles and adds dyn_rank, dyn_score,
    dyn_learnable_tokens and dyn_tokens.
    The output keeps every input column plus dyn_index, with a run record <output>.dyn.json beside it."""
    run_method_command(ctx, score_only=False)


def run_method_command(ctx, *, score_only: bool) -> None:
    """`dyn select` and `dyn score`: the same flags and recipes; score keeps every row."""
    from dyn.cli.launch import command_arguments

    args, json_output, quiet = command_arguments(ctx)
    method = args.pop("method")
    _refuse_other_method_flags(ctx, args, method)
    runner = {"hmin": _run_hmin, "grad": _run_grad, "slm-hard": _run_slm_hard}[method]
    summary = runner(args, score_only)
    if summary is not None:
        _report(method, summary, json_output=json_output, quiet=quiet, score_only=score_only)


def _refuse_other_method_flags(ctx, args: dict, method: str) -> None:
    """Drop the flags `method` does not read from `args`; a usage error when one was given a value."""
    from dyn.core.errors import UsageError

    params = {p.name: p for p in ctx.command.params}
    mine = set(METHOD_FLAGS[method])
    for name in sorted({n for names in METHOD_FLAGS.values() for n in names} - mine):
        value = args.pop(name)
        default = params[name].default
        from_env = getattr(ctx.get_parameter_source(name), "name", None) == "ENVIRONMENT"
        if value in ((), []):
            value = None
        if _value(value) != _value(default) and not from_env:
            flag = max(params[name].opts, key=len)
            owners = " / ".join(f"--method {m}" for m, names in METHOD_FLAGS.items() if name in names)
            raise UsageError(f"{flag} is a {owners} flag; this run is --method {method}")


def _run_hmin(values: dict, score_only: bool):
    from dyn.selection.run import SelectRequest, run_hmin_selection

    return run_hmin_selection(SelectRequest(**values, score_only=score_only, extra={"method": "hmin"}))


def _run_grad(values: dict, score_only: bool):
    from dyn.selection.grad import GradRequest, run_grad_selection

    values["checkpoints"] = [part for item in values["checkpoints"] or [] for part in str(item).split(",") if part]
    values["engine"] = None if values["engine"] == "auto" else values["engine"]
    return run_grad_selection(GradRequest(**values, score_only=score_only, extra={"method": "grad"}))


def _run_slm_hard(values: dict, score_only: bool):
    from dyn.selection.slm_hard import SlmHardRequest, run_slm_hard

    return run_slm_hard(SlmHardRequest(**values, score_only=score_only, extra={"method": "slm-hard"}))


def _report(method: str, summary: dict, *, json_output: bool, quiet: bool, score_only: bool) -> None:
    from dyn.cli.summary import report, report_table

    title = f"dyn {'score' if score_only else 'select'} --method {method}"
    if method == "hmin":
        report(title, summary, json_output=json_output, quiet=quiet)
        return
    rows = _grad_rows(summary) if method == "grad" else _slm_hard_rows(summary)
    rows.append(("time", ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings_s"].items())))
    written = [summary["output"], summary["run_record"]] + ([summary["plot"]] if summary.get("plot") else [])
    report_table(title, rows, summary, json_output=json_output, quiet=quiet, footer="wrote " + ", ".join(written))


def _grad_rows(summary: dict) -> list[tuple[str, str]]:
    from dyn.core.plot import sparkline

    figures = summary["figures"]
    threshold = figures["threshold"]
    rows = [
        ("rows in / scored / out", f"{summary['rows_in']} / {summary['rows_scored']} / {summary['rows_out']}"),
        ("rows without a score (no response token)", str(figures["rows_without_score"]["count"])),
        ("anchors scored", f"{figures['anchors_scored']} of {figures['anchors']}"),
        ("engine / similarity / Γ", f"{figures['engine']} / {figures['similarity']} / {figures['precondition']}"),
        ("keep rule", figures["keep_rule"] + ("" if threshold is None else f" ({threshold:.4g})")),
        ("scores", _spread(figures["row_scores"], figures["histogram"], sparkline)),
    ]
    for c in figures["checkpoints"]:
        stats = figures["anchor_scores"][str(c["step"])]
        rows.append((f"checkpoint {c['step']}: weight, anchor mean", f"{c['weight']:.4g}, {stats.get('mean', float('nan')):.4g}"))
    return rows


def _slm_hard_rows(summary: dict) -> list[tuple[str, str]]:
    from dyn.core.plot import sparkline

    figures = summary["figures"]
    rows = [
        ("rows in / scored / out", f"{summary['rows_in']} / {summary['rows_scored']} / {summary['rows_out']}"),
        ("rows without a score", _reasons(figures["rows_without_score"])),
        ("keep rule", figures["keep_rule"]),
        ("learnable share of response tokens", f"{figures['learnable_token_share']:.1%} (top {figures['top_k']})"),
        ("scores", _spread(figures["scores"], figures["histogram"], sparkline)),
    ]
    if figures.get("scores_kept"):
        kept, random = figures["scores_kept"], figures["scores_random_subset"]
        rows.append(("mean score kept / random subset", f"{kept.get('mean', float('nan')):.4f} / {random.get('mean', float('nan')):.4f}"))
    if figures["tokens"]["rows_truncated"]:
        rows.append(("rows cut to --max-length", str(figures["tokens"]["rows_truncated"])))
    # Groups with a handful of scored rows have noisy means; the run record lists every group.
    settled = [g for g in figures.get("groups") or [] if g["rows_scored"] >= MIN_GROUP_ROWS_SHOWN]
    for place, group in enumerate(settled[:5], start=1):
        kept = f", {group['rows_kept']} kept" if "rows_kept" in group else ""
        mean = "-" if group["mean_score"] is None else f"{group['mean_score']:.4f}"
        rows.append((f"hardest group {place} (mean score)", f"{group['group']}: {mean} ({group['rows_scored']} scored{kept})"))
    return rows


MIN_GROUP_ROWS_SHOWN = 5


def _spread(stats: dict, histogram: dict, sparkline) -> str:
    if not stats.get("count"):
        return "none"
    return f"{stats['min']:.4g} {sparkline(histogram['counts'])} {stats['max']:.4g} (mean {stats['mean']:.4g})"


def _reasons(unscored: dict) -> str:
    if not unscored["count"]:
        return "0"
    return f"{unscored['count']} (" + "; ".join(f"{reason}: {n}" for reason, n in unscored["reasons"].items()) + ")"


def _value(value):
    return value.value if isinstance(value, Enum) else value
