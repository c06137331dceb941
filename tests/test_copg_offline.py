"""CoPG offline repro: the cached scored set, identical pairs for every method, the table arithmetic on hand
values, the results schema of a tiny end-to-end sweep, and (slow) the command itself."""

import json
import math

import pytest
import torch

from polyalign.data.preference import load_preferences, load_scored
from polyalign.data.prompts import load_prompts
from polyalign.recipes import copg_offline as co
from polyalign.rollout.hf import HFEngine

torch.set_num_threads(1)
TINY = co.Settings(n_prompts=4, steps=2, batch_size=2, warmup_steps=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("offline") / "train.jsonl"
    return co.build_offline_set(3, 2, 5, path, max_new_tokens=8)


def test_offline_set_has_the_columns_and_the_reward_models_scores(scored_set):
    rows = [json.loads(line) for line in scored_set.read_text().splitlines()]
    prompts = load_prompts("builtin:stories").prompts[:3]
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
    assert [r["sample"] for r in rows] == [0, 1] * 3
    assert all({"prompt", "completion", "reward", "seed", "generator", "scorer"} <= set(r) for r in rows)
    assert all(r["seed"] == 5 and isinstance(r["reward"], float) for r in rows)
    rescored = co._load_scorer("stories260K-sentiment-rm")(
        [r["prompt"] for r in rows], [r["completion"] for r in rows]
    )
    assert torch.allclose(rescored, torch.tensor([r["reward"] for r in rows]), atol=1e-5)
    # The completions are the starting policy's samples with that seed, and the file reads as scored data.
    from polyalign.models import load_policy
    from polyalign.types import Sampling

    model, tokenizer = load_policy("stories260K")
    again = HFEngine(model, tokenizer).generate(
        prompts, 2, Sampling(max_new_tokens=8, temperature=1.0, seed=5)
    )
    assert again.completions == [r["completion"] for r in rows]
    assert [s.reward for s in load_scored(scored_set)] == [r["reward"] for r in rows]


def test_offline_set_is_built_once_and_reused(scored_set, monkeypatch):
    before = scored_set.read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached offline set was regenerated")

    monkeypatch.setattr(HFEngine, "generate", no_generation)
    assert co.build_offline_set(3, 2, 5, scored_set, max_new_tokens=8) == scored_set
    assert scored_set.read_bytes() == before
    with pytest.raises(FileExistsError, match="was built with"):
        co.build_offline_set(3, 4, 5, scored_set, max_new_tokens=8)  # other arguments: never a silent reuse


def test_offline_set_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="k must be >= 2"):
        co.build_offline_set(3, 1, 0, tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="n_prompts must be in 1..240"):
        co.build_offline_set(241, 2, 0, tmp_path / "b.jsonl")
    assert not list(tmp_path.iterdir())


def test_every_method_trains_on_the_same_pairs_with_the_same_optimisation(scored_set, tmp_path):
    configs = {m: co.method_config(m, 0.1, TINY, 0, scored_set, scored_set, tmp_path / m) for m in co.METHODS}
    for method, cfg in configs.items():
        assert (cfg.loss.name, cfg.loss.beta, cfg.data.fmt) == (method, 0.1, "scored")
        assert cfg.train == configs["copg"].train and cfg.train.steps == TINY.steps
        pairs = load_preferences(cfg.data.train, fmt="scored", strategy=cfg.data.pair_strategy)
        # k=2: one pair per prompt, chosen = the higher reward-model score, both scores kept (CoPG needs them).
        assert len(pairs) == 3 and all(p.chosen_score > p.rejected_score for p in pairs)
        assert [(p.chosen, p.rejected) for p in pairs] == [
            (p.chosen, p.rejected)
            for p in load_preferences(scored_set, fmt="scored", strategy=co.PAIRING["dpo"])
        ]


def _run(method, beta, reward, kl, wins, loss=1.0, acc=0.5):
    return {"method": method, "beta": beta, "reward": reward, "kl": kl, "wins": wins, "eval_loss": loss,
            "eval_accuracy": acc}  # fmt: skip


def test_summary_best_beta_and_table_on_hand_values():
    runs = [
        _run("dpo", 0.1, [1.0, 3.0], [2.0, 4.0], [1.0, 0.0], loss=0.6),  # seed 0
        _run("dpo", 0.1, [2.0, 2.0], [0.0, 2.0], [0.5, 0.5], loss=0.8),  # seed 1: pooled with seed 0
        _run("dpo", 0.3, [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]),
        _run("copg", 0.3, [1.5, 1.5], [1.0, 1.0], [1.0, 1.0]),
        _run("copg", 0.1, [1.0, 2.0], [5.0, 5.0], [1.0, 1.0]),  # same reward as beta 0.3, larger KL
    ]
    rows = co.summarize(runs)
    assert [(r["method"], r["beta"]) for r in rows] == [
        ("copg", 0.1),
        ("copg", 0.3),
        ("dpo", 0.1),
        ("dpo", 0.3),
    ]
    dpo = rows[2]
    # rewards [1, 3, 2, 2]: mean 2, sample variance 2/3, se = sqrt(2/3 / 4)
    assert dpo["reward"] == pytest.approx(2.0) and dpo["reward_se"] == pytest.approx(math.sqrt(2 / 3 / 4))
    assert dpo["kl"] == pytest.approx(2.0) and dpo["win_rate"] == pytest.approx(50.0)
    assert dpo["eval_loss"] == pytest.approx(0.7)
    best = co.best_betas(rows)
    assert best["dpo"]["beta"] == 0.1 and best["dpo"]["reward"] == pytest.approx(2.0)
    assert best["copg"]["beta"] == 0.3  # tie on reward 1.5: the lower KL wins
    table = co.format_table(rows, {"reward": -0.5, "reward_se": 0.1}, best, "header")
    lines = table.splitlines()
    assert lines[0] == "header" and lines[3].startswith("start") and "-0.500" in lines[3]
    assert [line.endswith(" *") for line in lines[4:8]] == [False, True, True, False]
    assert lines[-1] == "best beta (* above): CoPG 0.3 (paper 0.06), DPO 0.1 (paper 0.1)"


def test_mean_se_and_beta_grids():
    assert co.mean_se([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        co.mean_se([])
    assert co.check_betas(None) == co.DEFAULT_BETAS
    assert co.check_betas({"copg": [0.3, 0.1, 0.1]}) == {"copg": (0.1, 0.3)}
    for bad, message in (({"ppo": [0.1]}, "unknown method"), ({"dpo": [0.0]}, "> 0"), ({"ipo": []}, "> 0")):
        with pytest.raises(ValueError, match=message):
            co.check_betas(bad)
    with pytest.raises(ValueError, match="non-empty dict"):
        co.check_betas({})


def test_tiny_sweep_writes_the_results_schema_and_never_regenerates_while_training(tmp_path, monkeypatch):
    calls = []
    generate = HFEngine.generate

    def counting(self, prompts, n, sampling, extras=None):
        calls.append(sampling.temperature)
        return generate(self, prompts, n, sampling, extras)

    monkeypatch.setattr(HFEngine, "generate", counting)
    betas = {"copg": [0.1], "dpo": [0.1], "ipo": [0.03]}
    results = co.run_repro(TINY, [0], betas, tmp_path)
    # Sampled once per offline set (train, held-out); every other call is a greedy evaluation.
    assert sorted(calls) == [0.0] * 4 + [1.0, 1.0]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {
        "settings",
        "seeds",
        "betas",
        "baseline",
        "table",
        "best",
        "runs",
        "data",
        "wall_seconds",
    }
    assert saved["settings"]["steps"] == 2 and saved["seeds"] == [0]
    assert [(r["method"], r["beta"]) for r in saved["table"]] == [("copg", 0.1), ("dpo", 0.1), ("ipo", 0.03)]
    assert set(saved["best"]) == set(co.METHODS) and saved["paper_best_beta"] == co.PAPER_BEST_BETA
    n_eval = len(load_prompts(TINY.eval_prompts))
    for run in saved["runs"]:
        assert len(run["reward"]) == len(run["kl"]) == len(run["wins"]) == n_eval
        assert run["train_pairs"] == 4 and 0.0 <= run["eval_accuracy"] <= 1.0
    for row in saved["table"]:
        assert math.isfinite(row["reward"]) and row["reward_se"] > 0
    assert (tmp_path / "reward_vs_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["best"] == saved["best"]


@pytest.mark.slow
def test_command_runs_the_sweep(tmp_path, capsys):
    betas = {"copg": [0.1], "dpo": [0.1], "ipo": [0.03]}
    assert co.cli_copg_offline(str(tmp_path), 2, [0, 1], betas) == 0
    out = capsys.readouterr().out
    assert "best beta" in out and all(name in out for name in co.METHODS.values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["data"]) == {"0", "1"} and len(saved["runs"]) == 6
    assert saved["settings"]["steps"] == 2 and saved["settings"]["n_prompts"] == 240
