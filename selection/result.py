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
        table = table.append_column(name, pa.array(values.tolist() if hasattr(values, "tolist") else list(values)))
    return datasets.Dataset(table)
