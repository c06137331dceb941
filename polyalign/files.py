"""Crash-safe file writing, the one place it is done: atomic text/JSON/JSONL writes and durable deletes.

An atomic write goes to a temporary file beside the target, is flushed and fsynced, then renamed over the
target (atomic on POSIX) and the directory is fsynced: a reader, or a run resumed after `kill -9`, sees the
old content or the new one, never a torn file. Files are created with the usual mode (0644 under the
common umask 022), not the 0600 of `tempfile.mkstemp`.

Imports only the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` so that readers see the old content or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__} ({obj!r:.80})")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text of `obj` (tensors and numpy values become lists/numbers, non-ASCII kept as is)."""
    return json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """`atomic_write_text` of `obj` as JSON."""
    return atomic_write_text(path, to_json(obj, indent) + "\n")


def jsonl_text(records: Iterable[dict]) -> str:
    """JSONL text, one record a line; a record that is not JSON-serialisable is named by its index."""
    lines = []
    for i, record in enumerate(records):
        try:
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"record {i} is not JSON-serialisable: {exc}") from None
    return "".join(lines)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically; returns the number of records written."""
    text = jsonl_text(records)
    atomic_write_text(path, text)
    return text.count("\n")


def remove_dir(path: Path) -> None:
    """Delete a directory crash-safely: rename to .tmp-* (atomic) first, so a partial delete is ignored."""
    doomed = path.with_name(f".tmp-del-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (`name` or `owner/name`): it exists,
    starts with ./ ../ / ~ or a drive letter, or has more than one slash or a backslash."""
    return (
        os.path.exists(name)
        or name.startswith(("./", "../", "/", "~", ".\\"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
    )
