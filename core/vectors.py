"""Precomputed vectors from a column (`--embedding-field`), checked row by row."""

from __future__ import annotations

from collections import Counter

import numpy as np

from dyn.core.errors import DataError
from dyn.core.io import LoadedRows


def vectors_from_column(rows: LoadedRows, column: str, *, require_nonzero: bool, skip_bad_rows: bool = False):
    """A float32 (rows, dim) matrix from a list-valued column; bad rows raise or are dropped.

    Bad: not a list of numbers, a length other than the first row's, NaN/inf, or all zeros
    when the metric needs a direction (cosine).
    """
    dataset = rows.dataset
    if column not in dataset.column_names:
        raise DataError(f"{rows.source}: no column '{column}'; columns are: {', '.join(dataset.column_names)}")
    values = dataset[column]
    dim = None
    out, bad, reasons = [], np.zeros(len(values), dtype=bool), Counter()
    for i, value in enumerate(values):
        problem = None
        try:
            vector = np.asarray(value)
            if vector.dtype.kind not in "biuf":  # strings ("0.5"), nulls, mixed: not numbers
                raise TypeError(vector.dtype)
            vector = vector.astype(np.float64)
        except (TypeError, ValueError):
            vector, problem = None, "is not a list of numbers"
        if problem is None and (vector.ndim != 1 or vector.size == 0):
            problem = "is not a flat list of numbers"
        if problem is None and dim is not None and vector.size != dim:
            problem = f"has {vector.size} numbers where earlier rows have {dim}"
        if problem is None and not np.isfinite(vector).all():
            problem = "contains NaN or infinity"
        if problem is None and require_nonzero and not vector.any():
            problem = "is all zeros (no direction for the cosine metric)"
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(f"{rows.where(i)}: vector in '{column}' {problem}; fix it or pass --skip-bad-rows")
            bad[i] = True
            reasons[f"bad vector in '{column}'"] += 1
            continue
        dim = vector.size if dim is None else dim
        out.append(vector.astype(np.float32))
    if not out:
        raise DataError(f"{rows.source}: no usable vector in '{column}'")
    if bad.any():
        rows = rows.drop_rows(bad, reasons)
    return np.ascontiguousarray(np.stack(out)), rows
