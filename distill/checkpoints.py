"""Run folders and checkpoints in the Hugging Face Trainer layout (DESIGN §4.5), written by
`dyn train` and read by the gradient scorer (CLUES/LESS) and distillation.

A run folder:

    RUN_DIR/
      checkpoint-<step>/          one per save, written under a temporary name and renamed when whole
        config.json, model.safetensors, generation_config.json    (save_pretrained)
          - LoRA runs: adapter_config.json + adapter_model.safetensors instead; the adapter's
            `base_model_name_or_path` is the base model folder (RUN_DIR/base-model for fresh models)
        tokenizer.json, tokenizer_config.json, ...               (tokenizer.save_pretrained)
        optimizer.pt        torch AdamW state_dict; its param_groups carry `param_names`
        scheduler.pt        torch LambdaLR state_dict
        param_names.json    the trainable parameters' names in optimizer index order
        trainer_state.json  global_step, max_steps, num_train_epochs, epoch, logging_steps,
                            save_steps, train_batch_size, num_input_tokens_seen, log_history
                            ([{step, epoch, loss, learning_rate, grad_norm, num_tokens}, ...] up to
                            this step) and a "dyn" section (settings, example format, max length)
      base-model/                 LoRA on a fresh model only: the frozen base the adapters sit on
      config.json, model.safetensors, tokenizer files, trainer_state.json   the final model
      run.json                    the run record, written last: a run folder with it is complete

No rng_state.pth: `dyn train` seeds dropout from (seed, step, rank) at every step, so a resumed
run needs no saved random state to repeat an unbroken one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dyn.core.errors import DataError, UsageError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
PARAM_NAMES_FILE = "param_names.json"
RUN_RECORD_FILE = "run.json"
BASE_MODEL_FOLDER = "base-model"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Wrappers that prefix parameter names: PEFT, DistributedDataParallel, FSDP (and torch.compile).
_NAME_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "base_model.model.")


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One `checkpoint-<step>` folder of a run."""

    step: int
    path: Path


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """The `checkpoint-<step>` folders directly inside `run_dir`, sorted by step (temporary folders
    of an unfinished save are never listed). An empty list when there are none."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(folder: str | Path) -> dict:
    """A checkpoint's (or a run folder's) trainer_state.json; a data error naming the file when it
    is missing or unreadable."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {TRAINER_STATE_FILE}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise DataError(f"{path}: not a trainer state (expected an object with a log_history list)")
    return state


def _as_checkpoints(checkpoints) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, Path)):
        path = Path(checkpoints)
        if _CHECKPOINT_NAME.match(path.name) and path.is_dir():
            return [Checkpoint(int(_CHECKPOINT_NAME.match(path.name).group(1)), path)]
        found = list_checkpoints(path)
        if not found:
            raise DataError(f"{checkpoints}: no checkpoint-<step> folders")
        return found
    found = []
    for item in checkpoints:
        if isinstance(item, Checkpoint):
            found.append(item)
            continue
        path = Path(item)
        match = _CHECKPOINT_NAME.match(path.name)
        step = int(match.group(1)) if match else read_trainer_state(path).get("global_step")
        if step is None:
            raise DataError(f"{item}: cannot tell the checkpoint's step (name it checkpoint-<step>)")
        found.append(Checkpoint(int(step), path))
    return sorted(found)


def mean_learning_rates(checkpoints) -> dict[int, float]:
    """The CLUES/LESS default checkpoint weights eta_c: for each checkpoint, the mean of the
    `learning_rate` values logged for the steps since the previous checkpoint.

    `checkpoints` is a run folder (all its `checkpoint-*`), one checkpoint folder, or a list of
    checkpoint folders. Returns {step: eta} in step order. Checkpoint c's segment is the log
    entries with previous_step < step <= c (previous_step = 0 for the first), read from c's own
    trainer_state.json (which holds the log up to c). `dyn train` logs the learning rate that each
    optimizer step used; where a segment has no logged rate (sparse logging), the last rate
    logged at or before c is used, else the first one after the previous checkpoint.
    Data error when a checkpoint logs no learning rate at all.
    """
    result: dict[int, float] = {}
    previous = 0
    for checkpoint in _as_checkpoints(checkpoints):
        state = read_trainer_state(checkpoint.path)
        logged = [
            (int(entry["step"]), float(entry["learning_rate"]))
            for entry in state.get("log_history", [])
            if isinstance(entry, dict) and "learning_rate" in entry and "step" in entry
        ]
        if not logged:
            raise DataError(f"{checkpoint.path / TRAINER_STATE_FILE}: log_history holds no learning_rate")
        segment = [lr for step, lr in logged if previous < step <= checkpoint.step]
        if not segment:
            before = [lr for step, lr in logged if step <= checkpoint.step]
            after = [lr for step, lr in logged if step > previous]
            segment = before[-1:] or after[:1]
        result[checkpoint.step] = sum(segment) / len(segment)
        previous = checkpoint.step
    return result


def canonical_param_name(name: str) -> str:
    """A parameter name without wrapper prefixes (`module.`, `_fsdp_wrapped_module.`, `_orig_mod.`,
    `base_model.model.`), so optimizer state and a live model match whichever wrapped them.
    LoRA parameters keep their adapter name (`...lora_A.default.weight`)."""
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
    return name


@dataclass
class AdamState:
    """Adam(W) moments of one checkpoint by canonical parameter name (see `canonical_param_name`).

    `exp_avg[name]`, `exp_avg_sq[name]`: float32 tensors shaped like the parameter; `step[name]`:
    how many updates the moments have seen; `betas`, `eps`, `lr`, `weight_decay` per name from the
    parameter's group. Only trainable parameters appear (for LoRA: the adapters).
    """

    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)
    betas: dict = field(default_factory=dict)
    eps: dict = field(default_factory=dict)
    lr: dict = field(default_factory=dict)
    weight_decay: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.exp_avg)

    def for_model(self, model) -> dict:
        """{live parameter name: canonical name} for the model's parameters that have moments
        (whatever wraps the model: PEFT, DDP, FSDP). A data error lists the first trainable
        parameters (requires_grad) that have none."""
        mapping, missing = {}, []
        for name, parameter in model.named_parameters():
            key = canonical_param_name(name)
            if key in self.exp_avg:
                mapping[name] = key
            elif parameter.requires_grad:
                missing.append(name)
        if missing:
            raise DataError(f"optimizer state has no moments for {len(missing)} trainable parameter(s), e.g. {', '.join(missing[:3])}")
        if not mapping:
            raise DataError("optimizer state matches none of the model's parameters (a checkpoint of another model?)")
        return mapping


def load_optimizer_state(checkpoint: str | Path) -> AdamState:
    """Adam's exp_avg / exp_avg_sq of a checkpoint, by parameter NAME.

    torch keys optimizer state by index; the names come from the state dict's own
    `param_groups[*].param_names` (torch >= 2.6 with named parameters, as `dyn train` saves) or
    else from `param_names.json` beside it (names in index order). Data errors name the folder when
    optimizer.pt is absent, holds no Adam moments, or cannot be mapped to names.
    """
    import torch

    folder = Path(checkpoint)
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no optimizer state ({OPTIMIZER_FILE})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable pickles
        raise DataError(f"{path}: cannot read the optimizer state ({type(exc).__name__}: {exc})") from None
    groups = saved.get("param_groups", [])
    index_names = _index_names(folder, groups)
    result = AdamState()
    for group in groups:
        for index in group["params"]:
            entry = saved["state"].get(index)
            if entry is None:
                continue  # a parameter that never received a gradient
            if "exp_avg" not in entry or "exp_avg_sq" not in entry:
                raise DataError(f"{path}: not an Adam optimizer state (no exp_avg/exp_avg_sq)")
            name = canonical_param_name(index_names[index])
            result.exp_avg[name] = entry["exp_avg"]
            result.exp_avg_sq[name] = entry["exp_avg_sq"]
            result.step[name] = int(entry.get("step", 0))
            result.betas[name] = tuple(group.get("betas", (0.9, 0.999)))
            result.eps[name] = float(group.get("eps", 1e-8))
            result.lr[name] = float(group.get("lr", 0.0))
            result.weight_decay[name] = float(group.get("weight_decay", 0.0))
    if not result.exp_avg:
        raise DataError(f"{path}: holds no Adam moments")
    return result


def _index_names(folder: Path, groups: list[dict]) -> dict[int, str]:
    names: dict[int, str] = {}
    if groups and all("param_names" in g for g in groups):
        for group in groups:
            names.update(zip(group["params"], group["param_names"]))
        return names
    listing = folder / PARAM_NAMES_FILE
    if not listing.is_file():
        raise DataError(f"{folder}: the optimizer state has no parameter names and there is no {PARAM_NAMES_FILE}")
    ordered = json.loads(listing.read_text(encoding="utf-8"))
    indices = [i for g in groups for i in g["params"]]
    if len(ordered) != len(indices):
        raise DataError(f"{listing}: {len(ordered)} names for {len(indices)} optimizer parameters")
    return dict(zip(sorted(indices), ordered))


# --------------------------------------------------------------------------- writing

def save_checkpoint(run_dir: str | Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    trainer_state: dict, param_names: list[str]) -> Path:
    """Write `checkpoint-<step>` atomically: into a temporary folder, renamed when complete.

    `model` is the unwrapped model (a PEFT model saves its adapter only)."""
    import torch

    from dyn.core.atomic import atomic_output

    final = Path(run_dir) / checkpoint_name(step)
    with atomic_output(final, folder=True) as tmp:
        save_model_files(tmp, model, tokenizer, trainer_state)
        torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), Path(tmp) / SCHEDULER_FILE)
        (Path(tmp) / PARAM_NAMES_FILE).write_text(json.dumps(param_names, indent=0) + "\n", encoding="utf-8")
    return final


def save_model_files(folder: str | Path, model, tokenizer, trainer_state: dict) -> None:
    """Model (safetensors), tokenizer and trainer_state.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    write_trainer_state(folder, trainer_state)


def write_trainer_state(folder: str | Path, trainer_state: dict) -> None:
    (Path(folder) / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")


def trained_example_format(checkpoint: str | Path, loaded, template: str | None, response_field: str | None):
    """(ExampleFormat, saved max_length or None) for reading `loaded` rows as a checkpoint saw
    them: the user's --template/--response-field, else the format the `dyn train` run trained with
    (trainer_state.json `dyn.example_format`) when the rows have its columns, else the default
    columns (`core.lm.resolve_example_format`)."""
    from dyn.core.errors import DataError
    from dyn.core.lm import ExampleFormat, check_format_columns, resolve_example_format

    saved_format, saved_length = None, None
    if (Path(checkpoint) / TRAINER_STATE_FILE).is_file():
        saved = read_trainer_state(checkpoint).get("dyn", {})
        if saved.get("example_format"):
            saved_format = ExampleFormat.from_dict(saved["example_format"])
        saved_length = saved.get("max_length")
    if template is None and response_field is None and saved_format is not None:
        try:
            check_format_columns(loaded, saved_format)
            return saved_format, saved_length
        except DataError:
            pass
    return resolve_example_format(loaded.dataset.column_names, template, response_field, loaded.source), saved_length


def is_dyn_run(folder: str | Path) -> bool:
    """True when `folder` holds a `dyn train` or `dyn distill` run: a run record, or checkpoints with
    trainer state."""
    root = Path(folder)
    record = root / RUN_RECORD_FILE
    if record.is_file():
        try:
            return json.loads(record.read_text(encoding="utf-8")).get("command") in ("train", "distill")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return False
    return any((c.path / TRAINER_STATE_FILE).is_file() for c in list_checkpoints(root))
