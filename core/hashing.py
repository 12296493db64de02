"""Content hashes that key caches and fill run records."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(path: str | Path, names: list[str] | None = None) -> str:
    """Hash the files of a folder (or the named ones) by relative name and content."""
    root = Path(path)
    files = [root / n for n in names] if names else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            continue
        digest.update(str(file.relative_to(root)).encode())
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def text_keys(texts: list[str]) -> list[bytes]:
    """A 16-byte key per text: what the embedding cache is indexed by."""
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]


def json_sha256(obj) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
