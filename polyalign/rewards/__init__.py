"""Reward functions: the contract, the built-ins, validation, and weighted combination.

Contract. A reward function (RewardFn) is any callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float] | torch.Tensor  # B scores

where B = len(completions), prompts[i] is the prompt of completions[i] (repeated G times for a group), and
`columns` are extra per-row dataset columns (each a list of length B, e.g. `answer`) that a reward function
should accept and ignore when unused (`**columns`). A list of floats is TRL's contract; a (B,) tensor is
ours. `check_scores` turns either into a (B,) float32 tensor; a function that raises, returns the wrong
number of values, a non-number or NaN/Inf is an error naming the function and what came back. Rules live
in `rules.py`, the reward-model scorer in `model.py`.

A "package.module:function" reward spec imports and runs the code it names, so a config that names one
runs that code: train only from configs you trust.

`score_all` returns the weighted total and every raw component (for logging); `combine` wraps it as a
single RewardFn. This module must not know about trainers, rollouts or token ids: rewards see text only.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from polyalign.rewards import rules

RewardFn = Callable[..., torch.Tensor | list[float]]

# name -> factory(**kwargs) -> RewardFn. Reward models are built with the "model:<name_or_path>" spec.
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": rules.exact_match,
    "contains_any": rules.contains_any,
    "length_reward": rules.length_reward,
    "length_penalty": rules.length_penalty,
    "lexicon_sentiment": rules.lexicon_sentiment,
}


class RewardError(RuntimeError):
    """A reward function raised; the message names the reward and the original error."""


def build_reward(spec: str, **kwargs: Any) -> RewardFn:
    """Build a reward function from a spec string; `kwargs` go to the factory.

    Spec forms:
    - a built-in name from `REWARDS`, e.g. "lexicon_sentiment" or "length_penalty" (with max_chars=...);
    - "model:<name_or_path>": a reward model (`RewardModelScorer`), e.g. "model:stories260K-sentiment-rm",
      a local directory or a hub id; kwargs go to `RewardModelScorer` (batch_size, device, template, ...);
    - "package.module:function": a user function. If it is a RewardFn already, pass no kwargs; with
      kwargs it is treated as a factory and called as function(**kwargs).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("model:"):
        from polyalign.rewards.model import RewardModelScorer  # lazy: pulls in transformers

        return RewardModelScorer(spec.removeprefix("model:"), **kwargs)
    if spec in REWARDS:
        factory = REWARDS[spec]
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as e:
            raise ValueError(
                f"reward {spec!r}: bad arguments {kwargs}: {e}; signature {spec}{inspect.signature(factory)}"
            ) from e
        return factory(**kwargs)
    if ":" in spec:
        return _import_reward(spec, kwargs)
    raise ValueError(
        f"unknown reward {spec!r}: use one of {sorted(REWARDS)}, 'model:<name_or_path>' for a reward "
        "model, or 'package.module:function' for your own function"
    )


def _import_reward(spec: str, kwargs: dict[str, Any]) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn(**kwargs) if kwargs else fn


def check_scores(scores: Any, n: int, name: str) -> torch.Tensor:
    """What reward function `name` returned for `n` completions, as (n,) float32 on CPU, detached."""
    where = f"reward function {name}"
    if isinstance(scores, list | tuple):  # TRL's contract
        odd = next((i for i, v in enumerate(scores) if not isinstance(v, numbers.Real)), None)
        if odd is not None:
            raise ValueError(f"{where} returned a non-number at row {odd}: {scores[odd]!r:.80}")
        scores = torch.tensor([float(v) for v in scores])
    if not isinstance(scores, torch.Tensor):
        raise ValueError(
            f"{where} returned {type(scores).__name__}; expected {n} floats (a list or a tensor)"
        )
    if scores.dim() != 1:
        raise ValueError(f"{where} returned a tensor of shape {tuple(scores.shape)}; expected ({n},)")
    if len(scores) != n:
        raise ValueError(f"{where} returned {len(scores)} values for {n} completions")
    if not (scores.is_floating_point() or scores.dtype in _INT_DTYPES):
        raise ValueError(f"{where} returned a tensor of dtype {scores.dtype}; expected real numbers")
    scores = scores.detach().to(device="cpu", dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{where} returned NaN/Inf at rows {bad[:20]}{' ...' if len(bad) > 20 else ''}")
    return scores


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def score_all(
    fns: Mapping[str, RewardFn],
    weights: Mapping[str, float] | None,
    prompts: Sequence[str],
    completions: Sequence[str],
    **columns: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score completions with every reward; return (total (B,), {name: raw scores (B,)}).

    total = sum over names of weights[name] * scores[name]; weights=None means weight 1 for every reward.
    Each column in `columns` must be a sequence of length B.
    """
    weights = _check_weights(fns, weights)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(
            f"got {len(prompts)} prompts for {n} completions; repeat each prompt once per completion"
        )
    for key, col in columns.items():
        length = len(col) if hasattr(col, "__len__") and not isinstance(col, str) else None
        if length != n:
            got = type(col).__name__ if length is None else f"length {length}"
            raise ValueError(
                f"column {key!r} must be a sequence of length {n} (one value per completion), got {got}"
            )
    components: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        try:
            raw = fn(list(prompts), list(completions), **columns)
        except Exception as e:
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        components[name] = check_scores(raw, n, name)
    total = torch.zeros(n, dtype=torch.float32)  # (B,)
    for name, scores in components.items():
        total = total + weights[name] * scores
    return total, components


def _check_weights(fns: Mapping[str, RewardFn], weights: Mapping[str, float] | None) -> dict[str, float]:
    if not fns:
        raise ValueError("need at least one reward function")
    for name, fn in fns.items():
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable (got {type(fn).__name__})")
    if weights is None:
        return {name: 1.0 for name in fns}
    missing, extra = set(fns) - set(weights), set(weights) - set(fns)
    if missing or extra:
        raise ValueError(
            f"reward weights must name exactly the rewards {sorted(fns)}; "
            f"missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"weight of reward {name!r} must be a finite number, got {w!r}")
    return {name: float(w) for name, w in weights.items()}


def combine(fns: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None) -> RewardFn:
    """One RewardFn returning the weighted sum of `fns` (use `score_all` to also get the components)."""
    fns, checked = dict(fns), _check_weights(fns, weights)

    def combined(prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        total, _ = score_all(fns, checked, prompts, completions, **columns)
        return total

    return combined
