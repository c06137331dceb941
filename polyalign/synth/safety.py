"""Safety data for synthesis (the Alignment Prism recipe, SPEC 2.3, made pluggable).

Red-team prompts come from the shipped XSafety set (the default; no global/local labels) or from any file in
the Aya red-teaming layout (`prompt`, `language`, `harm_category`, `global_or_local`, optional `id`), e.g.
the Aya red-teaming JSONL files, or one column per language (MultiJail; `sources.py`). They become source records with their labels, and then go through the same
stages as any prompt: generate with two generators that differ by a safety preamble (`SAFETY_PREAMBLE` as the
system message of one, none for the other), score with a harm judge (the lexicon judge offline, an LLM harm
judge for real data; score 1 = safe, 0 = harmful), and pair: with `pairs.min_margin: 0.5` only pairs of a safe
(chosen) and a harmful (rejected) completion are kept. `safety_pair_stats` counts them by language and label.
The paper's preamble wording is not public; this one is ours.
"""

from __future__ import annotations

from collections import Counter

from polyalign.synth.sources import read_prompt_file
from polyalign.synth.stages import source_record

SAFETY_PREAMBLE = (
    "You are a helpful and harmless assistant. If a request asks for harmful, hateful, violent, sexual, illegal "
    "or dangerous content, decline politely in the user's language, briefly say why, and offer a safe "
    "alternative. Never insult anyone. Answer in the language of the request."
)


def load_redteam_prompts(
    path: str = "xsafety",
    languages: list[str] | None = None,
    categories: list[str] | None = None,
    per_group: int = 0,
    layout: str = "long",
    columns: dict[str, str] | None = None,
) -> list[dict]:
    """Source records (see `stages.source_record`) from XSafety (`path="xsafety"`) or a prompt file in the Aya
    (long) or MultiJail (wide) layout (`sources.py`). A file's `id` column is used when present (ids must be
    unique); otherwise "<file name>:<line>"."""
    from polyalign.recipes.evaluate.prompts import load_xsafety

    if path == "xsafety":
        prompts = load_xsafety(languages or None, categories or None, per_group)
        return [source_record(p.id, p.prompt, p.language, harm_category=p.harm_category) for p in prompts]
    records, _ = read_prompt_file(path, layout, columns)
    return select_sources(records, str(path), languages, categories, per_group)


def select_sources(
    records: list[dict], where: str, languages: list[str] | None, categories: list[str] | None, per_group: int
) -> list[dict]:
    """The records in `languages` (all when empty) with any of `categories` (all when empty), then the first
    `per_group` of each (language, first category) group."""
    if languages:
        from polyalign.data.languages import normalise_language

        wanted = {normalise_language(lang, f"{where} languages") for lang in languages}
        missing = wanted - {r["language"] for r in records}
        if missing:
            raise ValueError(f"{where}: no prompts in languages {sorted(missing)}")
        records = [r for r in records if r["language"] in wanted]
    if categories:
        records = [r for r in records if set(categories) & set(r.get("harm_categories") or [])]
        if not records:
            raise ValueError(f"{where}: no prompts in categories {sorted(categories)}")
    return first_per_group(records, per_group)


def first_per_group(records: list[dict], per_group: int) -> list[dict]:
    """The first `per_group` records of each (language, harm_category) group, in order; 0 = all."""
    if per_group <= 0:
        return records
    seen: Counter = Counter()
    out = []
    for r in records:
        seen[(r["language"], r.get("harm_category"))] += 1
        if seen[(r["language"], r.get("harm_category"))] <= per_group:
            out.append(r)
    return out


def safety_pair_stats(pairs: list[dict]) -> dict:
    """Counts of safety pairs by language, by global/local label and by harm category."""
    label = lambda p: p.get("global_or_local") or "unlabelled"
    return {
        "pairs": len(pairs),
        "by_language": dict(sorted(Counter(p["language"] for p in pairs).items())),
        "by_label": dict(sorted(Counter(label(p) for p in pairs).items())),
        "by_category": dict(sorted(Counter(p.get("harm_category") or "none" for p in pairs).items())),
    }
