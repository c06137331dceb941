"""Evaluation metrics against hand-computed values: win-rate under each tie policy, bootstrap intervals,
harm rates per group, relative reduction, and groups that were not measured staying absent."""

from __future__ import annotations

import pytest

from polyalign.recipes.evaluate.metrics import (
    harm_rates_by,
    macro_mean,
    rate_estimate,
    relative_reduction,
    win_rate,
    win_rate_estimate,
    win_rates_by,
)

OUTCOMES = ["win"] * 6 + ["loss"] * 2 + ["tie"] * 2  # W=6, L=2, T=2


def test_win_rate_tie_policies_by_hand():
    """half: (6 + 1) / 10 = 0.7; loss: 6 / 10 = 0.6; exclude: 6 / 8 = 0.75."""
    assert win_rate(6, 2, 2, "half") == pytest.approx(0.7)
    assert win_rate(6, 2, 2, "loss") == pytest.approx(0.6)
    assert win_rate(6, 2, 2, "exclude") == pytest.approx(0.75)
    assert win_rate(0, 0, 3, "exclude") is None and win_rate(0, 0, 0, "half") is None
    with pytest.raises(ValueError, match="tie_policy"):
        win_rate(1, 1, 1, "draw")


@pytest.mark.parametrize("policy,expected", [("half", 0.7), ("loss", 0.6), ("exclude", 0.75)])
def test_win_rate_estimate_point_and_interval(policy, expected):
    e = win_rate_estimate(OUTCOMES + [None], policy, n_resamples=500, seed=3)
    assert e.value == pytest.approx(expected)
    assert e.low <= e.value <= e.high and e.low < e.high
    assert e.n == 10 and e.counts == {"win": 6, "loss": 2, "tie": 2}  # None is not counted


def test_bootstrap_is_deterministic_given_seed():
    a = win_rate_estimate(OUTCOMES, "half", n_resamples=300, seed=7)
    b = win_rate_estimate(OUTCOMES, "half", n_resamples=300, seed=7)
    c = win_rate_estimate(OUTCOMES, "half", n_resamples=300, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)


def test_bootstrap_interval_degenerate_and_widening():
    all_wins = win_rate_estimate(["win"] * 5, "half")
    assert (all_wins.value, all_wins.low, all_wins.high) == (1.0, 1.0, 1.0)
    narrow = rate_estimate([True, False] * 200, n_resamples=400)
    wide = rate_estimate([True, False] * 5, n_resamples=400)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_win_rates_by_language_and_missing_cells():
    records = [
        {"language": "en", "outcome": "win"},
        {"language": "en", "outcome": "tie"},
        {"language": "fr", "outcome": "loss"},
        {"language": "de", "outcome": None},  # de: nothing measured
        {"language": "ja", "outcome": "tie"},  # ja: only a tie -> undefined under "exclude"
    ]
    half = win_rates_by(records, tie_policy="half", n_resamples=50)
    assert {g: e.value for g, e in half.items()} == {"en": 0.75, "fr": 0.0, "ja": 0.5}
    excl = win_rates_by(records, tie_policy="exclude", n_resamples=50)
    assert set(excl) == {"en", "fr"} and excl["en"].value == 1.0


def test_harm_rates_per_group_by_hand():
    records = [
        {"language": "en", "global_or_local": "global", "harmful": True},
        {"language": "en", "global_or_local": "local", "harmful": False},
        {"language": "en", "global_or_local": "local", "harmful": True},
        {"language": "en", "global_or_local": None, "harmful": False},
        {"language": "hi", "global_or_local": "local", "harmful": None},  # unparseable / not covered
    ]
    by_lang = harm_rates_by(records, "language", n_resamples=50)
    assert set(by_lang) == {"en"} and by_lang["en"].value == 0.5 and by_lang["en"].n == 4
    by_label = harm_rates_by(records, "global_or_local", n_resamples=50)
    assert {g: e.value for g, e in by_label.items()} == {"global": 1.0, "local": 0.5}
    assert by_label["local"].counts == {"positive": 1, "negative": 1}


def test_relative_reduction_by_hand_and_missing():
    """(base - tuned) / base: en (0.4 - 0.1) / 0.4 = 0.75; fr (0.2 - 0.3) / 0.2 = -0.5 (worse); de base 0 ->
    undefined (None); zh tuned not measured -> absent; hi base not measured -> absent."""
    base = {"en": 0.4, "fr": 0.2, "de": 0.0, "zh": 0.5}
    tuned = {"en": 0.1, "fr": 0.3, "de": 0.0, "hi": 0.2}
    out = relative_reduction(base, tuned)
    assert out == {"de": None, "en": pytest.approx(0.75), "fr": pytest.approx(-0.5)}


def test_macro_mean_only_over_measured():
    assert macro_mean({"en": 0.5, "fr": 1.0}) == 0.75 and macro_mean({}) is None


def test_bad_outcomes_rejected():
    with pytest.raises(ValueError, match="outcomes must be"):
        win_rate_estimate(["win", "draw"])
