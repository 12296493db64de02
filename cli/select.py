"""`dyn select`: choose a subset of rows. Thin: parse flags, call the recipe, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

EXAMPLES = """
Examples:

  dyn select --method hmin ../shared/data/t0-mix.jsonl.gz -k 1000 --template "{prompt}\\n{completion}" -o picked.jsonl

  dyn select --method hmin data.parquet --fraction 0.1 --stratify task --group-field task -o picked.parquet --json

  dyn select --method hmin data.jsonl -k 500 -o picked.jsonl --num-processes 2
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


def select_command(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="Input rows: .jsonl/.json/.parquet/.csv/.arrow (or .gz), a save_to_disk folder, or a cached hub dataset name."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the chosen rows; the format follows the suffix (no suffix: a save_to_disk folder)."),
    method: Method = typer.Option(Method.hmin, "--method", help="Selection method: hmin (max-min distance diversity)."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="How many rows to keep."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Keep this fraction of the rows, in (0, 1]."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column holding the text to embed."),
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
    group_field: Optional[str] = typer.Option(None, "--group-field", help="Label column: report how many groups the selection covers next to a random subset."),
    stratify: Optional[str] = typer.Option(None, "--stratify", help="Label column: greedy within each group, budget split by group size."),
    stratify_clusters: Optional[int] = typer.Option(None, "--stratify-clusters", help="Stratify over N k-means clusters of the vectors (FAISS) when no label column exists."),
    near_dup_radius: float = typer.Option(0.05, "--near-dup-radius", help="Distance under which two chosen rows count as near-duplicates in the report."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", envvar="DYN_CACHE_DIR", help="Embedding cache folder (default ~/.cache/dyn)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the embedding cache."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip malformed rows, counting them in the run record, instead of stopping."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a save_to_disk folder or hub dataset (default: the only one, or train)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Run as N worker processes (torch.distributed; gloo on CPU): the embedding pass is sharded, the output is identical."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags given here win."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary on stderr."),
) -> None:
    """Choose rows. hmin: the greedy farthest-point order over embeddings maximises the minimum
    pairwise distance (h_min) between chosen rows; the output keeps every input column and adds
    dyn_index, dyn_rank and dyn_hmin_at, with a run record <output>.dyn.json beside it."""
    from dyn.cli.config import merge_config
    from dyn.cli.launch import relaunch, world_size_from_env
    from dyn.cli.summary import report
    from dyn.core import progress
    from dyn.core.distributed import world
    from dyn.core.errors import UsageError
    from dyn.selection.run import SelectRequest, run_hmin_selection

    args = merge_config(ctx, dict(ctx.params), config)
    num_processes = args.pop("num_processes")
    if num_processes > 1 and world_size_from_env() == 1:
        raise typer.Exit(relaunch(num_processes))
    method_value = _value(args.pop("method"))
    if method_value != "hmin":
        raise UsageError(f"--method {method_value} is not built yet; available: hmin")
    json_output, quiet = args.pop("json_output"), args.pop("quiet")
    args.pop("config", None)
    progress.configure(quiet=quiet, rank=world().rank)
    request = SelectRequest(**{name: _value(value) for name, value in args.items()}, extra={"method": method_value})
    summary = run_hmin_selection(request)
    if summary is not None:
        report("dyn select --method hmin", summary, json_output=json_output, quiet=quiet)


def _value(value):
    return value.value if isinstance(value, Enum) else value
