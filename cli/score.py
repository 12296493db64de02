"""`dyn score`: the scorers of `dyn select`, keeping every row and adding their score columns.

Same flags as `dyn select` (one definition: the signature is `select_command`'s). The keep rules
(-k, --fraction, --band, --threshold, --min-learnable) are hidden from `--help` and refused with a
line saying why, rather than met with "no such option".
"""

from __future__ import annotations

import copy
import functools
import inspect

from dyn.cli.select import run_method_command, select_command

KEEP_RULES = ("k", "fraction", "band", "threshold", "min_learnable")

EXAMPLES = """
Examples:

  dyn score --method slm-hard pool.jsonl --slm small-lm/ -o pool.scored.parquet --plot

  dyn score --method grad train.jsonl --anchor anchor.jsonl --checkpoints warmup/ -o train.scored.jsonl

  dyn score --method hmin data.jsonl -o data.ranked.parquet --group-field task
"""


@functools.wraps(select_command)
def score_command(ctx, **_flags) -> None:
    run_method_command(ctx, score_only=True)


def _hidden(parameter: inspect.Parameter) -> inspect.Parameter:
    option = copy.copy(parameter.default)
    option.hidden = True
    return parameter.replace(default=option)


score_command.__signature__ = inspect.signature(select_command).replace(parameters=[
    _hidden(p) if p.name in KEEP_RULES else p for p in inspect.signature(select_command).parameters.values()
])


score_command.__doc__ = """Score every row and keep them all, in input order. hmin: dyn_rank (position in the
    full greedy farthest-point order) and dyn_hmin_at (distance to the rows before it). grad:
    dyn_rank, dyn_score and dyn_score_ckpt<step>. slm-hard: dyn_score (median loss over learnable
    tokens), dyn_learnable_tokens and dyn_tokens. Rows without a score get an empty (null) one.
    Chain with `dyn select`: the output keeps dyn_index into the original input."""
