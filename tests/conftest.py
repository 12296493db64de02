"""Shared test fixtures: slices of the real data in ../shared/data, and an isolated cache."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T0_MIX = SHARED_DATA / "t0-mix.jsonl.gz"


def _t0_rows(n: int) -> list[dict]:
    if not T0_MIX.exists():
        pytest.skip(f"real data not found at {T0_MIX}")
    with gzip.open(T0_MIX, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def t0_rows():
    """`t0_rows(n)`: the first n rows of the real instruction mix (prompt, completion, task).
    Session-scoped, so module fixtures that train a model on real rows can use it too."""
    return _t0_rows


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`), restored
    afterwards. Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    OpenMP threads wait on each other (measured: a forward pass 18x slower). It also matches the
    workers of a multi-process run (torch.distributed.run gives each one thread), so their bits can
    be compared with a one-process run's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def write_jsonl():
    """`write_jsonl(path, rows)`: write rows as JSON lines and return the path."""
    return _write_jsonl


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dyn-cache")


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    """The tests share one embedding cache of their own, so the user's cache is never touched and
    the same real rows are embedded once per session. Tests about the cache make their own."""
    cache = session_cache
    monkeypatch.setenv("DYN_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def minilm():
    """The bundled MiniLM encoder, loaded once for the session."""
    from dyn.core.embeddings import TextEncoder, bundled_model_path

    return TextEncoder(bundled_model_path(), device="cpu", precision="float32")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
