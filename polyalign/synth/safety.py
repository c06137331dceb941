"""Safety data for synthesis (the Alignment Prism recipe, SPEC 2.3, made pluggable).

Red-team prompts come from the shipped XSafety set (the default; no global/local labels) or from any file in
the Aya red-teaming layout (`prompt`, `language`, `harm_category`, `global_or_local`, optional `id`), e.g.
the Aya red-teaming JSONL files. They become source records with their labels, and then go through the same
stages as any prompt: generate with two generators that differ by a safety preamble (`SAFETY_PREAMBLE` as the
system message of one, none for the other), score with a harm judge (the lexicon judge offline, an LLM harm
judge for real data; score 1 = safe, 0 = harmful), and pair: with `pairs.min_margin: 0.5` only pairs of a safe
(chosen) and a harmful (rejected) completion are kept. `safety_pair_stats` counts them by language and label.
The paper's preamble wording is not public; this one is ours.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from polyalign.data.io import DataError, read_table
from polyalign.synth.stages import source_record
from polyalign.synth.store import check_unique_ids

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
) -> list[dict]:
    """Source records (see `stages.source_record`) from XSafety (`path="xsafety"`) or an Aya-layout file.
    A file's `id` column is used when present (ids must be unique); otherwise "<file name>:<line>"."""
    from polyalign.recipes.evaluate.prompts import load_prompt_file, load_xsafety

    if path == "xsafety":
        prompts = load_xsafety(languages or None, categories or None, per_group)
        return [source_record(p.id, p.prompt, p.language, harm_category=p.harm_category) for p in prompts]
    if categories:
        raise ValueError("source.categories applies to xsafety only; filter a file by language")
    prompts = load_prompt_file(path, None, 0)
    table = read_table(path)
    ids = [
        _row_id(row, f"{Path(path).name}:{loc.split()[-1]}") for row, loc in zip(table.rows, table.locations)
    ]
    records = [
        source_record(
            ident, p.prompt, p.language, harm_category=p.harm_category, global_or_local=p.global_or_local
        )
        for ident, p in zip(ids, prompts)
    ]
    check_unique_ids(records, str(path))
    if languages:
        from polyalign.data.languages import normalise_language

        wanted = {normalise_language(lang, f"{path} languages") for lang in languages}
        missing = wanted - {r["language"] for r in records}
        if missing:
            raise ValueError(f"{path}: no prompts in languages {sorted(missing)}")
        records = [r for r in records if r["language"] in wanted]
    return first_per_group(records, per_group)


def _row_id(row: dict, default: str) -> str:
    value = row.get("id")
    if value is None or value == "":
        return default
    if "|" in str(value):
        raise DataError(f"{default}: field 'id': {value!r} contains '|', which record ids may not hold")
    return str(value)


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
