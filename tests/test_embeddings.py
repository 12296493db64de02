"""Embeddings with the real bundled MiniLM: correctness against sentence-transformers, bf16
agreement, batching invariance, and the (model, text) cache."""

from __future__ import annotations

import numpy as np
import pytest

from dyn.core.embedding_cache import EmbeddingCache
from dyn.core.embeddings import TextEncoder, bundled_model_path, embed_texts, plan_batches


@pytest.fixture(scope="module")
def texts():
    import gzip
    import itertools
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "t0-mix.jsonl.gz"
    if not data.exists():
        pytest.skip("real data not found")
    with gzip.open(data, "rt") as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, 96)]
    return [r["prompt"] + "\n" + r["completion"] for r in rows]


def test_vectors_match_sentence_transformers(minilm, texts):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(bundled_model_path(), device="cpu").encode(
        texts[:48], batch_size=16, normalize_embeddings=True, convert_to_numpy=True
    )
    ours, _ = embed_texts(texts[:48], minilm)
    cosine = (ours * reference).sum(1)
    assert cosine.min() > 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_bfloat16_autocast_agrees_with_float32(minilm, texts):
    bf16 = TextEncoder(bundled_model_path(), device="cpu", precision="bfloat16")
    full, _ = embed_texts(texts, minilm)
    reduced, _ = embed_texts(texts, bf16)
    assert (full * reduced).sum(1).min() >= 0.9999


def test_batching_does_not_change_vectors(minilm, texts):
    small, _ = embed_texts(texts[:40], minilm, max_tokens=256)
    large, _ = embed_texts(texts[:40], minilm, max_tokens=20000)
    assert (small * large).sum(1).min() > 0.99999


def test_plan_batches_respects_the_budget_and_covers_every_text():
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    batches = plan_batches(lengths, max_tokens=1024, max_rows=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) <= 64
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 1024
    again = plan_batches(lengths, max_tokens=1024, max_rows=64)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_cache_makes_a_rerun_embed_nothing(minilm, texts, tmp_path):
    cache = EmbeddingCache(tmp_path, minilm.content_hash, minilm.settings(), minilm.dim)
    first, stats = embed_texts(texts[:30], minilm, cache)
    assert stats.embedded == 30 and stats.from_cache == 0
    second, stats = embed_texts(texts[:30] + texts[30:35], minilm, cache)
    assert stats.from_cache == 30 and stats.embedded == 5
    np.testing.assert_array_equal(second[:30], first)


def test_identical_texts_are_embedded_once_and_get_identical_vectors(minilm):
    vectors, stats = embed_texts(["same text", "other text", "same text"], minilm)
    assert stats.unique_texts == 2 and stats.embedded == 2
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_cache_for_other_settings_is_not_reused(minilm, tmp_path):
    cache = EmbeddingCache(tmp_path, minilm.content_hash, minilm.settings(), minilm.dim)
    embed_texts(["a cached text"], minilm, cache)
    other = EmbeddingCache(tmp_path, minilm.content_hash, {**minilm.settings(), "max_length": 17}, minilm.dim)
    found, _ = other.lookup([b"x" * 16])
    assert not found.any()
    assert other.folder != cache.folder
    # A folder whose meta was tampered with is rebuilt, never silently reused.
    meta = cache.folder / "meta.json"
    meta.write_text(meta.read_text().replace('"pooling": "mean"', '"pooling": "cls"'))
    again = EmbeddingCache(tmp_path, minilm.content_hash, minilm.settings(), minilm.dim)
    _, stats = embed_texts(["a cached text"], minilm, again)
    assert stats.from_cache == 0 and stats.embedded == 1


def test_unreadable_model_folder_is_a_usage_error(tmp_path):
    from dyn.core.errors import UsageError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot load"):
        TextEncoder(str(tmp_path))
    with pytest.raises(UsageError, match="not a model folder"):
        TextEncoder(str(tmp_path / "missing"))
