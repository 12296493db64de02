"""The end-of-run summary: a short table on stderr, and with --json one JSON object on stdout."""

from __future__ import annotations

import json
import sys

# (label, figure key, random-subset key, format) rows of the hmin table.
_FIGURE_ROWS = [
    ("h_min (min pairwise distance)", "hmin", "hmin_random", "{:.4f}"),
    ("coverage radius", "coverage_radius", "coverage_radius_random", "{:.4f}"),
    ("groups covered", "groups_covered", "groups_covered_random", "{}"),
    ("near-duplicate pairs chosen", "near_duplicate_pairs", "near_duplicate_pairs_random", "{}"),
]


def report(title: str, summary: dict, *, json_output: bool, quiet: bool) -> None:
    if json_output:
        print(json.dumps(summary, default=_plain), flush=True)
    if not quiet:
        _table(title, summary)


def _table(title: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    figures = summary.get("figures", {})
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("selection", justify="right")
    table.add_column("random subset", justify="right")
    table.add_row("rows in / used / out", f"{summary['rows_in']} / {summary['rows_used']} / {summary['rows_out']}", "")
    skipped = sum(summary.get("skipped_rows", {}).values())
    if skipped:
        table.add_row("rows skipped (see run record)", str(skipped), "")
    if figures.get("duplicate_rows"):
        table.add_row("duplicate rows in input", str(figures["duplicate_rows"]), "")
    for label, key, baseline, fmt in _FIGURE_ROWS:
        if figures.get(key) is None:
            continue
        other = figures.get(baseline)
        table.add_row(label, fmt.format(figures[key]), "" if other is None else fmt.format(other))
    if "groups_total" in figures:
        table.add_row("groups in input", str(figures["groups_total"]), "")
    timings = summary.get("timings_s", {})
    table.add_row("time", ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()), "")
    console = Console(stderr=True, highlight=False)
    console.print(table)
    written = [summary["output"], summary["run_record"]] + ([summary["plot"]] if summary.get("plot") else [])
    console.print("wrote " + ", ".join(written))


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def report_table(title: str, rows: list[tuple[str, str]], summary: dict, *, json_output: bool, quiet: bool,
                 footer: str | None = None) -> None:
    """Any command's end-of-run summary: `summary` as JSON on stdout with --json, and a two-column
    table of (label, value) `rows` plus an optional footer line on stderr unless quiet."""
    if json_output:
        print(json.dumps(summary, default=_plain), flush=True)
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    console = Console(stderr=True, highlight=False)
    console.print(table)
    if footer:
        console.print(footer)
