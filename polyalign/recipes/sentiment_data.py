"""The shipped UCI "Sentiment Labelled Sentences" (Kotzias et al. 2015, CC BY 4.0): loading, a
deterministic stratified split, and Bradley-Terry pairs for reward-model training.

Files live in `polyalign/assets/sentiment/` (see its PROVENANCE.md): one example per line,
`sentence<TAB>label` with label 1 = positive, 0 = negative. Sentences may carry stray whitespace before
the tab, so a line is split on its LAST tab and both sides are stripped. 3 sources x 1,000 sentences,
each source balanced 500/500.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SENTIMENT_DIR = Path(__file__).resolve().parents[1] / "assets" / "sentiment"
SOURCES = ("amazon_cells", "imdb", "yelp")  # file = f"{source}_labelled.txt"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledSentence:
    text: str
    label: int  # 1 = positive, 0 = negative
    source: str  # "amazon_cells" | "imdb" | "yelp" (or the file stem for other files)


def parse_sentiment_file(path: str | Path, source: str | None = None) -> list[LabelledSentence]:
    """Read one `sentence<TAB>label` file. Blank lines are skipped; malformed lines raise ValueError
    naming the file and the 1-based line number."""
    path = Path(path)
    source = source or path.stem.removesuffix("_labelled")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if "\t" not in line:
                raise ValueError(
                    f"{where}: expected 'sentence<TAB>label', found no tab in {line.strip()[:60]!r}"
                )
            text, label = line.rstrip("\n").rsplit("\t", 1)
            text, label = text.strip(), label.strip()
            if label not in ("0", "1"):
                raise ValueError(f"{where}: label must be 0 or 1, got {label!r}")
            if not text:
                raise ValueError(f"{where}: empty sentence before the label")
            out.append(LabelledSentence(text, int(label), source))
    return out


def load_sentiment(
    sources: Sequence[str] = SOURCES, root: str | Path | None = None
) -> list[LabelledSentence]:
    """All sentences of `sources` (file order, sources in the given order) from `root` (default: shipped)."""
    root = Path(root) if root is not None else SENTIMENT_DIR
    out = []
    for source in sources:
        path = root / f"{source}_labelled.txt"
        if not path.is_file():
            raise FileNotFoundError(f"sentiment source {source!r}: no file {path} (known sources: {SOURCES})")
        out.extend(parse_sentiment_file(path, source))
    return out


def split_sentiment(
    sentences: Sequence[LabelledSentence],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, list[LabelledSentence]]:
    """Deterministic train/val/test split, stratified by (source, label).

    Each (source, label) stratum is shuffled with `random.Random(seed)` and cut by `fractions`, so every
    split keeps the label balance of every source. Same inputs + seed -> same split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    strata: dict[tuple[str, int], list[LabelledSentence]] = {}
    for s in sentences:
        strata.setdefault((s.source, s.label), []).append(s)
    rng = random.Random(seed)
    splits: dict[str, list[LabelledSentence]] = {name: [] for name in SPLITS}
    for key in sorted(strata):
        items = list(strata[key])
        rng.shuffle(items)
        n_train = round(fractions[0] * len(items))
        n_val = round(fractions[1] * len(items))
        splits["train"] += items[:n_train]
        splits["val"] += items[n_train : n_train + n_val]
        splits["test"] += items[n_train + n_val :]
    for name in SPLITS:  # interleave strata so a prefix of a split is not one source
        rng.shuffle(splits[name])
    return splits


def build_pairs(sentences: Sequence[LabelledSentence], seed: int = 0) -> list[tuple[str, str]]:
    """Bradley-Terry pairs (chosen, rejected) = (a positive sentence, a negative sentence).

    Positives and negatives are shuffled with `random.Random(seed)` and zipped, so each sentence is used
    at most once and the number of pairs is min(#positive, #negative). A new seed gives a new pairing.
    """
    rng = random.Random(seed)
    positives = [s.text for s in sentences if s.label == 1]
    negatives = [s.text for s in sentences if s.label == 0]
    if not positives or not negatives:
        raise ValueError(
            f"need both labels to build pairs, got {len(positives)} positive, {len(negatives)} negative"
        )
    rng.shuffle(positives)
    rng.shuffle(negatives)
    return list(zip(positives, negatives))
