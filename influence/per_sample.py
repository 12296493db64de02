"""Per-sample gradients of weight matrices and vectors, from forward and backward hooks.

For the layers that own the scored parameters — `nn.Linear` (LoRA adapters are two of them),
Hugging Face `Conv1D`, `nn.Embedding`, `nn.LayerNorm` — a forward hook keeps the layer's input and
a tensor hook on its output receives the output's gradient in the backward pass. A row's gradient
of a weight matrix is then Σ_t u_t v_tᵀ over its tokens (Linear: u = output gradient, v = input;
Conv1D stores the transpose; Embedding: u = the one-hot token, v = output gradient), of a bias
Σ_t u_t, of a LayerNorm weight Σ_t u_t ⊙ x̂_t. Tied weights (GPT-2's embedding and LM head) collect
both layers' contributions in one block.

The backward pass runs on Σ_i ℓ_i: rows never mix in a causal LM, so each row's activation
gradients are those of its own loss. No parameter requires grad meanwhile — the first hooked
output is made a leaf that does — so the backward computes activation gradients only.

A `GradientSink` receives the per-token factors; `influence.store` has the two sinks (project at
once, or materialise the gradient first when Γ_c is non-linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dyn.core.errors import UsageError
from dyn.influence.losses import batch_row_losses, rows_with_response
from dyn.influence.parameters import ScoredParameters, no_parameter_gradients


@dataclass
class Block:
    """One scored parameter as the hooks see it: its key, position in the flattening order and shape."""

    key: str
    index: int
    shape: tuple[int, ...]


def conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def hookable_layers(model, params: ScoredParameters) -> tuple[list, list[Block]]:
    """(module, {"weight"|"bias": Block}) for every supported layer owning a scored parameter, and
    the blocks in flattening order; a UsageError names scored parameters no such layer owns."""
    blocks = {id(t): Block(k, i, tuple(t.shape)) for i, (k, t) in enumerate(zip(params.keys, params.tensors))}
    conv1d = conv1d_type()
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm) + ((conv1d,) if conv1d else ())
    layers, covered = [], set()
    for _, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        owned = {}
        for role in ("weight", "bias"):
            tensor = getattr(module, role, None)
            if tensor is not None and id(tensor) in blocks:
                owned[role] = blocks[id(tensor)]
                covered.add(id(tensor))
        if owned:
            if isinstance(module, torch.nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
                raise UsageError("the store engine cannot hook an embedding with max_norm or scale_grad_by_freq; exclude it with --modules")
            layers.append((module, owned))
    missing = [k for k, t in zip(params.keys, params.tensors) if id(t) not in covered]
    if missing:
        raise UsageError(
            "the store engine takes per-sample gradients of Linear, Conv1D, Embedding and LayerNorm "
            f"layers; these scored parameters belong to other layers: {', '.join(missing[:6])}"
            + (" ..." if len(missing) > 6 else "")
            + ". Exclude them with --modules REGEX, or use --engine directional/exact"
        )
    return layers, sorted(blocks.values(), key=lambda b: b.index)


class GradientSink:
    """Receives per-token factors of each row's gradient, block by block (see module doc)."""

    def matrix(self, block: Block, u, v, u_ids=None) -> None:
        """G_b += Σ_t u[b,t] v[b,t]ᵀ; with `u_ids` the u side is one-hot over shape[0] at those ids."""
        raise NotImplementedError

    def vector(self, block: Block, g) -> None:
        """g_b += g[b] for a (B, n) per-row vector gradient."""
        raise NotImplementedError


def run_with_hooks(model, params: ScoredParameters, batch: dict, sink: GradientSink) -> torch.Tensor:
    """Forward and backward over the batch, feeding `sink`; returns the per-row losses (B,)."""
    layers, _ = hookable_layers(model, params)
    rows = batch["input_ids"].shape[0]
    conv1d = conv1d_type()
    handles = []
    leaves: list[torch.Tensor] = []

    def watch(output, receive):
        if not output.requires_grad:
            output.requires_grad_(True)
            leaves.append(output)
        output.register_hook(lambda grad: receive(grad.detach()))

    def make_hook(module, owned):
        def forward_hook(mod, inputs, output):
            x = inputs[0]
            if isinstance(mod, torch.nn.Embedding):
                ids = x
                if ids.shape[0] == 1 and rows > 1:
                    # Position ids shared by the batch (GPT-2): give each row its own copy, so the
                    # output's gradient is per row instead of summed over the batch.
                    ids = ids.expand(rows, *ids.shape[1:])
                    output = output.expand(rows, *output.shape[1:]).contiguous()

                def receive(g):
                    if "weight" in owned:
                        if mod.padding_idx is not None:
                            g = g * (ids != mod.padding_idx).unsqueeze(-1).to(g.dtype)
                        sink.matrix(owned["weight"], None, g, u_ids=ids)
            elif isinstance(mod, torch.nn.LayerNorm):
                x_hat = F.layer_norm(x.detach(), mod.normalized_shape, None, None, mod.eps)

                def receive(g):
                    if "weight" in owned:
                        sink.vector(owned["weight"], _token_sum(g * x_hat))
                    if "bias" in owned:
                        sink.vector(owned["bias"], _token_sum(g))
            else:
                a = x.detach()
                transposed = conv1d is not None and isinstance(mod, conv1d)

                def receive(g):
                    if "weight" in owned:
                        u, v = (a, g) if transposed else (g, a)
                        sink.matrix(owned["weight"], _as_tokens(u), _as_tokens(v))
                    if "bias" in owned:
                        sink.vector(owned["bias"], _token_sum(g))
            watch(output, receive)
            return output

        return forward_hook

    try:
        for module, owned in layers:
            handles.append(module.register_forward_hook(make_hook(module, owned)))
        with no_parameter_gradients(model), torch.enable_grad():
            losses = batch_row_losses(model, batch)
            # Rows with a non-finite loss stay out of the backward pass (their error is reported by
            # the caller from the loss), so they cannot spoil the other rows' gradients.
            has = rows_with_response(batch) & torch.isfinite(losses)
            if has.any() and leaves:
                torch.autograd.grad(losses[has].sum(), leaves, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return losses.detach()


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., n) -> (B, T, n): every position between batch and feature axes is a token."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    return _as_tokens(x).sum(dim=1)
