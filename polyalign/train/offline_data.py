"""Preference records -> tokenized training and held-out pair sets for the offline trainer.

Steps, each reported in the run's `data_report.json`: load (with the configured format, columns and
on_error policy; skipped rows counted per reason) -> optional re-scoring by a reward model (pairs re-ranked
so chosen scores higher) -> tokenization with the truncation policy of `polyalign/data/chat.py` -> held-out
split by prompt when no eval set is given. The file is read once, streamed, and tokenized in batched calls
a chunk at a time into a `PairStore` (int32 token arrays): every count in the report covers the whole file.
A file of CACHE_MIN_BYTES or more is cached under data.cache_dir, keyed by the file (path, size, mtime), the
tokenizer and the settings, so the next run with the same file maps the cached tokens instead of
re-reading it (re-scored data is not cached: the reward model may change under its name). The data order of
training is a pure function of the step (`batch_indices`), so a resumed run reads exactly the batches it
would have, and the rows a run will read are known before it starts (`rows_used`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from polyalign.config_offline import OfflineRunConfig
from polyalign.data.chat import TokenizedPair, render_prompt, tokenize_preferences
from polyalign.data.io import DataError
from polyalign.data.pair_store import (
    FLAGS,
    PairStore,
    build_store,
    prompt_key,
    tokenizer_fingerprint,
    write_store,
)
from polyalign.data.preference import Columns, PreferencePair, iter_preferences, pairs_from_scored
from polyalign.data.prompts import batch_indices, rows_used  # noqa: F401 (the trainers' data order)

CACHE_MIN_BYTES = 1 << 20  # smaller files tokenize in about a second: not worth a cache entry
STORE_VERSION = 1  # bump when the store layout or the tokenization changes


@dataclass
class PairSet:
    """Tokenized pairs and, once precomputed, their reference sequence log-probs."""

    pairs: list[TokenizedPair] | PairStore
    ref_chosen: torch.Tensor | None = None  # (N,) log pi_ref(chosen | prompt), when cached
    ref_rejected: torch.Tensor | None = None  # (N,) log pi_ref(rejected | prompt), when cached
    cache: Path | None = None  # folder of the set's tokens cache (reference log-probs are cached beside it)

    def __len__(self) -> int:
        return len(self.pairs)


def load_store(cfg: OfflineRunConfig, source: str, tokenizer) -> PairStore:
    """Load, validate, (re-score,) tokenize `source` into a PairStore; meta["load"] is the load report."""
    d = cfg.data
    report, items = iter_preferences(source, d.fmt, Columns(**d.columns), d.language, d.split, d.on_error)
    if report.fmt == "scored":
        items = pairs_from_scored(list(items), d.pair_strategy, cfg.train.seed)

    def tokenize(chunk: list[PreferencePair]) -> list:
        return tokenize_preferences(
            tokenizer, chunk, d.max_length, d.max_prompt_length, use_chat_template=d.use_chat_template
        )

    def load_summary() -> dict:
        r = report
        load = {"source": r.source, "fmt": r.fmt, "rows": r.rows, "loaded": r.loaded, "skipped": r.skipped}
        return {"load": {**load, "skip_examples": r.examples}}

    def build(folder: Path) -> None:
        write_store(folder, items, tokenize, d.on_error, rescore, load_summary)

    rescore = _rescorer(d.rescore_with, tokenizer, cfg) if d.rescore_with else None
    path = Path(report.source)
    if not d.cache_dir or rescore or not path.is_file() or path.stat().st_size < CACHE_MIN_BYTES:
        return build_store(build)
    stat, settings = (
        path.stat(),
        {k: getattr(d, k) for k in ("fmt", "columns", "language", "split", "on_error")},
    )
    settings |= {k: getattr(d, k) for k in ("max_length", "max_prompt_length", "use_chat_template")}
    if report.fmt == "scored":
        settings |= {"pair_strategy": d.pair_strategy, "seed": cfg.train.seed}
    key = {"file": [str(path.resolve()), stat.st_size, stat.st_mtime_ns], "settings": settings}
    key |= {"tokenizer": tokenizer_fingerprint(tokenizer), "version": STORE_VERSION}
    return build_store(build, Path(d.cache_dir).expanduser(), key)


def split_by_prompt(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """`split_rows` of a list of pairs: (train pairs, held-out pairs)."""
    train, held = split_rows(np.array([prompt_key(p.prompt) for p in pairs], dtype=np.uint64), fraction, seed)
    return [pairs[i] for i in train], [pairs[i] for i in held]


def split_rows(keys: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of pairs with prompt keys `keys` (`pair_store.prompt_key`): whole
    prompt groups, in a seeded order, go to the held-out side until it holds round(fraction * N) pairs (at
    least 1), so no prompt is on both sides."""
    _, first, group = np.unique(np.asarray(keys), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # groups numbered in order of first appearance
    group, order = rank[group.reshape(-1)], list(range(len(first)))
    random.Random(seed).shuffle(order)
    sizes = np.bincount(group)[order]
    taken = order[: int(np.searchsorted(np.cumsum(sizes), max(1, round(fraction * len(group))))) + 1]
    held = np.isin(group, taken)
    if held.all():
        raise DataError(
            f"data.eval_fraction={fraction}: the {len(group)} pairs share {len(first)} prompt(s), too few to "
            "hold some out by prompt; give data.eval or set data.eval_fraction=0"
        )
    return np.flatnonzero(~held), np.flatnonzero(held)


def _rescorer(reward_model: str, tokenizer, cfg: OfflineRunConfig):
    """`rescore(pairs)`: score both sides with a reward model ({rendered prompt}{completion}); swap sides so
    chosen has the higher score (ties keep the order). Returns (pairs with both scores, which were swapped)."""
    from polyalign.rewards.model import RewardModelScorer  # lazy: loads transformers

    scorer = RewardModelScorer(reward_model, device=cfg.model.device)

    def rescore(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[bool]]:
        prompts = [render_prompt(tokenizer, p.prompt, cfg.data.use_chat_template) for p in pairs]
        chosen = scorer(prompts, [p.chosen for p in pairs]).tolist()
        rejected = scorer(prompts, [p.rejected for p in pairs]).tolist()
        out, swapped = [], [r > c for c, r in zip(chosen, rejected)]
        for pair, c, r, swap in zip(pairs, chosen, rejected, swapped):
            if swap:
                pair, c, r = replace(pair, chosen=pair.rejected, rejected=pair.chosen), r, c
            out.append(replace(pair, chosen_score=c, rejected_score=r))
        return out, swapped

    return rescore


def build_pair_sets(cfg: OfflineRunConfig, tokenizer, console=print) -> tuple[PairSet, PairSet | None, dict]:
    """The training and held-out PairSets (reference log-probs not yet cached) and the data report."""
    d = cfg.data
    sets = {"train": load_store(cfg, d.train, tokenizer), "eval": None}
    report: dict = {"train": sets["train"].meta["load"]}
    if d.eval is not None:
        sets["eval"] = load_store(cfg, d.eval, tokenizer)
        report["eval"] = sets["eval"].meta["load"]
    elif d.eval_fraction > 0:
        train, held = split_rows(sets["train"].arrays["prompt_key"], d.eval_fraction, cfg.train.seed)
        sets = {"train": sets["train"].select(train), "eval": sets["train"].select(held)}
        report["eval"] = {"source": f"{d.eval_fraction:g} of {d.train} (split by prompt)"}
    for name, store in sets.items():
        if store is None:
            continue
        names = [f for f in FLAGS if f != "swapped_by_rescoring" or d.rescore_with]
        counts = {name: int(store.flagged(name).sum()) for name in names}
        sets[name] = store = store.select(~store.flagged("untokenizable"))
        report[name].update(
            pairs=len(store), **counts, tokens_cache=str(store.folder) if store.folder else None
        )
        console(f"data {name}: {json.dumps(report[name], ensure_ascii=False)}")
        if not len(store):
            raise DataError(
                f"data.{name}: no usable pairs left after loading and tokenization: {report[name]}"
            )
    if cfg.loss.name == "copg":
        _check_scores(sets)
    return (*(PairSet(s, cache=s.folder) if s is not None else None for s in sets.values()), report)


def _check_scores(sets: dict) -> None:
    for name, store in sets.items():
        missing = int(np.isnan(store.arrays["scores"][store.rows]).any(axis=1).sum()) if store else 0
        if missing:
            raise DataError(
                f"loss.name=copg needs a reward for both sides of every pair; {missing} {name} pair(s) have none. "
                "Use scored data (data.fmt=scored, or chosen_score/rejected_score columns) or set "
                "data.rescore_with=<reward model>"
            )


def sft_sides(step: int, size: int, seed: int, random_side: bool) -> torch.Tensor:
    """(B,) bool, True where SFT trains on the rejected completion: never for sft_target=chosen, else a fair
    coin per pair seeded by (seed, step) so that a resumed run draws the same sides."""
    if not random_side:
        return torch.zeros(size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + step)
    return torch.rand(size, generator=generator) < 0.5
