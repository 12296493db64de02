"""GPU paths (skipped where no CUDA device is present; CI has none). Run by hand on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest

from dyn.selection.farthest_point import farthest_point_order

pytestmark = pytest.mark.gpu


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cuda_traversal_equals_cpu_order():
    x = _unit_rows(20000, 384, 0)
    cpu = farthest_point_order(x, 300, 7)
    gpu = farthest_point_order(x, 300, 7, device="cuda")
    np.testing.assert_array_equal(gpu.order, cpu.order)
    np.testing.assert_allclose(gpu.insertion_distance, cpu.insertion_distance, rtol=1e-4)


def test_cuda_half_storage_stays_close():
    from dyn.selection.neighbours import min_pairwise_distance

    x = _unit_rows(20000, 384, 1)
    reference = farthest_point_order(x, 200, 0)
    half = farthest_point_order(x, 200, 0, device="cuda", storage="float16")
    assert min_pairwise_distance(x[half.order]) == pytest.approx(min_pairwise_distance(x[reference.order]), rel=5e-3)


def test_cuda_embeddings_agree_with_cpu():
    from dyn.core.embeddings import TextEncoder, bundled_model_path, embed_texts

    texts = [f"sentence number {i} about topic {i % 7}" for i in range(64)]
    cpu, _ = embed_texts(texts, TextEncoder(bundled_model_path(), device="cpu", precision="float32"))
    gpu, _ = embed_texts(texts, TextEncoder(bundled_model_path(), device="cuda", precision="bfloat16"))
    assert (cpu * gpu).sum(1).min() > 0.999
