"""Tokenized preference pairs held compactly, so that memory grows with the pairs a run reads, not the file.

A store is a folder of numpy arrays, written in one pass over the pairs (tokenized a chunk at a time with
`chat.tokenize_preferences`) and read back memory-mapped: only the token pages of the pairs a run touches
are ever loaded. A `PairStore` is a view of some of its rows and reads as a sequence of `TokenizedPair`.

    tokens.bin     (T,) int32     each pair's prompt, chosen and rejected ids, pair after pair
    bounds.npy     (N, 4) int64   where pair i's prompt, chosen and rejected start in tokens, and where it ends
    flags.npy      (N,) uint8     one bit per name in FLAGS
    scores.npy     (N, 2) float64 chosen and rejected scores, NaN where none
    language.npy   (N,) int32     index into meta["languages"] (0: None)
    prompt_key.npy (N,) uint64    a 64-bit hash of the prompt: pairs of one prompt share it (split by prompt)
    meta.json      what the caller stores with the pairs (the load report, the cache key's parts)

A cached store is published by renaming a finished temporary folder into place, so a reader sees a whole
store or none; a store is never changed once written. Knows nothing about training or models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np

from polyalign.data.chat import TokenizedPair
from polyalign.data.io import DataError
from polyalign.data.preference import PreferencePair
from polyalign.files import atomic_write_json, fsync_dir, fsync_file, remove_dir

FLAGS = ("prompt_truncated", "chosen_truncated", "rejected_truncated", "identical_after_truncation")
FLAGS += ("untokenizable", "swapped_by_rescoring")
ARRAYS = ("bounds", "flags", "scores", "language", "prompt_key")


@dataclass(frozen=True)
class PairStore:
    """Rows `rows` of a store's arrays, read as a sequence of TokenizedPair."""

    tokens: np.ndarray  # (T,) int32, memory-mapped when the store is a cache folder
    arrays: dict[str, np.ndarray]  # ARRAYS, each with N rows
    meta: dict
    rows: np.ndarray  # (n,) int64, positions of this view's pairs in the arrays
    folder: Path | None = None  # the cache folder; None when held in memory

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = int(self.rows[i])
        p, c, r, end = self.arrays["bounds"][row].tolist()
        ids = self.tokens[p:end].tolist()
        flags = int(self.arrays["flags"][row])
        scores = [None if math.isnan(x) else x for x in self.arrays["scores"][row].tolist()]
        bits = [bool(flags >> b & 1) for b in range(3)]
        language = self.meta["languages"][int(self.arrays["language"][row])]
        return TokenizedPair(ids[: c - p], ids[c - p : r - p], ids[r - p :], *bits, language, *scores)

    def select(self, rows) -> PairStore:
        """The view of this view's `rows` (positions 0..len-1, or a boolean mask)."""
        return replace(self, rows=self.rows[np.asarray(rows)])

    def flagged(self, name: str) -> np.ndarray:
        """(n,) bool: which of this view's pairs carry the flag `name` (one of FLAGS)."""
        return (self.arrays["flags"][self.rows] >> FLAGS.index(name) & 1).astype(bool)


def prompt_key(prompt: str | list[dict]) -> int:
    """A 64-bit hash of a prompt (text or messages): equal prompts, equal keys."""
    text = json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids: its class, vocabulary and rules, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    parts = [type(tokenizer).__name__, rules, special, getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def write_store(
    folder: Path,
    pairs: Iterable[PreferencePair],
    tokenize: Callable[[list[PreferencePair]], list],
    on_error: str,
    rescore: Callable[[list[PreferencePair]], tuple[list[PreferencePair], list[bool]]] | None = None,
    meta: Callable[[], dict] = dict,
    chunk_size: int = 4096,
) -> None:
    """Tokenize `pairs` a chunk at a time into a new store in `folder`. `tokenize(chunk)` gives a
    TokenizedPair or a ValueError per pair: a DataError naming the pair's source and row, or (on_error=skip)
    a pair kept with the "untokenizable" flag and no tokens. `rescore(chunk)` may first re-rank pairs;
    `meta()`, called once the pairs are read, gives what meta.json holds besides the languages."""
    folder.mkdir(parents=True)
    types = {"bounds": np.int64, "flags": np.uint8, "scores": np.float64, "language": np.int32}
    arrays: dict[str, list] = {name: [] for name in ARRAYS}  # one numpy array per chunk
    languages, offset, pairs = {None: 0}, 0, iter(pairs)
    with open(folder / "tokens.bin", "wb") as f:
        while chunk := list(islice(pairs, chunk_size)):
            chunk, swapped = rescore(chunk) if rescore else (chunk, [False] * len(chunk))
            ids, out = [], {name: [] for name in ARRAYS}
            for pair, t, was_swapped in zip(chunk, tokenize(chunk), swapped):
                if isinstance(t, ValueError) and on_error != "skip":
                    raise DataError(
                        f"{pair.source}: record {pair.row}: cannot tokenize: {t}", "untokenizable"
                    )
                good = not isinstance(t, ValueError)
                parts = [t.prompt_ids, t.chosen_ids, t.rejected_ids] if good else [[], [], []]
                starts = [offset, offset + len(parts[0]), offset + len(parts[0]) + len(parts[1])]
                offset = starts[-1] + len(parts[2])
                starts.append(offset)
                ids += [i for x in parts for i in x]
                bits = [t.prompt_truncated, t.chosen_truncated, t.rejected_truncated] if good else [0] * 3
                bits += [good and t.chosen_ids == t.rejected_ids, not good, was_swapped]
                out["bounds"].append(starts)
                out["flags"].append(sum(int(b) << k for k, b in enumerate(bits)))
                out["scores"].append(
                    [math.nan if s is None else s for s in (pair.chosen_score, pair.rejected_score)]
                )
                out["language"].append(languages.setdefault(pair.language, len(languages)))
                out["prompt_key"].append(prompt_key(pair.prompt))
            f.write(np.asarray(ids, dtype=np.int32).tobytes())
            for name in ARRAYS:
                arrays[name].append(np.asarray(out[name], dtype=types.get(name, np.uint64)))
    for name in ARRAYS:
        np.save(folder / f"{name}.npy", np.concatenate(arrays[name]) if arrays[name] else np.zeros(0))
    atomic_write_json(folder / "meta.json", {**meta(), "languages": list(languages)})


def open_store(folder: Path, in_memory: bool = False) -> PairStore:
    """The whole store in `folder`: tokens memory-mapped (read into memory with in_memory=True)."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    arrays = {name: np.load(folder / f"{name}.npy") for name in ARRAYS}
    path = folder / "tokens.bin"
    size = path.stat().st_size
    tokens = (
        np.fromfile(path, dtype=np.int32)
        if in_memory or size == 0
        else np.memmap(path, dtype=np.int32, mode="r")
    )
    rows = np.arange(len(arrays["flags"]))
    return PairStore(tokens, arrays, meta, rows, None if in_memory else folder)


def build_store(
    build: Callable[[Path], None], cache_dir: Path | None = None, key: dict | None = None
) -> PairStore:
    """The store `build(folder)` writes: held in memory when `cache_dir` is None, else cached under
    `cache_dir` for `key` (a JSON-able dict of everything the tokens depend on, kept in meta.json), built
    only when missing and published atomically."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="polyalign-pairs-") as tmp:
            build(Path(tmp) / "store")
            return open_store(Path(tmp) / "store", in_memory=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    final = cache_dir / digest
    if not (final / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".tmp-{digest}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            meta = json.loads((tmp / "meta.json").read_text(encoding="utf-8"))
            atomic_write_json(tmp / "meta.json", {**meta, "key": key})
            for path in tmp.iterdir():
                fsync_file(path)
            os.replace(tmp, final)  # fails when another process published the same store first
            fsync_dir(cache_dir)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
        finally:
            if tmp.exists():
                remove_dir(tmp)
    return open_store(final)
