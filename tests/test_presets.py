"""algo.preset: each framework's RLOO/GRPO loss on fixed tensors against its documented formula written out
by hand here (plain Python floats, no polyalign loss function), and how presets resolve into the config."""

import math

import pytest
import torch
import yaml

from polyalign.config import ConfigError, load_config
from polyalign.config_algo import PRESETS
from polyalign.train import online
from polyalign.types import Rollout

G, P, T, MAX_NEW, BETA, EPS = 3, 2, 4, 6, 0.1, 0.2
LENGTHS = [4, 2, 3, 1, 4, 3]
SCORES = [1.0, 0.2, -0.5, 0.3, 0.9, 0.0]
gen = torch.Generator().manual_seed(0)
LOGP = (-1.0 + 0.4 * torch.randn(P * G, T, generator=gen, dtype=torch.float64)).tolist()  # policy trained
OLD = [[x + 0.3 * float(torch.randn((), generator=gen)) for x in row] for row in LOGP]  # the sampler's
REF = [[x + 0.5 * float(torch.randn((), generator=gen)) for x in row] for row in LOGP]  # the reference


def real(b):
    return range(LENGTHS[b])


def clip(x):
    return min(max(x, 1 - EPS), 1 + EPS)


def k1(b, t):  # the sampler's log-ratio to the reference: what goes into a reward
    return OLD[b][t] - REF[b][t]


def k3_loss(b, t):  # exp(ref - logp) - (ref - logp) - 1 of the policy being trained (TRL, verl low_var_kl)
    x = REF[b][t] - LOGP[b][t]
    return math.exp(x) - x - 1


def ratio(b, t):
    return math.exp(LOGP[b][t] - OLD[b][t])


def groups(values):
    return [values[g * G : (g + 1) * G] for g in range(P)]


def loo(values):  # R_i - mean of the other k - 1 (Back to Basics Eq. 6; TRL rloo_trainer.py)
    return [r - (sum(grp) - r) / (G - 1) for grp in groups(values) for r in grp]


def kl_reward():  # R = score - beta * sum_t log(pi/pi_ref), before the baseline
    return [SCORES[b] - BETA * sum(k1(b, t) for t in real(b)) for b in range(P * G)]


def paper():
    adv = loo(kl_reward())
    return -sum(adv[b] * sum(LOGP[b][t] for t in real(b)) for b in range(P * G)) / (P * G)


def trl_rloo():  # sequence ratio exp(sum logp - sum old), clipped, mean over sequences
    adv, total = loo(kl_reward()), 0.0
    for b in range(P * G):
        rho = math.exp(sum(LOGP[b][t] - OLD[b][t] for t in real(b)))
        total += -min(rho * adv[b], clip(rho) * adv[b])
    return total / (P * G)


def token_terms(b, a):  # the per-token clipped surrogate with advantage a (a number or a per-token list)
    a = a if isinstance(a, list) else [a] * T
    return [-min(ratio(b, t) * a[t], clip(ratio(b, t)) * a[t]) for t in real(b)]


def grpo():  # (s - mean) / (std + 1e-4); per-token surrogate + beta * k3; per-sequence token mean
    adv = []
    for grp in groups(SCORES):
        mean = sum(grp) / G
        std = math.sqrt(sum((s - mean) ** 2 for s in grp) / (G - 1))
        adv += [(s - mean) / (std + 1e-4) for s in grp]
    per_seq = []
    for b in range(P * G):
        terms = [x + BETA * k3_loss(b, t) for x, t in zip(token_terms(b, adv[b]), real(b))]
        per_seq.append(sum(terms) / LENGTHS[b])
    return sum(per_seq) / (P * G)


def dr_grpo():  # s - mean (no std); sum over every token / (rows * max_new_tokens)
    adv = [s - sum(grp) / G for grp in groups(SCORES) for s in grp]
    total = sum(
        x + BETA * k3_loss(b, t) for b in range(P * G) for x, t in zip(token_terms(b, adv[b]), real(b))
    )
    return total / (P * G * MAX_NEW)


def verl_rloo():  # scores * n/(n-1) - mean * n/(n-1) of KL-shaped rewards; token-mean over the batch
    rewards, adv = kl_reward(), []
    for grp in groups(rewards):
        mean = sum(grp) / G
        adv += [r * G / (G - 1) - mean * G / (G - 1) for r in grp]
    total = sum(sum(token_terms(b, adv[b])) for b in range(P * G))
    return total / sum(LENGTHS)


def openrlhf_rloo():  # baseline on raw scores, then -beta * k1 per token as reward-to-go; batch token mean
    adv, total = loo(SCORES), 0.0
    for b in range(P * G):
        rewards = [-BETA * k1(b, t) for t in real(b)]
        rewards[-1] += adv[b]
        returns = [sum(rewards[t:]) for t in real(b)]
        total += sum(token_terms(b, returns + [0.0] * (T - LENGTHS[b])))
    return total / sum(LENGTHS)


BY_HAND = {
    "paper": paper,
    "trl_rloo": trl_rloo,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "verl_rloo": verl_rloo,
    "openrlhf_rloo": openrlhf_rloo,
}


def preset_cfg(preset, *extra):
    shape = [
        "--rollout.samples_per_prompt=3",
        "--rollout.prompts_per_step=2",
        f"--rollout.max_new_tokens={MAX_NEW}",
    ]
    return load_config(None, [f"--algo.preset={preset}", f"--algo.kl_coef={BETA}", *shape, *extra])


def trainer_loss(algo) -> float:
    """The loss the online trainer's phases compute on the fixed tensors (garbage on padding)."""
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS], dtype=torch.long)
    pad = lambda rows: torch.where(
        mask.bool(), torch.tensor(rows, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64)
    )  # noqa: E731
    zeros = torch.zeros(P * G, T, dtype=torch.long)
    rollout = Rollout(
        ["a", "b"], [""] * 6, G, zeros, zeros, zeros, mask, pad(OLD), torch.ones(6, dtype=torch.bool)
    )
    scored = online.shaped(torch.tensor(SCORES, dtype=torch.float64), {}, pad(OLD), pad(REF), mask, algo)
    advantages = online.advantage_phase(scored.rewards, algo, G, {})
    loss, _ = online.policy_loss_fn(algo, rollout, scored, advantages, MAX_NEW)(pad(LOGP), torch.arange(6))
    return float(loss)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loss_matches_the_framework_formula_by_hand(preset):
    assert set(BY_HAND) == set(PRESETS)
    assert trainer_loss(preset_cfg(preset).algo) == pytest.approx(BY_HAND[preset](), rel=1e-9, abs=1e-12)


def test_presets_differ_on_the_fixed_tensors():
    values = [round(BY_HAND[p](), 6) for p in PRESETS]
    assert len(set(values)) == len(values)
    assert any(clip(ratio(b, t)) != ratio(b, t) for b in range(6) for t in real(b)), "no clip is active"


def test_paper_is_the_previous_default():
    algo = load_config(None).algo
    assert algo.preset == "paper"
    assert (algo.kl_in, algo.kl_estimator, algo.kl_aggregate, algo.baseline) == ("reward", "k1", "sum", "loo")
    assert (algo.std_normalize, algo.whiten_advantages, algo.logprob_aggregate) == (False, False, "sum")
    assert (algo.ratio, algo.clip_eps) == ("sequence", 0.0)


def test_explicit_keys_win_over_the_preset(tmp_path):
    algo = preset_cfg("grpo", "--algo.kl_estimator=k1").algo
    assert (algo.kl_estimator, algo.kl_in, algo.std_normalize, algo.clip_eps) == ("k1", "loss", True, 0.2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algo": {"preset": "dr_grpo", "logprob_aggregate": "token_mean"}}))
    algo = load_config(path).algo
    assert (algo.logprob_aggregate, algo.baseline, algo.std_normalize) == ("token_mean", "group_mean", False)
    assert load_config(path, ["--algo.clip_eps=0.1"]).algo.clip_eps == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--algo.preset=ppo_rloo"],
            "algo.preset: 'ppo_rloo' not in paper|grpo|dr_grpo|trl_rloo|openrlhf_rloo|verl_rloo",
        ),
        (["--algo.preset=grpo", "--algo.name=ppo"], "algo.preset grpo applies to algo.name rloo only"),
        (["--algo.logprob_aggregate=max_tokens"], "set algo.ratio: token"),
        (["--algo.preset=openrlhf_rloo", "--algo.ratio=sequence"], "set algo.ratio: token"),
        (["--algo.kl_in=prompt"], "algo.kl_in: 'prompt' not in reward|loss|token_reward"),
    ],
)
def test_bad_presets_and_combinations_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match="^defaults: .*" + message.replace("|", r"\|")):
        load_config(None, overrides)


def test_config_yaml_holds_the_resolved_options_and_the_preset_trains(tmp_path):
    tiny = ["--reward.functions={lexicon_sentiment: 1.0}", "--rollout.max_new_tokens=6", "--eval.every=0"]
    quiet = ["--output.progress=false", "--output.report=false", "--output.sample_every=0", "--train.steps=2"]
    run_dir = tmp_path / "run"
    preset = ["--algo.preset=openrlhf_rloo", "--rollout.prompts_per_step=2"]
    cfg = load_config(None, [*preset, *tiny, *quiet, f"--output.run_dir={run_dir}"])
    online.train_online(cfg)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]
    assert saved["preset"] == "openrlhf_rloo" and saved["kl_in"] == "token_reward"
    assert (saved["ratio"], saved["logprob_aggregate"], saved["clip_eps"]) == (
        "token",
        "batch_token_mean",
        0.2,
    )
    assert load_config(run_dir / "config.yaml") == cfg
    losses = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and "NaN" not in "".join(losses)


def test_print_config_shows_the_resolved_options(capsys):
    from polyalign.cli import main

    assert main(["train", "--print-config", "--algo.preset=dr_grpo", "--algo.clip_eps=0.3"]) == 0
    out = capsys.readouterr().out
    assert 'algo.kl_in: "loss"' in out and 'algo.logprob_aggregate: "max_tokens"' in out
    assert "algo.std_normalize: false" in out and "algo.clip_eps: 0.3" in out


def test_the_new_loss_pieces_by_hand():
    from polyalign import losses

    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert losses.group_advantages(r).tolist() == [[-3.0, -1.5, 4.5]]
    assert losses.group_advantages(r, "group_mean").tolist() == [[-2.0, -1.0, 3.0]]
    scaled = losses.group_advantages(r, "group_mean", std_normalize=True)
    assert scaled[0].tolist() == pytest.approx([x / (math.sqrt(7.0) + 1e-4) for x in (-2.0, -1.0, 3.0)])
    per_token, mask = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(losses.aggregate_tokens(per_token, mask, "max_tokens", max_tokens=5)) == pytest.approx(0.6)
    assert float(losses.aggregate_tokens(per_token, mask, "max_tokens")) == pytest.approx(1.0)  # T = 3
    kl = torch.tensor([[0.1, 0.2, 0.3]])
    adv = losses.token_kl_advantages(torch.tensor([1.0]), kl, torch.tensor([[1, 1, 0]]), beta=0.5)
    assert adv[0].tolist() == pytest.approx([1 - 0.5 * 0.3, 1 - 0.5 * 0.2, 0.0])
