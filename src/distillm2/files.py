"""File I/O of the run directory: strict JSONL, atomic files and directories, tail repair.

Every writer writes to a temporary name beside the target and renames it over the target, so a
reader (or a resumed run) never sees half a file. Temporary names carry the process id: ranks of
a multi-process run share the file system, and two writers must never share a temporary file.
JSONL appends are whole lines flushed to disk; a line a crash cut short is dropped on resume
(:func:`drop_partial_tail`) and regenerated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from distillm2.errors import DataError


def cache_dir() -> Path:
    """Where converted models, measurements and fetched images are cached: ``$DISTILLM2_CACHE``
    or ``~/.cache/distillm2``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillm2"
    return Path(os.environ.get("DISTILLM2_CACHE", default))


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSONL file as a dict; a malformed line is an error naming file and line."""
    path = Path(path)
    rows = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the line); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows to a temporary file and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file whole and no debris
        raise


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append whole lines in one write, flushed to disk before returning."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def drop_partial_tail(path: str | Path) -> bool:
    """Cut a last line that a crash left without its newline; True if something was cut."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    tmp = _tmp_name(path)
    tmp.write_bytes(data[: data.rfind(b"\n") + 1])
    tmp.replace(path)
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data, indent: int | None = 2) -> None:
    """``json.dumps(data)`` written atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for writers that take a file name (``torch.save``):
    renamed over ``path`` when the block finishes, removed when it fails. Yields the temporary path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``target`` only when the block
    finishes without an error; a crash leaves the old ``target`` (or none) and a stale temporary
    directory that the next attempt removes. Yields the temporary path."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)  # two renames: a crash between them leaves .old, never a mix
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
