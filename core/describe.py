"""What a dataset, an output or a run folder holds: the facts `dyn inspect` prints."""

from __future__ import annotations

import json
from pathlib import Path

from dyn.core.errors import UsageError


def describe(path: str, sample_rows: int = 3) -> dict:
    """A dict describing `path`: a run folder (run.json), a run record, or a dataset."""
    target = Path(path)
    if target.is_dir() and (target / "run.json").is_file():
        return {"kind": "run folder", "path": path, "run_record": _record(target / "run.json"),
                "checkpoints": sorted((p.name for p in target.glob("checkpoint-*") if p.is_dir()),
                                      key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1)}
    if target.is_file() and target.name.endswith(".dyn.json"):
        return {"kind": "run record", "path": path, "run_record": _record(target)}
    from dyn.core.io import read_rows
    from dyn.core.runrecord import record_path

    loaded = read_rows(path)
    dataset = loaded.dataset
    info = {
        "kind": "dataset",
        "path": path,
        "format": loaded.format,
        "rows": len(dataset),
        "columns": {f.name: str(f.type) for f in dataset.data.table.schema},
        "sample": [_shorten(row) for row in dataset.select(range(min(sample_rows, len(dataset)))).to_list()],
    }
    beside = Path(record_path(path))
    if beside.is_file():
        info["run_record"] = _record(beside)
    return info


def _record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path}: not a readable run record ({exc})") from None
    keys = ("command", "dyn_version", "started_at", "world_size", "device", "figures", "timings_s", "skipped_rows")
    return {k: data.get(k) for k in keys if k in data}


def _shorten(row: dict, limit: int = 120) -> dict:
    out = {}
    for key, value in row.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[key] = text if len(text) <= limit else text[: limit - 1] + "…"
    return out
