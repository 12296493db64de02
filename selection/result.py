"""What every selector returns, and how it becomes output rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SelectionResult:
    """Chosen row positions (into the loaded rows) in output order, the method's columns aligned
    with them, and the figures that go into the run record and the summary."""

    rows: np.ndarray
    columns: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


def output_rows(loaded, result: SelectionResult):
    """The chosen input rows with every input column, `dyn_index` and the method's columns.

    `dyn_index` is the row's 0-based position in the input; when the input already carries one
    (the output of an earlier dyn run) it is kept, so it keeps pointing into the original source.
    """
    import datasets
    import pyarrow as pa

    source = loaded.dataset
    if source._indices is not None:
        source = source.flatten_indices()
    table = source.data.table.take(pa.array(np.asarray(result.rows, dtype=np.int64)))
    if "dyn_index" not in table.column_names:
        table = table.append_column("dyn_index", pa.array(loaded.source_index[result.rows].astype(np.int64)))
    for name, values in result.columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        # from_pandas: NaN (a row without a score, in `dyn score`) is written as null.
        table = table.append_column(name, pa.array(values if isinstance(values, np.ndarray) else list(values), from_pandas=True))
    return datasets.Dataset(table)


def in_input_order(result: SelectionResult) -> SelectionResult:
    """The same rows and columns sorted by input position: `dyn score` writes every row where it
    stood in the input."""
    order = np.argsort(np.asarray(result.rows), kind="stable")
    columns = {
        name: values[order] if isinstance(values, np.ndarray) else [values[i] for i in order]
        for name, values in result.columns.items()
    }
    return SelectionResult(np.asarray(result.rows)[order], columns, result.figures)


def ranks_by_row(order: np.ndarray, rows: int) -> list:
    """Each row's position in `order` (its rank), None for a row `order` leaves out."""
    ranks: list = [None] * rows
    for rank, position in enumerate(np.asarray(order).tolist()):
        ranks[position] = rank
    return ranks


def finish_run(record, loaded, output: str, figures: dict, *, plot: str | None = None, **counts) -> dict:
    """Close a selection or scoring run: skipped rows and figures into the run record, the record
    written beside `output`, and the summary every `dyn select` / `dyn score` prints (`counts`:
    e.g. rows_out, rows_scored)."""
    from dyn.core.runrecord import record_path

    record.add_skipped(loaded.skipped)
    record.data["figures"] = figures
    run_record = record_path(output)
    record.write(run_record)
    return {
        "output": output,
        "run_record": run_record,
        "plot": plot,
        "rows_in": loaded.rows_in_source,
        "rows_used": len(loaded.dataset),
        **counts,
        "skipped_rows": dict(loaded.skipped),
        "figures": figures,
        "timings_s": record.data["timings_s"],
    }
