"""The influence engines against the exact oracle (batch-size-1 autograd, flattened gradients) on
tiny GPT-2 models built here: full weights and LoRA adapters, padded batches, masked prompts, a row
with no response token. Also: LESS's Adam direction, the projection's unbiasedness and seeding,
the gradient store on disk, and the score arithmetic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dyn.core.errors import DataError, UsageError
from dyn.influence.adam import AdamMoments, adam_direction
from dyn.influence.directional import directional_derivatives, use_eager_attention
from dyn.influence.engines import choose_engine
from dyn.influence.exact import adam_precondition_flat, exact_row_gradients, unflatten
from dyn.influence.features import GradientFeatures
from dyn.influence.mean_gradient import mean_gradient
from dyn.influence.parameters import canonical_name, select_parameters
from dyn.influence.projection import block_projection, block_sides
from dyn.influence.scores import CheckpointScores, KeepRule, auroc, combine, keep_rows
from dyn.influence.store import GradientStore

VOCAB = 97


# One intra-op thread for the whole module: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_gpt2(seed: int = 0, dtype=torch.float32, attn: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB,
                        bos_token_id=0, eos_token_id=1, attn_implementation=attn)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts with B = 0; give it weight so every path carries gradient
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def padded_batch(seed: int = 0, rows: int = 6, length: int = 14):
    """Right-padded rows of different lengths, prompts masked, row 2 with no response token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for r in range(rows):
        n = length - (r % 4) * 2
        mask[r, n:] = 0
        ids[r, n:] = 1
        labels[r, n:] = -100
        labels[r, : 3 + r % 3] = -100
    if rows > 2:
        labels[2, :] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.nanmax(np.abs(a - b)) / np.nanmax(np.abs(b)))


@pytest.fixture(params=["full", "lora"])
def model(request):
    return tiny_gpt2() if request.param == "full" else tiny_lora()


# --------------------------------------------------------------------------- directional

def test_directional_equals_exact_within_1e4_in_float32(model):
    batch = padded_batch()
    params = select_parameters(model)
    losses, grads = exact_row_gradients(model, params, batch)
    anchors = mean_gradient(model, params, [padded_batch(seed=7)])
    direction = torch.randn(params.numel, generator=torch.Generator().manual_seed(3))
    jvp_losses, derivatives = directional_derivatives(model, params, batch, [unflatten(anchors.vector, params), unflatten(direction, params)])
    exact = torch.stack([grads.double() @ anchors.vector.double(), grads.double() @ direction.double()], dim=1)
    assert torch.isnan(derivatives[2]).all() and torch.isnan(exact[2]).all(), "a row with no response token gets no score"
    for g in range(2):
        assert relative_error(derivatives[:, g], exact[:, g]) < 1e-4
    np.testing.assert_allclose(jvp_losses.numpy(), losses.numpy(), rtol=1e-5)


def test_hooked_directional_equals_exact_for_several_directions_at_once(model):
    from dyn.influence.directional import hooked_directional_derivatives, hooks_cover

    batch = padded_batch(seed=12)
    params = select_parameters(model)
    assert hooks_cover(model, params)
    _, grads = exact_row_gradients(model, params, batch)
    directions = torch.randn(3, params.numel, generator=torch.Generator().manual_seed(4))
    _, values = hooked_directional_derivatives(model, params, batch, [unflatten(d, params) for d in directions])
    assert torch.isnan(values[2]).all()
    for g in range(3):
        assert relative_error(values[:, g], grads @ directions[g]) < 1e-5


def test_directional_equals_exact_to_1e6_in_float64():
    """A float64 model pins the agreement tighter; the cross-entropy itself stays float32
    (core.lm.per_token_losses), which bounds it near float32's epsilon."""
    model = tiny_gpt2(dtype=torch.float64)
    batch = padded_batch(seed=1)
    params = select_parameters(model)
    _, grads = exact_row_gradients(model, params, batch)
    direction = torch.randn(params.numel, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, derivatives = directional_derivatives(model, params, batch, [unflatten(direction, params)])
    assert relative_error(derivatives[:, 0], grads @ direction) < 1e-6


def test_modules_regex_scores_only_matching_parameters():
    model = tiny_gpt2()
    params = select_parameters(model, r"h\.1\.mlp")
    assert params.keys and all(".h.1.mlp." in k for k in params.keys)
    batch = padded_batch()
    _, grads = exact_row_gradients(model, params, batch)
    direction = torch.randn(params.numel, generator=torch.Generator().manual_seed(2))
    _, derivatives = directional_derivatives(model, params, batch, [unflatten(direction, params)])
    assert relative_error(derivatives[:, 0], grads @ direction) < 1e-4
    with pytest.raises(UsageError, match="matches no parameter"):
        select_parameters(model, "nothing-like-this")


def test_lora_checkpoint_scores_its_adapters_with_canonical_names():
    params = select_parameters(tiny_lora())
    assert params.keys and all(".lora_" in k for k in params.keys)
    assert all(not k.startswith("base_model.") for k in params.keys)
    assert canonical_name("base_model.model.module.transformer.h.0.attn.c_attn.lora_A.default.weight") == "transformer.h.0.attn.c_attn.lora_A.default.weight"


def test_sdpa_model_is_switched_to_eager_for_forward_mode():
    model = tiny_gpt2(attn="sdpa")
    params = select_parameters(model)
    direction = [torch.ones_like(t) for t in params.tensors]
    assert use_eager_attention(model) is True
    _, derivatives = directional_derivatives(model, params, padded_batch(), [direction])
    assert torch.isfinite(derivatives[[0, 1, 3]]).all()


def test_mean_gradient_is_the_mean_of_exact_row_gradients(model):
    batch_a, batch_b = padded_batch(seed=4), padded_batch(seed=5, rows=3)
    params = select_parameters(model)
    mean = mean_gradient(model, params, [batch_a, batch_b])
    exact = torch.cat([exact_row_gradients(model, params, b)[1] for b in (batch_a, batch_b)])
    exact = exact[~torch.isnan(exact).any(dim=1)]
    assert mean.rows == len(exact) == 7
    assert relative_error(mean.vector, exact.mean(dim=0)) < 1e-5


# --------------------------------------------------------------------------- store: hooks, Adam, projection

def test_hooked_per_sample_gradients_equal_exact_ones(model):
    """Without projection the store's features are the per-sample gradients themselves: Linear,
    HF Conv1D, tied embedding + LM head, position embedding, LayerNorm, biases, LoRA."""
    batch = padded_batch(seed=2)
    params = select_parameters(model)
    _, grads = exact_row_gradients(model, params, batch)
    features = GradientFeatures(model, params, proj_dim=None).compute(batch)["features"]
    assert features.shape == grads.shape
    assert torch.isnan(features[2]).all()
    assert relative_error(features, grads) < 1e-5


def _adam_moments(model, steps: int = 3) -> AdamMoments:
    """Moments from real AdamW steps on the model's trainable parameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, betas=(0.8, 0.99))
    batch = padded_batch(seed=9)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from dyn.core.lm import per_row_loss

        losses = per_row_loss(logits, batch["labels"])
        losses[~torch.isnan(losses)].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    by_id = {id(p): canonical_name(n) for n, p in trainable}
    state = optimizer.state
    return AdamMoments(
        {by_id[id(p)]: state[p]["exp_avg"] for _, p in trainable},
        {by_id[id(p)]: state[p]["exp_avg_sq"] for _, p in trainable},
        {by_id[id(p)]: (0.8, 0.99) for _, p in trainable},
    )


def test_adam_direction_is_less_formula():
    g, m, v = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([0.1, 0.1, -0.3]), torch.tensor([0.01, 0.04, 0.09])
    expected = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
    torch.testing.assert_close(adam_direction(g, m, v, 0.9, 0.999), expected)


def test_store_applies_adam_per_sample_like_the_oracle(model):
    moments = _adam_moments(model)
    batch = padded_batch(seed=3)
    params = select_parameters(model)
    _, grads = exact_row_gradients(model, params, batch)
    conditioned = adam_precondition_flat(grads, params, moments)
    out = GradientFeatures(model, params, proj_dim=None, moments=moments).compute(batch, plain=True)
    assert relative_error(out["features"], conditioned) < 1e-5
    assert relative_error(out["plain"], grads) < 1e-5
    assert relative_error(conditioned, grads) > 0.1, "Γ must change the gradient"


def test_adam_moments_missing_for_a_parameter_is_a_clear_error():
    model = tiny_gpt2()
    moments = _adam_moments(model)
    del moments.exp_avg["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(DataError, match="no Adam moments for parameter 'transformer.h.0.mlp.c_fc.weight'"):
        moments.aligned(select_parameters(model))


def _projected(grads: torch.Tensor, params, proj_dim: int, seed: int) -> torch.Tensor:
    """Exact per-sample gradients (B, D) projected block by block, materialised: the reference for
    what the store's factored hooks compute without forming the gradients."""
    parts = []
    for key, tensor, block in zip(params.keys, params.tensors, unflatten_rows(grads, params)):
        parts.append(block_projection(key, tuple(tensor.shape), proj_dim, seed).project_full(block))
    return torch.cat(parts, dim=1)


def unflatten_rows(grads: torch.Tensor, params):
    start = 0
    for t in params.tensors:
        yield grads[:, start:start + t.numel()].reshape(grads.shape[0], *t.shape)
        start += t.numel()


def test_factored_projection_from_hooks_equals_projecting_the_exact_gradient(model):
    batch = padded_batch(seed=8)
    params = select_parameters(model)
    _, grads = exact_row_gradients(model, params, batch)
    features = GradientFeatures(model, params, proj_dim=64, seed=11).compute(batch)["features"]
    reference = _projected(grads, params, 64, 11)
    assert features.shape[1] < grads.shape[1] / 4
    assert relative_error(features, reference) < 1e-5


def test_projected_inner_products_are_unbiased_and_tighten_with_dimension():
    model = tiny_gpt2(seed=1)
    params = select_parameters(model)
    _, grads = exact_row_gradients(model, params, padded_batch(seed=6, rows=2))
    grads = grads.double()
    exact = float(grads[0] @ grads[1])
    errors = {}
    for proj_dim in (16, 256):
        values = []
        for seed in range(60):
            f = _projected(grads.float(), params, proj_dim, seed).double()
            values.append(float(f[0] @ f[1]))
        values = np.asarray(values)
        standard_error = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - exact) < 4 * standard_error, (proj_dim, values.mean(), exact, standard_error)
        errors[proj_dim] = float(np.sqrt(np.mean((values - exact) ** 2)))
    assert errors[256] < errors[16] / 2, errors


def test_projection_is_seeded_by_seed_and_parameter_name():
    a = block_projection("h.0.attn.c_attn.weight", (32, 96), 64, seed=3)
    b = block_projection("h.0.attn.c_attn.weight", (32, 96), 64, seed=3)
    c = block_projection("h.0.attn.c_attn.weight", (32, 96), 64, seed=4)
    d = block_projection("h.1.attn.c_attn.weight", (32, 96), 64, seed=3)
    assert a.size == 64 and a.sides == (8, 8)
    assert torch.equal(a.matrices[0], b.matrices[0]) and torch.equal(a.matrices[1], b.matrices[1])
    assert not torch.equal(a.matrices[0], c.matrices[0]) and not torch.equal(a.matrices[1], d.matrices[1])
    assert block_sides((3, 1000), 64) == (3, 21) and block_sides((50,), 64) == (50,)


# --------------------------------------------------------------------------- engine choice, store folder, scores

def test_engine_choice():
    assert choose_engine(None, "dot", "none") == "directional"
    assert choose_engine(None, "cosine", "none") == "store"
    assert choose_engine(None, "dot", "adam") == "store"
    with pytest.raises(UsageError, match="not linear"):
        choose_engine("directional", "dot", "adam")
    with pytest.raises(UsageError, match="cosine"):
        choose_engine("directional", "cosine", "none")


def test_store_round_trip_and_refusal_of_other_settings(tmp_path):
    folder = tmp_path / "store"
    store = GradientStore(folder, {"proj_dim": 64, "seed": 0}).open(create=True)
    part = store.part(5, "a" * 64, "rows", "plain", "b" * 64)
    assert not part.is_complete()
    part.reset()
    features = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 1e-5
    features[3] = np.nan
    part.write_shard(1, 2, np.array([4, 0]), features[[4, 0]])
    part.write_shard(0, 2, np.array([1, 2, 3]), features[[1, 2, 3]])
    part.finish(rows=5, dim=7)
    assert part.is_complete()
    back = GradientStore(folder, {"proj_dim": 64, "seed": 0}).open(create=False).part(5, "a" * 64, "rows", "plain", "b" * 64).read()
    assert np.isnan(back[3]).all()
    keep = [0, 1, 2, 4]
    np.testing.assert_allclose(back[keep], features[keep], rtol=2e-3, atol=0)  # tiny gradients survive float16
    with pytest.raises(UsageError, match="other settings \\(proj_dim\\)"):
        GradientStore(folder, {"proj_dim": 128, "seed": 0}).open(create=True)
    assert json.loads((folder / "meta.json").read_text())["settings"] == {"proj_dim": 64, "seed": 0}


def test_combine_weights_checkpoints_then_takes_the_max_over_groups():
    a = CheckpointScores(10, 2.0, np.array([[1.0, 0.0], [0.0, 3.0], [np.nan, np.nan]]), np.array([[1.0, 1.0]]))
    b = CheckpointScores(20, 0.5, np.array([[4.0, 0.0], [0.0, -2.0], [np.nan, np.nan]]), np.array([[0.0, 2.0]]))
    combined = combine([a, b])
    np.testing.assert_allclose(combined.rows[:2], [4.0, 5.0])
    assert np.isnan(combined.rows[2])
    np.testing.assert_allclose(combined.per_checkpoint[10][:2], [1.0, 3.0])
    assert combined.anchor_stats["combined"]["mean"] == 3.0


def test_keep_rows_rules():
    scores = np.array([0.5, np.nan, 2.0, 1.0, 2.0])
    kept, threshold = keep_rows(scores, np.array([0.0, 2.0]), KeepRule())
    assert threshold == 1.0 and kept.tolist() == [2, 4, 3]
    assert keep_rows(scores, np.array([0.0]), KeepRule(k=2))[0].tolist() == [2, 4]
    assert keep_rows(scores, np.array([0.0]), KeepRule(fraction=0.5))[0].tolist() == [2, 4]
    assert keep_rows(scores, np.array([0.0]), KeepRule(threshold=0.6))[0].tolist() == [2, 4, 3]


def test_auroc():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
