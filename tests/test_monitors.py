"""Reward-hacking monitors: each function on fixed tensors against hand-computed values, the alarms at their
thresholds, and a run rewarded for short completions showing the length monitor firing (metrics, progress)."""

import json
import re
from pathlib import Path

import pytest
import torch

from polyalign.config import load_config
from polyalign.recipes.report import fired_monitors, plot_reward_vs_kl, write_training_report
from polyalign.train import monitors
from polyalign.train.logging import Progress
from polyalign.train.online import train_online
from polyalign.types import Rollout


def test_distinct_n_and_repeated_ngrams_by_hand():
    batch = [[1, 2, 1, 2, 1, 2], [1, 2, 3]]
    # unigrams: 6 + 3 = 9, distinct {1, 2, 3} = 3; bigrams: 5 + 2 = 7, distinct {12, 21, 23} = 3
    assert monitors.distinct_n(batch, 1) == pytest.approx(3 / 9)
    assert monitors.distinct_n(batch, 2) == pytest.approx(3 / 7)
    # 4-grams of row 0: 1212, 2121, 1212 (a repeat); row 1 has none: 1 repeated of 3
    assert monitors.repeated_ngram_rate(batch, 4) == pytest.approx(1 / 3)
    # 2-grams: row 0 12 21 12 21 12 (3 repeats of 5), row 1 12 23 (0 of 2): 3 of 7
    assert monitors.repeated_ngram_rate(batch, 2) == pytest.approx(3 / 7)
    assert monitors.distinct_n([[5]], 2) == 0.0 and monitors.repeated_ngram_rate([], 4) == 0.0


def test_kl_per_token_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    # (0.5 - 1.0 + 1.5) / 3 tokens; padding ignored
    assert monitors.kl_per_token(logp, ref, mask) == pytest.approx(1.0 / 3)
    assert monitors.kl_per_token(logp, None, mask) == 0.0


def rollout(lengths: list[int], finished: list[bool]) -> Rollout:
    T = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    ids = torch.arange(len(lengths) * T).view(len(lengths), T) * mask
    return Rollout(
        ["p"], ["c"] * len(lengths), len(lengths), torch.ones(len(lengths), 1, dtype=torch.long),
        torch.ones(len(lengths), 1, dtype=torch.long), ids, mask, torch.zeros(mask.shape),
        torch.tensor(finished),
    )  # fmt: skip


def test_step_monitors_measure_drift_from_the_first_step():
    state = {}
    first = monitors.step_monitors(rollout([4, 2], [True, False]), None, state)
    assert first["monitor/length_drift"] == 1.0 and first["monitor/unfinished"] == 0.5
    assert state["monitor_start"] == {"length": 3.0, "unfinished": 0.5}
    later = monitors.step_monitors(rollout([8, 8], [False, False]), None, state)
    assert later["monitor/length_drift"] == pytest.approx(8 / 3)  # mean 8 over mean 3
    assert later["monitor/unfinished"] == 1.0 and later["monitor/unfinished_rise"] == 0.5
    assert later["monitor/distinct_1"] == 1.0  # every token id differs in this fixture


def test_eval_monitors_count_collapse_and_correlate_the_second_scorer():
    state = {}
    start = monitors.eval_monitors(["a", "b", "c", "d"], torch.tensor([1.0, 2, 3, 4]), None, state)
    assert start["eval/distinct"] == 4 and start["monitor/held_out_distinct"] == 1.0
    second = torch.tensor([4.0, 3, 2, 1])
    later = monitors.eval_monitors(["a", "a ", "a", "d"], torch.tensor([1.0, 2, 3, 4]), second, state)
    assert later["eval/distinct"] == 2 and later["eval/distinct_frac"] == 0.5 and later["eval/top_count"] == 3
    assert later["monitor/held_out_distinct"] == 0.5 and later["eval/scorer"] == 2.5
    assert later["monitor/scorer_corr"] == pytest.approx(-1.0)
    flat = monitors.eval_monitors(["a"] * 3, torch.tensor([1.0, 2, 3]), [1.0, 1.0, 1.0], {})
    assert (
        flat["monitor/scorer_corr"] == 0.0 and flat["eval/scorer"] == 1.0
    )  # a constant scorer: no correlation
    # the held-out monitors ride along with the following steps
    step = monitors.step_monitors(rollout([2], [True]), None, state)
    assert step["monitor/held_out_distinct"] == 0.5 and step["monitor/scorer_corr"] == pytest.approx(-1.0)


def test_alarms_fire_past_their_thresholds_only():
    calm = {
        "monitor/length_drift": 1.9, "monitor/repeat_4gram": 0.3, "monitor/unfinished_rise": 0.3,
        "monitor/kl_per_token": 0.29, "monitor/held_out_distinct": 0.8, "monitor/scorer_corr": 0.0,
    }  # fmt: skip
    assert monitors.alarms(calm) == [] and monitors.alarms({}) == []
    wild = {
        "monitor/length_drift": 2.6, "monitor/repeat_4gram": 0.5, "monitor/unfinished_rise": 0.9,
        "monitor/kl_per_token": 1.2, "monitor/held_out_distinct": 0.6, "monitor/scorer_corr": -0.4,
    }  # fmt: skip
    assert monitors.alarms(wild) == [
        "! length x2.6", "! repeat 0.5", "! unfinished +0.9", "! kl/token 1.2", "! distinct x0.6", "! scorer r -0.4"
    ]  # fmt: skip
    assert monitors.alarms({"monitor/length_drift": 0.4}) == ["! length x0.4"]
    text = Progress(10, keys=("reward",), enabled=False).describe({"reward": 1.0, **wild}, None)
    assert text.startswith("reward 1 ! length x2.6")


def test_a_run_rewarded_for_short_completions_fires_the_length_monitor(tmp_path, capsys):
    """Each token costs 0.2 and completions stop at '.': the policy learns to stop at once (~19 -> ~1
    token) and the length monitor fires in the metrics, the progress line and the report. ~5 s on a CPU."""
    cfg = load_config(
        None,
        [
            "--reward.functions={lexicon_sentiment: 1.0}", "--reward.length_penalty=0.2",
            "--rollout.prompts_per_step=4", "--rollout.samples_per_prompt=4", "--rollout.max_new_tokens=32",
            "--rollout.stop_strings=['.']", "--train.steps=10", "--train.lr=1e-2", "--eval.every=5",
            "--eval.num_prompts=4", "--eval.max_new_tokens=8", "--eval.scorer=length_reward",
            "--output.sample_every=0", f"--output.run_dir={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    summary = train_online(cfg)
    run_dir = Path(cfg.output.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all("monitor/length_drift" in r and "monitor/held_out_distinct" in r for r in steps)
    assert steps[0]["monitor/length_drift"] == 1.0 and steps[-1]["monitor/length_drift"] < 0.5
    assert "! length x0.0" in capsys.readouterr().out  # step 10's progress line
    evals = [r for r in rows if "eval/distinct" in r]
    assert [r["step"] for r in evals] == [0, 5, 10] and all("monitor/scorer_corr" in r for r in evals)

    report = write_training_report(summary, cfg).read_text()
    monitors_section = report[report.index("## Monitors") :]
    assert re.search(r"\| length \| [12] \| 10 \| \d+ \| `! length x0\.", monitors_section)
    for png in ("reward_vs_kl", "monitors", "held_out_over_training"):
        assert f"(plots/{png}.png)" in monitors_section and (run_dir / "plots" / f"{png}.png").stat().st_size


def test_fired_monitors_lists_each_monitor_with_its_steps(tmp_path):
    records = [
        {"step": 1, "monitor/length_drift": 1.0, "monitor/kl_per_token": 0.1},
        {"step": 2, "monitor/length_drift": 2.5, "monitor/kl_per_token": 0.4},
        {"step": 2, "monitor/held_out_distinct": 0.5},  # an evaluation's record at the same step
        {"step": 3, "monitor/length_drift": 3.0, "monitor/held_out_distinct": 0.5},
    ]
    assert fired_monitors(records) == [
        ["length", "2", "3", "2", "`! length x2.5`"],
        ["kl/token", "2", "2", "1", "`! kl/token 0.4`"],
        ["distinct", "2", "3", "2", "`! distinct x0.5`"],
    ]
    assert fired_monitors(records[:1]) == []
    with pytest.raises(ValueError, match="no step logs both kl and score"):
        plot_reward_vs_kl(tmp_path / "x.png", records)


@pytest.mark.slow
def test_the_quickstart_raises_the_reward_and_stays_diverse(tmp_path):
    """The README's quickstart numbers: the held-out reward rises clearly, the held-out greedy completions stay
    within 10% of the start's distinct count and no monitor fires. ~2 min on 2 CPU cores."""
    run_dir = tmp_path / "quickstart"
    train_online(load_config(None, [f"--output.run_dir={run_dir}", "--output.progress=false"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/distinct" in r]
    assert [r["step"] for r in evals] == [0, 25, 50, 75, 100]
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"] + 2.0, evals
    assert evals[-1]["eval/distinct"] >= 0.9 * evals[0]["eval/distinct"], evals
    assert fired_monitors(records) == []
