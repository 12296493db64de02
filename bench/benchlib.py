"""What every benchmark in bench/ shares: where the real data is, the clock, and reading rows.

The benchmarks are scripts (`python bench/<method>.py`), so this folder is on their import path.
"""

from __future__ import annotations

import gzip
import itertools
import json
import time
from pathlib import Path

# ../shared/data beside the repository, as DESIGN lays it out (the project machine's absolute path
# when the repository sits elsewhere).
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")


def now() -> float:
    return time.perf_counter()


def read_jsonl(path: Path, n: int) -> list[dict]:
    """The first `n` rows of a JSON-lines file (gzip-compressed when it ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]
