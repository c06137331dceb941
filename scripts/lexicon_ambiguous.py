"""Dev script for the lexicon harm judge (polyalign/recipes/evaluate/lexicon.py): its ambiguous entries and its flag rates.

    /tmp/vwf/bin/python scripts/lexicon_ambiguous.py generate   # needs wordfreq[cjk]; writes ambiguous.tsv
    python scripts/lexicon_ambiguous.py zipf vi                   # Zipf of one language's entries, high first
    python scripts/lexicon_ambiguous.py table [--before SRC]      # flag rates on benign and XSafety texts

`generate` lists, per language, the single-token entries (own list, and English entries where they are judged
in another language) whose wordfreq Zipf frequency in that language is >= THRESHOLD, and writes them to
polyalign/assets/ldnoobw/ambiguous.tsv; the judge ignores them. wordfreq is a development-time tool only:
polyalign reads the shipped TSV and never imports wordfreq. `table` needs only polyalign; `--before SRC`
also runs an older checkout's polyalign (a folder holding its `polyalign/` package) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# LEXICON_SRC: run another checkout's polyalign (the "before" column of `table --before`).
sys.path.insert(0, os.environ.get("LEXICON_SRC", str(ROOT)))

# Attributes are looked up at use so that `rates` also runs on a checkout older than them.
from polyalign.recipes.evaluate import lexicon  # noqa: E402

THRESHOLD = 4.5
# Which lists the threshold applies to: see PROVENANCE.md (profanity is frequent in wordfreq's sources).
SCOPE = "v2+cross"
# polyalign code -> wordfreq code where they differ (Norwegian is Bokmål; Serbo-Croatian is one wordlist).
_WORDFREQ_CODE = {"no": "nb", "sr": "sh", "hr": "sh", "bs": "sh"}


def _wordfreq_code(language: str, available: set[str]) -> str | None:
    code = _WORDFREQ_CODE.get(language, language)
    return code if code in available else None


def candidates(language: str, scope: str) -> list[tuple[str, str]]:
    """(entry, list) pairs the threshold applies to for `language`: list is "own" or "en"."""
    english = lexicon.read_entries(lexicon.DEFAULT_ROOT / "v1" / "en")
    if language == "en":
        return []  # the curated English list is the reference: English profanity sits at Zipf 4.0-5.5
    out = [(e, "en") for e in english]
    path = lexicon.lexicon_path(language)
    if path is not None and (scope == "all" or path.parent.name == "data"):
        out += [(e, "own") for e in lexicon.read_entries(path)]
    return out


def ambiguous_rows(threshold: float = THRESHOLD, scope: str = SCOPE) -> list[tuple[str, str, float, str]]:
    """(language, entry, zipf, list) for every single-token entry at or above `threshold`."""
    from wordfreq import available_languages, tokenize, zipf_frequency

    available = set(available_languages())
    rows = []
    for language in sorted(set(lexicon.lexicon_languages()) | available):
        code = _wordfreq_code(language, available)
        if code is None:
            continue
        for entry, source in candidates(language, scope):
            if len(tokenize(entry, code)) != 1:
                continue  # phrases: wordfreq's estimate for several tokens is not a word frequency
            zipf = zipf_frequency(entry, code)
            if zipf >= threshold:
                rows.append((language, entry, zipf, source))
    return rows


def write_ambiguous(rows: list[tuple[str, str, float, str]], path: Path) -> None:
    lines = ["language\tentry\tzipf\tlist"] + [f"{lang}\t{e}\t{z:.2f}\t{src}" for lang, e, z, src in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def control_sets() -> dict[str, dict[str, list[str]]]:
    """{set name: {language: texts}}: benign sets (MGSM, dpo_demo, XSafety commonsense) and XSafety unsafe."""
    from polyalign.recipes.evaluate.prompts import ASSETS, load_mgsm, load_xsafety

    sets: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in load_mgsm():
        sets["mgsm"][p.language].append(p.prompt)
    for lang in ("en", "zh"):
        records = json.loads((ASSETS / "dpo_demo" / f"dpo_{lang}_demo.json").read_text(encoding="utf-8"))
        for r in records:
            sets["dpo_demo"][lang] += [r["conversations"][0]["value"], r["chosen"]["value"]]
    for p in load_xsafety(None, ["commonsense"]):
        sets["xsafety_commonsense"][p.language].append(p.prompt)
    for p in load_xsafety():
        sets["xsafety_unsafe"][p.language].append(p.prompt)
    return sets


def flag_rates(judge: lexicon.LexiconHarmJudge | None = None) -> dict[str, dict[str, float]]:
    """{set: {language: share of texts flagged}}."""
    judge = judge or lexicon.LexiconHarmJudge()
    return {
        name: {
            lang: sum(judge.match(t, lang) is not None for t in texts) / len(texts)
            for lang, texts in by.items()
        }
        for name, by in control_sets().items()
    }


def _rates_from(src: str) -> dict:
    """flag_rates() computed by another checkout's polyalign (run in a subprocess with its path first)."""
    env = {**os.environ, "LEXICON_SRC": str(Path(src).resolve())}
    done = subprocess.run(
        [sys.executable, __file__, "rates"], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout)


def table(after: dict, before: dict | None) -> str:
    head = "| set | language | texts flagged, before | after |" if before else "| set | language | flagged |"
    lines = [head, "|---|---|---|---|" if before else "|---|---|---|"]
    for name, by in after.items():
        for lang, rate in sorted(by.items()):
            cells = (
                [name, lang]
                + ([f"{100 * before[name][lang]:.1f}%"] if before else [])
                + [f"{100 * rate:.1f}%"]
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--threshold", type=float, default=THRESHOLD)
    gen.add_argument("--scope", choices=("v2+cross", "all"), default=SCOPE)
    gen.add_argument("--out", type=Path, help="default: the shipped ambiguous.tsv")
    zipf = sub.add_parser("zipf")
    zipf.add_argument("language")
    sub.add_parser("rates", help="flag rates as JSON (used by table --before)")
    tab = sub.add_parser("table")
    tab.add_argument("--before", help="folder holding an older polyalign package")
    tab.add_argument("--ambiguous", help="an ambiguous-entries TSV to use instead of the shipped one")
    args = ap.parse_args()
    if args.cmd == "generate":
        rows = ambiguous_rows(args.threshold, args.scope)
        out = args.out or lexicon.DEFAULT_ROOT / lexicon.AMBIGUOUS_FILE
        write_ambiguous(rows, out)
        print(f"{len(rows)} ambiguous entries in {len({r[0] for r in rows})} languages -> {out}")
    elif args.cmd == "zipf":
        rows = sorted(ambiguous_rows(0.0, "all"), key=lambda r: -r[2])
        print("\n".join(f"{z:.2f}\t{e}\t{src}" for lang, e, z, src in rows if lang == args.language))
    elif args.cmd == "rates":
        print(json.dumps(flag_rates()))
    else:
        judge = lexicon.LexiconHarmJudge(ambiguous=Path(args.ambiguous).resolve()) if args.ambiguous else None
        print(table(flag_rates(judge), _rates_from(args.before) if args.before else None))


if __name__ == "__main__":
    main()
