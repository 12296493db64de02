"""Which parameters a gradient score is taken over: all of them, a `--modules REGEX` subset, or
the LoRA adapters of a PEFT model (DESIGN §4.2).

Every engine flattens gradients in the same order (the model's `named_parameters` order, tied
weights once), and names parameters by a canonical key with wrapper prefixes (PEFT's
`base_model.model.`, DDP's `module.`, FSDP's `_fsdp_wrapped_module.`, torch.compile's `_orig_mod.`)
stripped (`distill.checkpoints.canonical_param_name`), so optimizer state, projection seeds and
stores match across those wrappers.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

from dyn.core.errors import UsageError

def canonical_name(name: str) -> str:
    """A parameter name without the prefixes that training wrappers add (the same mapping the
    optimizer-state reader uses, so Adam moments and live parameters meet by name)."""
    from dyn.distill.checkpoints import canonical_param_name

    return canonical_param_name(name)


def is_lora_name(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


@dataclass(frozen=True)
class ScoredParameters:
    """The parameters a score is over, in flattening order: the model's names, canonical keys and
    the tensors themselves."""

    names: tuple[str, ...]
    keys: tuple[str, ...]
    tensors: tuple

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def describe(self) -> dict:
        return {"count": len(self.names), "numel": self.numel}


def select_parameters(model, modules: str | None = None) -> ScoredParameters:
    """All parameters (tied ones once), or a PEFT model's LoRA adapters; then those whose canonical
    name matches `modules` (`re.search`)."""
    named = list(model.named_parameters())
    lora = [(n, p) for n, p in named if is_lora_name(canonical_name(n))]
    candidates = lora if lora else named
    if modules is not None:
        try:
            pattern = re.compile(modules)
        except re.error as exc:
            raise UsageError(f"--modules {modules!r}: not a regular expression ({exc})") from None
        chosen = [(n, p) for n, p in candidates if pattern.search(canonical_name(n))]
        if not chosen:
            sample = ", ".join(canonical_name(n) for n, _ in candidates[:8])
            raise UsageError(f"--modules {modules!r} matches no parameter; names look like: {sample}, ...")
        candidates = chosen
    return ScoredParameters(
        names=tuple(n for n, _ in candidates),
        keys=tuple(canonical_name(n) for n, _ in candidates),
        tensors=tuple(p for _, p in candidates),
    )


@contextmanager
def gradients_only_for(model, params: ScoredParameters):
    """Inside: exactly the scored parameters require grad (so backward passes skip the rest)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(t) for t in params.tensors}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def no_parameter_gradients(model):
    """Inside: no parameter requires grad (hooks then ask only for activation gradients)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
