"""Evaluation metrics, pure python + torch: win-rate with a named tie policy, harm rates per group, relative
harm reduction, percentile-bootstrap confidence intervals.

Win-rate of a model against a baseline over pairwise outcomes (W wins, L losses, T ties), by tie policy:
- "half":    (W + T/2) / (W + L + T)     ties count as half a win (AlpacaFarm style);
- "loss":    W / (W + L + T)             ties count as non-wins (SPEC 7.6's [M] reading);
- "exclude": W / (W + L)                 ties are dropped (undefined, so absent, when W + L = 0).
Harm rate = harmful / judged (the safety paper's % harmful generations). Relative reduction of a tuned model
against a base model = (base - tuned) / base (SPEC 7.7); undefined (None) when the base rate is 0.

Never averaging over what was not measured: a record whose outcome / verdict is None (unparseable, or a
language the judge does not cover) is left out, and a group with nothing measured is ABSENT from the
returned dict, not reported as 0. Relative reduction exists only for groups measured for both models.

Intervals: percentile bootstrap over items (resample the group's items with replacement `n_resamples`
times, recompute the statistic, take the (1-c)/2 and (1+c)/2 quantiles), deterministic given `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

TIE_POLICIES = ("half", "loss", "exclude")
OUTCOMES = ("win", "loss", "tie")


@dataclass(frozen=True)
class Estimate:
    """A rate with its bootstrap interval; n = items that entered the statistic's denominator or were
    resampled (all measured items of the group); counts by outcome / verdict."""

    value: float
    low: float
    high: float
    n: int
    counts: dict[str, int]

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, **self.counts}


def _check_policy(tie_policy: str) -> None:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")


def _win_rate_tensor(w: torch.Tensor, lo: torch.Tensor, t: torch.Tensor, tie_policy: str) -> torch.Tensor:
    """Win-rate from win / loss / tie counts under `tie_policy` (module docstring); NaN where undefined.
    Shapes: (R,) counts -> (R,)."""
    if tie_policy == "exclude":
        return w / (w + lo)  # 0/0 = NaN
    return (w + (0.5 * t if tie_policy == "half" else 0.0)) / (w + lo + t)


def win_rate(wins: int, losses: int, ties: int, tie_policy: str = "half") -> float | None:
    """Win-rate from counts; None when undefined (no items, or only ties under "exclude")."""
    _check_policy(tie_policy)
    counts = (torch.tensor(float(x), dtype=torch.float64) for x in (wins, losses, ties))
    value = float(_win_rate_tensor(*counts, tie_policy))
    return None if math.isnan(value) else value


def bootstrap_interval(
    stat: Callable[[torch.Tensor], torch.Tensor],
    n_items: int,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of `stat` over resamples of item indices; `stat` maps (R, n) index tensors to (R,)
    values (NaN = undefined in that resample, dropped)."""
    if not 0 < confidence < 1 or n_resamples < 1 or n_items < 1:
        raise ValueError("bootstrap: need 0 < confidence < 1, n_resamples >= 1, n_items >= 1")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(n_items, (n_resamples, n_items), generator=generator)  # (R, n)
    values = stat(index).double()
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    low, high = torch.quantile(values, q).tolist()
    return low, high


def win_rate_estimate(
    outcomes: Sequence[str | None],
    tie_policy: str = "half",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate | None:
    """Win-rate of "win" / "loss" / "tie" outcomes (None = unmeasured, skipped) with a bootstrap interval;
    None when nothing measured or the rate is undefined."""
    _check_policy(tie_policy)
    measured = [o for o in outcomes if o is not None]
    bad = sorted({o for o in measured if o not in OUTCOMES})
    if bad:
        raise ValueError(f"outcomes must be {OUTCOMES} or None, got {bad}")
    counts = {name: measured.count(name) for name in ("win", "loss", "tie")}
    value = win_rate(counts["win"], counts["loss"], counts["tie"], tie_policy)
    if value is None:
        return None
    w = torch.tensor([o == "win" for o in measured], dtype=torch.float64)
    lo = torch.tensor([o == "loss" for o in measured], dtype=torch.float64)
    t = torch.tensor([o == "tie" for o in measured], dtype=torch.float64)
    stat = lambda idx: _win_rate_tensor(w[idx].sum(1), lo[idx].sum(1), t[idx].sum(1), tie_policy)
    low, high = bootstrap_interval(stat, len(measured), n_resamples, confidence, seed)
    return Estimate(value, low, high, len(measured), counts)


def rate_estimate(
    flags: Sequence[bool | None], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate | None:
    """Fraction of True among measured flags (None = unmeasured) with a bootstrap interval; None if none."""
    measured = [bool(f) for f in flags if f is not None]
    if not measured:
        return None
    x = torch.tensor(measured, dtype=torch.float64)
    low, high = bootstrap_interval(lambda idx: x[idx].mean(1), len(x), n_resamples, confidence, seed)
    positives = int(x.sum())
    return Estimate(
        positives / len(x), low, high, len(x), {"positive": positives, "negative": len(x) - positives}
    )


def _by(records: Iterable[dict], key: str, value: str, estimate: Callable, **kwargs) -> dict[str, Estimate]:
    """estimate(the `value` fields) per group of records whose `key` is set; groups with nothing measured are
    absent."""
    groups: dict[str, list] = {}
    for record in records:
        if record.get(key) is not None:
            groups.setdefault(str(record[key]), []).append(record.get(value))
    out = {g: estimate(values, **kwargs) for g, values in sorted(groups.items())}
    return {g: e for g, e in out.items() if e is not None}


def win_rates_by(records: Iterable[dict], key: str = "language", **kwargs) -> dict[str, Estimate]:
    """Win-rate per group of records with an "outcome" field."""
    return _by(records, key, "outcome", win_rate_estimate, **kwargs)


def harm_rates_by(
    records: Iterable[dict], key: str = "language", value: str = "harmful", **kwargs
) -> dict[str, Estimate]:
    """Rate of True per group of records with a boolean `value` field (True / False / None = not measured)."""
    return _by(records, key, value, rate_estimate, **kwargs)


def relative_reduction(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float | None]:
    """(base - tuned) / base for every group measured in BOTH; None where the base rate is 0 (undefined)."""
    return {g: ((base[g] - tuned[g]) / base[g] if base[g] else None) for g in sorted(base) if g in tuned}


def macro_mean(values: dict[str, float]) -> float | None:
    """Unweighted mean over the measured groups (e.g. languages); None when there are none."""
    return sum(values.values()) / len(values) if values else None
