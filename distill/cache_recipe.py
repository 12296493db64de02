"""The `dyn distill cache` recipe: rows in -> the teacher run's example format and tokenizer ->
token ids -> every teacher checkpoint's top-k next-token log-probabilities per response token
(`distill.teacher_cache`) -> a cache folder + its run record.

A plain sequence of library calls; the cache itself checks its meta on reuse and resumes by shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dyn.core.errors import DataError, UsageError

DEFAULT_CACHE_TOP_K = 64


@dataclass
class CacheRequest:
    teacher: str
    data: str
    output: str
    top_k: int = DEFAULT_CACHE_TOP_K
    template: str | None = None
    response_field: str | None = None
    max_length: int | None = None
    batch_tokens: int | None = None
    shard_tokens: int | None = None
    device: str = "auto"
    precision: str = "auto"
    skip_bad_rows: bool = False
    split: str | None = None
    extra: dict = field(default_factory=dict)


def run_teacher_cache(req: CacheRequest) -> dict | None:
    """Build (or complete) the cache; returns the summary on rank 0 (None on other ranks)."""
    from pathlib import Path

    from dyn.core.distributed import world
    from dyn.core.embeddings import resolve_device, resolve_precision
    from dyn.core.io import read_rows
    from dyn.core.lm import build_lm_examples
    from dyn.core.models import context_length, load_model_and_tokenizer
    from dyn.core.runrecord import RunRecord, record_path
    from dyn.distill.checkpoints import trained_example_format
    from dyn.distill.teacher_cache import DEFAULT_SHARD_TOKENS, build_teacher_cache, teacher_checkpoints

    if req.top_k < 1:
        raise UsageError(f"--top-k {req.top_k}: must be at least 1")
    if Path(req.output).resolve() in (Path(req.teacher).resolve(), Path(req.data).resolve()):
        raise UsageError(f"-o {req.output}: the cache may not replace the teacher run or the data")
    w = world()
    record = RunRecord("distill cache", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    device = resolve_device(req.device)
    precision = resolve_precision(req.precision, device, flag="--precision")
    record.data["device"] = device
    checkpoints = teacher_checkpoints(req.teacher)
    with record.phase("read"):
        loaded = read_rows(req.data, skip_bad_rows=req.skip_bad_rows, split=req.split)
    with record.phase("tokenize"):
        model, tokenizer = load_model_and_tokenizer(str(checkpoints[0].path), flag="--teacher")
        fmt, saved_length = trained_example_format(checkpoints[0].path, loaded, req.template, req.response_field)
        max_length = req.max_length or saved_length or context_length(model.config)
        if max_length > context_length(model.config):
            raise UsageError(f"--max-length {max_length}: the teacher attends over at most {context_length(model.config)} positions")
        del model
        examples, loaded = build_lm_examples(loaded, fmt, tokenizer, max_length, skip_bad_rows=req.skip_bad_rows)
    if int(examples.response_tokens.sum()) == 0:
        raise DataError(f"{loaded.source}: no row has a response token to cache ({dict(examples.no_response)})")
    with record.phase("cache"):
        cache = build_teacher_cache(
            req.output, req.teacher, examples, tokenizer, top_k=req.top_k, example_format=fmt.to_dict(),
            dyn_index=loaded.source_index, where=loaded.where, batch_tokens=req.batch_tokens,
            shard_tokens=req.shard_tokens or DEFAULT_SHARD_TOKENS, device=device, precision=precision,
        )
    if not w.is_main:
        return None
    figures = {
        "checkpoints": cache.steps,
        "top_k": cache.top_k,
        "precision": precision,
        "example_format": fmt.describe(),
        "tokens": examples.figures(),
        "cache": cache.figures(),
    }
    record.add_input(req.data, loaded.rows_in_source)
    for checkpoint in checkpoints:
        record.add_model(f"teacher checkpoint-{checkpoint.step}", str(checkpoint.path), cache.teacher_sha256(checkpoint.step))
    record.add_skipped(loaded.skipped)
    record.data["figures"] = figures
    run_record = record_path(req.output)
    record.write(run_record)
    return {
        "output": req.output,
        "run_record": run_record,
        "rows_in": loaded.rows_in_source,
        "rows_used": len(loaded.dataset),
        "response_tokens": int(examples.response_tokens.sum()),
        "skipped_rows": dict(loaded.skipped),
        "figures": figures,
        "timings_s": record.data["timings_s"],
    }
