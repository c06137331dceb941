"""Source prompts from a file, as stage-1 records (`stages.source_record`), in either layout:

- long (the Aya red-teaming layout): one prompt per row, columns `prompt`, `language` (a BCP-47 code or an
  English name; rows without one get the config's default language), optional `id`, `harm_category` (one label
  or a list literal such as "['Violence', 'Hate Speech']") and `global_or_local` ("global" | "local");
- wide (the MultiJail layout, `id,source,tags,en,zh,it,vi,...`): one column per language, turned into one record
  per (row, language) by `polyalign.recipes.columns.wide_to_long`; `tags` holds the categories.

`columns: {field: column}` renames columns first (`map_columns`), so files with other column names work as they
are. Every record keeps the file's id as `source_id` (long: the id itself is the record id; wide: the record id
is "<id>|<language>", one per language), every category in `harm_categories` and the first in `harm_category`
(where one category is needed: per-group subsets, safety pair counts, mixtures). Rows without an id get
"<file name>:<line>" (long) or "<file name>:<row>" (wide).
"""

from __future__ import annotations

from pathlib import Path

from polyalign.data.io import DataError, field_error, get_field, read_table, text_field
from polyalign.data.languages import normalise_language
from polyalign.recipes.columns import map_columns, parse_labels, wide_to_long
from polyalign.synth.stages import source_record
from polyalign.synth.store import SEP, check_unique_ids, make_id


def read_prompt_file(
    path: str | Path, layout: str = "long", columns: dict[str, str] | None = None, language: str | None = None
) -> tuple[list[dict], int]:
    """(source records in file order, empty cells skipped) from a long or wide prompt file (module docstring).
    `language` is the default for long rows without a language value (None: such a row is an error)."""
    table = read_table(path)
    if not table.rows:
        raise DataError(f"{path}: no rows", "empty")
    rows = map_columns(table.rows, dict(columns or {}), str(path))
    default_ids = [f"{Path(path).name}:{loc.split()[-1]}" for loc in table.locations]
    if layout == "wide":
        records, empty = _wide_records(rows, str(path), default_ids)
    elif layout == "long":
        records = [
            _long_record(row, f"{path}: {loc}", ident, language)
            for row, loc, ident in zip(rows, table.locations, default_ids)
        ]
        empty = 0
    else:
        raise ValueError(f"{path}: layout {layout!r} is not long|wide")
    check_unique_ids(records, str(path))
    return records, empty


def _row_id(row: dict, default: str, where: str) -> str:
    value = row.get("id")
    if value is None or value == "":
        return default
    if SEP in str(value):
        raise field_error(where, "id", f"{value!r} contains {SEP!r}, which record ids may not hold", "bad_id")
    return str(value)


def _language(value: object, where: str) -> str:
    try:
        return normalise_language(value, f"{where}: field 'language'")
    except ValueError as err:
        raise DataError(str(err), "bad_language") from None


def _label(row: dict, where: str) -> str | None:
    value = row.get("global_or_local")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or value.strip().lower() not in ("global", "local"):
        raise field_error(
            where, "global_or_local", f"expected 'global' or 'local', got {value!r}", "bad_label"
        )
    return value.strip().lower()


def _long_record(row: dict, where: str, default_id: str, default_language: str | None) -> dict:
    prompt = text_field(get_field(row, "prompt", where), where, "prompt")
    value = row.get("language")
    if (value is None or value == "") and default_language is not None:
        value = default_language
    labels = parse_labels(row.get("harm_category"))
    ident = _row_id(row, default_id, where)
    return source_record(
        ident,
        prompt,
        _language(value, where),
        harm_category=labels[0] if labels else None,
        harm_categories=labels,
        global_or_local=_label(row, where),
        source_id=ident,
    )


def _wide_records(rows: list[dict], source: str, default_ids: list[str]) -> tuple[list[dict], int]:
    rows = [
        {**row, "id": ident} if row.get("id") in (None, "") else row for row, ident in zip(rows, default_ids)
    ]
    long, empty = wide_to_long(rows, source)
    records = []
    for r in long:
        where = f"{source}: id {r['id']}"
        ident = _row_id(r, r["id"], where)
        language = _language(r["language"], where)
        records.append(
            source_record(
                make_id(ident, language),
                r["prompt"],
                language,
                harm_category=r["category"],
                harm_categories=r["categories"],
                source_id=ident,
            )
        )
    return records, empty
