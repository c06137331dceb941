"""Data that crosses module boundaries, as frozen dataclasses. No logic beyond tiny helpers.

Glossary (used everywhere in polyalign):
- prompt: the text a completion continues. completion: the generated (or given) continuation.
- rollout: prompts x G completions each, with token ids, masks and the sampler's log-probs.
- group: the G completions of one prompt. Completions of prompt i sit at rows i*G .. i*G+G-1.
- score: raw output of a reward function / reward model / judge. reward: the scalar a trainer optimises
  (score, optionally KL-shaped: reward = score - beta * (log pi - log pi_ref)).
- advantage: reward minus a baseline. chosen / rejected: the two sides of a preference pair.
- language: a BCP-47 code ("en", "zh", ...).

Shape letters: B sequences, G group size, P prompts, T completion tokens, Tp prompt tokens, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    """How to sample completions."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    row_offset: int = 0
    """Index of this call's first row in the whole batch when the batch is split across processes."""
    total_rows: int | None = None
    """Rows of the whole batch (None = this call's rows). With `row_offset`, row i's random numbers are those
    of row row_offset + i in one unsplit call, so completions do not depend on the process count."""


@dataclass(frozen=True)
class Rollout:
    """Prompts and their sampled completions, group-major (see module docstring)."""

    prompts: list[str]  # P prompt texts
    completions: list[str]  # B = P*G decoded completion texts (special tokens removed)
    group_size: int  # G
    prompt_ids: torch.Tensor  # (B, Tp) long, LEFT padded with pad id
    prompt_mask: torch.Tensor  # (B, Tp) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) long, RIGHT padded with pad id
    completion_mask: torch.Tensor  # (B, T) long, 1 on generated tokens up to and including EOS/stop
    logprobs: torch.Tensor  # (B, T) float, sampler's log pi(token) at the sampling temperature, 0 on padding
    finished: torch.Tensor  # (B,) bool, True when the completion ended with EOS or a stop string
    extras: dict = field(default_factory=dict)  # extra per-prompt dataset columns, each a list of length B

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def prompts_per_row(self) -> list[str]:  # B prompt texts, each prompt repeated G times
        return [p for p in self.prompts for _ in range(self.group_size)]

    @property
    def completion_lengths(self) -> torch.Tensor:  # (B,)
        return self.completion_mask.sum(-1)
