"""`polyalign repro semantics` end to end on a tiny budget: two presets, one seed, its table and plot."""

import json

import pytest

from polyalign.config import ConfigError
from polyalign.recipes.semantics import cli_semantics, preset_config, summarize

TINY = [
    "--rollout.prompts_per_step=2",
    "--rollout.max_new_tokens=6",
    "--eval.num_prompts=4",
    "--eval.max_new_tokens=6",
]


def test_semantics_runs_every_given_preset_and_writes_its_table(tmp_path, capsys):
    assert cli_semantics([0], 2, str(tmp_path), TINY, presets=["paper", "grpo"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["preset"] for r in data["table"]] == ["start", "paper", "grpo"]
    assert data["table"][0]["kl"] == 0.0 and data["table"][0]["win_rate"] == 50.0
    for row in data["table"][1:]:
        assert row["seeds"] == 1 and 0 <= row["win_rate"] <= 100 and 0 < row["length"] <= 6
        assert {"reward", "kl", "length", "win_rate", "reward_std", "win_rate_std"} <= set(row)
    assert [len(r["wins"]) for r in data["runs"]] == [4, 4]
    saved = (tmp_path / "runs" / "grpo-seed0" / "config.yaml").read_text()
    assert "kl_in: loss" in saved and "logprob_aggregate: token_mean" in saved
    table = (tmp_path / "table.md").read_text()
    assert (
        "| start |" in table
        and "| paper |" in table
        and "| grpo |" in table
        and "| paper |" in capsys.readouterr().out
    )
    assert (tmp_path / "semantics.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_is_mean_and_spread_over_seeds():
    runs = [
        {"preset": "a", "reward": [1.0, 3.0], "kl": [0.0, 0.0], "length": [4, 6], "wins": [1.0, 0.0]},
        {"preset": "a", "reward": [4.0, 4.0], "kl": [1.0, 1.0], "length": [2, 2], "wins": [1.0, 1.0]},
    ]
    (row,) = summarize(runs)
    assert row["reward"] == pytest.approx(3.0) and row["reward_std"] == pytest.approx(2**0.5)
    assert row["win_rate"] == pytest.approx(75.0) and row["length"] == pytest.approx(3.5)


def test_a_bad_override_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="algo.kl_in"):
        cli_semantics([0], 2, str(tmp_path / "out"), ["--algo.kl_in=nowhere"])
    assert not (tmp_path / "out").exists()
    assert preset_config("dr_grpo", 3, 5, tmp_path, []).algo.logprob_aggregate == "max_tokens"
