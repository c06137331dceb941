"""Resumable stage files: every expensive synthesis stage appends its output records to a JSONL file, one
flushed-and-fsynced batch at a time, each record keyed by a stable `id`.

On a rerun `done_ids(path)` first cuts a torn last line (a kill -9 mid-write) and reads the ids already
written; `run_batches` then processes only the work items whose output ids are missing. So a crash loses at
most the batch in flight, a finished record is never written twice, and a rerun continues where the last
run stopped. Cheap pure stages (pairing, filtering) rewrite their whole output atomically instead.

Ids are deterministic from content: `make_id(*parts)` joins the parts with "|" (source prompt id, language,
generator name, ...), so the same work item gets the same id on every run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from polyalign.data.io import DataError, JsonlWriter

SEP = "|"
PROGRESS_EVERY_S = 3.0


def make_id(*parts: object) -> str:
    """A stable record id from its parts (the first may itself be an id; later parts, such as a language or a
    generator name, may not contain the separator "|")."""
    text = [str(p) for p in parts]
    bad = [p for i, p in enumerate(text) if not p or (i and SEP in p)]
    if bad:
        raise ValueError(f"record id part {bad[0]!r} is empty or contains {SEP!r}")
    return SEP.join(text)


def read_stage(path: str | Path) -> list[dict]:
    """Whole records of a stage file (a torn last line is ignored); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the torn last line of a killed run, cut by the next writer
                break
            raise DataError(f"{path}: line {number}: malformed JSON record in a stage file") from None
    return rows


def check_unique_ids(records: Sequence[dict], where: str) -> None:
    """DataError naming the first duplicated id and its two positions."""
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        ident = record.get("id")
        if not isinstance(ident, str) or not ident:
            raise DataError(f"{where}: record {i}: field 'id': expected a non-empty string, got {ident!r}")
        if ident in seen:
            raise DataError(
                f"{where}: duplicate id {ident!r} (records {seen[ident]} and {i}); ids must be unique",
                "duplicate_id",
            )
        seen[ident] = i


def done_ids(path: str | Path) -> set[str]:
    """Ids already in a stage file, after repairing a torn last line; a duplicated id is an error."""
    path = Path(path)
    if path.is_file():
        JsonlWriter(path, append=True).close()  # opening for append cuts a half-written last line
    records = read_stage(path)
    check_unique_ids(records, str(path))
    return {r["id"] for r in records}


def progress_printer(
    description: str, total: int, done: int, enabled: bool = True, console: Any = None, clock=time.monotonic
) -> Callable[[int], None]:
    """`advance(n)` for a stage: once the stage has run `PROGRESS_EVERY_S` seconds, and then every as many
    seconds, it prints "synth <stage>: <done>/<total> records, <rate>/s" (rich, on stderr). Silent when
    `enabled` is false (`progress: false` in the config) or when stderr is not a terminal (logs, pipes)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not enabled or not console.is_terminal:
        return lambda n: None
    start = clock()
    state = {"count": 0, "printed": start}

    def advance(n: int) -> None:
        state["count"] += n
        now = clock()
        if now - state["printed"] >= PROGRESS_EVERY_S:
            state["printed"] = now
            rate = state["count"] / max(now - start, 1e-9)
            console.print(
                f"synth {description}: {done + state['count']}/{total} records, {rate:.1f}/s", highlight=False
            )

    return advance


def run_batches(
    path: str | Path,
    items: Sequence[Any],
    item_id: Callable[[Any], str],
    process: Callable[[list[Any]], Iterable[dict]],
    batch_size: int,
    description: str,
    progress: bool = True,
) -> dict[str, int]:
    """Process the items whose id is not yet in `path`, `batch_size` at a time, appending every batch's
    output records durably. `process(batch)` returns the output records of a batch (each with an "id").

    Returns {"total", "already_done", "processed", "written"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    done = done_ids(path)
    ids = [item_id(item) for item in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{description}: two work items share the id {dup!r}", "duplicate_id")
    pending = [item for item, ident in zip(items, ids) if ident not in done]
    stats = {"total": len(items), "already_done": len(items) - len(pending), "processed": 0, "written": 0}
    advance = progress_printer(description, len(items), stats["already_done"], progress and bool(pending))
    with JsonlWriter(path, append=True) as writer:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            records = list(process(batch))
            fresh = [r for r in records if r["id"] not in done]
            done.update(r["id"] for r in fresh)
            stats["written"] += writer.write(fresh)
            stats["processed"] += len(batch)
            advance(len(batch))
    return stats
