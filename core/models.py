"""Causal LMs for training and scoring: fresh ones from a preset or a JSON config, or a local folder.

`--model` (and `--student`, ...) takes one of (DESIGN §4.5):
- a preset name: `tiny` (GPT-2, 2 layers, hidden 64, 2 heads, context 512) or `small` (4 layers,
  hidden 256, 4 heads, context 1024); the vocabulary comes from the tokenizer;
- a `.json` file of config keys (GPT2Config keys by default; a `model_type` key picks another
  architecture), also built fresh with the tokenizer's vocabulary;
- a model folder (`save_pretrained` layout): loaded with AutoModelForCausalLM + AutoTokenizer.
  A folder holding a PEFT adapter (`adapter_config.json`) is loaded on top of its base model.

Nothing is downloaded. Forward-mode autodiff (the influence engine's JVP route) needs
`attn_implementation="eager"`: PyTorch's SDPA kernel has no forward-mode rule on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dyn.core.errors import UsageError

PRESETS: dict[str, dict] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 512},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 1024},
}


@dataclass(frozen=True)
class ModelSource:
    """What `--model` named: `kind` is "preset", "config" (a JSON file) or "folder"."""

    kind: str
    name: str
    config: dict = field(default_factory=dict)

    @property
    def is_fresh(self) -> bool:
        return self.kind in ("preset", "config")

    def describe(self) -> str:
        return {"preset": f"preset '{self.name}'", "config": f"config {self.name}", "folder": f"folder {self.name}"}[self.kind]


def resolve_model_source(spec: str, flag: str = "--model") -> ModelSource:
    """Read what `--model SPEC` names; a usage error when it is none of preset, JSON file, folder."""
    if spec in PRESETS:
        return ModelSource("preset", spec, dict(PRESETS[spec]))
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UsageError(f"{flag} {spec}: not a model folder (no config.json)")
        return ModelSource("folder", str(path))
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{flag} {spec}: not a JSON model config ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{flag} {spec}: a model config must be a JSON object of config keys")
        return ModelSource("config", str(path), data)
    raise UsageError(
        f"{flag} {spec}: no such preset, config file or model folder; presets: {', '.join(PRESETS)}"
    )


def fresh_config(source: ModelSource, tokenizer, flag: str = "--model"):
    """The config of a fresh model: the preset or file keys, with the tokenizer's vocabulary and
    special tokens. Unknown keys and impossible shapes are usage errors naming the key."""
    from transformers import AutoConfig, GPT2Config

    keys = dict(source.config)
    model_type = keys.pop("model_type", "gpt2")
    try:
        config_class = GPT2Config if model_type == "gpt2" else type(AutoConfig.for_model(model_type))
    except ValueError:
        raise UsageError(f"{flag} {source.name}: unknown model_type '{model_type}'") from None
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    unknown = sorted(k for k in keys if k not in known)
    if unknown:
        raise UsageError(f"{flag} {source.name}: unknown config key(s) {', '.join(unknown)} for model_type '{model_type}'")
    keys.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        config = config_class(**keys)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{flag} {source.name}: invalid config ({exc})") from None
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if hidden and heads and hidden % heads:
        raise UsageError(f"{flag} {source.name}: hidden size {hidden} is not divisible by {heads} attention heads")
    return config


def build_fresh_model(config, seed: int, attn_implementation: str | None = None, flag: str = "--model"):
    """A randomly initialised causal LM from `config`; the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{flag}: cannot build a model from this config ({type(exc).__name__}: {exc})") from None


def load_tokenizer(folder: str, flag: str = "--model"):
    """AutoTokenizer from a local folder; a usage error when the folder has no usable tokenizer."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise UsageError(f"{flag} {folder}: no tokenizer in the folder (tokenizer.json or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise UsageError(f"{flag} {folder}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None


def adapter_base_path(folder: str) -> str | None:
    """The base model a PEFT adapter folder was trained on, or None when `folder` is a full model."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def load_causal_lm(folder: str, *, attn_implementation: str | None = None, is_trainable: bool = False, flag: str = "--model"):
    """A causal LM from a local folder: a full model, or a PEFT adapter on top of its base model
    (`base_model_name_or_path` in adapter_config.json). Usage errors name the folder."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = adapter_base_path(folder)
    target = base if base is not None else folder
    if base is not None and not (Path(base) / "config.json").is_file():
        raise UsageError(f"{flag} {folder}: its adapter's base model {base} is not a local model folder")
    if not (Path(target) / "config.json").is_file():
        raise UsageError(f"{flag} {folder}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(target), **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable folders
        raise UsageError(f"{flag} {target}: cannot load the model ({type(exc).__name__}: {exc})") from None
    if base is None:
        return model
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except Exception as exc:
        raise UsageError(f"{flag} {folder}: cannot load the adapter ({type(exc).__name__}: {exc})") from None


def load_model_and_tokenizer(folder: str, *, attn_implementation: str | None = None, is_trainable: bool = False, flag: str = "--model"):
    """(model, tokenizer) from a model or adapter folder; the tokenizer from the folder itself, or
    for an adapter folder without one, from its base model's folder."""
    base = adapter_base_path(folder)
    tokenizer_folder = folder if base is None or (Path(folder) / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_folder, flag)
    model = load_causal_lm(folder, attn_implementation=attn_implementation, is_trainable=is_trainable, flag=flag)
    return model, tokenizer


def context_length(config) -> int:
    """How many positions the model attends over (n_positions / max_position_embeddings)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def model_content_hash(source: ModelSource, config=None) -> str:
    """Hash of what defines the starting model: the config of a fresh one, the files of a folder."""
    from dyn.core.hashing import folder_sha256, json_sha256

    if source.is_fresh:
        return json_sha256(config.to_dict() if config is not None else source.config)
    folder = Path(source.name)
    names = ["config.json", "adapter_config.json"] + sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return folder_sha256(folder, [n for n in names if (folder / n).is_file()])


# --------------------------------------------------------------------------- LoRA

def lora_target_modules(model) -> list[str]:
    """Names (last component) of the Linear / HF Conv1D layers inside the transformer blocks:
    attention and MLP projections; embeddings and the output head are left out."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is output or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise UsageError("--lora-r: the model has no Linear or Conv1D layers to adapt")
    return sorted(names)


def apply_lora(model, r: int, alpha: float | None = None, dropout: float = 0.0):
    """Wrap `model` with LoRA adapters (peft) of rank `r` on its attention and MLP projections;
    only the adapters train. alpha defaults to 2r."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora-r needs the package peft (pip install peft)") from None
    from transformers.pytorch_utils import Conv1D

    if r < 1:
        raise UsageError(f"--lora-r {r}: must be at least 1")
    targets = lora_target_modules(model)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
        target_modules=targets, fan_in_fan_out=conv1d, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
