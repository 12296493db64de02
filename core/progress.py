"""Progress and messages on stderr: rich bars on a terminal, one plain line every few seconds otherwise.

stdout is kept for `--json`; everything a person reads while a run goes goes to stderr. In a
multi-process run only rank 0 speaks unless a message is marked for every rank.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

_state = {"quiet": False, "rank": 0}
PLAIN_INTERVAL_S = float(os.environ.get("DYN_PROGRESS_INTERVAL", "5"))


def configure(quiet: bool = False, rank: int = 0) -> None:
    _state["quiet"] = quiet
    _state["rank"] = rank


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str, every_rank: bool = False) -> None:
    """A one-line message for the person running the command."""
    if _state["quiet"] or (_state["rank"] != 0 and not every_rank):
        return
    prefix = f"[rank {_state['rank']}] " if _state["rank"] else ""
    print(prefix + message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if _state["rank"] == 0:
        print(f"dyn: warning: {message}", file=sys.stderr, flush=True)


class _PlainProgress:
    """Prints `label: done/total (pct), rate/s, eta` at most every PLAIN_INTERVAL_S seconds."""

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PLAIN_INTERVAL_S:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        info(f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.0f} {self.unit}/s, eta {eta:.0f}s")

    def close(self) -> None:
        if time.monotonic() - self.start >= PLAIN_INTERVAL_S:
            self._print(time.monotonic())


class _RichProgress:
    def __init__(self, label: str, total: int, unit: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), TimeRemainingColumn(), console=_console(), transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def close(self) -> None:
        self.bar.stop()


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def progress(label: str, total: int, unit: str = "rows"):
    """A progress reporter with `.advance(n)`; rich on a terminal, plain lines in logs."""
    if _state["quiet"] or _state["rank"] != 0:
        reporter = _Silent()
    elif sys.stderr.isatty() and not os.environ.get("CI"):
        reporter = _RichProgress(label, total, unit)
    else:
        reporter = _PlainProgress(label, total, unit)
    try:
        yield reporter
    finally:
        reporter.close()
