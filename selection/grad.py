"""The grad selection recipe (CLUES, with LESS's cosine and Adam variants; DESIGN §4.2):
rows and anchors in -> token ids -> per checkpoint, every row's gradient agreement with the
anchors -> the checkpoint-weighted score -> the rows that agree -> rows out + run record.

    score(z) = Σ_c η_c · ⟨Γ_c(∇ℓ(z; θ_c)), ḡ_c⟩,   ḡ_c = mean over anchors a of ∇ℓ(a; θ_c)

A plain sequence of library calls (torchtune-style); `dyn select --method grad` parses flags into a
`GradRequest` and calls `run_grad_selection`. The anchors are scored by the same pipeline, and by
default a row is kept when its score is at least the mean anchor score.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dyn.core.errors import DataError, UsageError

DEFAULT_PROJ_DIM = 1024
UNSCORED_LISTED = 50


@dataclass
class GradRequest:
    data: str
    output: str
    anchor: str
    checkpoints: list[str]
    engine: str | None = None
    similarity: str = "dot"
    precondition: str = "none"
    weights: str = "lr"
    k: int | None = None
    fraction: float | None = None
    threshold: float | None = None
    anchor_group_field: str | None = None
    modules: str | None = None
    store: str | None = None
    proj_dim: int = DEFAULT_PROJ_DIM
    seed: int = 0
    template: str | None = None
    response_field: str | None = None
    max_length: int | None = None
    batch_tokens: int | None = None
    device: str = "auto"
    skip_bad_rows: bool = False
    split: str | None = None
    score_only: bool = False
    plot: bool = False
    extra: dict = field(default_factory=dict)


def check_grad_request(req: GradRequest) -> str:
    """Flag checks that need no data, so a bad command fails before any work; the engine to run."""
    from dyn.core.io import check_output_path
    from dyn.influence.checkpoints import PRECONDITIONS
    from dyn.influence.engines import choose_engine
    from dyn.influence.scores import SIMILARITIES

    if not req.anchor:
        raise UsageError("--method grad needs --anchor FILE: the trusted rows the gradients are compared with")
    if not req.checkpoints:
        raise UsageError("--method grad needs --checkpoints DIR: a `dyn train` run folder (or checkpoint/model folders)")
    given = [name for name, value in (("-k", req.k), ("--fraction", req.fraction), ("--threshold", req.threshold)) if value is not None]
    if req.score_only and given:
        raise UsageError(f"dyn score keeps every row; {', '.join(given)} belong to dyn select")
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are alternatives; give one (or none: keep rows scoring at least the mean anchor score)")
    if req.k is not None and req.k < 1:
        raise UsageError(f"-k {req.k}: must be at least 1")
    if req.fraction is not None and not 0 < req.fraction <= 1:
        raise UsageError(f"--fraction {req.fraction}: must be in (0, 1]")
    if req.similarity not in SIMILARITIES:
        raise UsageError(f"--similarity {req.similarity}: choose one of {', '.join(SIMILARITIES)}")
    if req.precondition not in PRECONDITIONS:
        raise UsageError(f"--precondition {req.precondition}: choose one of {', '.join(PRECONDITIONS)}")
    engine = choose_engine(req.engine, req.similarity, req.precondition)
    if req.store is not None and engine != "store":
        raise UsageError(f"--store holds the store engine's projected gradients; this run uses --engine {engine} (add --engine store)")
    if req.proj_dim < 1:
        raise UsageError(f"--proj-dim {req.proj_dim}: must be at least 1")
    if req.batch_tokens is not None and req.batch_tokens < 16:
        raise UsageError(f"--batch-tokens {req.batch_tokens}: must be at least 16")
    if req.plot:
        from dyn.core.plot import check_plotting_available

        check_plotting_available()
    check_output_path(req.output, [req.data, req.anchor])
    if req.store is not None:
        store, output = Path(req.store).resolve(), Path(req.output).resolve()
        if store == output or store in output.parents:
            raise UsageError(f"--store {req.store}: the output may not go inside the gradient store")
    return engine


def run_grad_selection(req: GradRequest) -> dict | None:
    """Run the whole selection; returns the summary on rank 0 (None on other ranks)."""
    from dyn.core.distributed import world
    from dyn.core.embeddings import resolve_device
    from dyn.core.io import check_output_columns, read_rows, write_rows
    from dyn.core.runrecord import RunRecord
    from dyn.influence.checkpoints import scoring_plan
    from dyn.core.plot import score_histogram
    from dyn.selection.result import SelectionResult, finish_run, output_rows, ranks_by_row

    engine = check_grad_request(req)
    w = world()
    record = RunRecord(("score" if req.score_only else "select") + " --method grad", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    device = resolve_device(req.device)
    record.data["device"] = device
    record.data["seeds"] = {"projection": req.seed}
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
        anchor_loaded = read_rows(req.anchor, skip_bad_rows=req.skip_bad_rows)
    check_output_columns(loaded.dataset.data.table.schema, req.output)
    plan = scoring_plan(req.checkpoints, req.weights, req.precondition)

    state = _ScoringState(req, engine, device, plan, record)
    with record.phase("tokenize"):
        loaded, anchor_loaded = state.prepare_rows(loaded, anchor_loaded)
    scorable = int(len(state.rows.examples.with_response()))
    if req.k is not None and req.k > scorable:
        raise UsageError(f"-k {req.k}: {loaded.source} has only {scorable} rows with a response token to score")
    try:
        per_checkpoint = [state.score(checkpoint) for checkpoint in plan]
    except BaseException:
        state.close(failed=True)
        raise
    state.close()
    if not w.is_main:
        return None

    from dyn.influence.scores import KeepRule, combine, keep_rows

    combined = combine(per_checkpoint)
    rule = KeepRule(req.k, req.fraction, req.threshold)
    scored = int(np.isfinite(combined.rows).sum())
    if scored == 0:
        raise DataError(f"{loaded.source}: no row has a response token to score ({dict(state.rows.examples.no_response)})")
    if req.score_only:
        kept, threshold = np.arange(len(combined.rows)), None
        ranks = ranks_by_row(keep_rows(combined.rows, combined.anchors, KeepRule(fraction=1.0))[0], len(kept))
    else:
        kept, threshold = keep_rows(combined.rows, combined.anchors, rule)
        ranks = np.arange(len(kept), dtype=np.int64)
        if not len(kept):
            from dyn.core import progress

            progress.warn(f"no row scored at least {threshold:.4g} ({rule.describe()}); the output is empty")
    columns = {"dyn_rank": ranks, "dyn_score": combined.rows[kept]}
    for step, values in combined.per_checkpoint.items():
        columns[f"dyn_score_ckpt{step}"] = values[kept]
    figures = state.figures(combined, rule, threshold, kept, loaded)
    figures["histogram"] = score_histogram(combined.rows)
    if req.score_only:
        figures["keep_rule"] = "every row (score)"
    result = SelectionResult(kept, columns, figures)
    with record.phase("write"):
        write_rows(output_rows(loaded, result), req.output)
    plot = None
    if req.plot:
        from dyn.core.plot import plot_scores_beside

        plot = plot_scores_beside(req.output, combined.rows, title=f"grad scores ({loaded.source})",
                                  kept=None if req.score_only else kept, xlabel="checkpoint-weighted gradient agreement")
    record.add_input(req.data, loaded.rows_in_source)
    record.add_input(req.anchor, anchor_loaded.rows_in_source, role="anchor")
    return finish_run(record, loaded, req.output, figures, plot=plot, rows_scored=scored, rows_out=len(kept))


class _ScoringState:
    """What stays the same across checkpoints: tokenised rows and anchors, the batch plans, the
    engine settings and store, and the first checkpoint's tokenizer and parameter shapes."""

    def __init__(self, req: GradRequest, engine: str, device: str, plan, record):
        self.req, self.engine, self.device, self.plan, self.record = req, engine, device, plan, record
        self.tokenizer_vocab = None
        self.signature = None
        self.store = None
        self.temporary_store = None
        self.models: list[dict] = []
        self._first = None

    # ---- rows

    def prepare_rows(self, loaded, anchor_loaded):
        from dyn.core.lm import build_lm_examples, check_format_columns, pad_token_id
        from dyn.distill.checkpoints import trained_example_format
        from dyn.core.models import context_length
        from dyn.core.lm_batches import default_batch_tokens, plan_row_batches
        from dyn.influence.checkpoints import load_scoring_model

        first = self.plan[0]
        with self.record.phase("load model"):
            model, tokenizer = load_scoring_model(first)
        self._first = (model, tokenizer)
        self.tokenizer_vocab = tokenizer.get_vocab()
        fmt, saved_length = trained_example_format(first.path, loaded, self.req.template, self.req.response_field)
        max_length = self.req.max_length or saved_length or context_length(model.config)
        if max_length > context_length(model.config):
            raise UsageError(f"--max-length {max_length}: the model attends over at most {context_length(model.config)} positions")
        examples, loaded = build_lm_examples(loaded, fmt, tokenizer, max_length, skip_bad_rows=self.req.skip_bad_rows)
        check_format_columns(anchor_loaded, fmt)
        anchor_examples, anchor_loaded = build_lm_examples(anchor_loaded, fmt, tokenizer, max_length, skip_bad_rows=self.req.skip_bad_rows)
        groups, names = _anchor_groups(anchor_loaded, self.req.anchor_group_field)
        budget = self.req.batch_tokens or default_batch_tokens(self.device)
        budget = max(budget, int(examples.lengths.max()), int(anchor_examples.lengths.max()))
        pad = pad_token_id(tokenizer)
        self.rows_budget = budget
        self.rows = plan_row_batches(examples, pad, loaded.where, budget, device=self.device)
        self.anchors = plan_row_batches(anchor_examples, pad, anchor_loaded.where, budget, groups, names, device=self.device)
        self.format, self.max_length = fmt, max_length
        self.rows_hash, self.anchors_hash = examples_hash(examples), examples_hash(anchor_examples)
        self.record.data["figures_tokens"] = {"rows": examples.figures(), "anchors": anchor_examples.figures(), "example_format": fmt.describe()}
        return loaded, anchor_loaded

    # ---- checkpoints

    def score(self, checkpoint):
        from dyn.core import progress
        from dyn.influence.checkpoints import (
            adam_moments, check_same_architecture, checkpoint_hash, load_scoring_model, parameter_signature,
        )
        from dyn.influence.engines import CheckpointContext, EngineSettings, score_checkpoint
        from dyn.influence.parameters import select_parameters

        progress.info(f"scoring {checkpoint.path} (step {checkpoint.step}, weight {checkpoint.weight:.4g}) with the {self.engine} engine")
        with self.record.phase("load model"):
            if self._first is not None:
                model, tokenizer = self._first
                self._first = None
            else:
                model, tokenizer = load_scoring_model(checkpoint)
                if tokenizer.get_vocab() != self.tokenizer_vocab:
                    raise DataError(f"{checkpoint.path}: its tokenizer differs from {self.plan[0].path}'s; score checkpoints of one run")
            model.to(self.device)
            params = select_parameters(model, self.req.modules)
            signature = parameter_signature(params)
            if self.signature is None:
                self.signature = signature
            check_same_architecture(self.signature, signature, checkpoint)
            moments = adam_moments(checkpoint) if self.req.precondition == "adam" else None
            model_hash = checkpoint_hash(checkpoint, with_optimizer=moments is not None) if self.engine == "store" else ""
        if self.engine == "store" and self.store is None:
            self._open_store()
        settings = EngineSettings(self.engine, self.req.similarity, self.req.proj_dim, self.req.seed, self.store)
        ctx = CheckpointContext(checkpoint.step, model_hash, self.rows_hash, self.anchors_hash)
        with self.record.phase("score"):
            try:
                scores = score_checkpoint(settings, model, params, moments, self.rows, self.anchors, ctx, checkpoint.weight)
            except RuntimeError as exc:
                if "out of memory" not in str(exc).lower():
                    raise
                raise UsageError(
                    f"out of memory while scoring {checkpoint.path} on {self.device}; lower --batch-tokens "
                    f"(now {self.rows_budget} padded tokens per batch) or --max-length"
                ) from None
        self.models.append({"step": checkpoint.step, "path": str(checkpoint.path), "weight": checkpoint.weight, "route": ctx.route})
        self.record.add_model(f"checkpoint-{checkpoint.step}", str(checkpoint.path), model_hash or checkpoint_hash(checkpoint),
                              weight=checkpoint.weight, parameters=params.describe())
        del model
        return scores

    def _open_store(self):
        from dyn.core.distributed import barrier, broadcast_object, world
        from dyn.core.hashing import json_sha256
        from dyn.influence.store import GradientStore

        w = world()
        folder = self.req.store
        if folder is None:
            output = Path(self.req.output).resolve()
            token = broadcast_object(hashlib.blake2b(str(np.random.SeedSequence().entropy).encode(), digest_size=6).hexdigest() if w.is_main else None)
            folder = str(output.with_name(f".{output.name}.dyn-grad-store-{token}"))
            self.temporary_store = folder
        settings = {"proj_dim": self.req.proj_dim, "seed": self.req.seed, "parameters": json_sha256(self.signature), "dtype": "float32"}
        store = GradientStore(folder, settings)
        if w.is_main:
            store.open(create=True)
        barrier()
        self.store = store if w.is_main else store.open(create=False)
        self.record.data["gradient_store"] = {"folder": folder if self.req.store else None, "settings": settings}

    def close(self, failed: bool = False):
        """Remove the temporary store (after every rank is done with it; at once on failure,
        when the other ranks may be stopped anywhere)."""
        from dyn.core.distributed import barrier, world

        if self.temporary_store is not None:
            if not failed:
                barrier()
            if world().is_main:
                shutil.rmtree(self.temporary_store, ignore_errors=True)

    # ---- figures

    def figures(self, combined, rule, threshold, kept, loaded) -> dict:
        from dyn.influence.scores import describe

        examples = self.rows.examples
        unscored = np.flatnonzero(~np.isfinite(combined.rows))
        return {
            "engine": self.engine,
            "similarity": self.req.similarity,
            "precondition": self.req.precondition,
            "keep_rule": rule.describe(),
            "threshold": threshold,
            "rows_scored": int(np.isfinite(combined.rows).sum()),
            "rows_kept": int(len(kept)),
            "rows_without_score": {
                "count": int(len(unscored)),
                "reasons": dict(examples.no_response),
                "dyn_index": [int(loaded.source_index[i]) for i in unscored[:UNSCORED_LISTED]],
            },
            "anchors": int(len(self.anchors)),
            "anchors_scored": int(np.isfinite(combined.anchors).sum()),
            "anchors_without_score": dict(self.anchors.examples.no_response),
            "anchor_groups": self.anchors.group_names if self.req.anchor_group_field else None,
            "checkpoints": self.models,
            "anchor_scores": {str(k): v for k, v in combined.anchor_stats.items()},
            "row_scores": describe(combined.rows),
            "parameters": {"count": len(self.signature), "numel": int(sum(np.prod(s) for _, s in self.signature))},
            "proj_dim": self.req.proj_dim if self.engine == "store" else None,
        }


def examples_hash(examples) -> str:
    """What was scored, exactly: every row's token ids and where its response starts."""
    digest = hashlib.sha256()
    digest.update(np.asarray(examples.prompt_lengths, dtype=np.int64).tobytes())
    digest.update(np.asarray(examples.response_tokens, dtype=np.int64).tobytes())
    for ids in examples.input_ids:
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _anchor_groups(anchor_loaded, field_name: str | None):
    """Each anchor's group index and the group names (sorted), or one group."""
    n = len(anchor_loaded.dataset)
    if field_name is None:
        return np.zeros(n, dtype=np.int64), ["all"]
    if field_name not in anchor_loaded.dataset.column_names:
        raise DataError(f"{anchor_loaded.source}: no column '{field_name}' (--anchor-group-field); columns are: {', '.join(anchor_loaded.dataset.column_names)}")
    labels = [str(v) for v in anchor_loaded.dataset[field_name]]
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[v] for v in labels], dtype=np.int64), names
