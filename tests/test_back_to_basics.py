"""Back-to-basics repro: equal sample budgets, the table arithmetic, and (slow) the whole command."""

import json

import pytest

from polyalign.config import load_config
from polyalign.recipes.back_to_basics import (
    BUDGET_PER_STEP,
    METHODS,
    bootstrap_ci,
    cli_back_to_basics,
    method_config,
    summarize,
)


def test_every_method_gets_the_same_sample_budget(tmp_path):
    base = load_config(None)
    for algo, k in METHODS.values():
        cfg = method_config(base, "rloo" if algo == "dpo" else algo, k, seed=0, steps=5, out=tmp_path)
        assert cfg.rollout.samples_per_prompt * cfg.rollout.prompts_per_step == BUDGET_PER_STEP
        assert cfg.train.steps == 5 and cfg.rollout.samples_per_prompt == k


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    wins = [1.0] * 30 + [0.0] * 10 + [0.5] * 10
    lo, hi = bootstrap_ci(wins, seed=3)
    assert lo < sum(wins) / len(wins) < hi
    assert (lo, hi) == bootstrap_ci(wins, seed=3)
    assert bootstrap_ci([1.0] * 8) == (1.0, 1.0)


def test_summarize_pools_seeds_and_sorts_by_win_rate():
    results = {
        "A": [
            {"wins": [1.0, 0.0], "reward": [1.0, 3.0], "kl": [0.5, 1.5]},
            {"wins": [1.0, 1.0], "reward": [2.0, 2.0], "kl": [1.0, 1.0]},
        ],
        "B": [{"wins": [0.0, 0.5], "reward": [0.0, 0.0], "kl": [0.0, 0.0]}],
    }
    rows = summarize(results)
    assert [r["method"] for r in rows] == ["A", "B"]
    assert rows[0]["win_rate"] == pytest.approx(75.0) and rows[0]["reward"] == pytest.approx(2.0)
    assert rows[0]["kl"] == pytest.approx(1.0) and rows[1]["win_rate"] == pytest.approx(25.0)


@pytest.mark.slow
def test_command_runs_every_method(tmp_path, capsys):
    assert (
        cli_back_to_basics([0], 2, str(tmp_path), ["--rollout.max_new_tokens=8", "--eval.num_prompts=4"]) == 0
    )
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in data["table"]} == set(METHODS)
