"""The slm-hard recipe (SALT; DESIGN §4.3): rows in -> token ids -> one forward pass of a small LM
per batch -> each row's median loss over its learnable tokens -> the hardest rows (select) or every
row with its score (score) -> rows out + run record.

`dyn select --method slm-hard` and `dyn score --method slm-hard` parse flags into an
`SlmHardRequest` and call `run_slm_hard`. Rows without a learnable token get no score; they are
counted in the run record and, in score mode, written with an empty score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dyn.core.errors import DataError, UsageError
from dyn.selection.slm_score import DEFAULT_TOP_K

UNSCORED_LISTED = 50
UNKNOWN_TOKEN_WARN_RATE = 0.01


@dataclass
class SlmHardRequest:
    data: str
    output: str
    slm: str
    score_only: bool = False
    k: int | None = None
    fraction: float | None = None
    band: str | None = None
    min_learnable: int = 1
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    text_field: str | None = None
    template: str | None = None
    response_field: str | None = None
    max_length: int | None = None
    batch_tokens: int | None = None
    group_field: str | None = None
    device: str = "auto"
    precision: str = "auto"
    plot: bool = False
    skip_bad_rows: bool = False
    split: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class SlmKeepRule:
    """Which scored rows to keep: the top `k` or `fraction` of the eligible rows, or those whose
    score lies between the `band` quantiles (inclusive) of the eligible rows' scores. Eligible:
    scored, with at least `min_learnable` learnable tokens."""

    k: int | None = None
    fraction: float | None = None
    band: tuple[float, float] | None = None
    min_learnable: int = 1

    def describe(self) -> str:
        if self.k is not None:
            rule = f"top {self.k}"
        elif self.fraction is not None:
            rule = f"top fraction {self.fraction}"
        else:
            rule = f"score percentiles {self.band[0]:g}..{self.band[1]:g}"
        return rule + (f", at least {self.min_learnable} learnable tokens" if self.min_learnable > 1 else "")


def parse_band(text: str) -> tuple[float, float]:
    """`--band LO:HI` as two quantiles 0 <= LO < HI <= 1."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--band {text}: write LO:HI with quantiles in [0, 1], e.g. 0.5:0.9") from None
    if not 0 <= low < high <= 1:
        raise UsageError(f"--band {text}: need 0 <= LO < HI <= 1")
    return low, high


def keep_rule(req: SlmHardRequest) -> SlmKeepRule | None:
    """The request's keep rule (None in score mode), checked before any work."""
    given = [name for name, value in (("-k", req.k), ("--fraction", req.fraction), ("--band", req.band)) if value is not None]
    if req.score_only:
        if given or req.min_learnable != 1:
            flags = given + (["--min-learnable"] if req.min_learnable != 1 else [])
            raise UsageError(f"dyn score keeps every row; {', '.join(flags)} belong to dyn select")
        return None
    if len(given) != 1:
        raise UsageError("say which rows to keep with one of -k N, --fraction F or --band LO:HI"
                         + (f" (got {' and '.join(given)})" if given else ""))
    if req.k is not None and req.k < 1:
        raise UsageError(f"-k {req.k}: must be at least 1")
    if req.fraction is not None and not 0 < req.fraction <= 1:
        raise UsageError(f"--fraction {req.fraction}: must be in (0, 1]")
    if req.min_learnable < 1:
        raise UsageError(f"--min-learnable {req.min_learnable}: must be at least 1")
    return SlmKeepRule(req.k, req.fraction, parse_band(req.band) if req.band else None, req.min_learnable)


def keep_rows(scores: np.ndarray, learnable: np.ndarray, rule: SlmKeepRule, source: str = "the input") -> tuple[np.ndarray, dict]:
    """Positions of the kept rows, highest score first (ties: earlier row first), and the
    thresholds used."""
    eligible = np.flatnonzero(np.isfinite(scores) & (learnable >= rule.min_learnable))
    order = eligible[np.lexsort((eligible, -scores[eligible]))]
    if rule.k is not None:
        if rule.k > len(eligible):
            raise UsageError(f"-k {rule.k}: {source} has only {len(eligible)} rows with a score"
                             + (f" and at least {rule.min_learnable} learnable tokens" if rule.min_learnable > 1 else ""))
        return order[: rule.k], {"eligible_rows": int(len(eligible))}
    if rule.fraction is not None:
        count = max(1, int(round(rule.fraction * len(eligible)))) if len(eligible) else 0
        return order[:count], {"eligible_rows": int(len(eligible))}
    low, high = np.quantile(scores[eligible], rule.band) if len(eligible) else (np.nan, np.nan)
    inside = order[(scores[order] >= low) & (scores[order] <= high)]
    return inside, {"eligible_rows": int(len(eligible)), "band_scores": [float(low), float(high)]}


def check_request(req: SlmHardRequest) -> SlmKeepRule | None:
    """Flag checks that need no data, so a bad command fails before any work."""
    from dyn.core.io import check_output_path

    if not req.slm:
        raise UsageError("--method slm-hard needs --slm DIR: a small causal LM folder with its tokenizer (e.g. a `dyn train` run)")
    if not Path(req.slm).is_dir():
        raise UsageError(f"--slm {req.slm}: not a folder (a small causal LM saved with save_pretrained, with its tokenizer)")
    rule = keep_rule(req)
    if req.top_k < 1:
        raise UsageError(f"--top-k {req.top_k}: must be at least 1")
    if req.text_field and (req.template or req.response_field):
        raise UsageError("--text-field scores a whole column; --template/--response-field score a response after a prompt: give one")
    if req.batch_tokens is not None and req.batch_tokens < 16:
        raise UsageError(f"--batch-tokens {req.batch_tokens}: must be at least 16")
    if req.plot:
        from dyn.core.plot import check_plotting_available

        check_plotting_available()
    check_output_path(req.output, [req.data])
    return rule


def run_slm_hard(req: SlmHardRequest) -> dict | None:
    """Run the whole selection (or scoring); returns the summary on rank 0 (None on other ranks)."""
    from dyn.core.distributed import world
    from dyn.core.embeddings import resolve_device, resolve_precision
    from dyn.core.io import check_output_columns, read_rows, write_rows
    from dyn.core.runrecord import RunRecord
    from dyn.selection.result import SelectionResult, finish_run, output_rows
    from dyn.selection.slm_score import score_rows

    rule = check_request(req)
    w = world()
    verb = "score" if req.score_only else "select"
    record = RunRecord(f"{verb} --method slm-hard", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    device = resolve_device(req.device)
    precision = resolve_precision(req.precision, device, flag="--precision")
    record.data["device"] = device
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
    check_output_columns(loaded.dataset.data.table.schema, req.output)
    with record.phase("load model"):
        model, tokenizer, model_hash = _load_slm(req.slm)
    with record.phase("tokenize"):
        rows, loaded, token_figures = _tokenised_rows(req, loaded, model, tokenizer, device)
    with record.phase("score"):
        scores = score_rows(model.to(device), rows, req.top_k, precision)
    if not w.is_main:
        return None

    scored = np.isfinite(scores.score)
    if not scored.any():
        raise DataError(f"{loaded.source}: no row has a learnable response token to score "
                        f"(rows without response tokens: {dict(rows.examples.no_response)})")
    columns = {"dyn_score": scores.score, "dyn_learnable_tokens": scores.learnable_tokens, "dyn_tokens": scores.tokens}
    if rule is None:
        kept, keep_figures = np.arange(len(scores.score)), {}
    else:
        kept, keep_figures = keep_rows(scores.score, scores.learnable_tokens, rule, loaded.source)
        columns = {"dyn_rank": np.arange(len(kept), dtype=np.int64)} | {name: v[kept] for name, v in columns.items()}
        if not len(kept):
            from dyn.core import progress

            progress.warn(f"no row met the keep rule ({rule.describe()}); the output is empty")
    figures = _figures(req, rule, scores, kept, keep_figures, loaded, rows, token_figures, precision)
    result = SelectionResult(kept, columns, figures)
    with record.phase("write"):
        write_rows(output_rows(loaded, result), req.output)
    plot = None
    if req.plot:
        from dyn.core.plot import plot_scores_beside

        plot = plot_scores_beside(req.output, scores.score, title=f"slm-hard scores ({loaded.source})",
                                  kept=None if rule is None else kept, xlabel="median loss over learnable tokens")
    record.add_input(req.data, loaded.rows_in_source)
    record.add_model("slm", req.slm, model_hash, parameters=int(sum(p.numel() for p in model.parameters())))
    return finish_run(record, loaded, req.output, figures, plot=plot, rows_scored=int(scored.sum()), rows_out=int(len(kept)))


def _load_slm(folder: str):
    """The small LM, its tokenizer and a content hash of the folder's files."""
    from dyn.core.models import ModelSource, load_model_and_tokenizer, model_content_hash

    model, tokenizer = load_model_and_tokenizer(folder, flag="--slm")
    return model, tokenizer, model_content_hash(ModelSource("folder", folder))


def _tokenised_rows(req: SlmHardRequest, loaded, model, tokenizer, device: str):
    """Prompt/response token ids of every row, planned into token-budget batches."""
    from dyn.core.lm import ExampleFormat, build_lm_examples, pad_token_id
    from dyn.core.lm_batches import default_batch_tokens, plan_row_batches
    from dyn.core.models import context_length
    from dyn.distill.checkpoints import trained_example_format

    columns = loaded.dataset.column_names
    if req.text_field is not None:
        if req.text_field not in columns:
            raise DataError(f"{loaded.source}: no column '{req.text_field}' (--text-field); columns are: {', '.join(columns)}")
        fmt = ExampleFormat(response_field=req.text_field)
    else:
        fmt, _ = trained_example_format(req.slm, loaded, req.template, req.response_field)
    context = context_length(model.config)
    max_length = req.max_length or context
    if max_length > context:
        raise UsageError(f"--max-length {max_length}: the small LM attends over at most {context} positions")
    examples, loaded = build_lm_examples(loaded, fmt, tokenizer, max_length, skip_bad_rows=req.skip_bad_rows)
    budget = req.batch_tokens or default_batch_tokens(device)
    budget = max(budget, int(examples.lengths.max()) if len(examples) else 0)
    rows = plan_row_batches(examples, pad_token_id(tokenizer), loaded.where, budget, device=device)
    figures = examples.figures() | {"example_format": fmt.describe(), "batch_tokens": budget}
    figures |= _unknown_token_figures(examples, tokenizer)
    if figures["rows_truncated"]:
        from dyn.core import progress

        progress.warn(f"{figures['rows_truncated']} rows were longer than {max_length} tokens and were cut "
                      f"(set --max-length to change the limit)")
    return rows, loaded, figures


def _unknown_token_figures(examples, tokenizer) -> dict:
    """How much of the text the small LM's vocabulary could not encode (its unknown token)."""
    unk = tokenizer.unk_token_id
    total = int(examples.lengths.sum())
    if unk is None or total == 0:
        return {"unknown_tokens": 0, "unknown_token_rate": 0.0}
    unknown = int(sum(int((ids == unk).sum()) for ids in examples.input_ids))
    rate = unknown / total
    if rate > UNKNOWN_TOKEN_WARN_RATE:
        from dyn.core import progress

        progress.warn(f"{rate:.1%} of the tokens are the small LM's unknown token: its vocabulary does not cover this text")
    return {"unknown_tokens": unknown, "unknown_token_rate": rate}


def _figures(req, rule, scores, kept, keep_figures, loaded, rows, token_figures, precision) -> dict:
    from dyn.core.plot import score_histogram
    from dyn.influence.scores import describe

    unscored = np.flatnonzero(~np.isfinite(scores.score))
    reasons = Counter(rows.examples.no_response)
    no_learnable = int(sum(1 for i in unscored if rows.examples.response_tokens[i] > 0))
    if no_learnable:
        reasons[f"no response token in the small LM's top {req.top_k}"] = no_learnable
    figures = {
        "top_k": req.top_k,
        "precision": precision,
        "keep_rule": "every row (score)" if rule is None else rule.describe(),
        **keep_figures,
        "rows_scored": int(np.isfinite(scores.score).sum()),
        "rows_kept": int(len(kept)),
        "rows_without_score": {
            "count": int(len(unscored)),
            "reasons": dict(reasons),
            "dyn_index": [int(loaded.source_index[i]) for i in unscored[:UNSCORED_LISTED]],
        },
        "scores": describe(scores.score),
        "scores_kept": describe(scores.score[kept]) if rule is not None else None,
        "learnable_token_share": float(scores.learnable_tokens.sum() / max(1, scores.tokens.sum())),
        "histogram": score_histogram(scores.score),
        "tokens": token_figures,
    }
    if rule is not None:
        figures["scores_random_subset"] = describe(_random_subset_scores(scores.score, len(kept), seed=req.seed))
    if req.group_field:
        figures["groups"] = group_figures(loaded, req.group_field, scores.score, kept if rule is not None else None)
    return figures


def _random_subset_scores(scores: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The scores of a seeded random subset of the scored rows, as large as the selection."""
    scored = np.flatnonzero(np.isfinite(scores))
    picked = np.random.default_rng(seed).choice(scored, size=min(size, len(scored)), replace=False)
    return scores[picked]


def group_figures(loaded, field_name: str, scores: np.ndarray, kept: np.ndarray | None) -> list[dict]:
    """Per label of `field_name`: rows, rows scored, mean and median score, and rows kept; the
    hardest group (highest mean score) first."""
    if field_name not in loaded.dataset.column_names:
        raise DataError(f"{loaded.source}: no column '{field_name}' (--group-field); columns are: {', '.join(loaded.dataset.column_names)}")
    labels = np.asarray([str(v) for v in loaded.dataset[field_name]])
    kept_mask = np.zeros(len(scores), dtype=bool)
    if kept is not None:
        kept_mask[kept] = True
    out = []
    for name in sorted(set(labels.tolist())):
        members = labels == name
        values = scores[members & np.isfinite(scores)]
        entry = {
            "group": name,
            "rows": int(members.sum()),
            "rows_scored": int(len(values)),
            "mean_score": float(values.mean()) if len(values) else None,
            "median_score": float(np.median(values)) if len(values) else None,
        }
        if kept is not None:
            entry["rows_kept"] = int((members & kept_mask).sum())
        out.append(entry)
    return sorted(out, key=lambda e: (e["mean_score"] is None, -(e["mean_score"] or 0.0), e["group"]))
