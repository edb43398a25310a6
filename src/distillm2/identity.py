"""What determines a generation or a score, as a short hash: the identity of each model (its
weight, config and tokenizer files) and the settings. Every evaluation cache carries such a key,
in its file name or beside it, and is recomputed when the key changes, so results of two models,
two sets of weights in one directory or two decoding settings never mix.

A model's fingerprint hashes the files of its directory (a hub id is first resolved to its
cached snapshot): files up to 64 MiB by their bytes, larger ones (weight shards) by size,
modification time and their first and last MiB, which keeps it cheap for a 70B model. Copying a
large shard changes its modification time and so, conservatively, the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillm2 import models

_WHOLE = 64 * 2**20  # files up to this size are hashed in full
_EDGE = 2**20  # of larger files: the first and last MiB
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> digest, for this process

# Bumped when a change to generation or scoring code changes what a cache holds.
CACHE_FORMAT = 2


def _file_digest(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if stat.st_size <= _WHOLE:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            h.update(fh.read(_EDGE))
            fh.seek(stat.st_size - _EDGE)
            h.update(fh.read(_EDGE))
    _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def _snapshot(name: str) -> Path | None:
    """The local snapshot directory of a hub id already in the cache, or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: the caller records it as unresolved
        return None


def model_identity(name_or_path: str) -> dict:
    """``{"source", "path", "fingerprint"}`` of a model given by hub id, directory or embedded
    name. ``fingerprint`` is a 16-hex-digit hash of its directory's files, or of the name alone
    (``"resolved": False``) when no local copy can be found."""
    resolved = models.resolve(name_or_path)
    folder = Path(resolved) if Path(resolved).is_dir() else _snapshot(resolved)
    if folder is None:
        digest = hashlib.sha256(f"unresolved:{resolved}".encode()).hexdigest()[:16]
        return {"source": name_or_path, "path": None, "fingerprint": digest, "resolved": False}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{_file_digest(path)}\n".encode())
    return {"source": name_or_path, "path": str(folder), "fingerprint": h.hexdigest()[:16]}


def cache_key(**parts) -> str:
    """A 16-hex-digit hash of ``parts`` (any JSON-serialisable values) and the cache format."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def claim(path: str | Path, key: str) -> bool:
    """Make ``path`` a cache for ``key``: when ``PATH.key`` names another key (or is missing
    while ``path`` exists), ``path`` and its per-rank parts are removed first. Returns whether
    anything was removed. Call it from one process, before any rank reads ``path``."""
    path = Path(path)
    marker = path.with_name(path.name + ".key")
    if marker.exists() and marker.read_text().strip() == key:
        return False
    stale = [p for p in path.parent.glob(path.name + "*") if p != marker and p.is_file()]
    for p in stale:
        p.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    return bool(stale)


def read_keyed_json(path: str | Path, key: str) -> dict | None:
    """The JSON object cached in ``path`` when it was written for ``key``, else None."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if data.get("key") == key else None
