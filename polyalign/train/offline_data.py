"""Preference records -> tokenized training and held-out pair sets for the offline trainer.

Steps, each reported in the run's `data_report.json`: load (with the configured format, columns and
on_error policy; skipped rows counted per reason) -> held-out split by prompt when no eval set is given ->
optional re-scoring by a reward model (pairs re-ranked so chosen scores higher) -> tokenization with the
truncation policy of `polyalign/data/chat.py` (truncation counts logged). The data order of training is a
pure function of the step (`batch_indices`), so a resumed run reads exactly the batches it would have.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from polyalign.config_offline import OfflineRunConfig
from polyalign.data.chat import TokenizedPair, render_prompt, tokenize_preference, truncation_counts
from polyalign.data.io import DataError
from polyalign.data.preference import Columns, LoadReport, PreferencePair, load_preferences_with_report


@dataclass
class PairSet:
    """Tokenized pairs and, once precomputed, their reference sequence log-probs."""

    pairs: list[TokenizedPair]
    ref_chosen: torch.Tensor | None = None  # (N,) log pi_ref(chosen | prompt), when cached
    ref_rejected: torch.Tensor | None = None  # (N,) log pi_ref(rejected | prompt), when cached

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_languages(self) -> bool:
        return any(p.language for p in self.pairs)


def load_pairs(cfg: OfflineRunConfig, source: str) -> tuple[list[PreferencePair], LoadReport]:
    """Load and validate pairs with the configured format, columns and error policy."""
    d = cfg.data
    return load_preferences_with_report(
        source,
        d.fmt,
        columns=Columns(**d.columns),
        language=d.language,
        split=d.split,
        strategy=d.pair_strategy,
        seed=cfg.train.seed,
        on_error=d.on_error,
    )


def split_by_prompt(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): whole prompt groups go to the held-out side (seeded) until it holds
    round(fraction * N) pairs (at least 1), so no prompt is on both sides."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target, held = max(1, round(fraction * len(pairs))), set()
    for key in keys:
        if len(held) >= target:
            break
        held.update(groups[key])
    if len(held) == len(pairs):
        raise DataError(
            f"data.eval_fraction={fraction}: the {len(pairs)} pairs share {len(groups)} prompt(s), too few to "
            "hold some out by prompt; give data.eval or set data.eval_fraction=0"
        )
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def rescore_pairs(
    pairs: list[PreferencePair], reward_model: str, tokenizer, cfg: OfflineRunConfig
) -> tuple[list[PreferencePair], int]:
    """Score both sides with a reward model ({rendered prompt}{completion}); swap sides so chosen has the
    higher score (ties keep the order). Returns (pairs with chosen/rejected scores, number swapped)."""
    from polyalign.rewards.model import RewardModelScorer  # lazy: loads transformers

    scorer = RewardModelScorer(reward_model, device=cfg.model.device)
    prompts = [render_prompt(tokenizer, p.prompt, cfg.data.use_chat_template) for p in pairs]
    chosen = scorer(prompts, [p.chosen for p in pairs]).tolist()
    rejected = scorer(prompts, [p.rejected for p in pairs]).tolist()
    out, swapped = [], 0
    for pair, c, r in zip(pairs, chosen, rejected):
        if r > c:
            pair, c, r, swapped = replace(pair, chosen=pair.rejected, rejected=pair.chosen), r, c, swapped + 1
        out.append(replace(pair, chosen_score=c, rejected_score=r))
    return out, swapped


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, cfg: OfflineRunConfig
) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Tokenize and truncate; a pair that cannot be tokenized is an error naming its source and row (or is
    skipped and counted under on_error=skip). Returns (pairs, counts of truncations and skips)."""
    d, out, counts = cfg.data, [], {"untokenizable": 0}
    for pair in pairs:
        try:
            out.append(
                tokenize_preference(
                    tokenizer, pair, d.max_length, d.max_prompt_length, use_chat_template=d.use_chat_template
                )
            )
        except ValueError as exc:
            if d.on_error != "skip":
                raise DataError(
                    f"{pair.source}: record {pair.row}: cannot tokenize: {exc}", "untokenizable"
                ) from exc
            counts["untokenizable"] += 1
    counts.update(truncation_counts(out))
    counts["identical_after_truncation"] = sum(p.chosen_ids == p.rejected_ids for p in out)
    return out, counts


def build_pair_sets(cfg: OfflineRunConfig, tokenizer, console=print) -> tuple[PairSet, PairSet | None, dict]:
    """The training and held-out PairSets (reference log-probs not yet cached) and the data report."""
    d = cfg.data
    train, train_load = load_pairs(cfg, d.train)
    report: dict = {"train": _load_summary(train_load)}
    held = None
    if d.eval is not None:
        held, eval_load = load_pairs(cfg, d.eval)
        report["eval"] = _load_summary(eval_load)
    elif d.eval_fraction > 0:
        train, held = split_by_prompt(train, d.eval_fraction, cfg.train.seed)
        report["eval"] = {"source": f"{d.eval_fraction:g} of {d.train} (split by prompt)"}
    sets = {"train": train, "eval": held}
    for name, pairs in sets.items():
        if pairs is None:
            continue
        if d.rescore_with:
            pairs, report[name]["swapped_by_rescoring"] = rescore_pairs(pairs, d.rescore_with, tokenizer, cfg)
        sets[name], counts = tokenize_pairs(pairs, tokenizer, cfg)
        report[name].update(pairs=len(sets[name]), **counts)
        console(f"data {name}: {json.dumps(report[name], ensure_ascii=False)}")
        if not sets[name]:
            raise DataError(
                f"data.{name}: no usable pairs left after loading and tokenization: {report[name]}"
            )
    if cfg.loss.name == "copg":
        _check_scores(sets)
    return PairSet(sets["train"]), (PairSet(sets["eval"]) if sets["eval"] is not None else None), report


def _load_summary(report: LoadReport) -> dict:
    return {
        "source": report.source,
        "fmt": report.fmt,
        "rows": report.rows,
        "loaded": report.loaded,
        "skipped": dict(report.skipped),
        "skip_examples": list(report.examples),
    }


def _check_scores(sets: dict) -> None:
    for name, pairs in sets.items():
        missing = sum(p.chosen_score is None or p.rejected_score is None for p in pairs or [])
        if missing:
            raise DataError(
                f"loss.name=copg needs a reward for both sides of every pair; {missing} {name} pair(s) have none. "
                "Use scored data (data.fmt=scored, or chosen_score/rejected_score columns) or set "
                "data.rescore_with=<reward model>"
            )


@lru_cache(maxsize=4)
def _epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def batch_indices(n: int, step: int, batch_size: int, seed: int, shuffle: bool = True) -> list[int]:
    """Dataset rows of optimizer step `step`: positions step*B .. step*B+B-1 of the endless stream of epochs,
    each epoch a seeded permutation of range(n) (a batch may span two epochs). Pure in its arguments."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        rows.append(_epoch_order(n, epoch, seed, shuffle)[index])
    return rows


def sft_sides(step: int, size: int, seed: int, random_side: bool) -> torch.Tensor:
    """(B,) bool, True where SFT trains on the rejected completion: never for sft_target=chosen, else a fair
    coin per pair seeded by (seed, step) so that a resumed run draws the same sides."""
    if not random_side:
        return torch.zeros(size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + step)
    return torch.rand(size, generator=generator) < 0.5
