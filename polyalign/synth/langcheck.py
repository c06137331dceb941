"""A cheap language check by writing system: the Unicode script of a text's letters vs the script(s) its
declared language is written in.

`check_language(text, language)` -> "ok" | "mismatch" | "unknown":
- the letters of the text are classified by script (Latin, Cyrillic, Arabic, Devanagari, Bengali, Han,
  Hiragana/Katakana, Hangul, Thai, Greek, Hebrew, ...) from their Unicode names; digits, punctuation and
  spaces are ignored;
- "ok" when at least `min_share` (default 0.5) of the letters are in one of the language's scripts;
- "mismatch" otherwise (e.g. a "ru" prompt in Latin letters, a "hi" completion in English);
- "unknown" when the text has fewer than `min_letters` letters or the language's script is not in the table.
It cannot tell French from English (same script); it catches the common failures of machine translation and
in-language generation: an untranslated prompt, a completion in the wrong script.
"""

from __future__ import annotations

import unicodedata

_SCRIPT_PREFIXES = (
    ("LATIN", "Latin"), ("CYRILLIC", "Cyrillic"), ("ARABIC", "Arabic"), ("DEVANAGARI", "Devanagari"),
    ("BENGALI", "Bengali"), ("CJK", "Han"), ("HIRAGANA", "Kana"), ("KATAKANA", "Kana"), ("HANGUL", "Hangul"),
    ("THAI", "Thai"), ("GREEK", "Greek"), ("HEBREW", "Hebrew"), ("TELUGU", "Telugu"), ("TAMIL", "Tamil"),
    ("GUJARATI", "Gujarati"), ("GURMUKHI", "Gurmukhi"), ("KANNADA", "Kannada"), ("MALAYALAM", "Malayalam"),
    ("GEORGIAN", "Georgian"), ("ARMENIAN", "Armenian"), ("ETHIOPIC", "Ethiopic"), ("KHMER", "Khmer"),
    ("LAO", "Lao"), ("MYANMAR", "Myanmar"), ("SINHALA", "Sinhala"), ("TIBETAN", "Tibetan"),
)  # fmt: skip

_LATIN = (
    "af az ca cs cy da de en eo es et eu fi fil fr ga gl hr hu id is it lt lv ms mt nl no nb nn pl pt ro sk "
    "sl sq sv sw tl tr uz vi yo zu xh ha ig so ceb haw jv su ku"
).split()
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"Latin"}) for code in _LATIN},
    **{code: frozenset({"Cyrillic"}) for code in "ru uk bg be mk kk ky tg mn".split()},
    **{code: frozenset({"Arabic"}) for code in "ar fa ur ps ug arq".split()},
    **{code: frozenset({"Devanagari"}) for code in "hi mr ne sa".split()},
    "sr": frozenset({"Cyrillic", "Latin"}),  # Serbian is written in both
    "bn": frozenset({"Bengali"}), "as": frozenset({"Bengali"}), "zh": frozenset({"Han"}),
    "yue": frozenset({"Han"}), "ja": frozenset({"Han", "Kana"}), "ko": frozenset({"Hangul", "Han"}),
    "th": frozenset({"Thai"}), "el": frozenset({"Greek"}), "he": frozenset({"Hebrew"}),
    "yi": frozenset({"Hebrew"}), "te": frozenset({"Telugu"}), "ta": frozenset({"Tamil"}),
    "gu": frozenset({"Gujarati"}), "pa": frozenset({"Gurmukhi"}), "kn": frozenset({"Kannada"}),
    "ml": frozenset({"Malayalam"}), "ka": frozenset({"Georgian"}), "hy": frozenset({"Armenian"}),
    "am": frozenset({"Ethiopic"}), "km": frozenset({"Khmer"}), "lo": frozenset({"Lao"}),
    "my": frozenset({"Myanmar"}), "si": frozenset({"Sinhala"}), "bo": frozenset({"Tibetan"}),
}  # fmt: skip


def letter_script(char: str) -> str | None:
    """The script of one letter (from its Unicode name), or None for non-letters and unnamed scripts."""
    if not unicodedata.category(char).startswith("L"):
        return None
    name = unicodedata.name(char, "")
    for prefix, script in _SCRIPT_PREFIXES:
        if name.startswith(prefix):
            return script
    return None


def script_counts(text: str) -> dict[str, int]:
    """{script: number of letters} over the text's letters."""
    counts: dict[str, int] = {}
    for char in text:
        script = letter_script(char)
        if script is not None:
            counts[script] = counts.get(script, 0) + 1
    return counts


def check_language(text: str, language: str, min_letters: int = 3, min_share: float = 0.5) -> str:
    """ "ok" | "mismatch" | "unknown" (module docstring). `language` is a BCP-47 code; its region is ignored."""
    expected = LANGUAGE_SCRIPTS.get(language.split("-")[0].lower())
    counts = script_counts(text)
    total = sum(counts.values())
    if expected is None or total < min_letters:
        return "unknown"
    share = sum(n for script, n in counts.items() if script in expected) / total
    return "ok" if share >= min_share else "mismatch"
