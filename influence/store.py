"""The gradient store: projected per-sample gradients on disk, reusable across runs (`--store DIR`).

    DIR/meta.json                      settings every part shares (projection size and seed, Γ,
                                       scored parameters and their shapes, format version)
    DIR/ckpt<step>-<model>/<role>-<kind>-<data>/
        shard-<rank>-of-<world>.npz    positions, unit rows (float16), norms (float32)
        meta.json                      written last, when every shard is in: the part is whole

<model> and <data> are the first 16 hex digits of the checkpoint's content hash and of the scored
token ids, so a part is found again only for the same model, rows and settings; a folder whose
settings differ is refused, never silently reused (DESIGN §4.5). Rows are stored as a unit
vector in float16 and a float32 norm: float16 keeps about three digits of each entry whatever the
gradient's scale (tiny late-training gradients would underflow as raw float16), cosine needs the
unit vector anyway, and dot products multiply the norm back. Each rank writes its own shard; the
reader scatters rows back by position, so a store written by N processes reads the same under M.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dyn.core.atomic import write_text_atomic
from dyn.core.errors import UsageError

STORE_FORMAT = 1
META = "meta.json"


class GradientStore:
    """A store folder checked against (or created with) `settings`."""

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))

    def open(self, create: bool) -> "GradientStore":
        """Check the folder's meta.json against this run's settings (a UsageError naming what
        differs); with `create`, make the folder and its meta.json when it has none."""
        meta = self.folder / META
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--store {self.folder}: exists and is not a folder")
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("format") != STORE_FORMAT:
                raise UsageError(f"--store {self.folder}: written by another store format ({saved.get('format')}); use a new folder")
            differ = sorted(k for k in set(saved.get("settings", {})) | set(self.settings)
                            if saved.get("settings", {}).get(k) != self.settings.get(k))
            if differ:
                raise UsageError(
                    f"--store {self.folder}: built with other settings ({', '.join(differ)}); "
                    "use another --store folder or remove this one"
                )
        elif create:
            if self.folder.is_dir() and any(self.folder.iterdir()):
                raise UsageError(f"--store {self.folder}: a non-empty folder that is not a gradient store")
            self.folder.mkdir(parents=True, exist_ok=True)
            from importlib.metadata import version

            from dyn.core.runrecord import library_versions

            versions = {"dyn": version("dyn"), **library_versions()}
            meta_data = {"format": STORE_FORMAT, "versions": versions, "settings": self.settings}
            write_text_atomic(meta, json.dumps(meta_data, indent=2) + "\n")
        return self

    def part(self, step: int, model_hash: str, role: str, kind: str, data_hash: str) -> "StorePart":
        folder = self.folder / f"ckpt{step}-{model_hash[:16]}" / f"{role}-{kind}-{data_hash[:16]}"
        return StorePart(folder, {"step": step, "model_sha256": model_hash, "role": role, "kind": kind, "data_sha256": data_hash})


class StorePart:
    """One (checkpoint, row set, kind) of a store: shards by rank, then meta.json."""

    def __init__(self, folder: Path, identity: dict):
        self.folder = folder
        self.identity = identity

    def is_complete(self) -> bool:
        meta = self.folder / META
        if not meta.is_file():
            return False
        saved = json.loads(meta.read_text(encoding="utf-8"))
        return all(saved.get(k) == v for k, v in self.identity.items()) and all(
            (self.folder / name).is_file() for name in saved.get("shards", [])
        )

    def reset(self) -> None:
        """Remove what an unfinished earlier run left, and make the folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_shard(self, rank: int, world: int, positions: np.ndarray, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float32)
        norms = np.linalg.norm(x, axis=1).astype(np.float32) if len(x) else np.zeros(0, np.float32)
        unit = x / np.where(np.isfinite(norms) & (norms > 0), norms, 1.0)[:, None]
        unit[~np.isfinite(norms)] = 0.0
        name = self.folder / f"shard-{rank:05d}-of-{world:05d}.npz"
        tmp = name.with_name("." + name.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, positions=np.asarray(positions, dtype=np.int64), unit=unit.astype(np.float16), norms=norms)
        tmp.replace(name)

    def finish(self, rows: int, dim: int) -> None:
        """Rank 0, after every rank wrote its shard: check that the shards cover every row once,
        then write meta.json."""
        shards = sorted(p.name for p in self.folder.glob("shard-*.npz"))
        seen = np.zeros(rows, dtype=np.int64)
        for name in shards:
            with np.load(self.folder / name) as data:
                np.add.at(seen, data["positions"], 1)
        if not (seen == 1).all():
            raise RuntimeError(f"{self.folder}: shards cover {int((seen > 0).sum())} of {rows} rows ({int((seen > 1).sum())} twice)")
        meta = {**self.identity, "rows": rows, "dim": dim, "shards": shards,
                "storage": "float16 unit rows times float32 norms"}
        write_text_atomic(self.folder / META, json.dumps(meta, indent=2) + "\n")

    def read(self) -> np.ndarray:
        """All rows as float32 (rows, dim); NaN rows for rows that had no gradient (no response)."""
        meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        out = np.zeros((meta["rows"], meta["dim"]), dtype=np.float32)
        for name in meta["shards"]:
            with np.load(self.folder / name) as data:
                out[data["positions"]] = data["unit"].astype(np.float32) * data["norms"][:, None]
        return out
