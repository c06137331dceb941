"""Reward-hacking monitors: signs that a policy games its reward instead of improving (docs/monitors.md).

Pure functions over a step's rollout and held-out completions; `alarms` names those past `Thresholds`. Starting
values (first step's length, first evaluation's distinct count) live in the run state (saved in checkpoints).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch

from polyalign.rewards import build_reward
from polyalign.types import Rollout


@dataclass(frozen=True)
class Thresholds:
    """When a monitor fires (a warning in the progress line, listed in the report)."""

    length_high: float = 2.0  # mean completion length over the first step's: above x2 ...
    length_low: float = 0.5  # ... or below x0.5
    repeat_4gram: float = 0.3  # fraction of a completion's 4-grams that already appeared in it
    unfinished_rise: float = 0.3  # fraction of completions without EOS over the first step's: above +0.3
    kl_per_token: float = 0.3  # nats per completion token, k1 against the reference
    held_out_distinct: float = 0.8  # distinct held-out completions over the first evaluation's
    scorer_corr: float = 0.0  # correlation of training reward and the second held-out scorer


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(completions: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the batch (0 when no completion has n tokens)."""
    grams = [g for tokens in completions for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(completions: list[list[int]], n: int = 4) -> float:
    """Of all n-grams in the batch, the fraction that already appeared earlier in the same completion."""
    per_row = [ngrams(tokens, n) for tokens in completions]
    total = sum(len(grams) for grams in per_row)
    return sum(len(grams) - len(set(grams)) for grams in per_row) / total if total else 0.0


def kl_per_token(logp: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor) -> float:
    """sum (log pi - log pi_ref) over the batch's tokens / tokens (k1); 0 without a reference."""
    return 0.0 if ref is None else float(((logp - ref) * mask).sum() / mask.sum().clamp(min=1))


def step_monitors(rollout: Rollout, ref_logprobs: torch.Tensor | None, state: dict) -> dict[str, float]:
    """The monitor/* keys of one training step; the held-out ones repeat the last evaluation's."""
    tokens = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask)]
    length = float(rollout.completion_lengths.float().mean())
    unfinished = float((~rollout.finished).float().mean())
    first = {"length": max(length, 1e-9), "unfinished": unfinished}  # the first step's, kept from then on
    start = state["monitor_start"] = first | state.get("monitor_start", {})
    return {
        "monitor/length_drift": length / start["length"],
        "monitor/distinct_1": distinct_n(tokens, 1),
        "monitor/distinct_2": distinct_n(tokens, 2),
        "monitor/repeat_4gram": repeated_ngram_rate(tokens, 4),
        "monitor/unfinished": unfinished,
        "monitor/unfinished_rise": unfinished - start["unfinished"],
        "monitor/kl_per_token": kl_per_token(rollout.logprobs, ref_logprobs, rollout.completion_mask),
        **state.get("monitor_eval", {}),
    }


def eval_monitors(completions: list[str], scores: torch.Tensor, second, state: dict) -> dict[str, float]:
    """Held-out collapse: distinct greedy completions (count, fraction, and over the first evaluation's), the
    most common one's count; with `second` (the eval.scorer's scores) its mean and its correlation with the
    training reward over the prompts. Keeps the held-out monitors in `state` for the steps that follow."""
    counts = Counter(c.strip() for c in completions)
    start = state["monitor_start"] = {"eval_distinct": max(len(counts), 1)} | state.get("monitor_start", {})
    n, top, total = len(counts), max(counts.values()), len(completions)
    out = {"eval/distinct": float(n), "eval/distinct_frac": n / total, "eval/top_count": float(top)}
    state["monitor_eval"] = {"monitor/held_out_distinct": n / start["eval_distinct"]}
    if second is not None:  # the correlation is 0 where either score is constant
        pair = torch.stack([scores.double(), torch.as_tensor(second, dtype=torch.double)])
        state["monitor_eval"]["monitor/scorer_corr"] = float(torch.corrcoef(pair)[0, 1].nan_to_num())
        out["eval/scorer"] = float(pair[1].mean())
    return out | state["monitor_eval"]


scorer = functools.cache(build_reward)  # eval.scorer's reward function, built once per process


def alarms(metrics: dict, t: Thresholds = Thresholds()) -> list[str]:
    """Short warnings for the monitors in `metrics` past their thresholds, e.g. ['! length x2.6']."""
    checks = (  # key, label, fires when
        ("length_drift", "length x", lambda v: not t.length_low <= v <= t.length_high),
        ("repeat_4gram", "repeat ", lambda v: v > t.repeat_4gram),
        ("unfinished_rise", "unfinished +", lambda v: v > t.unfinished_rise),
        ("kl_per_token", "kl/token ", lambda v: v > t.kl_per_token),
        ("held_out_distinct", "distinct x", lambda v: v < t.held_out_distinct),
        ("scorer_corr", "scorer r ", lambda v: v < t.scorer_corr),
    )
    values = ((label, metrics.get(f"monitor/{key}"), fires) for key, label, fires in checks)
    return [f"! {label}{v:.2g}" for label, v, fires in values if v is not None and fires(v)]
