"""Prompt sets for online RL: the built-in story openings and user prompt files.

`load_prompts(spec)` returns `PromptSet(prompts, columns)`; `prompt_batch(...)` picks a step's prompts
deterministically from (seed, step), so a resumed run sees exactly the prompts it would have seen: the rows
of `batch_indices`, which also orders the offline trainer's pairs.

Built-in sets (TinyStories-style openings for the shipped stories260K model, made from templates here):
- `builtin:stories`: 240 training openings;  `builtin:stories-eval`: 48 held-out openings whose names and
  objects never occur in the training set.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import lru_cache

import torch

_TEMPLATES = (
    "Once upon a time, there was a little {noun} named {name}.",
    "One day, {name} the {noun} found a {thing} in the {place}.",
    "{name} was a {noun} who lived near the {place}.",
    "{name} wanted to play with the {thing}, but",
    "Every morning, {name} went to the {place} to look for a {thing}.",
    "{name} and the {thing} were best friends. One day,",
)
_TRAIN = dict(
    name=("Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Tim", "Anna"),
    noun=("girl", "boy", "dog", "cat", "bird"),
    thing=("ball", "kite", "box", "toy", "cake"),
    place=("park", "garden", "forest", "house", "river"),
)
_EVAL = dict(
    name=("Sam", "Lucy", "Jack", "Zoe"),
    noun=("bunny", "duck", "fox"),
    thing=("hat", "boat", "flower"),
    place=("beach", "school", "farm"),
)


def _render(words: dict[str, tuple[str, ...]], n: int, seed: int) -> list[str]:
    combos = list(itertools.product(_TEMPLATES, *words.values()))
    random.Random(seed).shuffle(combos)
    seen: dict[str, None] = {}
    for template, *values in combos:
        seen.setdefault(template.format(**dict(zip(words, values))), None)
        if len(seen) == n:
            break
    return list(seen)


BUILTIN_PROMPTS = {
    "builtin:stories": lambda: _render(_TRAIN, 240, seed=0),
    "builtin:stories-eval": lambda: _render(_EVAL, 48, seed=1),
}


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    columns: dict[str, list] = field(default_factory=dict)  # extra dataset columns, one value per prompt
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(spec: str, prompt_column: str = "prompt") -> PromptSet:
    """A built-in set name, or a JSONL/JSON/CSV/Parquet file with a prompt column (other columns kept)."""
    if spec in BUILTIN_PROMPTS:
        return PromptSet(BUILTIN_PROMPTS[spec](), {}, spec)
    if spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in prompt set {spec!r}; choose from {sorted(BUILTIN_PROMPTS)}")
    from polyalign.data.io import read_records

    records = read_records(spec)
    if not records:
        raise ValueError(f"{spec}: no prompts found")
    prompts, columns = [], {k: [] for k in records[0] if k != prompt_column}
    for i, rec in enumerate(records):
        value = rec.get(prompt_column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{spec}: row {i + 1}: field {prompt_column!r} must be a non-empty string, got {value!r}"
            )
        prompts.append(value)
        for k in columns:
            columns[k].append(rec.get(k))
    return PromptSet(prompts, columns, spec)


def check_prompt_lengths(prompt_set: PromptSet, tokenizer, max_tokens: int) -> None:
    """Fail early, naming the row, if a prompt has more tokens than the configured maximum."""
    for i, prompt in enumerate(prompt_set.prompts):
        n = len(tokenizer(prompt)["input_ids"])
        if n > max_tokens:
            raise ValueError(
                f"{prompt_set.source}: prompt {i + 1} has {n} tokens, more than data.max_prompt_tokens={max_tokens}"
            )


def prompt_batch(prompt_set: PromptSet, step: int, batch_size: int, seed: int) -> tuple[list[str], dict]:
    """The prompts of optimisation step `step` (`batch_indices`), a pure function of its inputs."""
    rows = batch_indices(len(prompt_set), step, batch_size, seed)
    columns = {k: [v[r] for r in rows] for k, v in prompt_set.columns.items()}
    return [prompt_set.prompts[r] for r in rows], columns


@lru_cache(maxsize=4)
def _epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # (n,)


def batch_indices(n: int, step: int, batch_size: int, seed: int, shuffle: bool = True) -> list[int]:
    """Dataset rows of optimizer step `step`: positions step*B .. step*B+B-1 of the endless stream of epochs,
    each epoch a seeded permutation of range(n) (a batch may span two epochs). Pure in its arguments."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        rows.append(int(_epoch_order(n, epoch, seed, shuffle)[index]))
    return rows


def rows_used(n: int, steps: int, batch_size: int, seed: int, shuffle: bool = True) -> torch.Tensor:
    """The rows `batch_indices` draws in steps 0 .. steps-1, sorted: all n once the steps span an epoch."""
    if steps * batch_size >= n:
        return torch.arange(n)
    return _epoch_order(n, 0, seed, shuffle)[: steps * batch_size].sort().values
