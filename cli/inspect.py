"""`dyn inspect`: what a dataset, an output with its run record, or a run folder holds."""

from __future__ import annotations

import json

import typer

EXAMPLES = """
Examples:

  dyn inspect picked.jsonl

  dyn inspect ../shared/data/gsm8k-test.jsonl --rows 2

  dyn inspect picked.jsonl.dyn.json --json
"""


def inspect_command(
    path: str = typer.Argument(..., help="A dataset file or folder, a run record (*.dyn.json) or a run folder."),
    rows: int = typer.Option(3, "--rows", help="How many sample rows to show."),
    json_output: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """Show rows, columns and a sample of a dataset, and the run record beside it if there is one."""
    from dyn.core.describe import describe

    info = describe(path, sample_rows=rows)
    if json_output:
        print(json.dumps(info, default=str))
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{info['kind']}[/bold] {path}")
    if info["kind"] == "dataset":
        console.print(f"format {info['format']}, {info['rows']} rows")
        for name, kind in info["columns"].items():
            console.print(f"  {name}: {kind}")
        for i, sample in enumerate(info["sample"]):
            console.print(f"row {i}: {json.dumps(sample, ensure_ascii=False)}")
    if "checkpoints" in info:
        console.print(f"checkpoints: {', '.join(info['checkpoints']) or 'none'}")
    record = info.get("run_record")
    if record:
        console.print(f"run record: {record.get('command')} (dyn {record.get('dyn_version')}, {record.get('started_at')})")
        for key, value in (record.get("figures") or {}).items():
            console.print(f"  {key}: {value}")
        if record.get("timings_s"):
            console.print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))
