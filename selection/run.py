"""The hmin selection recipe: rows in -> vectors (cached) -> greedy order -> rows out + run record.

A plain, explicit sequence of library calls (torchtune-style); `dyn select --method hmin` parses
flags into a `SelectRequest` and calls `run_hmin_selection`. Library users can do the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dyn.core.errors import DataError, UsageError


@dataclass
class SelectRequest:
    data: str
    output: str
    k: int | None = None
    fraction: float | None = None
    text_field: str | None = None
    template: str | None = None
    embedding_model: str | None = None
    embedding_field: str | None = None
    metric: str = "cosine"
    start: str = "random"
    seed: int = 0
    storage: str = "float32"
    device: str = "auto"
    embed_precision: str = "auto"
    batch_tokens: int | None = None
    group_field: str | None = None
    stratify: str | None = None
    stratify_clusters: int | None = None
    near_dup_radius: float = 0.05
    cache_dir: str | None = None
    no_cache: bool = False
    skip_bad_rows: bool = False
    split: str | None = None
    score_only: bool = False
    plot: bool = False
    extra: dict = field(default_factory=dict)


def check_budget_flags(k: int | None, fraction: float | None) -> None:
    """`-k` or `--fraction`, exactly one, each in range."""
    if k is not None and fraction is not None:
        raise UsageError("-k and --fraction are alternatives; give one")
    if k is None and fraction is None:
        raise UsageError("say how many rows to keep: -k N or --fraction F")
    if fraction is not None and not 0 < fraction <= 1:
        raise UsageError(f"--fraction {fraction}: must be in (0, 1]")
    if k is not None and k < 1:
        raise UsageError(f"-k {k}: must be at least 1")


def resolve_budget(k: int | None, fraction: float | None, rows: int, source: str = "the input") -> int:
    """The number of rows to keep from `-k` or `--fraction`, given the usable rows."""
    check_budget_flags(k, fraction)
    if fraction is not None:
        return max(1, int(round(fraction * rows)))
    if k > rows:
        raise UsageError(f"-k {k}: {source} has only {rows} usable rows")
    return k


def check_request(req: SelectRequest) -> None:
    """Flag checks that need no data, so a bad command fails before any work."""
    from dyn.core.io import check_output_path

    if req.score_only:
        if req.k is not None or req.fraction is not None:
            raise UsageError("dyn score keeps every row (each gets its rank in the full greedy order); -k and --fraction belong to dyn select")
    else:
        check_budget_flags(req.k, req.fraction)
    if req.embedding_field and (req.embedding_model or req.text_field or req.template):
        raise UsageError("--embedding-field gives the vectors; do not combine it with --embedding-model, --text-field or --template")
    if req.stratify and req.stratify_clusters:
        raise UsageError("--stratify (a label column) and --stratify-clusters (k-means groups) are alternatives; give one")
    if req.stratify_clusters is not None and req.stratify_clusters < 1:
        raise UsageError(f"--stratify-clusters {req.stratify_clusters}: must be at least 1")
    if req.batch_tokens is not None and req.batch_tokens < 16:
        raise UsageError(f"--batch-tokens {req.batch_tokens}: must be at least 16")
    if req.plot:
        from dyn.core.plot import check_plotting_available

        check_plotting_available()
    check_output_path(req.output, [req.data])


def run_hmin_selection(req: SelectRequest) -> dict | None:
    """Run the whole selection; returns the summary on rank 0 (None on other ranks)."""
    from dyn.core.distributed import world
    from dyn.core.embeddings import resolve_device
    from dyn.core.io import check_output_columns, read_rows, write_rows
    from dyn.core.runrecord import RunRecord
    from dyn.selection.hmin import HminSettings, select_hmin
    from dyn.core.plot import score_histogram
    from dyn.selection.result import finish_run, in_input_order, output_rows

    check_request(req)
    w = world()
    record = RunRecord(("score" if req.score_only else "select") + " --method hmin", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
    check_output_columns(loaded.dataset.data.table.schema, req.output)
    vectors, loaded = _row_vectors(loaded, req, record)
    k = len(loaded.dataset) if req.score_only else resolve_budget(req.k, req.fraction, len(loaded.dataset), loaded.source)
    groups = _labels(loaded, req.stratify or req.group_field)
    if not w.is_main:
        return None
    if req.stratify_clusters:
        groups = _cluster_groups(vectors, req, record)

    device = resolve_device(req.device)
    settings = HminSettings(
        k=k, metric=req.metric, start=req.start, seed=req.seed, storage=req.storage,
        device=device, near_duplicate_radius=req.near_dup_radius,
    )
    record.data["device"] = device
    record.data["seeds"] = {"start_and_random_subset": req.seed}
    stratify = bool(req.stratify or req.stratify_clusters)
    result = select_hmin(vectors, settings, groups=groups, stratify=stratify, phase=record.phase)
    inserted = np.asarray([np.nan if v is None else v for v in result.columns["dyn_hmin_at"]], dtype=np.float64)
    result.figures["histogram"] = score_histogram(inserted)
    if req.score_only:
        result = in_input_order(result)
    with record.phase("write"):
        write_rows(output_rows(loaded, result), req.output)
    plot = None
    if req.plot:
        from dyn.core.plot import plot_scores_beside

        plot = plot_scores_beside(req.output, inserted, title=f"hmin insertion distances ({loaded.source})",
                                  xlabel=f"{req.metric} distance to the rows chosen before")
    record.add_input(req.data, loaded.rows_in_source)
    return finish_run(record, loaded, req.output, result.figures, plot=plot, rows_out=len(result.rows))


def _row_vectors(loaded, req: SelectRequest, record):
    """The vectors to select over: a precomputed column, or embeddings of each row's text."""
    from dyn.core.vectors import vectors_from_column

    if req.embedding_field:
        with record.phase("read"):
            return vectors_from_column(
                loaded, req.embedding_field, require_nonzero=req.metric == "cosine", skip_bad_rows=req.skip_bad_rows
            )
    from dyn.core.embedding_cache import EmbeddingCache
    from dyn.core.embeddings import TextEncoder, bundled_model_path, default_cache_root, embed_texts
    from dyn.core.text import extract_texts, resolve_text_spec

    spec = resolve_text_spec(loaded.dataset.column_names, req.text_field, req.template, loaded.source)
    with record.phase("load model"):
        encoder = TextEncoder(req.embedding_model or bundled_model_path(), device=req.device, precision=req.embed_precision)
    with record.phase("read"):
        texts, loaded = extract_texts(loaded, spec, skip_bad_rows=req.skip_bad_rows, chat_tokenizer=encoder.tokenizer)
    cache = None
    if not req.no_cache:
        cache = EmbeddingCache(req.cache_dir or default_cache_root(), encoder.content_hash, encoder.settings(), encoder.dim)
    with record.phase("embed"):
        vectors, stats = embed_texts(texts, encoder, cache, max_tokens=req.batch_tokens)
    record.add_model(
        "embedding", encoder.path, encoder.content_hash, text=spec.describe(), **encoder.settings(),
        device=encoder.device, cache=str(cache.folder) if cache else None,
    )
    record.data["figures_embedding"] = {
        "texts": stats.rows, "unique_texts": stats.unique_texts,
        "from_cache": stats.from_cache, "embedded": stats.embedded,
    }
    return vectors, loaded


def _cluster_groups(vectors: np.ndarray, req: SelectRequest, record) -> np.ndarray:
    """k-means groups (FAISS) over the vectors the selection uses, for when no label column exists."""
    from dyn.selection.hmin import prepare_vectors
    from dyn.selection.neighbours import kmeans_groups

    if req.stratify_clusters > len(vectors):
        raise UsageError(f"--stratify-clusters {req.stratify_clusters}: more clusters than the {len(vectors)} rows")
    with record.phase("cluster"):
        return kmeans_groups(prepare_vectors(vectors, req.metric), req.stratify_clusters, req.seed)


def _labels(loaded, column: str | None) -> np.ndarray | None:
    if column is None:
        return None
    if column not in loaded.dataset.column_names:
        raise DataError(f"{loaded.source}: no column '{column}' to group by; columns are: {', '.join(loaded.dataset.column_names)}")
    return np.asarray(loaded.dataset[column], dtype=object)
