"""The teacher's top-k next-token log-probabilities for every response token of every row: computed
online from a loaded teacher, or stored once per teacher checkpoint in a cache folder that many
students and sweeps read (DESIGN §4.4, §4.5).

What is computed (`top_k_from_logits`, the one definition online mode and the cache share): for
each counted position (labels != -100 after the one-position shift of `core.lm`), the teacher's
log_softmax over its full output vocabulary in float32, its k largest entries (descending; the
order `torch.topk` gives) with their ids, and the exact log of the mass outside them,
tail = logsumexp of the other vocab − k log-probabilities (= log(1 − Σ top-k), without the
cancellation of subtracting a sum close to 1; −inf when k is the whole vocabulary). Entries come in
the "compact" layout of `distill.losses`: one per counted position, row-major over the batch rows,
positions ascending, which is what `distillation_loss(..., teacher_log_probs=, teacher_ids=,
teacher_tail_log_prob=)` takes.

Storage precision. Log-probabilities are stored as float16 (round to nearest even), ids as int32,
the tail as float32 (exact). float16 rather than bfloat16: both take 2 bytes, but log-probabilities
lie in [−65504, 0] where float16 has 11 significant bits to bfloat16's 8, so the stored value is
within |log p|·2^-11 of the float32 one (bfloat16: |log p|·2^-8), i.e. each probability keeps a
relative error ≤ |log p|·2^-11 (≤ 0.25% for p ≥ e^-5). float16's smaller range costs nothing:
below −65504 it rounds to −inf, where exp() is 0 in float32 anyway (float32 underflows below
−104). The reader returns float32 (the float16 values widened exactly). Per response token a cache
holds 6k + 4 bytes.

Layout of a cache folder:

    CACHE/
      meta.json                 what produced it (see below); written last by rank 0, atomically
      index.safetensors         dyn_index (rows,) int64     the row's position in the source
                                offsets (rows+1,) int64     row i's entries are [offsets[i], offsets[i+1])
                                shard_starts (shards+1,)    shard s holds rows [starts[s], starts[s+1])
      step-<N>/                 one folder per teacher checkpoint, by the checkpoint's step
        shard-<s>.safetensors   log_probs (T_s, k) float16, ids (T_s, k) int32,
                                tail_log_prob (T_s,) float32; T_s = offsets[starts[s+1]] −
                                offsets[starts[s]]; row i's block is rows offsets[i] − offsets[starts[s]]
                                onwards. Header metadata: step, first row, rows, teacher sha256, k.

Rows are keyed by `dyn_index` (never by a training step) and kept in source order; shard s holds
the contiguous rows whose first entry falls in the s-th window of `shard_tokens` entries, so a
row's shard is one binary search in `shard_starts`. The index depends on the data alone and is
shared by every checkpoint.

meta.json: `format`, `dyn_version`, `spec` (the identity a cache is checked against: data_sha256 =
`selection.grad.examples_hash` of the token ids, dyn_index_sha256, rows, response_tokens,
max_length, example_format, tokenizer_sha256, tokenizer_size, top_k), `storage` (dtypes,
shard_tokens, shards, bytes per token), `teacher_precision` (the forward pass's), `checkpoints`
([{step, teacher_sha256 (content hash of the checkpoint's config and weights), path, vocab_size,
complete}]) and `complete` (every listed checkpoint is whole). A cache whose meta does not match
the request is refused with a DataError naming the field, never silently reused.

Building (`build_teacher_cache`) is sharded over ranks and resumable by shard. The batch plan is
`core.lm_batches.plan_row_batches` with the shard as the group, so batches never cross shards and
depend on the rows alone; each missing shard is computed by one rank (missing[rank::world]) and
written atomically under its final name. A killed build leaves only whole shards; a rerun computes
the missing ones. Results are byte-identical whatever the number of processes and however often
the build was interrupted (on a given machine and thread count).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX

CACHE_FORMAT = "dyn-teacher-cache/1"
META_FILE = "meta.json"
INDEX_FILE = "index.safetensors"
STEP_PREFIX = "step-"
DEFAULT_SHARD_TOKENS = 1 << 16
STORED_LOG_PROB_DTYPE = "float16"
# How many float32 log-probabilities the top-k pass upcasts at once (positions x vocabulary).
_CHUNK_ELEMENTS = 1 << 24
_OPEN_SHARDS = 64
_STEP_NAME = re.compile(r"^step-(\d+)$")
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}
# The spec fields in the words an error message uses.
_SPEC_WORDS = {
    "data_sha256": "other data (token ids)",
    "dyn_index_sha256": "other rows (dyn_index)",
    "rows": "another number of rows",
    "response_tokens": "another number of response tokens",
    "max_length": "another --max-length",
    "example_format": "another example format",
    "tokenizer_sha256": "another tokenizer",
    "tokenizer_size": "another tokenizer size",
    "top_k": "another --top-k",
}


# --------------------------------------------------------------------------- the numbers

@dataclass
class TeacherTopK:
    """The teacher at the counted positions of a batch, compact layout (see the module doc).

    `log_probs` (n, k) float32, descending within a position; `ids` (n, k) int64;
    `tail_log_prob` (n,) float32, the log of the teacher's mass outside the k ids.
    """

    log_probs: "torch.Tensor"
    ids: "torch.Tensor"
    tail_log_prob: "torch.Tensor"

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __iter__(self):
        """`log_probs, ids, tail = teacher_top_k(...)`."""
        return iter((self.log_probs, self.ids, self.tail_log_prob))

    def loss_inputs(self) -> dict:
        """Keyword arguments for `distill.losses.distillation_loss`."""
        return {"teacher_log_probs": self.log_probs, "teacher_ids": self.ids, "teacher_tail_log_prob": self.tail_log_prob}

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(self.log_probs.to(device), self.ids.to(device), self.tail_log_prob.to(device))

    def as_stored(self) -> "TeacherTopK":
        """These numbers as a cache returns them: log-probabilities rounded to float16."""
        import torch

        return TeacherTopK(self.log_probs.to(torch.float16).float(), self.ids, self.tail_log_prob)


def top_k_from_logits(logits, labels, top_k: int) -> TeacherTopK:
    """The teacher's top-k at the counted positions of a batch: `logits` (batch, seq, vocab) of a
    causal LM, `labels` (batch, seq) as `core.lm.collate_lm_batch` makes them (position t predicts
    labels[t+1]). Computed in float32 over the full vocabulary, a bounded number of positions at a
    time; tensors stay on the logits' device."""
    import torch

    vocab = int(logits.shape[-1])
    check_top_k(top_k, vocab, "the teacher's vocabulary")
    counted = labels[:, 1:] != IGNORE_INDEX
    rows, positions = counted.nonzero(as_tuple=True)
    n = int(rows.shape[0])
    device = logits.device
    log_probs = torch.empty((n, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((n, top_k), dtype=torch.long, device=device)
    tail = torch.empty((n,), dtype=torch.float32, device=device)
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            logp = torch.log_softmax(logits[rows[start:stop], positions[start:stop]].float(), dim=-1)
            values, top = logp.topk(top_k, dim=-1)
            log_probs[start:stop], ids[start:stop] = values, top
            tail[start:stop] = torch.logsumexp(logp.scatter(-1, top, float("-inf")), dim=-1)
    return TeacherTopK(log_probs, ids, tail)


def teacher_top_k(model, batch: dict, top_k: int, *, autocast_dtype=None) -> TeacherTopK:
    """Online mode: forward one collated batch (`core.lm.collate_lm_batch`, on the model's device)
    through the teacher and return its top-k (`top_k_from_logits`). `autocast_dtype` (e.g.
    torch.bfloat16) runs the forward pass under autocast; the softmax is float32 regardless.
    Runs under no_grad (not inference_mode), so the results can meet the student's graph."""
    import torch
    from contextlib import nullcontext

    device_type = batch["input_ids"].device.type
    context = torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with torch.no_grad(), context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return top_k_from_logits(logits, batch["labels"], top_k)


def check_top_k(top_k: int, vocab: int, what: str) -> None:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be a whole number >= 1")
    if top_k > vocab:
        raise UsageError(f"--top-k {top_k}: larger than {what} ({vocab} ids)")


# --------------------------------------------------------------------------- what a cache is for

def tokenizer_sha256(tokenizer) -> str:
    """Content hash of what token ids mean: the vocabulary (token -> id, added tokens included)
    and the special tokens."""
    from dyn.core.hashing import json_sha256

    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return json_sha256({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), "special": special})


def _dyn_index_sha256(dyn_index: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(dyn_index, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds, compared field by field when a cache is reused. Build one with
    `CacheSpec.describe`."""

    data_sha256: str
    dyn_index_sha256: str
    rows: int
    response_tokens: int
    max_length: int
    example_format: dict
    tokenizer_sha256: str
    tokenizer_size: int
    top_k: int

    @classmethod
    def describe(cls, examples, tokenizer, *, top_k: int, example_format, dyn_index=None) -> "CacheSpec":
        """The spec of `examples` (`core.lm.LMExamples`) tokenised with `tokenizer` from rows read
        with `example_format` (an ExampleFormat or its dict); `dyn_index` (default 0..rows-1) is
        each example's position in the source (`LoadedRows.source_index`). UsageError when top_k
        exceeds the tokenizer's vocabulary."""
        from dyn.selection.grad import examples_hash

        check_top_k(top_k, len(tokenizer), "the tokenizer's vocabulary")
        index = _as_dyn_index(dyn_index, len(examples))
        fmt = example_format.to_dict() if hasattr(example_format, "to_dict") else dict(example_format or {})
        return cls(
            data_sha256=examples_hash(examples), dyn_index_sha256=_dyn_index_sha256(index), rows=len(examples),
            response_tokens=int(np.asarray(examples.response_tokens).sum()), max_length=int(examples.max_length),
            example_format=fmt, tokenizer_sha256=tokenizer_sha256(tokenizer), tokenizer_size=len(tokenizer),
            top_k=int(top_k),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, saved: dict) -> list[str]:
        """The fields on which a saved spec differs from this one."""
        mine = json.loads(json.dumps(self.to_dict()))
        return [name for name in mine if saved.get(name) != mine[name]]


def _as_dyn_index(dyn_index, rows: int) -> np.ndarray:
    index = np.arange(rows, dtype=np.int64) if dyn_index is None else np.asarray(dyn_index, dtype=np.int64)
    if index.shape != (rows,):
        raise UsageError(f"dyn_index has {index.size} values for {rows} rows")
    if len(np.unique(index)) != rows:
        raise DataError("dyn_index values repeat: each row needs its own")
    return index


def teacher_checkpoints(teacher) -> list:
    """The teacher's checkpoints (`distill.checkpoints.Checkpoint`, by step): a `dyn train` run
    folder (every `checkpoint-<step>` in it), one checkpoint folder, or a list of folders /
    Checkpoints. DataError when a run folder has none or a folder holds no model."""
    from dyn.distill.checkpoints import _as_checkpoints
    from dyn.influence.checkpoints import check_checkpoint_files

    if isinstance(teacher, (str, Path)) and not Path(teacher).is_dir():
        raise UsageError(f"--teacher {teacher}: no such folder")
    found = _as_checkpoints(teacher)
    if not found:
        raise UsageError("--teacher: no checkpoints given")
    steps = [c.step for c in found]
    if len(set(steps)) != len(steps):
        raise UsageError(f"--teacher: two checkpoints of the same step ({', '.join(str(s) for s in steps)})")
    check_checkpoint_files([(c.step, c.path) for c in found], "none")
    return found


def teacher_sha256(checkpoint) -> str:
    """Content hash of a checkpoint's model files (config and weights; an adapter's base too)."""
    from dyn.influence.checkpoints import checkpoint_hash

    return checkpoint_hash(checkpoint)


# --------------------------------------------------------------------------- layout

def plan_shards(response_tokens: np.ndarray, shard_tokens: int) -> np.ndarray:
    """Shard boundaries over rows in source order: shard s holds the rows whose first entry lies in
    the same window of `shard_tokens` entries; (shards+1,) row positions, the last = rows."""
    if shard_tokens < 1:
        raise UsageError(f"shard_tokens {shard_tokens}: must be at least 1")
    counts = np.asarray(response_tokens, dtype=np.int64)
    if len(counts) == 0:
        return np.zeros(1, dtype=np.int64)
    window = (np.cumsum(counts) - counts) // shard_tokens
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    return np.r_[starts, len(counts)].astype(np.int64)


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """`tensors` (name -> numpy array) in the safetensors format, byte for byte the same for the same
    input: the header's keys sorted (the safetensors library orders metadata by a randomly seeded
    hash map), padded with spaces to 8 bytes, tensors by item size (widest first, so each one is
    aligned) then name, as the library lays them out. Any safetensors reader reads it."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors, key=lambda n: (-np.asarray(tensors[n]).dtype.itemsize, n)):
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return np.uint64(len(text)).astype("<u8").tobytes() + text + b"".join(blobs)


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    from dyn.core.atomic import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors as read-only numpy views over one memory map, header metadata)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(np.frombuffer(raw[:8].tobytes(), dtype="<u8")[0])
    header = json.loads(raw[8:8 + size].tobytes())
    base = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = raw[base + begin: base + end].view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, header.get("__metadata__", {})


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _step_folder(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


# --------------------------------------------------------------------------- the reader

class TeacherCache:
    """A teacher cache folder, read. Open one with `TeacherCache.open` (checks) or build one with
    `build_teacher_cache`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_file = self.folder / META_FILE
        if not meta_file.is_file():
            raise UsageError(f"--teacher-cache {folder}: not a teacher cache (no {META_FILE})")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{meta_file}: not valid JSON ({exc})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != CACHE_FORMAT:
            raise DataError(f"{meta_file}: not a teacher cache of format {CACHE_FORMAT} (found {self.meta.get('format') if isinstance(self.meta, dict) else None})")
        try:
            index, _ = _read_safetensors(self.folder / INDEX_FILE)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise DataError(f"{self.folder / INDEX_FILE}: missing or unreadable ({type(exc).__name__}); rebuild the cache") from None
        self.dyn_index = np.array(index["dyn_index"])
        self.offsets = np.array(index["offsets"])
        self.shard_starts = np.array(index["shard_starts"])
        self._order = np.argsort(self.dyn_index, kind="stable")
        self._sorted = self.dyn_index[self._order]
        self._shards: OrderedDict = OrderedDict()

    @classmethod
    def open(cls, folder: str | Path, spec: CacheSpec | None = None, *, teacher: dict | None = None,
             steps=None) -> "TeacherCache":
        """Open a cache for reading, refusing (DataError naming the field) one built for another
        `spec` (data, rows, tokenizer, k, ...), another teacher (`teacher`: {step: teacher_sha256},
        checked for every step it names), or lacking a complete checkpoint in `steps`."""
        cache = cls(folder)
        if spec is not None:
            cache.check_spec(spec)
        if teacher:
            cache.check_teacher(teacher)
        for step in steps if steps is not None else []:
            if int(step) not in cache.steps:
                have = ", ".join(str(s) for s in cache.steps) or "none"
                raise DataError(f"{folder}: holds no complete checkpoint-{step} (complete steps: {have}); build it with `dyn distill cache`")
        return cache

    # -- checks

    def check_spec(self, spec: CacheSpec) -> None:
        saved = self.meta.get("spec", {})
        differ = spec.differences(saved)
        if differ:
            first = differ[0]
            raise DataError(
                f"{self.folder}: built for {_SPEC_WORDS.get(first, first)} ({', '.join(differ)}: cache has "
                f"{_short(saved.get(first))}, requested {_short(getattr(spec, first))}); refusing to reuse it - "
                "build a new cache (another -o folder) or remove this one"
            )

    def check_teacher(self, teacher: dict) -> None:
        known = {int(c["step"]): c["teacher_sha256"] for c in self.meta.get("checkpoints", [])}
        for step, sha in sorted(teacher.items()):
            if int(step) in known and known[int(step)] != sha:
                raise DataError(
                    f"{self.folder}: checkpoint-{step} was cached from other teacher weights (teacher_sha256: cache has "
                    f"{known[int(step)][:16]}, requested {sha[:16]}); refusing to reuse it - build a new cache"
                )

    # -- what it holds

    @property
    def spec(self) -> dict:
        return self.meta["spec"]

    @property
    def top_k(self) -> int:
        return int(self.meta["spec"]["top_k"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(c["step"]) for c in self.meta.get("checkpoints", []) if c.get("complete"))

    def teacher_sha256(self, step: int) -> str:
        for entry in self.meta.get("checkpoints", []):
            if int(entry["step"]) == int(step):
                return entry["teacher_sha256"]
        raise DataError(f"{self.folder}: no checkpoint-{step}")

    def positions(self, dyn_index) -> np.ndarray:
        """Each dyn_index's row position in the cache; DataError for one it does not hold."""
        wanted = np.asarray(dyn_index, dtype=np.int64).reshape(-1)
        at = np.searchsorted(self._sorted, wanted)
        at_clipped = np.minimum(at, max(len(self._sorted) - 1, 0))
        found = (at < len(self._sorted)) & (self._sorted[at_clipped] == wanted) if len(self._sorted) else np.zeros(len(wanted), bool)
        if not found.all():
            missing = wanted[~found][:5].tolist()
            raise DataError(f"{self.folder}: holds no row with dyn_index {', '.join(str(m) for m in missing)}")
        return self._order[at_clipped]

    def response_tokens(self, dyn_index) -> np.ndarray:
        positions = self.positions(dyn_index)
        return self.offsets[positions + 1] - self.offsets[positions]

    # -- reading

    def read(self, step: int, dyn_index) -> TeacherTopK:
        """The cached teacher for the rows `dyn_index` (a student batch, in its order) at the
        checkpoint of `step`: compact layout, row-major over the rows as given, positions ascending
        - what `collate_lm_batch` of those rows and `distillation_loss` expect. CPU tensors."""
        import torch

        step = int(step)
        if step not in self.steps:
            have = ", ".join(str(s) for s in self.steps) or "none"
            raise DataError(f"{self.folder}: holds no complete checkpoint-{step} (complete steps: {have})")
        positions = self.positions(dyn_index)
        shards = np.searchsorted(self.shard_starts, positions, side="right") - 1
        parts_lp, parts_ids, parts_tail = [], [], []
        for position, shard in zip(positions.tolist(), shards.tolist()):
            begin, end = int(self.offsets[position]), int(self.offsets[position + 1])
            if end == begin:
                continue
            tensors = self._shard(step, shard)
            base = int(self.offsets[self.shard_starts[shard]])
            parts_lp.append(tensors["log_probs"][begin - base:end - base])
            parts_ids.append(tensors["ids"][begin - base:end - base])
            parts_tail.append(tensors["tail_log_prob"][begin - base:end - base])
        k = self.top_k
        if not parts_lp:
            return TeacherTopK(torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.long), torch.zeros(0))
        return TeacherTopK(
            torch.from_numpy(np.concatenate(parts_lp).astype(np.float32)),
            torch.from_numpy(np.concatenate(parts_ids).astype(np.int64)),
            torch.from_numpy(np.concatenate(parts_tail).astype(np.float32)),
        )

    def _shard(self, step: int, shard: int) -> dict:
        key = (step, shard)
        if key in self._shards:
            self._shards.move_to_end(key)
            return self._shards[key]
        path = self.folder / _step_folder(step) / _shard_name(shard)
        if not path.is_file():
            raise DataError(f"{path}: missing from a cache marked complete for checkpoint-{step}; rebuild the cache")
        tensors, _ = _read_safetensors(path)
        expected = int(self.offsets[self.shard_starts[shard + 1]] - self.offsets[self.shard_starts[shard]])
        if tensors["log_probs"].shape != (expected, self.top_k):
            raise DataError(f"{path}: holds {tensors['log_probs'].shape} entries, the index says ({expected}, {self.top_k}); rebuild the cache")
        self._shards[key] = tensors
        if len(self._shards) > _OPEN_SHARDS:
            self._shards.popitem(last=False)
        return tensors

    def figures(self) -> dict:
        storage = self.meta.get("storage", {})
        return {
            "rows": int(self.spec["rows"]), "response_tokens": int(self.spec["response_tokens"]),
            "top_k": self.top_k, "checkpoints": self.steps, "shards": storage.get("shards"),
            "bytes_per_token": storage.get("bytes_per_token"), "complete": self.complete,
        }


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text[:16] if isinstance(value, str) and len(value) == 64 else text[:80]


# --------------------------------------------------------------------------- the builder

def build_teacher_cache(
    folder: str | Path, teacher, examples, tokenizer, *, top_k: int, example_format, dyn_index=None,
    where: Callable[[int], str] | None = None, batch_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS, device: str | None = None, precision: str = "float32",
    on_shard: Callable[[int, int], None] | None = None,
) -> TeacherCache:
    """Build (or complete) the teacher cache in `folder` for every checkpoint of `teacher` (see
    `teacher_checkpoints`) over `examples` (`core.lm.LMExamples` tokenised with `tokenizer`, from
    rows read with `example_format`; `dyn_index` each row's source position). Every rank of a
    multi-process run calls it; shards are shared out and each is written by one rank.

    An existing cache is reused only when its meta matches (DataError naming the field
    otherwise); shards already written are kept, missing ones computed, and the cache is marked
    complete when every checkpoint is whole. `precision` ("float32" or "bfloat16") is the teacher
    forward pass's (softmax always float32); `batch_tokens` the padded-token budget of a batch;
    `on_shard(step, shard)` is called after each shard this rank writes (progress, tests).
    Returns the opened cache on every rank."""
    import torch

    from dyn.core.distributed import barrier, broadcast_object, world

    if precision not in ("float32", "bfloat16"):
        raise UsageError(f"--precision {precision}: choose float32 or bfloat16 for the teacher")
    w = world()
    folder = Path(folder)
    index = _as_dyn_index(dyn_index, len(examples))
    spec = CacheSpec.describe(examples, tokenizer, top_k=top_k, example_format=example_format, dyn_index=index)
    checkpoints = teacher_checkpoints(teacher)
    starts = plan_shards(examples.response_tokens, shard_tokens)

    # Rank 0 checks or creates the folder; every rank raises the same error when it cannot.
    outcome = failure = None
    if w.is_main:
        try:
            hashes = {c.step: teacher_sha256(c) for c in checkpoints}
            _prepare_folder(folder, spec, checkpoints, hashes, index, examples.response_tokens, starts, shard_tokens, precision)
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            outcome, failure = (type(exc).__name__, str(exc)), exc
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome is not None:
        raise {"UsageError": UsageError, "DataError": DataError}.get(outcome[0], RuntimeError)(outcome[1])
    barrier()
    cache = TeacherCache(folder)
    starts = cache.shard_starts  # an existing cache keeps its own shard layout
    offsets = cache.offsets

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and w.size > 1:
        device = f"cuda:{w.local_rank}"
    autocast_dtype = torch.bfloat16 if precision == "bfloat16" else None
    teacher_hash = {int(c["step"]): c["teacher_sha256"] for c in cache.meta["checkpoints"]}
    name_row = where or (lambda i: f"row with dyn_index {int(index[i])}")
    rows = _plan_batches(examples, tokenizer, name_row, starts, batch_tokens, device)

    for checkpoint in checkpoints:
        step_dir = folder / _step_folder(checkpoint.step)
        missing = None
        if w.is_main:
            step_dir.mkdir(exist_ok=True)
            for leftover in step_dir.glob(".*.dyn-tmp-*"):
                leftover.unlink(missing_ok=True)  # a shard a killed run was writing
            missing = [s for s in range(len(starts) - 1) if not _shard_is_whole(step_dir / _shard_name(s), checkpoint.step, teacher_hash[checkpoint.step])]
        missing = broadcast_object(missing)
        vocab = None
        if missing:
            vocab = _compute_shards(
                folder, checkpoint, missing[w.rank::w.size], rows, offsets, starts, top_k, device, autocast_dtype,
                teacher_hash[checkpoint.step], spec.tokenizer_sha256, on_shard,
            )
        vocabs = [v for v in _gather(vocab) if v is not None]
        barrier()
        if w.is_main:
            _mark_checkpoint(folder, checkpoint.step, len(starts) - 1, vocabs[0] if vocabs else None)
        barrier()
    return TeacherCache(folder)


def _gather(obj) -> list:
    from dyn.core.distributed import all_gather_objects

    return all_gather_objects(obj)


def _prepare_folder(folder: Path, spec: CacheSpec, checkpoints, hashes: dict, index: np.ndarray,
                    response_tokens, starts: np.ndarray, shard_tokens: int, precision: str) -> None:
    """Rank 0: check an existing cache against the request (DataError naming the field), or create
    the folder with its index and meta; record checkpoints it did not hold yet."""
    from dyn.core.atomic import write_text_atomic

    meta_file = folder / META_FILE
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {folder}: exists and is not a folder")
    if meta_file.is_file():
        cache = TeacherCache(folder)
        cache.check_spec(spec)
        cache.check_teacher(hashes)
        meta = cache.meta
        recorded = {int(c["step"]) for c in meta["checkpoints"]}
        needs_work = any(int(c["step"]) in hashes and not c.get("complete") for c in meta["checkpoints"]) or bool(set(hashes) - recorded)
        if needs_work and meta.get("teacher_precision") != precision:
            raise DataError(
                f"{folder}: built with the teacher in {meta.get('teacher_precision')} (teacher_precision); "
                f"finish it with the same precision, not {precision}, or build a new cache"
            )
    else:
        if folder.is_dir() and any(not _is_cache_entry(p.name) for p in folder.iterdir()):
            raise UsageError(f"-o {folder}: a non-empty folder that is not a teacher cache; name a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        offsets = np.r_[0, np.cumsum(np.asarray(response_tokens, dtype=np.int64))].astype(np.int64)
        _write_atomic_bytes(folder / INDEX_FILE, _safetensors_bytes(
            {"dyn_index": index, "offsets": offsets, "shard_starts": starts}, {"format": CACHE_FORMAT}))
        from importlib.metadata import version

        meta = {
            "format": CACHE_FORMAT,
            "dyn_version": version("dyn"),
            "spec": spec.to_dict(),
            "storage": {
                "log_probs": STORED_LOG_PROB_DTYPE, "ids": "int32", "tail_log_prob": "float32",
                "shard_tokens": int(shard_tokens), "shards": int(len(starts) - 1),
                "bytes_per_token": 6 * spec.top_k + 4,
            },
            "teacher_precision": precision,
            "checkpoints": [],
            "complete": False,
        }
    recorded = {int(c["step"]) for c in meta["checkpoints"]}
    for checkpoint in checkpoints:
        if checkpoint.step not in recorded:
            meta["checkpoints"].append({"step": checkpoint.step, "teacher_sha256": hashes[checkpoint.step],
                                        "path": str(checkpoint.path), "vocab_size": None, "complete": False})
    meta["checkpoints"].sort(key=lambda c: int(c["step"]))
    meta["complete"] = all(c.get("complete") for c in meta["checkpoints"])
    write_text_atomic(meta_file, json.dumps(meta, indent=2) + "\n")


def _is_cache_entry(name: str) -> bool:
    return name in (META_FILE, INDEX_FILE, "run.json") or bool(_STEP_NAME.match(name)) or ".dyn-tmp-" in name


def _plan_batches(examples, tokenizer, where, starts: np.ndarray, batch_tokens: int | None, device: str):
    """Token-budget batches of rows with response tokens, never crossing a shard
    (`plan_row_batches` with the shard as group); rows without any are never run."""
    from dyn.core.lm import pad_token_id
    from dyn.core.lm_batches import default_batch_tokens, plan_row_batches

    lengths = examples.lengths
    if batch_tokens is None:
        batch_tokens = max(default_batch_tokens(device), int(lengths.max()) if len(lengths) else 1)
    shard_of_row = np.searchsorted(starts, np.arange(len(examples)), side="right") - 1
    rows = plan_row_batches(examples, pad_token_id(tokenizer), where, batch_tokens, groups=shard_of_row, device=device)
    rows.batches = [b[examples.response_tokens[b] > 0] for b in rows.batches]
    rows.batches = [b for b in rows.batches if len(b)]
    return rows


def _shard_is_whole(path: Path, step: int, teacher_hash: str) -> bool:
    """A shard a previous run finished (written atomically, so present means whole) for this
    checkpoint's weights."""
    if not path.is_file():
        return False
    try:
        _, metadata = _read_safetensors(path)
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return metadata.get("step") == str(step) and metadata.get("teacher_sha256") == teacher_hash


def _compute_shards(folder: Path, checkpoint, shards: list[int], rows, offsets: np.ndarray, starts: np.ndarray, top_k: int,
                    device: str, autocast_dtype, teacher_hash: str, tokenizer_hash: str, on_shard) -> int | None:
    """This rank's share of one checkpoint's missing shards; returns the teacher's vocabulary
    (None when this rank had none to compute)."""
    from dyn.core import progress
    from dyn.core.models import load_model_and_tokenizer

    if not shards:
        return None
    model, teacher_tokenizer = load_model_and_tokenizer(str(checkpoint.path), flag="--teacher")
    if tokenizer_sha256(teacher_tokenizer) != tokenizer_hash:
        raise DataError(f"{checkpoint.path}: its tokenizer differs from the one the rows were tokenised with; a cache holds one tokenizer's ids")
    model = model.to(device).eval()
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else int(model.config.vocab_size)
    check_top_k(top_k, vocab, f"the vocabulary of {checkpoint.path}")
    group_batches: dict[int, list[int]] = {}
    for j, batch in enumerate(rows.batches):
        group_batches.setdefault(int(rows.groups[batch[0]]), []).append(j)
    with progress.progress(f"teacher cache, checkpoint-{checkpoint.step}", total=len(shards), unit="shards") as bar:
        for shard in shards:
            first, stop = int(starts[shard]), int(starts[shard + 1])
            base, total = int(offsets[first]), int(offsets[stop] - offsets[first])
            log_probs = np.zeros((total, top_k), dtype=np.float16)
            ids = np.zeros((total, top_k), dtype=np.int32)
            tail = np.zeros(total, dtype=np.float32)
            for j in group_batches.get(shard, []):
                positions = rows.batches[j]
                result = teacher_top_k(model, rows.batch(j), top_k, autocast_dtype=autocast_dtype)
                counts = rows.examples.response_tokens[positions]
                if len(result) != int(counts.sum()):
                    raise RuntimeError(f"teacher cache: {len(result)} counted positions for {int(counts.sum())} response tokens")
                values = result.log_probs.cpu().numpy()
                bad = ~np.isfinite(values[:, 0])
                if bad.any():
                    row = int(np.repeat(positions, counts)[np.flatnonzero(bad)[0]])
                    raise DataError(f"{rows.where(row)}: the teacher checkpoint-{checkpoint.step}'s log-probabilities are not finite (NaN or inf logits); check the model")
                dest = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in positions]) - base
                log_probs[dest] = values.astype(np.float16)
                ids[dest] = result.ids.cpu().numpy().astype(np.int32)
                tail[dest] = result.tail_log_prob.cpu().numpy()
            metadata = {"format": CACHE_FORMAT, "step": checkpoint.step, "first_row": first, "rows": stop - first,
                        "teacher_sha256": teacher_hash, "top_k": top_k}
            path = folder / _step_folder(checkpoint.step) / _shard_name(shard)
            _write_atomic_bytes(path, _safetensors_bytes({"log_probs": log_probs, "ids": ids, "tail_log_prob": tail}, metadata))
            bar.advance(1)
            if on_shard is not None:
                on_shard(checkpoint.step, shard)
    return vocab


def _mark_checkpoint(folder: Path, step: int, shards: int, vocab: int | None) -> None:
    """Rank 0, after every rank wrote its shards: check that the checkpoint's shards are all there,
    then record it complete (and the cache, when every checkpoint is)."""
    from dyn.core.atomic import write_text_atomic

    step_dir = folder / _step_folder(step)
    absent = [s for s in range(shards) if not (step_dir / _shard_name(s)).is_file()]
    if absent:
        raise RuntimeError(f"{step_dir}: {len(absent)} of {shards} shards were not written (e.g. {_shard_name(absent[0])})")
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    for entry in meta["checkpoints"]:
        if int(entry["step"]) == step:
            entry["complete"] = True
            if vocab is not None:
                entry["vocab_size"] = vocab
    meta["complete"] = all(c.get("complete") for c in meta["checkpoints"])
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
