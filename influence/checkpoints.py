"""The checkpoints a gradient score sums over, their weights η_c, and each one's Γ_c (DESIGN §4.2).

`--checkpoints` names run folders (every `checkpoint-<step>` inside), single checkpoint folders, or
plain model folders, in any mix; they are scored in step order. Weights:
- `lr` (default, CLUES/LESS): the mean learning rate logged in trainer_state.json over the steps
  since the previous scored checkpoint (`distill.checkpoints.mean_learning_rates`);
- `uniform`: 1/C each, so the score is the mean over checkpoints;
- `v1,v2,...`: given, one per checkpoint in step order.
`--precondition adam` reads each checkpoint's optimizer.pt (`distill.checkpoints.load_optimizer_state`)
and applies LESS's Adam direction (influence.adam); every checkpoint must have one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from dyn.core.errors import DataError, UsageError

PRECONDITIONS = ("none", "adam")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class ScoringCheckpoint:
    step: int
    path: Path
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.name


def resolve_checkpoints(specs: list[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint the specs name, in step order."""
    from dyn.distill.checkpoints import TRAINER_STATE_FILE, list_checkpoints, read_trainer_state

    if not specs:
        raise UsageError("--checkpoints: name a run folder of `dyn train` (its checkpoint-* folders are used) or checkpoint folders")
    found: dict[int, Path] = {}
    for spec in specs:
        path = Path(spec)
        if not path.is_dir():
            raise UsageError(f"--checkpoints {spec}: no such folder")
        match = _CHECKPOINT_NAME.match(path.name)
        if match:
            entries = [(int(match.group(1)), path)]
        else:
            inside = list_checkpoints(path)
            if inside:
                entries = [(c.step, c.path) for c in inside]
            elif _is_model_folder(path):
                step = 0
                if (path / TRAINER_STATE_FILE).is_file():
                    step = int(read_trainer_state(path).get("global_step") or 0)
                entries = [(step, path)]
            else:
                raise UsageError(f"--checkpoints {spec}: neither a checkpoint-<step> folder, nor a run folder holding some, nor a model folder")
        for step, folder in entries:
            if step in found and found[step].resolve() != folder.resolve():
                raise UsageError(f"--checkpoints: two checkpoints of step {step} ({found[step]} and {folder}); score one run at a time")
            found[step] = folder
    return sorted(found.items())


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def check_checkpoint_files(checkpoints: list[tuple[int, Path]], precondition: str) -> None:
    """Before any work: every checkpoint has a model (config + weights), and optimizer.pt when
    `--precondition adam`."""
    from dyn.distill.checkpoints import OPTIMIZER_FILE

    if precondition not in PRECONDITIONS:
        raise UsageError(f"--precondition {precondition}: choose one of {', '.join(PRECONDITIONS)}")
    for _, folder in checkpoints:
        if not _is_model_folder(folder) or not any(any(folder.glob(p)) for p in _MODEL_FILES):
            raise DataError(f"{folder}: no model in the checkpoint (config.json and *.safetensors / *.bin)")
        if precondition == "adam" and not (folder / OPTIMIZER_FILE).is_file():
            raise DataError(
                f"{folder}: no optimizer state ({OPTIMIZER_FILE}), which --precondition adam needs for every "
                "checkpoint (dyn train saves it); score with --precondition none instead"
            )


def checkpoint_weights(checkpoints: list[tuple[int, Path]], spec: str) -> list[float]:
    """η_c for each checkpoint (see the module doc)."""
    from dyn.distill.checkpoints import mean_learning_rates

    if spec == "uniform":
        return [1.0 / len(checkpoints)] * len(checkpoints)
    if spec == "lr":
        try:
            rates = mean_learning_rates([folder for _, folder in checkpoints])
        except DataError as exc:
            raise DataError(f"{exc}; --weights lr needs the learning-rate log of each checkpoint (use --weights uniform or give values)") from None
        return [float(rates[step]) for step, _ in checkpoints]
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--weights {spec}: lr, uniform, or comma-separated numbers (one per checkpoint)") from None
    if len(values) != len(checkpoints):
        steps = ", ".join(str(s) for s, _ in checkpoints)
        raise UsageError(f"--weights {spec}: {len(values)} values for {len(checkpoints)} checkpoints (steps {steps})")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--weights {spec}: weights must be finite numbers")
    return values


def scoring_plan(specs: list[str], weights: str, precondition: str) -> list[ScoringCheckpoint]:
    """The checkpoints with their weights, files checked."""
    found = resolve_checkpoints(specs)
    check_checkpoint_files(found, precondition)
    return [ScoringCheckpoint(step, folder, w) for (step, folder), w in zip(found, checkpoint_weights(found, weights))]


def load_scoring_model(checkpoint: ScoringCheckpoint):
    """(model, tokenizer) in eval mode with eager attention: the forward-mode route needs it, and
    every engine then runs the same kernels."""
    from dyn.core.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(checkpoint.path), attn_implementation="eager", flag="--checkpoints")
    return model.eval(), tokenizer


def checkpoint_hash(checkpoint: ScoringCheckpoint, with_optimizer: bool = False) -> str:
    """Content hash of the checkpoint's model (and, for an adapter, of its base model too; with
    `with_optimizer`, of its optimizer.pt as well: Γ_c = adam depends on it)."""
    from dyn.core.hashing import file_sha256, json_sha256
    from dyn.core.models import ModelSource, adapter_base_path, model_content_hash

    parts = [model_content_hash(ModelSource("folder", str(checkpoint.path)))]
    base = adapter_base_path(str(checkpoint.path))
    if base is not None:
        parts.append(model_content_hash(ModelSource("folder", base)))
    if with_optimizer:
        parts.append(file_sha256(checkpoint.path / "optimizer.pt"))
    return parts[0] if len(parts) == 1 else json_sha256(parts)


def adam_moments(checkpoint: ScoringCheckpoint):
    """The checkpoint's Adam moments for Γ_c (influence.adam)."""
    from dyn.distill.checkpoints import load_optimizer_state
    from dyn.influence.adam import AdamMoments

    return AdamMoments.from_state(load_optimizer_state(checkpoint.path), source=str(checkpoint.path / "optimizer.pt"))


def parameter_signature(params) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(t.shape)) for k, t in zip(params.keys, params.tensors)]


def check_same_architecture(first: list, other: list, checkpoint: ScoringCheckpoint) -> None:
    """Every checkpoint must score the same parameters with the same shapes."""
    if first == other:
        return
    a, b = dict(first), dict(other)
    for key in list(a) + list(b):
        if a.get(key) != b.get(key):
            raise DataError(
                f"{checkpoint.path}: checkpoints of different architectures: parameter '{key}' is "
                f"{a.get(key, 'absent')} in the first checkpoint and {b.get(key, 'absent')} here"
            )
