"""Read and write row datasets in the formats users bring, as `datasets.Dataset` objects.

Inputs: `.jsonl`/`.json` (JSON lines or one JSON array), `.parquet`, `.csv`, `.arrow` (each also
`.gz` where the format allows), a folder written by `save_to_disk`, or a Hugging Face dataset name
found in the local cache. JSON lines are parsed here, line by line, so a malformed line is named by
its number (or skipped and counted with `skip_bad_rows`); the other formats go through pyarrow.

Outputs follow the path's suffix and are written atomically (see `core.atomic`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dyn.core.atomic import atomic_output
from dyn.core.errors import DataError, UsageError

ROW_FORMATS = ("jsonl", "json", "parquet", "csv", "arrow")


@dataclass
class LoadedRows:
    """Rows read from one source, with where each came from.

    `source_index[i]` is the 0-based position of row i among all rows of the source (bad rows
    that were skipped still take their number), so it maps every kept row back to its origin.
    `line_numbers`, for JSON lines, is the 1-based line of each kept row.
    """

    dataset: "datasets.Dataset"  # noqa: F821 - imported lazily
    source: str
    format: str
    source_index: np.ndarray
    line_numbers: np.ndarray | None = None
    skipped: Counter = field(default_factory=Counter)
    rows_in_source: int = 0

    def where(self, i: int) -> str:
        """Name row i for an error message: `data.jsonl line 58` or `data.parquet row 57`."""
        if self.line_numbers is not None:
            return f"{self.source} line {int(self.line_numbers[i])}"
        return f"{self.source} row {int(self.source_index[i])}"

    def drop_rows(self, bad: np.ndarray, reason_counts: Counter) -> "LoadedRows":
        """A copy without the rows where `bad` is True; their reasons are added to `skipped`."""
        keep = np.flatnonzero(~bad)
        return LoadedRows(
            dataset=self.dataset.select(keep),
            source=self.source,
            format=self.format,
            source_index=self.source_index[keep],
            line_numbers=None if self.line_numbers is None else self.line_numbers[keep],
            skipped=self.skipped + reason_counts,
            rows_in_source=self.rows_in_source,
        )


def row_format(path: str | os.PathLike) -> tuple[str | None, bool]:
    """The row format named by a path's suffix and whether it is gzip-compressed."""
    name = Path(path).name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    for fmt in ROW_FORMATS:
        if name.endswith("." + fmt):
            return fmt, compressed
    return None, compressed


def read_rows(source: str, *, skip_bad_rows: bool = False, split: str | None = None) -> LoadedRows:
    """Read a dataset from a file, a `save_to_disk` folder or the local hub cache."""
    path = Path(source)
    if path.is_dir():
        loaded = _read_saved_folder(path, split)
    elif path.exists():
        fmt, compressed = row_format(path)
        if fmt is None:
            raise UsageError(
                f"{source}: unknown file type; expected one of "
                + ", ".join("." + f for f in ROW_FORMATS)
                + " (optionally .gz) or a save_to_disk folder"
            )
        if path.stat().st_size == 0:
            raise DataError(f"{source}: file is empty (no rows)")
        if fmt in ("jsonl", "json"):
            loaded = _read_json(path, compressed, skip_bad_rows)
        else:
            loaded = _read_with_arrow(path, fmt, compressed)
    elif row_format(path)[0] is None and not source.startswith((".", "/", "~")):
        loaded = _read_hub_cache(source, split)
    else:
        raise UsageError(f"{source}: no such file or folder")
    if len(loaded.dataset) == 0:
        raise DataError(f"{source}: no rows")
    return loaded


def _open_text(path: Path, compressed: bool):
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def _read_json(path: Path, compressed: bool, skip_bad_rows: bool) -> LoadedRows:
    source = str(path)
    try:
        with _open_text(path, compressed) as handle:
            text = handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot read as UTF-8 text ({exc})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{source}: file is empty (no rows)")
    if stripped.startswith("["):
        return _read_json_array(source, text)
    return _read_json_lines(source, text, skip_bad_rows)


def _read_json_array(source: str, text: str) -> LoadedRows:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source} row {i}: expected a JSON object, got {type(row).__name__}")
    dataset = _dataset_from_rows(source, rows, None)
    return LoadedRows(dataset, source, "json", np.arange(len(rows)), None, Counter(), len(rows))


def _read_json_lines(source: str, text: str, skip_bad_rows: bool) -> LoadedRows:
    rows, lines, index = [], [], []
    skipped: Counter = Counter()
    position = 0
    # Split on "\n" only: str.splitlines() would also break at U+2028, U+0085, \x1c ... which
    # JSON strings may hold raw (the real instruction mix does).
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        problem = None
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                problem = f"expected a JSON object, got {type(row).__name__}"
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(
                    f"{source} line {line_number}: {problem}; fix it or pass --skip-bad-rows"
                )
            skipped["malformed JSON line"] += 1
        else:
            rows.append(row)
            lines.append(line_number)
            index.append(position)
        position += 1
    if not rows:
        raise DataError(f"{source}: no valid rows" + (" (all lines malformed)" if skipped else ""))
    dataset = _dataset_from_rows(source, rows, lines)
    return LoadedRows(
        dataset, source, "jsonl", np.asarray(index), np.asarray(lines), skipped, position
    )


def _dataset_from_rows(source: str, rows: list[dict], lines: list[int] | None):
    import datasets

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(_mixed_type_message(source, rows, lines) or f"{source}: {exc}") from None
    return datasets.Dataset(table)


def _mixed_type_message(source: str, rows: list[dict], lines: list[int] | None) -> str | None:
    """Find the first column whose values change type, to name it and the rows involved."""
    first_seen: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
            if key not in first_seen:
                first_seen[key] = (kind, i)
            elif first_seen[key][0] != kind:
                kind0, i0 = first_seen[key]
                where = (lambda j: f"line {lines[j]}") if lines else (lambda j: f"row {j}")
                return (
                    f"{source}: column '{key}' mixes types: {kind0} at {where(i0)}, "
                    f"{kind} at {where(i)}"
                )
    return None


def _read_with_arrow(path: Path, fmt: str, compressed: bool) -> LoadedRows:
    import datasets

    source = str(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            # Quoted values may hold newlines (prompts do); without this pyarrow splits its
            # parallel blocks inside them and fails on any CSV larger than one block (1 MB).
            table = pacsv.read_csv(
                pa.input_stream(str(path), compression="gzip" if compressed else None),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
            )
        else:
            table = _read_arrow_ipc(path, compressed)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot read as {fmt}: {exc}") from None
    n = table.num_rows
    return LoadedRows(datasets.Dataset(table), source, fmt, np.arange(n), None, Counter(), n)


def _read_arrow_ipc(path: Path, compressed: bool) -> pa.Table:
    import pyarrow.ipc as ipc

    data = pa.input_stream(str(path), compression="gzip" if compressed else None).read()
    try:
        return ipc.open_stream(data).read_all()
    except pa.ArrowInvalid:
        return ipc.open_file(pa.BufferReader(data)).read_all()


def _read_saved_folder(path: Path, split: str | None) -> LoadedRows:
    import datasets

    source = str(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{source}: not a folder written by save_to_disk ({exc})") from None
    dataset = _pick_split(source, loaded, split)
    n = len(dataset)
    return LoadedRows(dataset, source, "save_to_disk", np.arange(n), None, Counter(), n)


def _read_hub_cache(name: str, split: str | None) -> LoadedRows:
    import datasets

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types for "not found"
        raise UsageError(
            f"{name}: no such file, and no dataset of that name in the local Hugging Face cache "
            f"({type(exc).__name__})"
        ) from None
    dataset = _pick_split(name, loaded, split)
    n = len(dataset)
    return LoadedRows(dataset, name, "hub", np.arange(n), None, Counter(), n)


def _pick_split(source: str, loaded, split: str | None):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    names = list(loaded.keys())
    if split is None:
        if len(names) == 1:
            return loaded[names[0]]
        if "train" in names:
            return loaded["train"]
        raise UsageError(f"{source}: has splits {', '.join(names)}; choose one with --split")
    if split not in names:
        raise UsageError(f"{source}: no split '{split}'; it has {', '.join(names)}")
    return loaded[split]


def check_output_path(output: str, inputs: list[str]) -> None:
    """Refuse outputs that would overwrite an input or land where nothing can be written."""
    out = Path(output)
    fmt, _ = row_format(out)
    if fmt is None and out.suffix:
        raise UsageError(
            f"{output}: unknown output type '{out.suffix}'; use .jsonl, .json, .parquet, .csv, "
            ".arrow (optionally .gz) or a folder name without a suffix (save_to_disk)"
        )
    resolved = out.resolve()
    # A file output also writes its run record `<output>.dyn.json` beside it (core.runrecord).
    record = resolved.with_name(resolved.name + ".dyn.json") if fmt is not None else None
    for source in inputs:
        src = Path(source)
        if not src.exists():
            continue
        src = src.resolve()
        # Same path, output inside an input folder, or an input inside the output folder
        # (a folder output replaces the whole folder).
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise UsageError(f"{output}: output would overwrite the input {source}")
        if record is not None and record == src:
            raise UsageError(f"{output}: its run record {record.name} would overwrite the input {source}")
    parent = resolved.parent
    if not parent.exists():
        raise UsageError(f"{output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{output}: folder {parent} is not writable")


def write_rows(dataset, output: str) -> None:
    """Write rows in the format the output path names, atomically (temporary name, then rename)."""
    fmt, compressed = row_format(output)
    if dataset._indices is not None:  # a selected or reordered view: materialise it in order
        dataset = dataset.flatten_indices()
    if fmt is None:
        with atomic_output(output, folder=True) as tmp:
            dataset.save_to_disk(tmp)
        return
    table = dataset.data.table
    with atomic_output(output) as tmp:
        if fmt in ("jsonl", "json"):
            _write_json_lines(table, tmp, compressed)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        elif fmt == "csv":
            _write_csv(table, tmp, compressed, output)
        else:
            import pyarrow.ipc as ipc

            with pa.output_stream(tmp, compression="gzip" if compressed else None) as sink:
                with ipc.new_stream(sink, table.schema) as writer:
                    writer.write_table(table)


def _write_json_lines(table: pa.Table, path: str, compressed: bool) -> None:
    raw = gzip.open(path, "wb") if compressed else open(path, "wb")
    with raw:
        for batch in table.to_batches(max_chunksize=4096):
            lines = [json.dumps(row, ensure_ascii=False, default=_json_default) for row in batch.to_pylist()]
            raw.write(("\n".join(lines) + "\n").encode("utf-8"))


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def check_output_columns(schema: pa.Schema, output: str) -> None:
    """Refuse, before any work, columns the output format cannot hold (nested ones in CSV)."""
    if row_format(output)[0] != "csv":
        return
    nested = [f.name for f in schema if pa.types.is_nested(f.type)]
    if nested:
        raise UsageError(
            f"{output}: CSV cannot hold the nested column(s) {', '.join(nested)}; "
            "write .jsonl, .parquet or .arrow instead"
        )


def _write_csv(table: pa.Table, path: str, compressed: bool, output: str) -> None:
    import pyarrow.csv as pacsv

    check_output_columns(table.schema, output)
    with pa.output_stream(path, compression="gzip" if compressed else None) as sink:
        pacsv.write_csv(table, sink)
