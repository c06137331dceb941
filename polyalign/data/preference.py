"""Preference data: load pairs and scored completions from files or hub datasets, validate them, normalise
them to `PreferencePair` / `ScoredCompletion`, and build pairs from scored completions.

Formats (`fmt="auto"` picks one from the first record's columns; names are configurable with `Columns`):
- `pairs`: {prompt, chosen, rejected}. Strings, or chat message lists [{"role", "content"}]. With message
  lists the prompt may be empty or absent: the messages chosen and rejected share become the prompt (after
  the given prompt, when chosen/rejected repeat it), and what follows must be one assistant message each.
- `hh` (Anthropic HH-RLHF): {chosen, rejected}, whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues. The
  prompt is their shared prefix up to and including the last "\\n\\nAssistant:" they share; chosen/rejected
  are the rest (so prompt + chosen == the original chosen text, leading space included).
- `sharegpt` (the shipped LLaMA-Factory demo): {conversations: [{from, value}], chosen: {from, value},
  rejected: {from, value}}; roles human/gpt/system map to user/assistant/system.
- `scored`: {prompt, completion, reward}, several rows per prompt. `load_scored` returns the rows;
  `load_preferences(fmt="scored")` pairs them with `pairs_from_scored`.
An optional `language` column (BCP-47 code) is kept in every format; optional `chosen_score` /
`rejected_score` (or `score_chosen` / `score_rejected`) columns are kept on pairs.

Completions are always plain strings (the final assistant message's content); prompts are strings or
message lists. Every error names the file, the line or row, and the field; with `on_error="skip"` bad rows
are skipped and counted per reason in a `LoadReport`. Over-long rows are handled at tokenization
(`chat.py`). Built-in sets: "builtin:dpo-demo-en" and "builtin:dpo-demo-zh" (300 pairs each).
"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polyalign.data.io import DataError, field_error, get_field, iter_table, number_field, text_field
from polyalign.data.messages import (
    common_prefix_length,
    normalize_messages,
    sharegpt_to_messages,
    split_conversations,
)

_DEMO = Path(__file__).resolve().parent.parent / "assets" / "dpo_demo"
BUILTIN = {
    "builtin:dpo-demo-en": (_DEMO / "dpo_en_demo.json", "sharegpt", "en"),
    "builtin:dpo-demo-zh": (_DEMO / "dpo_zh_demo.json", "sharegpt", "zh"),
}
FORMATS = ("pairs", "hh", "sharegpt", "scored")
STRATEGIES = ("all_pairs", "random_pairs", "best_worst")
_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a chosen and a rejected completion (see the glossary in polyalign/types.py)."""

    prompt: str | list[dict]  # text, or chat messages [{"role", "content"}] ending before the completion
    chosen: str
    rejected: str
    language: str | None  # BCP-47 code, None when unknown
    source: str  # file path or hub id it was read from
    row: int  # 0-based record index in the source (pairs from scored rows: the chosen row)
    chosen_score: float | None = None
    rejected_score: float | None = None


@dataclass(frozen=True)
class ScoredCompletion:
    """One completion of a prompt with its reward."""

    prompt: str | list[dict]
    completion: str
    reward: float
    language: str | None
    source: str
    row: int


@dataclass(frozen=True)
class Columns:
    """Column names of the source records."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    conversations: str = "conversations"
    completion: str = "completion"
    reward: str = "reward"
    language: str = "language"


@dataclass
class LoadReport:
    """What a load read, kept and skipped; filled in as the rows of `iter_preferences` are read."""

    source: str
    fmt: str
    rows: int = 0  # records read (valid JSON), before validation
    loaded: int = 0  # rows that passed validation
    skipped: Counter = field(default_factory=Counter)  # reason -> count (malformed lines included)
    examples: list[str] = field(default_factory=list)  # the first few skip messages

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.source} ({self.fmt}): loaded {self.loaded} of {self.rows} rows; skipped: {reasons}"


def load_preferences(
    path_or_id: str | Path,
    fmt: str = "auto",
    *,
    columns: Columns = Columns(),
    language: str | None = None,
    split: str = "train",
    strategy: str = "best_worst",
    seed: int = 0,
    on_error: str = "error",
) -> list[PreferencePair]:
    """Load and validate preference pairs from a file, hub id or built-in name; warns with the load report's
    summary when rows were skipped (`iter_preferences` gives the report).

    Args:
        fmt: "auto" (detected from the first record) or one of FORMATS; "scored" rows are paired by
            `pairs_from_scored(records, strategy, seed)`.
        language: the language of rows without a `language` value (built-in sets set their own).
        on_error: "error" raises on the first bad row; "skip" skips bad rows and counts them per reason.
    """
    report, items = iter_preferences(path_or_id, fmt, columns, language, split, on_error)
    items = list(items)
    _warn_skipped(report)
    return pairs_from_scored(items, strategy, seed) if report.fmt == "scored" else items


def load_scored(
    path_or_id: str | Path, *, columns: Columns = Columns(), language=None, split="train", on_error="error"
) -> list[ScoredCompletion]:
    """Scored completions {prompt, completion, reward}, unpaired; the args as for `load_preferences`."""
    report, items = iter_preferences(path_or_id, "scored", columns, language, split, on_error)
    items = list(items)
    _warn_skipped(report)
    return items


def _warn_skipped(report: LoadReport) -> None:
    if report.skipped:
        warnings.warn(report.summary(), stacklevel=3)


def _resolve(path_or_id: str | Path, fmt: str, language: str | None) -> tuple[str | Path, str, str | None]:
    """Built-in names -> (asset path, format, language); anything else passes through."""
    if not str(path_or_id).startswith("builtin:"):
        return path_or_id, fmt, language
    if str(path_or_id) not in BUILTIN:
        raise ValueError(f"unknown built-in preference set {path_or_id!r}; known: {sorted(BUILTIN)}")
    path, builtin_fmt, builtin_language = BUILTIN[str(path_or_id)]
    return path, builtin_fmt if fmt == "auto" else fmt, language or builtin_language


def iter_preferences(
    path_or_id: str | Path,
    fmt: str = "auto",
    columns: Columns = Columns(),
    language: str | None = None,
    split: str = "train",
    on_error: str = "error",
) -> tuple[LoadReport, Iterator[PreferencePair | ScoredCompletion]]:
    """(report, records): the format is detected from the first record now; the records are read, parsed and
    validated as they are consumed (a JSONL file is streamed), and the report counts them as they go."""
    path, fmt, language = _resolve(path_or_id, fmt, language)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; expected 'auto' or one of {FORMATS}")
    malformed, bad = [], []
    rows = iter_table(path, split, on_error=on_error, skipped=malformed, bad=bad)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: no records")
    fmt = detect_format(first[0], columns, str(path)) if fmt == "auto" else fmt
    report = LoadReport(str(path), fmt)

    def parse_all() -> Iterator[PreferencePair | ScoredCompletion]:
        parse, make = _PARSERS[fmt]
        for index, (row, location) in enumerate(itertools.chain([first], rows)):
            where = f"{report.source}: {location}"
            report.rows += 1
            try:
                fields = parse(row, where, columns)
                lang = _language(row, where, columns.language) or language
                item = make(**fields, language=lang, source=report.source, row=index)
            except DataError as exc:
                if on_error != "skip":
                    raise
                report.skipped[exc.reason] += 1
                report.examples += [str(exc)][: 5 - len(report.examples)]
                continue
            report.loaded += 1
            yield item
        report.skipped.update(malformed_json=len(malformed), bad_encoding=len(bad))
        report.skipped = +report.skipped

    return report, parse_all()


def detect_format(row: dict, columns: Columns = Columns(), source: str = "data") -> str:
    """The format of a record, from its columns (and, for {chosen, rejected} only, their value types)."""
    c, keys = columns, set(row)
    if {c.conversations, c.chosen, c.rejected} <= keys:
        return "sharegpt"
    if {c.prompt, c.completion, c.reward} <= keys:
        return "scored"
    if {c.chosen, c.rejected} <= keys:
        return "pairs" if c.prompt in keys or isinstance(row[c.chosen], list) else "hh"
    raise DataError(
        f"{source}: cannot detect the preference format; columns found: {sorted(keys)}. Expected one of: "
        f"pairs {{{c.prompt}, {c.chosen}, {c.rejected}}}; hh {{{c.chosen}, {c.rejected}}} as "
        f"'\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues; sharegpt {{{c.conversations}, {c.chosen}, "
        f"{c.rejected}}}; scored {{{c.prompt}, {c.completion}, {c.reward}}}. Rename them with Columns(...)",
        "missing_field",
    )


def _prompt(value, where: str, key: str) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return normalize_messages(value, f"{where}: field {key!r}")
    raise field_error(
        where, key, f"expected a string or a message list, got {type(value).__name__}", "bad_type"
    )


def _language(row: dict, where: str, key: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise field_error(where, key, f"expected a language code string, got {value!r}", "bad_type")
    return value or None


def _pair(prompt, chosen: str, rejected: str, where: str, row: dict, c: Columns) -> dict:
    """PreferencePair fields, with the optional chosen/rejected score columns."""
    if chosen == rejected:
        raise field_error(
            where, c.chosen, "chosen and rejected completions are identical", "chosen_equals_rejected"
        )
    fields = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for side, name in (("chosen_score", c.chosen), ("rejected_score", c.rejected)):
        key = next((k for k in (f"{name}_score", f"score_{name}") if k in row), None)
        fields[side] = number_field(row[key], where, key) if key else None
    return fields


def _parse_pairs(row: dict, where: str, c: Columns) -> dict:
    chosen, rejected = get_field(row, c.chosen, where), get_field(row, c.rejected, where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt = _prompt(row.get(c.prompt) or [], where, c.prompt)
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        keys = (c.prompt, c.chosen, c.rejected)
        prompt, chosen, rejected = split_conversations(prompt, chosen, rejected, where, keys)
        return _pair(prompt, chosen, rejected, where, row, c)
    prompt = _prompt(get_field(row, c.prompt, where), where, c.prompt)
    chosen, rejected = text_field(chosen, where, c.chosen), text_field(rejected, where, c.rejected)
    return _pair(prompt, chosen, rejected, where, row, c)


def _parse_hh(row: dict, where: str, c: Columns) -> dict:
    chosen = text_field(get_field(row, c.chosen, where), where, c.chosen)
    rejected = text_field(get_field(row, c.rejected, where), where, c.rejected)
    cut = chosen.rfind(_ASSISTANT, 0, common_prefix_length(chosen, rejected))
    if cut < 0:
        raise field_error(
            where, c.chosen, "chosen and rejected share no '\\n\\nAssistant:' turn", "bad_dialogue"
        )
    cut += len(_ASSISTANT)
    for key, text in ((c.chosen, chosen[cut:]), (c.rejected, rejected[cut:])):
        if _HUMAN in text:
            raise field_error(
                where,
                key,
                "continues past the final assistant turn (the dialogues diverge earlier)",
                "bad_dialogue",
            )
        text_field(text, where, key)
    return _pair(chosen[:cut], chosen[cut:], rejected[cut:], where, row, c)


def _parse_sharegpt(row: dict, where: str, c: Columns) -> dict:
    turns = get_field(row, c.conversations, where)
    prompt = sharegpt_to_messages(turns, f"{where}: field {c.conversations!r}")
    if prompt[-1]["role"] != "user":
        raise field_error(
            where,
            f"{c.conversations}[{len(turns) - 1}]",
            "the last turn must be from 'human'",
            "bad_conversation",
        )
    texts = []
    for key in (c.chosen, c.rejected):
        value = get_field(row, key, where)
        if isinstance(value, dict):
            (turn,) = sharegpt_to_messages([value], f"{where}: field {key!r}")
            if turn["role"] != "assistant":
                raise field_error(
                    where, key, f"expected a 'gpt' turn, got {value['from']!r}", "bad_conversation"
                )
            value = turn["content"]
        texts.append(text_field(value, where, key))
    return _pair(prompt, texts[0], texts[1], where, row, c)


def _parse_scored(row: dict, where: str, c: Columns) -> dict:
    prompt = _prompt(get_field(row, c.prompt, where), where, c.prompt)
    completion = text_field(get_field(row, c.completion, where), where, c.completion)
    reward = number_field(get_field(row, c.reward, where), where, c.reward)
    if reward is None:
        raise field_error(where, c.reward, "missing value", "bad_score")
    return {"prompt": prompt, "completion": completion, "reward": reward}


# format -> (row parser returning the record's fields, the record class)
_PARSERS = {
    "pairs": (_parse_pairs, PreferencePair),
    "hh": (_parse_hh, PreferencePair),
    "sharegpt": (_parse_sharegpt, PreferencePair),
    "scored": (_parse_scored, ScoredCompletion),
}


def pairs_from_scored(
    records: list[ScoredCompletion], strategy: str = "all_pairs", seed: int = 0
) -> list[PreferencePair]:
    """Pairs (y, y') of completions of the same prompt, with both rewards kept as chosen/rejected scores.

    Strategies, per prompt group of n completions (groups in first-appearance order):
    - "all_pairs": every unordered pair, n(n-1)/2 (for CoPG: no ranking needed, equal rewards kept);
    - "random_pairs": shuffle with `seed` and pair neighbours, floor(n/2) disjoint pairs (CoPG);
    - "best_worst": the highest- vs the lowest-reward completion (DPO); groups whose rewards are all
      equal give no pair.
    In each pair `chosen` is the higher-reward completion (on ties, the earlier row). Pairs of identical
    completion texts are dropped: they carry no contrast.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; expected one of {STRATEGIES}")
    groups: dict[str, list[ScoredCompletion]] = {}
    for record in records:
        groups.setdefault(json.dumps(record.prompt, ensure_ascii=False), []).append(record)
    rng = random.Random(seed)
    pairs = []
    for group in groups.values():
        if strategy == "all_pairs":
            candidates = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
        elif strategy == "random_pairs":
            shuffled = rng.sample(group, len(group))
            candidates = list(zip(shuffled[0::2], shuffled[1::2]))
        else:
            best = max(group, key=lambda r: r.reward)
            worst = min(group, key=lambda r: r.reward)
            candidates = [(best, worst)] if best.reward > worst.reward else []
        pairs += [_scored_pair(a, b) for a, b in candidates if a.completion != b.completion]
    return pairs


def _scored_pair(a: ScoredCompletion, b: ScoredCompletion) -> PreferencePair:
    if b.reward > a.reward or (b.reward == a.reward and b.row < a.row):
        a, b = b, a
    return PreferencePair(
        a.prompt, a.completion, b.completion, a.language, a.source, a.row, a.reward, b.reward
    )
