"""One checkpoint's scores s_c(z, G) for every row and anchor, by one of three engines that give
the same numbers at different cost (DESIGN §4.2):

- directional (default for dot products): ḡ_{c,G} from batched backward passes over the anchors,
  then every row's exact ⟨∇ℓ_i, ḡ⟩ per batch, from layer hooks where they cover every scored
  parameter, else from one forward-mode JVP (influence.directional);
- store (needed for cosine and Adam's Γ_c): projected per-sample gradients from layer hooks,
  written to a gradient store by rank and read back (influence.features, influence.store);
- exact (the oracle): batch-size-1 autograd, full flattened gradients in memory (influence.exact).

Rows are shared out by batch over the ranks (core.lm_batches); anchors' mean gradients are
computed by every rank over the same batches, so every rank holds the same ḡ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dyn.core.errors import DataError, UsageError
from dyn.core.lm_batches import RowBatches, map_batches
from dyn.influence.scores import CheckpointScores, feature_scores, group_means, unit_rows

ENGINES = ("directional", "store", "exact")


def choose_engine(engine: str | None, similarity: str, precondition: str) -> str:
    """The engine to run: directional for plain dot products, store when cosine or Adam needs
    per-sample gradients; a UsageError for combinations the directional trick cannot compute."""
    if engine in (None, "auto"):
        return "store" if similarity == "cosine" or precondition == "adam" else "directional"
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "directional" and precondition == "adam":
        raise UsageError(
            "--engine directional cannot apply --precondition adam: LESS's Adam direction is not "
            "linear in the gradient, so it is no directional derivative; use --engine store (or exact)"
        )
    if engine == "directional" and similarity == "cosine":
        raise UsageError("--similarity cosine needs each row's gradient norm, which a directional derivative does not give; use --engine store (or exact)")
    return engine


@dataclass
class EngineSettings:
    engine: str
    similarity: str = "dot"
    proj_dim: int | None = 1024
    seed: int = 0
    store: object = None  # an opened influence.store.GradientStore (store engine)


@dataclass
class CheckpointContext:
    """What the engines need to know about the checkpoint being scored."""

    step: int
    model_hash: str = ""
    rows_hash: str = ""
    anchors_hash: str = ""
    route: str = ""  # set by the engine: how the numbers were computed


def score_checkpoint(settings: EngineSettings, model, params, moments, rows: RowBatches, anchors: RowBatches,
                     ctx: CheckpointContext, weight: float) -> CheckpointScores | None:
    """s_c for rows and anchors (None on ranks other than 0 for the store engine, which scores on
    rank 0 from the store)."""
    run = {"directional": _directional, "exact": _exact, "store": _store}[settings.engine]
    result = run(settings, model, params, moments, rows, anchors, ctx)
    if result is None:
        return None
    row_scores, anchor_scores = result
    return CheckpointScores(ctx.step, weight, row_scores, anchor_scores)


# --------------------------------------------------------------------------- checks and assembly

def check_finite(source: RowBatches, positions: np.ndarray, losses, values, step: int) -> None:
    """A DataError naming the first row that has response tokens and a non-finite loss or value."""
    has = source.has_response(positions)
    losses = np.asarray(losses, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).reshape(len(positions), -1)
    for i in np.flatnonzero(has):
        if not np.isfinite(losses[i]):
            raise DataError(f"{source.where(int(positions[i]))}: non-finite loss ({losses[i]}) at checkpoint step {step}")
        if not np.isfinite(values[i]).all():
            raise DataError(f"{source.where(int(positions[i]))}: non-finite gradient at checkpoint step {step}")


def assemble(source: RowBatches, per_batch: list, width: int) -> np.ndarray:
    """(rows, width) from per-batch (B, width) arrays in batch order; NaN where nothing came."""
    out = np.full((len(source), width), np.nan)
    for positions, values in zip(source.batches, per_batch):
        out[positions] = values
    return out


def _where_in_batches(source: RowBatches, batch_ids: list[int], batch: int, row: int) -> str:
    return source.where(int(source.batches[batch_ids[batch]][row]))


# --------------------------------------------------------------------------- directional

def _directional(settings, model, params, moments, rows, anchors, ctx):
    from dyn.influence.directional import (
        directional_derivatives, hooked_directional_derivatives, hooks_cover, use_eager_attention,
    )
    from dyn.influence.exact import unflatten

    derivatives = hooked_directional_derivatives if hooks_cover(model, params) else directional_derivatives
    ctx.route = "layer hooks" if derivatives is hooked_directional_derivatives else "forward-mode JVP"
    if derivatives is directional_derivatives:
        use_eager_attention(model)
    directions = [unflatten(g, params) for g in anchor_mean_gradients(model, params, anchors, ctx.step)]

    def scores_of(source):
        def compute(j, batch):
            losses, values = derivatives(model, params, batch, directions)
            check_finite(source, source.batches[j], losses, values, ctx.step)
            return values.cpu().numpy()
        return assemble(source, map_batches(source, compute, f"step {ctx.step}: directional scores"), len(directions))

    return scores_of(rows), scores_of(anchors)


def anchor_mean_gradients(model, params, anchors: RowBatches, step: int) -> list[torch.Tensor]:
    """ḡ_G (flat) for each anchor group, over that group's batches."""
    from dyn.influence.mean_gradient import NonFiniteRow, mean_gradient

    means = []
    for g, name in enumerate(anchors.group_names):
        ids = anchors.group_batches(g)
        try:
            mean = mean_gradient(model, params, [anchors.batch(j) for j in ids])
        except NonFiniteRow as exc:
            raise DataError(f"{_where_in_batches(anchors, ids, exc.batch, exc.row)}: non-finite {exc.what} at checkpoint step {step}") from None
        if mean.rows == 0:
            raise DataError(f"anchor group {name!r}: no anchor row has a response token to take a gradient of")
        means.append(mean.vector)
    return means


# --------------------------------------------------------------------------- features: exact and store

def _centres(settings, anchor_plain: np.ndarray, anchors: RowBatches) -> np.ndarray:
    """The anchor side of each group: mean gradient (dot) or mean unit gradient (cosine)."""
    x = unit_rows(anchor_plain.astype(np.float64)) if settings.similarity == "cosine" else anchor_plain
    centres = group_means(x, anchors.groups, list(range(len(anchors.group_names))))
    for g, name in enumerate(anchors.group_names):
        members = anchor_plain[anchors.groups == g]
        if not np.isfinite(members).all(axis=1).any():
            raise DataError(f"anchor group {name!r}: no anchor row has a response token to take a gradient of")
    return centres


def _exact(settings, model, params, moments, rows, anchors, ctx):
    from dyn.influence.exact import adam_precondition_flat, exact_row_gradients

    ctx.route = "batch-size-1 autograd"

    def gradients(source, both):
        def compute(j, batch):
            losses, grads = exact_row_gradients(model, params, batch)
            conditioned = adam_precondition_flat(grads, params, moments) if moments is not None else grads
            grads, conditioned = grads.cpu(), conditioned.cpu()
            check_finite(source, source.batches[j], losses.cpu(), conditioned, ctx.step)
            return (grads.numpy(), conditioned.numpy()) if both else conditioned.numpy()
        return map_batches(source, compute, f"step {ctx.step}: exact gradients")

    anchor_parts = gradients(anchors, both=True)
    width = params.numel
    anchor_plain = assemble(anchors, [p for p, _ in anchor_parts], width)
    anchor_conditioned = assemble(anchors, [c for _, c in anchor_parts], width)
    row_conditioned = assemble(rows, gradients(rows, both=False), width)
    centres = _centres(settings, anchor_plain, anchors)
    return (feature_scores(row_conditioned, centres, settings.similarity),
            feature_scores(anchor_conditioned, centres, settings.similarity))


def _store(settings, model, params, moments, rows, anchors, ctx):
    from dyn.core.distributed import barrier, broadcast_object, world
    from dyn.influence.features import GradientFeatures

    features = GradientFeatures(model, params, settings.proj_dim, settings.seed, moments)
    kind = "adam" if moments is not None else "plain"
    ctx.route = f"projected per-sample gradients ({features.dim} dims)"
    store = settings.store
    row_part = store.part(ctx.step, ctx.model_hash, "rows", kind, ctx.rows_hash)
    anchor_parts = {"plain": store.part(ctx.step, ctx.model_hash, "anchors", "plain", ctx.anchors_hash)}
    if moments is not None:
        anchor_parts["adam"] = store.part(ctx.step, ctx.model_hash, "anchors", "adam", ctx.anchors_hash)

    w = world()
    jobs = [(rows, {kind: row_part}), (anchors, anchor_parts)]
    for source, parts in jobs:
        complete = broadcast_object(all(p.is_complete() for p in parts.values()) if w.is_main else None)
        if complete:
            continue
        if w.is_main:
            for part in parts.values():
                part.reset()
        barrier()
        _write_features(features, source, parts, ctx.step, w)
        barrier()
        if w.is_main:
            for part in parts.values():
                part.finish(len(source), features.dim)
        barrier()
    if not w.is_main:
        return None
    anchor_plain = anchor_parts["plain"].read()
    anchor_conditioned = anchor_parts[kind].read()
    centres = _centres(settings, anchor_plain, anchors)
    row_features = row_part.read()
    return (feature_scores(row_features, centres, settings.similarity),
            feature_scores(anchor_conditioned, centres, settings.similarity))


def _write_features(features, source: RowBatches, parts: dict, step: int, w) -> None:
    """This rank's batches through the hooks; one shard per part."""
    from dyn.core import progress

    positions, values = [], {name: [] for name in parts}
    with progress.progress(f"step {step}: projected gradients", total=len(source.batches), unit="batches") as bar:
        for j in range(w.rank, len(source.batches), w.size):
            out = features.compute(source.batch(j), plain="plain" in parts and "adam" in parts)
            named = {"adam": out["features"], "plain": out.get("plain", out["features"])} if "adam" in parts else {"plain": out["features"]}
            for name in parts:
                value = named[name].cpu().numpy()
                check_finite(source, source.batches[j], out["losses"].cpu().numpy(), value, step)
                values[name].append(value)
            positions.append(source.batches[j])
            bar.advance(w.size)
    index = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    for name, part in parts.items():
        stacked = np.concatenate(values[name]) if values[name] else np.zeros((0, features.dim), np.float32)
        part.write_shard(w.rank, w.size, index, stacked)
