"""The run record: `<output>.dyn.json` beside every output (DESIGN §3).

It says what produced the output: dyn's version and git hash, the resolved arguments, every input
(size, sha256, rows), every model (config hash), library versions, device and world size, seeds,
per-phase timings, skipped rows by reason, and the method's figures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from dyn.core.atomic import write_text_atomic
from dyn.core.hashing import file_sha256

_LIBRARIES = ("torch", "transformers", "datasets", "accelerate", "faiss-cpu", "faiss-gpu", "numpy", "pyarrow")


def record_path(output: str) -> str:
    """Where the record of an output goes: beside a file, or `run.json` inside a run folder."""
    out = Path(output)
    if out.is_dir() and not out.suffix:
        return str(out / "run.json")
    return str(out.with_name(out.name + ".dyn.json"))


class RunRecord:
    """Collects what a run did; `write` saves it atomically as JSON."""

    def __init__(self, command: str, arguments: dict):
        self.data: dict = {
            "dyn_version": _dyn_version(),
            "git_commit": _git_commit(),
            "command": command,
            "argv": sys.argv,
            "arguments": arguments,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": [],
            "models": [],
            "libraries": library_versions(),
            "python": platform.python_version(),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "device": None,
            "world_size": 1,
            "seeds": {},
            "timings_s": {},
            "skipped_rows": {},
            "figures": {},
        }

    def add_input(self, path: str, rows: int, role: str = "data") -> None:
        entry: dict = {"role": role, "path": path, "rows": rows}
        p = Path(path)
        if p.is_file():
            entry["bytes"] = p.stat().st_size
            entry["sha256"] = file_sha256(p)
        elif p.is_dir():
            entry["bytes"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        parent = Path(record_path(path))
        if parent.is_file():
            entry["parent_run_record"] = str(parent)
        self.data["inputs"].append(entry)

    def add_model(self, role: str, path: str, content_hash: str, **extra) -> None:
        self.data["models"].append({"role": role, "path": path, "sha256": content_hash, **extra})

    def add_skipped(self, counts: Counter) -> None:
        merged = Counter(self.data["skipped_rows"]) + Counter(counts)
        self.data["skipped_rows"] = dict(merged)

    @contextmanager
    def phase(self, name: str):
        """Time a phase of the run; timings of a repeated phase add up."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.data["timings_s"][name] = round(self.data["timings_s"].get(name, 0.0) + spent, 4)

    def write(self, path: str) -> None:
        self.data["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text_atomic(path, json.dumps(self.data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def library_versions() -> dict:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _dyn_version() -> str:
    try:
        return metadata.version("dyn")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
