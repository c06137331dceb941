"""Rule rewards over text: exact match, keyword presence, length, and a small sentiment lexicon.

Each public function here is a factory: it takes the rule's settings and returns a RewardFn
`(prompts, completions, **columns) -> Tensor (B,) float32` (see `polyalign.rewards`). Rules score the
completion text only (never the prompt) and know nothing about tokens, models or trainers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable
from typing import Any

import torch

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _words(text: str) -> list[str]:
    """Lower-cased word tokens ("don't" stays one token)."""
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def _per_completion(score: Callable[[str], float]) -> Callable[..., torch.Tensor]:
    """The RewardFn that scores each completion's text alone with `score`."""

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        return torch.tensor([float(score(c)) for c in completions], dtype=torch.float32)

    return reward


def normalize_answer(text: str) -> str:
    """Lower-case, drop surrounding whitespace and punctuation, collapse inner whitespace."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_match(answer_column: str = "answer", normalize: bool = True) -> Callable[..., torch.Tensor]:
    """1.0 where the completion equals the row's `answer_column` value, else 0.0.

    With normalize=True both sides go through `normalize_answer` first ("  Paris." == "paris").
    """

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        if answer_column not in columns:
            raise ValueError(f"exact_match needs column {answer_column!r}; got columns {sorted(columns)}")
        answers = columns[answer_column]
        prep = normalize_answer if normalize else (lambda s: s)
        hits = [prep(c) == prep(str(a)) for c, a in zip(completions, answers, strict=True)]
        return torch.tensor(hits, dtype=torch.float32)

    return reward


def contains_any(words: Iterable[str], case_sensitive: bool = False) -> Callable[..., torch.Tensor]:
    """1.0 where the completion contains any of `words` as a whole word (or phrase), else 0.0."""
    words = [w for w in words] if not isinstance(words, str) else [words]
    if not words or any(not isinstance(w, str) or not w.strip() for w in words):
        raise ValueError(f"contains_any needs a non-empty list of non-empty strings, got {words!r}")
    flags = 0 if case_sensitive else re.IGNORECASE
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w.strip()) for w in words) + r")\b", flags)
    return _per_completion(lambda text: pattern.search(text) is not None)


def length_reward(target_chars: int = 200) -> Callable[..., torch.Tensor]:
    """Peaks at 0 when the completion has `target_chars` characters: -|len - target| / target."""
    if target_chars <= 0:
        raise ValueError(f"length_reward target_chars must be > 0, got {target_chars}")
    return _per_completion(lambda text: -abs(len(text) - target_chars) / target_chars)


def length_penalty(max_chars: int = 400, per_char: float = 0.01) -> Callable[..., torch.Tensor]:
    """0 up to `max_chars` characters, then -per_char for every character over it."""
    if max_chars < 0 or per_char < 0:
        raise ValueError(
            f"length_penalty needs max_chars >= 0 and per_char >= 0, got {max_chars}, {per_char}"
        )
    return _per_completion(lambda text: -per_char * max(len(text) - max_chars, 0))


# A small hand-picked lexicon of plain English words (including the simple vocabulary of children's
# stories). It is a cheap baseline reward and a sanity check for a learned sentiment reward model.
POSITIVE_WORDS = frozenset(
    "happy happily happier glad joy joyful love loved loves lovely liked smile smiled smiles laugh "
    "laughed fun funny good great nice kind kindly friend friends friendly fantastic wonderful amazing "
    "excellent best beautiful pretty fine enjoy enjoyed proud excited delicious brave hug hugged "
    "thank thanks thankful awesome perfect favorite favourite sweet cheerful gentle safe helpful "
    "recommend impressed comfortable beautifully warm calm".split()
)
NEGATIVE_WORDS = frozenset(
    "sad sadly unhappy cry cried cries crying angry mad hate hated hates bad worse worst terrible "
    "awful horrible scared afraid fear hurt hurts pain broke broken lost lonely upset "
    "poor boring bored disappointed disappointing disappointment annoying ugly sick rude wrong dirty "
    "nasty waste wasted problem fail failed failure stupid useless dull tired mess scary frown "
    "frowned shout shouted yell yelled".split()
)
NEGATORS = frozenset("not no never nothing don't didn't doesn't isn't wasn't won't can't cannot".split())


def lexicon_score(text: str) -> float:
    """(pos - neg) / (pos + neg + 1) over the words of `text`, in (-1, 1).

    A lexicon word right after a negator ("not", "didn't", ...) counts with the opposite polarity.
    The +1 makes one hit weaker evidence than several: "happy" -> 0.5, "happy and kind" -> 0.67.
    """
    pos = neg = 0
    prev = ""
    for word in _words(text):
        polarity = (word in POSITIVE_WORDS) - (word in NEGATIVE_WORDS)
        if prev in NEGATORS:
            polarity = -polarity
        pos += polarity > 0
        neg += polarity < 0
        prev = word
    return (pos - neg) / (pos + neg + 1)


def lexicon_sentiment() -> Callable[..., torch.Tensor]:
    """Word-list sentiment of each completion, `lexicon_score`, in (-1, 1); 0 when no lexicon word."""
    return _per_completion(lexicon_score)
