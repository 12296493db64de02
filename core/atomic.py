"""Atomic outputs: write under a temporary name in the same folder, rename when complete.

A run killed at any point leaves either the previous file or nothing at the output path, never a
half-written file that looks whole. Temporary names start with '.' and contain `.dyn-tmp-`.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.dyn-tmp-{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike, folder: bool = False):
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    final = Path(path)
    tmp = temporary_name(final)
    _remove(tmp)
    try:
        yield str(tmp)
        if folder and final.is_dir():
            old = final.with_name(f".{final.name}.dyn-old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
