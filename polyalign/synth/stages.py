"""The synthesis stages, each a function over records with JSONL out, in pipeline order:

    translate_prompts -> generate_completions -> score_completions -> build_pairs -> filter_pairs

The first three call models and append to their stage file through `store.run_batches` (resumable, one
durable append per batch, keyed by record id); the last two are pure functions of their input.

Provenance carried by every record: `language`, `source_prompt_id`, `fingerprint` (a hash of the settings
that made it, see `fingerprints.py`), and, as they are added, `translator`, `generator`, `seed`, `judge`,
`score(s)`. Records keep `harm_category` (the first category), `harm_categories` (all), `global_or_local` and
`source_id` (the id in the prompt file) of their source prompt for safety mixtures. `language_check` ("ok" |
"mismatch" | "unknown", see `langcheck.py`) is set on every prompt and completion.

Seeds are per record: a translation or completion is sampled with `record_seed(backend seed, record id)`,
whatever batch it lands in, so a rerun that redoes a torn last line (or uses another batch size) gives every
record the seed an uninterrupted run gives it.

Record ids: a source prompt keeps its id; a translation is "<source id>|<language>"; a completion is
"<prompt id>|<generator>" (scored records keep it); a pair is its prompt id.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from polyalign.synth.backends import Generator, Scorer, Translator
from polyalign.synth.langcheck import check_language
from polyalign.synth.store import make_id, run_batches

_CARRIED = ("harm_category", "harm_categories", "global_or_local", "source_id")


def record_seed(base: int, ident: str) -> int:
    """The sampling seed of one record: the backend's seed plus a hash of the record's id."""
    return (base + zlib.crc32(ident.encode("utf-8"))) % 2**31


def source_record(ident: str, prompt: str, language: str, **extra: object) -> dict:
    """A source prompt as a stage-1 record; `extra` may hold the carried fields (`_CARRIED`)."""
    if extra.get("harm_categories") is None:
        extra["harm_categories"] = [extra["harm_category"]] if extra.get("harm_category") else []
    return {
        "id": ident,
        "prompt": prompt,
        "language": language,
        "source_prompt_id": ident,
        "source_language": language,
        "origin": "source",
        "translator": None,
        "seed": None,
        "language_check": check_language(prompt, language),
        **{k: extra.get(k) for k in _CARRIED},
    }


def translate_prompts(
    sources: Sequence[dict],
    languages: Sequence[str],
    translator: Translator | None,
    out_path: str | Path,
    batch_size: int = 8,
    keep_source: bool = True,
    progress: bool = True,
    fingerprint: str | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write the source prompts (when `keep_source`) and their translations into every target language
    other than their own to `out_path`, each with `fingerprint`. Returns the stage counts."""
    items = [(s, None) for s in sources if keep_source]
    items += [(s, lang) for s in sources for lang in languages if lang != s["language"]]
    if any(lang is not None for _, lang in items) and translator is None:
        raise ValueError("translate: target languages are set but there is no translator")

    def item_id(item) -> str:
        source, lang = item
        return source["id"] if lang is None else make_id(source["id"], lang)

    def process(batch):
        out = [{**s, "fingerprint": fingerprint} for s, lang in batch if lang is None]
        for target in sorted({lang for _, lang in batch if lang is not None}):
            group = [s for s, lang in batch if lang == target]
            seeds = [record_seed(seed, make_id(s["id"], target)) for s in group]
            texts = translator.translate(
                [s["prompt"] for s in group], [s["language"] for s in group], target, seeds
            )
            for s, text, record_seed_ in zip(group, texts, seeds):
                out.append(
                    {
                        **s,
                        "id": make_id(s["id"], target),
                        "prompt": text.strip(),
                        "language": target,
                        "origin": "translation",
                        "translator": translator.name,
                        "seed": record_seed_,
                        "language_check": check_language(text, target),
                        "fingerprint": fingerprint,
                    }
                )
        return out

    return run_batches(out_path, items, item_id, process, batch_size, "translate", progress)


def generate_completions(
    prompts: Sequence[dict],
    generators: Sequence[Generator],
    out_path: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    seeds: dict[str, int] | None = None,
    fingerprints: dict[str, str] | None = None,
) -> dict[str, int]:
    """One completion per (prompt, generator), generated directly in the prompt's language. Empty prompts
    are never sent; empty completions are kept with status "empty" (skipped by scoring, counted). `seeds`
    and `fingerprints` are per generator name."""
    seeds, fingerprints = seeds or {}, fingerprints or {}
    items = [(p, g) for p in prompts if p["prompt"].strip() for g in generators]

    def process(batch):
        out = []
        for g in generators:
            group = [p for p, gen in batch if gen is g]
            if not group:
                continue
            row_seeds = [record_seed(seeds.get(g.name, 0), make_id(p["id"], g.name)) for p in group]
            texts = g.generate([p["prompt"] for p in group], row_seeds)
            for p, text, seed in zip(group, texts, row_seeds):
                text = text.strip()
                out.append(
                    {
                        "id": make_id(p["id"], g.name),
                        "prompt_id": p["id"],
                        "prompt": p["prompt"],
                        "language": p["language"],
                        "source_prompt_id": p["source_prompt_id"],
                        "generator": g.name,
                        "seed": seed,
                        "completion": text,
                        "status": "ok" if text else "empty",
                        "prompt_language_check": p["language_check"],
                        "language_check": check_language(text, p["language"]) if text else "unknown",
                        **{k: p.get(k) for k in _CARRIED},
                        "fingerprint": fingerprints.get(g.name),
                    }
                )
        return out

    return run_batches(
        out_path,
        items,
        lambda item: make_id(item[0]["id"], item[1].name),
        process,
        batch_size,
        "generate",
        progress,
    )


def score_completions(
    completions: Sequence[dict],
    scorer: Scorer,
    out_path: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    fingerprints: dict[str, str] | None = None,
) -> dict[str, int]:
    """Score every non-empty completion; an unscorable one (unparseable verdict, language not covered) keeps
    score None and its status, and is skipped by pairing. `fingerprints` are per generator name."""
    fingerprints = fingerprints or {}
    items = [c for c in completions if c["status"] == "ok"]

    def process(batch):
        scores = scorer.score(
            [c["prompt"] for c in batch], [c["completion"] for c in batch], [c["language"] for c in batch]
        )
        if len(scores) != len(batch):
            raise RuntimeError(f"scorer {scorer.name}: {len(scores)} scores for {len(batch)} completions")
        return [
            {
                **c,
                "judge": scorer.name,
                "score": s,
                "score_status": st,
                "fingerprint": fingerprints.get(c["generator"]),
            }
            for c, (s, st) in zip(batch, scores)
        ]

    return run_batches(out_path, items, lambda c: c["id"], process, batch_size, "score", progress)


def build_pairs(scored: Sequence[dict], min_margin: float = 0.0) -> tuple[list[dict], Counter]:
    """Best vs worst scored completion of every prompt. Dropped and counted: prompts with fewer than two
    scored completions (`too_few_scored`), equal best and worst (`tie`), margin <= min_margin
    (`below_margin`). Returns (pairs in first-seen prompt order, counts)."""
    groups: dict[str, list[dict]] = {}
    for record in scored:
        if record.get("score") is not None:
            groups.setdefault(record["prompt_id"], []).append(record)
    counts: Counter = Counter()
    counts["unscored"] = sum(r.get("score") is None for r in scored)
    pairs = []
    for prompt_id, group in groups.items():
        if len(group) < 2:
            counts["too_few_scored"] += 1
            continue
        best = max(group, key=lambda r: r["score"])
        worst = min(group, key=lambda r: r["score"])
        margin = best["score"] - worst["score"]
        if margin == 0:
            counts["tie"] += 1
            continue
        if margin <= min_margin:
            counts["below_margin"] += 1
            continue
        pairs.append(_pair(prompt_id, best, worst, group, margin))
    counts["pairs"] = len(pairs)
    return pairs, counts


def _pair(prompt_id: str, best: dict, worst: dict, group: list[dict], margin: float) -> dict:
    checks = (best["prompt_language_check"], best["language_check"], worst["language_check"])
    return {
        "id": prompt_id,
        "prompt": best["prompt"],
        "chosen": best["completion"],
        "rejected": worst["completion"],
        "language": best["language"],
        "source_prompt_id": best["source_prompt_id"],
        "chosen_generator": best["generator"],
        "rejected_generator": worst["generator"],
        "judge": best["judge"],
        "chosen_score": best["score"],
        "rejected_score": worst["score"],
        "margin": margin,
        "scores": {r["generator"]: r["score"] for r in group},
        "seeds": {r["generator"]: r["seed"] for r in group},
        "language_mismatch": "mismatch" in checks,
        **{k: best.get(k) for k in _CARRIED},
    }


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def filter_pairs(
    pairs: Sequence[dict], language_mismatch: str = "drop", dedupe: bool = True, max_chars: int = 0
) -> tuple[list[dict], Counter]:
    """Drop (and count by reason) pairs with identical chosen and rejected text, with a completion over
    `max_chars`, in the wrong script (when `language_mismatch` is "drop"), and repeats of an earlier
    (language, prompt). Language mismatches are counted even when kept."""
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in pairs:
        key = (pair["language"], _normalise(pair["prompt"]))
        if pair["language_mismatch"]:
            counts["language_mismatch"] += 1
        if _normalise(pair["chosen"]) == _normalise(pair["rejected"]):
            counts["dropped_same_text"] += 1
        elif max_chars and max(len(pair["chosen"]), len(pair["rejected"])) > max_chars:
            counts["dropped_too_long"] += 1
        elif pair["language_mismatch"] and language_mismatch == "drop":
            counts["dropped_language_mismatch"] += 1
        elif dedupe and key in seen:
            counts["dropped_duplicate"] += 1
        else:
            seen.add(key)
            kept.append(pair)
    counts["kept"] = len(kept)
    return kept, counts
