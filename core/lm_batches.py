"""Rows to score, as token-budget batches planned once over all rows and shared out by rank.

The plan (length-sorted, padded tokens within a budget: `core.embeddings.plan_batches`) depends
only on the rows, never on the number of processes; batch j goes to rank j mod world size and
results are gathered back in batch order. Every row is therefore computed in the same batch,
with the same padding, whether one process runs or eight: sharded results equal one process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dyn.core.errors import DataError

CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 16384
MAX_BATCH_ROWS = 64


def default_batch_tokens(device) -> int:
    """The padded-token budget of a batch when --batch-tokens is not given: larger on a GPU."""
    return CUDA_BATCH_TOKENS if str(device).startswith("cuda") else CPU_BATCH_TOKENS


@dataclass
class RowBatches:
    """Tokenised rows (`core.lm.LMExamples`), their batch plan, and how to name a row in errors.

    `groups[i]` is the index of row i's group (anchors with `--anchor-group-field`; else all 0);
    batches never mix groups, so a group's mean gradient is a sum over whole batches.
    """

    examples: object
    batches: list[np.ndarray]
    pad_token_id: int
    where: Callable[[int], str]
    groups: np.ndarray
    group_names: list

    def __len__(self) -> int:
        return len(self.examples)

    device: str | None = None

    def batch(self, j: int) -> dict:
        return self.examples.batch(self.batches[j], self.pad_token_id, device=self.device)

    def has_response(self, positions: np.ndarray) -> np.ndarray:
        return self.examples.response_tokens[positions] > 0

    def group_batches(self, g: int) -> list[int]:
        return [j for j, b in enumerate(self.batches) if self.groups[b[0]] == g]


def plan_row_batches(examples, pad_token_id: int, where, max_tokens: int, groups: np.ndarray | None = None,
                     group_names: list | None = None, device: str | None = None) -> RowBatches:
    from dyn.core.embeddings import plan_batches

    lengths = examples.lengths
    if len(lengths) and max_tokens < int(lengths.max()):
        raise DataError(f"--batch-tokens {max_tokens}: smaller than the longest example ({int(lengths.max())} tokens); raise it or lower --max-length")
    groups = np.zeros(len(lengths), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    batches: list[np.ndarray] = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        members = np.flatnonzero(groups == g)
        batches.extend(members[b] for b in plan_batches(lengths[members], max_tokens=max_tokens, max_rows=MAX_BATCH_ROWS))
    return RowBatches(examples, batches, pad_token_id, where, groups, group_names or ["all"], device)


def map_batches(rows: RowBatches, compute: Callable[[int, dict], object], label: str) -> list:
    """compute(j, batch) for this rank's batches; every rank gets all results in batch order."""
    from dyn.core import progress
    from dyn.core.distributed import all_gather_objects, world

    w = world()
    mine = {}
    with progress.progress(label, total=len(rows.batches), unit="batches") as bar:
        for j in range(w.rank, len(rows.batches), w.size):
            mine[j] = compute(j, rows.batch(j))
            bar.advance(w.size)
    merged: dict = {}
    for part in all_gather_objects(mine):
        merged.update(part)
    return [merged[j] for j in range(len(rows.batches))]
