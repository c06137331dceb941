"""data/io.py on files as they are published: compressed (.gz, .bz2, .zst), not UTF-8, missing local paths."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

from polyalign.data.io import DataError, _detect_format, read_table

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2 é", "chosen": "c", "rejected": "d"}]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _csv(rows) -> bytes:
    return (
        "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    ).encode()


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard", reason="zstd reading needs the zstandard package")
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    "suffix", ["jsonl", "jsonl.gz", "jsonl.bz2", "jsonl.zst", "csv.gz", "json.gz", "csv.zst"]
)
def test_compressed_files_read_like_plain_ones(tmp_path, suffix):
    inner = suffix.split(".")[0]
    data = {"jsonl": _jsonl(ROWS), "csv": _csv(ROWS), "json": json.dumps(ROWS).encode()}[inner]
    packed = {"gz": gzip.compress, "bz2": bz2.compress, "zst": _zstd}.get(suffix.split(".")[-1], lambda b: b)
    path = tmp_path / f"pairs.{suffix}"
    path.write_bytes(packed(data))
    table = read_table(path)
    assert table.rows == ROWS
    assert table.locations == (
        ["line 1", "line 2"]
        if inner == "jsonl"
        else ["line 2", "line 3"]
        if inner == "csv"
        else ["row 0", "row 1"]
    )


@pytest.mark.parametrize("inner", ["jsonl", "csv"])
def test_bytes_that_are_not_utf8_are_a_named_error_or_a_counted_skip(tmp_path, inner):
    good = _jsonl(ROWS) if inner == "jsonl" else _csv(ROWS)
    lines = good.splitlines(keepends=True)
    bad_line = (
        b"caf\xe9 latin-1,x,y\n"
        if inner == "csv"
        else b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n'
    )
    path = tmp_path / f"pairs.{inner}.gz"
    path.write_bytes(gzip.compress(b"".join([*lines[:-1], bad_line, lines[-1]])))
    number = len(lines)  # the bad line's 1-based number
    with pytest.raises(
        DataError, match=rf"pairs\.{inner}\.gz: line {number}: not UTF-8.*on_error=skip"
    ) as info:
        read_table(path)
    assert info.value.reason == "bad_encoding"
    table = read_table(path, on_error="skip")
    assert table.rows == ROWS and table.encoding_errors == (number,) and not table.skipped_lines
    assert table.locations[-1] == f"line {number + 1}"  # lines after the skipped one keep their file numbers


def test_a_truncated_archive_is_a_named_error(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS * 50))[:40])
    with pytest.raises(DataError, match="pairs.jsonl.gz: cannot be read") as info:
        read_table(path)
    assert info.value.reason == "corrupt_file"


@pytest.mark.parametrize(
    "name", ["./data/pairs", "data/sub/pairs", "/nonexistent/pairs", "pairs.jsonl.gz", "x.parquet"]
)
def test_a_path_that_looks_local_never_goes_to_the_hub(name):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(name)


@pytest.mark.parametrize("name", ["Anthropic/hh-rlhf", "imdb"])
def test_hub_ids_still_go_to_the_hub(name):
    assert _detect_format(name) == "hf"
