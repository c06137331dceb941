"""Records in and out: read rows from JSONL / JSON / CSV / Parquet files or a Hugging Face dataset, and
write JSONL safely (atomically, or appended with fsync per batch for resumable pipelines).

A record is a plain `dict`. Readers keep where each record came from (`"line 7"` for JSONL and CSV,
1-based file lines; `"row 3"` for JSON lists, Parquet and Hugging Face datasets, 0-based) so that every
error about a record can name the file, the place and the field. This module knows nothing about what
the columns mean; `preference.py` and `prompts.py` interpret them.

Compressed files are read by suffix (`pairs.jsonl.gz`, `prompts.csv.bz2`, `x.json.zst`): gzip and bzip2
through the standard library, zstd through the `zstandard` package when installed. Text must be UTF-8 (a BOM
is dropped); a line that is not is a "bad_encoding" error naming the file and line, or a skipped line under
on_error="skip".

Optional dependencies are imported only when used: `pyarrow` for Parquet, `datasets` for hub ids and
saved dataset folders, `zstandard` for `.zst`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from polyalign.files import jsonl_text, looks_local

FORMATS = ("jsonl", "json", "csv", "parquet", "hf")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".zst")


class DataError(ValueError):
    """Bad input data. The message names the file, the line or row, and the field; `reason` is a short
    code (e.g. "malformed_json", "missing_field") used to count skipped rows."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def field_error(where: str, key: str, problem: str, reason: str) -> DataError:
    """A DataError for one field of one record; `where` is "<source>: <location>"."""
    return DataError(f"{where}: field {key!r}: {problem}", reason)


def get_field(row: dict, key: str, where: str):
    """row[key], or a "missing_field" error listing the columns the row has."""
    if key not in row:
        raise field_error(where, key, f"missing (columns: {sorted(row)})", "missing_field")
    return row[key]


def text_field(value: object, where: str, key: str) -> str:
    """A non-empty (not only whitespace) string; "bad_type" / "empty_completion" errors otherwise."""
    if not isinstance(value, str):
        raise field_error(where, key, f"expected a string, got {type(value).__name__}", "bad_type")
    if not value.strip():
        raise field_error(where, key, "empty completion", "empty_completion")
    return value


def number_field(value: object, where: str, key: str) -> float | None:
    """A finite float from a number or a numeric string (CSV cells); None for None or ""."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise field_error(where, key, f"expected a number, got {value!r}", "bad_score") from None
    if not math.isfinite(number):
        raise field_error(where, key, f"not a finite number: {value!r}", "bad_score")
    return number


@dataclass(frozen=True)
class Records:
    """Rows read from one source, with where each came from."""

    source: str  # the path or hub id as given
    rows: list[dict]
    locations: list[str]  # one per row: "line N" (JSONL/CSV, 1-based) or "row N" (JSON/Parquet/HF, 0-based)
    skipped_lines: tuple[int, ...] = ()  # malformed lines skipped under on_error="skip"
    encoding_errors: tuple[int, ...] = ()  # lines skipped under on_error="skip" for not being UTF-8


def read_records(
    path_or_id: str | Path,
    split: str = "train",
    fmt: str | None = None,
    *,
    on_error: str = "error",
    key: str | None = None,
) -> list[dict]:
    """Rows of a local file or a Hugging Face dataset; see `read_table` (this drops the locations and
    warns with the count of skipped malformed lines)."""
    table = read_table(path_or_id, split, fmt, on_error=on_error, key=key)
    skipped = sorted(table.skipped_lines + table.encoding_errors)
    if skipped:
        warnings.warn(
            f"{table.source}: skipped {len(skipped)} malformed line(s): {skipped[:10]}",
            stacklevel=2,
        )
    return table.rows


def read_table(
    path_or_id: str | Path,
    split: str = "train",
    fmt: str | None = None,
    *,
    on_error: str = "error",
    key: str | None = None,
) -> Records:
    """All records with their locations; see `iter_table` for the args."""
    skipped, bad, rows, locations = [], [], [], []
    for row, location in iter_table(
        path_or_id, split, fmt, on_error=on_error, key=key, skipped=skipped, bad=bad
    ):
        rows.append(row)
        locations.append(location)
    return Records(str(path_or_id), rows, locations, tuple(skipped), tuple(bad))


def iter_table(
    path_or_id: str | Path,
    split: str = "train",
    fmt: str | None = None,
    *,
    on_error: str = "error",
    key: str | None = None,
    skipped: list[int] | None = None,
    bad: list[int] | None = None,
) -> Iterator[tuple[dict, str]]:
    """(record, location) pairs as they are read: JSONL is streamed line by line (a large file is never held
    whole), the other formats are read whole first.

    Args:
        path_or_id: a `.jsonl`/`.ndjson`, `.json`, `.csv` or `.parquet` file; a folder (read with
            `datasets`: a `save_to_disk` folder or a dataset script/data folder); or a hub id.
        split: the split of a Hugging Face dataset, or of a JSON file holding {split: [records]}.
        fmt: one of FORMATS to override detection by suffix.
        on_error: "error" raises on a malformed JSONL line or one that is not UTF-8; "skip" leaves it out
            and appends its number to `skipped` (not UTF-8: to `bad`).
        key: for a JSON object file, the key holding the list of records.
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    source = str(path_or_id)
    fmt = fmt or _detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} for {source}; expected one of {FORMATS}")
    if fmt != "hf" and not Path(source).is_file():
        raise FileNotFoundError(f"no such file: {source}")
    if fmt in ("jsonl", "csv", "json"):
        lines = _text_lines(Path(source), on_error, [] if bad is None else bad)
    if fmt == "jsonl":
        yield from _read_jsonl(Path(source), lines, on_error, [] if skipped is None else skipped)
    elif fmt == "csv":
        yield from _read_csv(Path(source), list(lines))
    else:
        rows = (
            _read_hf(source, split)
            if fmt == "hf"
            else _read_parquet(Path(source))
            if fmt == "parquet"
            else _read_json(Path(source), "".join(text for _, text in lines), split, key)
        )
        yield from ((row, f"row {i}") for i, row in enumerate(rows))


def _detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "hf"
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    inner = suffixes[-1] if suffixes else ""
    if inner in _SUFFIXES:
        return _SUFFIXES[inner]
    if path.exists():
        known = ", ".join(sorted(_SUFFIXES)) + f", each optionally + {'/'.join(COMPRESSIONS)}"
        raise ValueError(
            f"cannot tell the format of {path} from its suffix ({known}); pass fmt= one of {FORMATS}"
        )
    if inner or path.suffix or looks_local(source):
        raise FileNotFoundError(f"no such file: {source}")
    return "hf"  # not a local path and no data-file suffix: a hub id such as "org/name"


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed by suffix (.gz, .bz2, .zst)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path} needs zstandard: pip install zstandard") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _text_lines(path: Path, on_error: str, bad: list[int]) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for every line of a text file, as read; lines that are not UTF-8
    raise a "bad_encoding" DataError naming the line, or are left out (appended to `bad`) under
    on_error="skip"."""
    try:
        with open_binary(path) as f:
            for number, raw in enumerate(io.BufferedReader(f) if path.suffix == ".zst" else f, start=1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    if on_error == "skip":
                        bad.append(number)
                        continue
                    raise DataError(
                        f"{path}: line {number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                        f"{exc.start + 1}); re-encode the file as UTF-8, or set data.on_error=skip",
                        "bad_encoding",
                    ) from None
                yield number, text
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz/.bz2/.zst
        raise DataError(f"{path}: cannot be read: {exc}", "corrupt_file") from None


def _read_jsonl(path: Path, lines: Iterable, on_error: str, skipped: list[int]) -> Iterator[tuple[dict, str]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if on_error == "skip":
                skipped.append(number)
                continue
            raise DataError(
                f"{path}: line {number}: malformed JSON record: {exc}", "malformed_json"
            ) from None
        yield row, f"line {number}"


def _read_json(path: Path, text: str, split: str, key: str | None) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}", "malformed_json") from None
    if isinstance(data, dict):
        data = _list_in_object(path, data, split, key)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: row {i}: expected a JSON object, got {type(row).__name__}", "malformed_json"
            )
    return data


def _list_in_object(path: Path, data: dict, split: str, key: str | None) -> list:
    """The record list inside a JSON object: under `key`, else under the split name, else the only list."""
    lists = [k for k, v in data.items() if isinstance(v, list)]
    if key is not None and key not in data:
        raise DataError(f"{path}: key {key!r} not found; keys holding lists: {lists}")
    chosen = key if key is not None else split if split in lists else lists[0] if len(lists) == 1 else None
    if chosen is None:
        raise DataError(
            f"{path}: a JSON object with list keys {lists}; pass key= to say which holds the records"
        )
    return data[chosen]


def _read_csv(path: Path, lines: list[tuple[int, str]]) -> Iterator[tuple[dict, str]]:
    numbers = [number for number, _ in lines]  # file line of each line read (non-UTF-8 lines left out)

    def file_line(k: int) -> int:  # the k-th line read (0-based) as a line of the file
        return numbers[k] if k < len(numbers) else k + 1

    reader = csv.DictReader(io.StringIO("".join(text for _, text in lines), newline=""), restkey="\0extra")
    start = file_line(1)  # the header is the first line; a record may span several lines
    for row in reader:
        if "\0extra" in row or any(v is None for v in row.values()):
            raise DataError(
                f"{path}: line {start}: expected {len(reader.fieldnames or [])} comma-separated fields "
                f"({reader.fieldnames}), got a different number",
                "malformed_csv",
            )
        yield row, f"line {start}"
        start = file_line(reader.line_num)


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def _read_hf(source: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {source!r} as a Hugging Face dataset needs the datasets package: pip install datasets"
        ) from None
    folder = Path(source)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        dataset = datasets.load_from_disk(str(folder))  # a save_to_disk folder
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise KeyError(f"{source}: no split {split!r}; splits: {list(dataset)}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(source, split=split)
    return dataset.to_list()


def _trim_partial_line(path: Path) -> int:
    """Cut a trailing record left half-written by a crash (no final newline); returns the bytes dropped."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


class JsonlWriter:
    """Append records to a JSONL file; each `write(batch)` is flushed and fsynced before it returns, so a
    crash loses at most the batch being written. Opening in append mode first cuts a half-written last
    line (reported in `dropped_bytes`), so a resumed pipeline appends to a file of whole records.

    Use as a context manager: `with JsonlWriter(path) as w: w.write(records)`.
    """

    def __init__(self, path: str | Path, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_bytes = _trim_partial_line(self.path) if append and self.path.exists() else 0
        self.written = 0  # records written through this writer
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> int:
        """Append a batch of records durably; returns how many were written."""
        text = jsonl_text(records)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())
        count = text.count("\n")
        self.written += count
        return count

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
