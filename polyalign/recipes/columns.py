"""Prompt files as their authors publish them (for `polyalign eval`, synth and experiments; ring): renamed
columns and one column per language.

- `map_columns(rows, mapping)`: `{expected_field: column_in_file}` renames columns (`data.columns`,
  `prompts.columns`), e.g. `{prompt: question, category: harm_category}`. A mapped column missing from the
  file is an error naming the file and the columns it has.
- `wide_to_long(rows, ...)`: a red-team file with one column per language (MultiJail's
  `id,source,tags,en,zh,it,...`) becomes one record per (row, language): `{prompt, language, id, source,
  categories, category}`. A column is a language column when its name is a language code (`en`, `zh`,
  `pt-BR`, `fil`) and it is not the id, tag or source column; the id is kept as the source id, a tag cell
  that holds a list (a Python or JSON literal such as "['violence', 'crime']") becomes `categories` (all
  labels kept) and `category` (the first). Empty cells are skipped and counted.

Pure functions over lists of dicts; no I/O.
"""

from __future__ import annotations

import ast
import json
import re

from polyalign.data.io import DataError

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
NOT_LANGUAGES = frozenset({"id", "source", "tags", "tag", "category", "categories", "type", "split", "row"})


def map_columns(rows: list[dict], mapping: dict[str, str], source: str) -> list[dict]:
    """Rows with `mapping[field]` renamed to `field` (the other columns kept as they are)."""
    if not mapping or not rows:
        return rows
    missing = {field: column for field, column in mapping.items() if column not in rows[0]}
    if missing:
        raise DataError(
            f"{source}: columns {sorted(missing.values())} (mapped to {sorted(missing)}) not found; "
            f"the file has {sorted(rows[0])}",
            "missing_field",
        )
    renamed = {column: field for field, column in mapping.items()}
    return [{renamed.get(k, k): v for k, v in row.items()} for row in rows]


def parse_labels(value: object) -> list[str]:
    """Category labels from a cell: a list, a Python/JSON list literal, or one plain label."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        for parse in (json.loads, ast.literal_eval):  # literal_eval evaluates literals only, never code
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, (list, tuple)):
                return [str(v).strip() for v in parsed if str(v).strip()]
    return [text] if text else []


def language_columns(columns: list[str], exclude: set[str]) -> list[str]:
    """The columns named by a language code, in file order."""
    skip = {c.lower() for c in exclude} | NOT_LANGUAGES
    return [c for c in columns if c.lower() not in skip and LANGUAGE_CODE.match(c)]


def wide_to_long(
    rows: list[dict],
    source: str,
    *,
    id_column: str = "id",
    tags_column: str = "tags",
    source_column: str = "source",
    languages: list[str] | None = None,
) -> tuple[list[dict], int]:
    """One record per (row, language) of a one-column-per-language file; returns (records, empty cells)."""
    if not rows:
        return [], 0
    found = language_columns(list(rows[0]), {id_column, tags_column, source_column})
    if languages:
        unknown = [x for x in languages if x not in rows[0]]
        if unknown:
            raise DataError(f"{source}: no column for languages {unknown}; language columns: {found}")
        found = list(languages)
    if not found:
        raise DataError(
            f"{source}: prompts.layout=wide needs columns named by language codes (en, zh, ...); "
            f"the file has {sorted(rows[0])}",
            "missing_field",
        )
    records, empty = [], 0
    for i, row in enumerate(rows):
        labels = parse_labels(row.get(tags_column))
        for language in found:
            text = row.get(language)
            if not isinstance(text, str) or not text.strip():
                empty += 1
                continue
            records.append(
                {
                    "prompt": text,
                    "language": language,
                    "id": str(row.get(id_column, i)),
                    "source": row.get(source_column),
                    "categories": labels,
                    "category": labels[0] if labels else None,
                }
            )
    return records, empty
