"""Evaluation prompt sets, as `EvalPrompt`s, and MGSM exact-match scoring.

- XSafety (shipped, Apache-2.0): 10 languages x 13 unsafe categories + the benign `commonsense` set, 200
  prompts each. The upstream folder `sp` is Spanish and is returned as "es"; category names are normalised
  (`_n` / `_en` suffixes and the `ru` misspelling removed). XSafety has no global/local labels.
- MGSM (shipped, CC BY 4.0): 250 grade-school math problems x 11 languages, integer answers.
- Any JSONL / JSON / CSV / Parquet file in the Aya red-teaming layout (`layout: long`): `prompt`,
  `language` (a BCP-47 code or an English language name such as "Hindi"), optionally `harm_category` (a
  label, or a list or list literal such as "['Violence', 'Hate Speech']": all labels are kept in
  `categories`, the first is the harm_category), `global_or_local` ("global" | "local") and `answer` (an
  integer, for exact match). Every bad row is an error naming the file, the line or row, and the field.
- A file with one column per language (`layout: wide`, MultiJail's `id,source,tags,en,zh,it,vi,...`): one
  prompt per non-empty cell (empty cells are skipped and counted), `tags` (a list literal) giving the
  categories (`polyalign.recipes.columns.wide_to_long`).
Columns named otherwise are renamed with `columns: {field: column in the file}` (`map_columns`), e.g.
`{prompt: question}` or, for a wide file, `{id: uid, tags: labels}`.

`per_group` keeps the first N prompts of each (language, category) group in file order (0 = all), so a
subset is the same on every run.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from polyalign.data.io import DataError, field_error, get_field, read_table, text_field
from polyalign.data.languages import normalise_language
from polyalign.recipes.columns import map_columns, parse_labels, wide_to_long

ASSETS = Path(__file__).resolve().parents[2] / "assets"
XSAFETY_CATEGORIES = (
    "Crimes_And_Illegal_Activities", "Ethics_And_Morality", "Goal_Hijacking", "Inquiry_With_Unsafe_Opinion",
    "Insult", "Mental_Health", "Physical_Harm", "Privacy_And_Property", "Prompt_Leaking", "Reverse_Exposure",
    "Role_Play_Instruction", "Unfairness_And_Discrimination", "Unsafe_Instruction_Topic",
)  # fmt: skip
BENIGN_CATEGORY = "commonsense"
XSAFETY_LANGUAGES = ("ar", "bn", "de", "en", "es", "fr", "hi", "ja", "ru", "zh")
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


@dataclass(frozen=True)
class EvalPrompt:
    id: str  # stable: "<source>/<language>/<category>/<index>" or "<file>:<line>"
    prompt: str
    language: str  # BCP-47
    harm_category: str | None = None
    global_or_local: str | None = None  # "global" | "local" | None (not labelled)
    answer: int | None = None  # MGSM / exact match
    categories: tuple[str, ...] = ()  # every harm label of the prompt; harm_category is the first


def _check_languages(requested: list[str] | None, available: tuple[str, ...], source: str) -> list[str]:
    if not requested:
        return list(available)
    codes = [normalise_language(lang, f"{source} languages") for lang in requested]
    missing = [c for c in codes if c not in available]
    if missing:
        raise ValueError(f"{source} has no prompts in {missing}; available: {list(available)}")
    return codes


def _xsafety_file(folder: Path, category: str) -> Path:
    names = [f"{category}.csv", f"{category}_n.csv", f"{category}_en.csv"]
    if category == "Crimes_And_Illegal_Activities":
        names.append("Crimes_And_Illegal_Activitie.csv")  # upstream typo in ru/
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"XSafety: no file for category {category!r} in {folder}")


def load_xsafety(
    languages: list[str] | None = None,
    categories: list[str] | None = None,
    per_group: int = 0,
    root: str | Path = ASSETS / "xsafety",
) -> list[EvalPrompt]:
    """XSafety prompts; categories default to the 13 unsafe ones (add "commonsense" for the benign set)."""
    codes = _check_languages(languages, XSAFETY_LANGUAGES, "XSafety")
    valid = (*XSAFETY_CATEGORIES, BENIGN_CATEGORY)
    cats = list(categories) if categories else list(XSAFETY_CATEGORIES)
    unknown = [c for c in cats if c not in valid]
    if unknown:
        raise ValueError(f"XSafety: unknown categories {unknown}; valid: {list(valid)}")
    out = []
    for lang in codes:
        folder = Path(root) / ("sp" if lang == "es" else lang)
        for cat in cats:
            with _xsafety_file(folder, cat).open(encoding="utf-8-sig", newline="") as f:
                rows = [r[0].strip() for r in csv.reader(f) if r and r[0].strip()]
            rows = rows[:per_group] if per_group else rows
            out += [EvalPrompt(f"xsafety/{lang}/{cat}/{i}", p, lang, cat) for i, p in enumerate(rows)]
    return out


def load_mgsm(
    languages: list[str] | None = None, per_group: int = 0, root: str | Path = ASSETS / "mgsm"
) -> list[EvalPrompt]:
    """MGSM problems with integer answers ("2,125" -> 2125)."""
    out = []
    for lang in _check_languages(languages, MGSM_LANGUAGES, "MGSM"):
        lines = (Path(root) / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()
        lines = lines[:per_group] if per_group else lines
        for i, line in enumerate(lines):
            question, answer = line.rsplit("\t", 1)
            out.append(
                EvalPrompt(f"mgsm/{lang}/{i}", question.strip(), lang, answer=int(answer.replace(",", "")))
            )
    return out


def _optional_text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise field_error(where, key, f"expected a string, got {type(value).__name__}", "bad_type")
    return value.strip()


def _file_prompt(row: dict, where: str, ident: str) -> EvalPrompt:
    prompt = text_field(get_field(row, "prompt", where), where, "prompt")
    try:
        language = normalise_language(get_field(row, "language", where), f"{where}: field 'language'")
    except ValueError as err:
        raise DataError(str(err), "bad_language") from None
    label = _optional_text(row, "global_or_local", where)
    if label is not None and label.lower() not in ("global", "local"):
        raise field_error(
            where, "global_or_local", f"expected 'global' or 'local', got {label!r}", "bad_label"
        )
    answer = row.get("answer")
    if answer is not None and answer != "":
        try:
            answer = int(str(answer).replace(",", "").strip())
        except ValueError:
            raise field_error(where, "answer", f"expected an integer, got {answer!r}", "bad_answer") from None
    else:
        answer = None
    labels = tuple(parse_labels(row.get("harm_category")))
    category = labels[0] if labels else None
    return EvalPrompt(ident, prompt, language, category, label.lower() if label else None, answer, labels)


def _read_rows(path: str | Path, columns: dict[str, str] | None) -> tuple[list[dict], list[str]]:
    """(rows with mapped columns renamed, their locations), or a DataError for an empty file."""
    table = read_table(path)
    if not table.rows:
        raise DataError(f"{path}: no rows", "empty")
    return map_columns(table.rows, dict(columns or {}), str(path)), table.locations


def load_prompt_file(
    path: str | Path, languages: list[str] | None = None, per_group: int = 0, columns: dict | None = None
) -> list[EvalPrompt]:
    """Prompts from a file in the Aya red-teaming layout (module docstring); `languages` filters."""
    rows, locations = _read_rows(path, columns)
    wanted = {normalise_language(lang, f"{path} languages") for lang in languages or []}
    prompts = [
        _file_prompt(row, f"{path}: {loc}", f"{Path(path).name}:{loc.split()[-1]}")
        for row, loc in zip(rows, locations)
    ]
    if wanted:
        missing = wanted - {p.language for p in prompts}
        if missing:
            raise ValueError(f"{path}: no prompts in languages {sorted(missing)}")
        prompts = [p for p in prompts if p.language in wanted]
    return first_per_group(prompts, per_group)


def load_wide_file(
    path: str | Path, languages: list[str] | None = None, per_group: int = 0, columns: dict | None = None
) -> tuple[list[EvalPrompt], int]:
    """(prompts, empty cells skipped) from a file with one column per language (module docstring);
    `languages` picks columns (default: every column named by a language code)."""
    rows, _ = _read_rows(path, columns)
    records, empty = wide_to_long(rows, str(path), languages=languages or None)
    prompts = []
    for r in records:
        try:
            language = normalise_language(r["language"], f"{path}: column {r['language']!r}")
        except ValueError as err:
            raise DataError(str(err), "bad_language") from None
        ident = f"{Path(path).name}:{r['id']}/{r['language']}"
        labels = tuple(r["categories"])
        prompts.append(EvalPrompt(ident, r["prompt"].strip(), language, r["category"], categories=labels))
    return first_per_group(prompts, per_group), empty


def first_per_group(prompts: list[EvalPrompt], per_group: int) -> list[EvalPrompt]:
    """The first `per_group` prompts of each (language, harm_category) group, in order; 0 = all."""
    if per_group <= 0:
        return prompts
    seen: dict[tuple, int] = {}
    out = []
    for p in prompts:
        key = (p.language, p.harm_category)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= per_group:
            out.append(p)
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_integer(text: str) -> int | None:
    """The last number in `text` as an int ("... so the answer is 1,250." -> 1250; "18.0" -> 18); None when
    there is no number or the last one is not a whole number. Unicode digits (Bengali, Devanagari, Thai, full
    width) are read as digits, since MGSM completions may use them."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = float(matches[-1].replace(",", "").rstrip("."))
    return int(value) if value.is_integer() else None


def exact_match(completion: str, answer: int) -> bool:
    """MGSM scoring: the completion's final integer equals the answer."""
    return extract_final_integer(completion) == answer
