"""A folder of embeddings keyed by (model, text): reruns and a second `-k` embed nothing again.

Layout: `<root>/embeddings/<model hash>-<settings hash>/meta.json` naming what produced the
vectors (model sha256, pooling, precision, max length, dyn version) and `shard-*.npz` files, each
holding 16-byte text keys and float32 vectors. Shards are written atomically and only by rank 0.
A folder whose meta does not match the request is rebuilt, never silently reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dyn.core.atomic import atomic_output, write_text_atomic
from dyn.core.hashing import json_sha256
from dyn.core.progress import info

CACHE_FORMAT = 1


class EmbeddingCache:
    def __init__(self, root: str | Path, model_hash: str, settings: dict, dim: int):
        self.meta = {"format": CACHE_FORMAT, "model_sha256": model_hash, "settings": settings, "dim": dim}
        self.folder = Path(root) / "embeddings" / f"{model_hash[:16]}-{json_sha256(settings)[:8]}"
        self.dim = dim
        self._checked = False

    def _check_meta(self) -> None:
        if self._checked:
            return
        self._checked = True
        meta_file = self.folder / "meta.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except ValueError:
                meta = None
            if meta is not None and {k: meta.get(k) for k in self.meta} == self.meta:
                return
            info(f"embedding cache {self.folder} was made for other settings; rebuilding it")
            shutil.rmtree(self.folder, ignore_errors=True)

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Which keys are cached (a mask) and their vectors, in the order of the found keys."""
        self._check_meta()
        found = np.zeros(len(keys), dtype=bool)
        if not self.folder.is_dir():
            return found, np.zeros((0, self.dim), dtype=np.float32)
        where: dict[bytes, tuple[int, int]] = {}
        shards = []
        for number, shard in enumerate(sorted(self.folder.glob("shard-*.npz"))):
            try:
                with np.load(shard) as data:
                    shard_keys, shard_vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard is ignored; its rows are embedded again
            if shard_vectors.shape[1:] != (self.dim,):
                continue
            shards.append(shard_vectors)
            for row, key in enumerate(shard_keys):
                where.setdefault(key.tobytes(), (len(shards) - 1, row))
        rows = []
        for i, key in enumerate(keys):
            hit = where.get(key)
            if hit is not None:
                found[i] = True
                rows.append(shards[hit[0]][hit[1]])
        vectors = np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        return found, vectors.astype(np.float32, copy=False)

    def add(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if not keys:
            return
        self._check_meta()
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            write_text_atomic(meta_file, json.dumps(self.meta, indent=2) + "\n")
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1)
        name = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.npz"
        with atomic_output(name) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=key_array, vectors=np.asarray(vectors, dtype=np.float32))
