"""The online algorithm's options (`algo:`) and `algo.preset`: each framework's RLOO/GRPO semantics as a bundle.

A semantic option left unset (None) takes the preset's value when the config is built; a key set in YAML or
with `--algo.X=...` wins. The resolved values, not just the preset's name, are what `config.yaml` and
`--print-config` show. Sources for every choice (file and line in each framework): docs/presets.md.
Imports nothing from polyalign (config.py re-exports AlgoConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Algorithm = Literal["rloo", "reinforce", "vanilla_pg", "ppo", "raft", "copg"]
Preset = Literal["paper", "grpo", "dr_grpo", "trl_rloo", "openrlhf_rloo", "verl_rloo"]

_PAPER = dict(
    kl_in="reward", kl_estimator="k1", kl_aggregate="sum", baseline="loo", std_normalize=False,
    whiten_advantages=False, logprob_aggregate="sum", ratio="sequence", clip_eps=0.0,
)  # fmt: skip
_TOKEN_PPO = dict(ratio="token", clip_eps=0.2)  # the per-token clipped ratio of GRPO, verl and OpenRLHF
PRESETS: dict[str, dict] = {
    "paper": _PAPER,  # Back to Basics (arXiv:2402.14740)
    "grpo": {**_PAPER, **_TOKEN_PPO, "kl_in": "loss", "kl_estimator": "k3", "baseline": "group_mean",
             "std_normalize": True, "logprob_aggregate": "token_mean"},  # DeepSeekMath; TRL loss_type grpo
    "dr_grpo": {**_PAPER, **_TOKEN_PPO, "kl_in": "loss", "kl_estimator": "k3", "baseline": "group_mean",
                "logprob_aggregate": "max_tokens"},  # Dr. GRPO (arXiv:2503.20783); TRL loss_type dr_grpo
    "trl_rloo": {**_PAPER, "clip_eps": 0.2},  # TRL RLOOTrainer: sequence ratio, clipped
    "openrlhf_rloo": {**_PAPER, **_TOKEN_PPO, "kl_in": "token_reward", "logprob_aggregate": "batch_token_mean"},
    "verl_rloo": {**_PAPER, **_TOKEN_PPO, "logprob_aggregate": "batch_token_mean"},  # use_kl_in_reward
}  # fmt: skip


@dataclass(frozen=True)
class AlgoConfig:
    name: Algorithm = "rloo"
    preset: Preset = "paper"
    """The semantics of RLOO: paper (Back to Basics) | grpo | dr_grpo | trl_rloo | openrlhf_rloo | verl_rloo; it
    fills every option below left unset (docs/presets.md). Hyper-parameters (kl_coef, lr, k) stay the run's."""
    kl_coef: float = 0.2
    """beta in r - beta * log(pi/pi_ref); 0 disables the reference model. 0.2 keeps the quickstart's held-out
    completions diverse (README); the paper used 0.03-0.1 with 7B models."""
    kl_in: Literal["reward", "loss", "token_reward"] | None = None
    """Where the KL goes: reward (R = score - beta * KL before the baseline) | loss (+ beta * aggregated
    per-token KL of the policy being trained, after the baseline) | token_reward (OpenRLHF: baseline on the
    scores, then -beta * KL reward-to-go per token, giving token-level advantages)."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] | None = None
    """k1 (signed, the papers') | k2 | k3 | abs."""
    kl_aggregate: Literal["sum", "mean"] | None = None
    """Sequence KL in the reward: sum over completion tokens (the papers') | mean."""
    baseline: Literal["loo", "group_mean"] | None = None
    """rloo: loo (mean of the other k - 1 rewards) | group_mean (mean of all k, the sample's own included)."""
    std_normalize: bool | None = None
    """rloo: divide advantages by the group's reward std (unbiased) + 1e-4 (GRPO)."""
    whiten_advantages: bool | None = None
    logprob_aggregate: Literal["sum", "token_mean", "batch_token_mean", "max_tokens"] | None = None
    """How per-token loss terms become the loss: sum (per sequence, mean over sequences: the papers') |
    token_mean (per-sequence mean) | batch_token_mean (all tokens of the batch) | max_tokens (sum over the
    batch / (rows * rollout.max_new_tokens), Dr. GRPO); the last two need ratio: token."""
    ratio: Literal["sequence", "token"] | None = None
    """Where the ratio pi/pi_sampler and its clip act: sequence (one per completion) | token (PPO-style)."""
    clip_eps: float | None = None
    """Ratio clip width; 0 = no clip (at sequence level no ratio either: the paper)."""
    updates_per_batch: int = 2
    """Gradient steps per rollout batch (the rollout is split into this many minibatches; paper: 2)."""
    baseline_momentum: float | None = None
    """reinforce: None = running mean of all past rewards (the paper); else an exponential moving average."""
    copg_form: Literal["surrogate", "squared"] = "surrogate"
    """copg: surrogate | squared (same gradient)."""
    ppo_epochs: int = 4
    ppo_clip_eps: float = 0.2
    gae_lambda: float = 0.95
    gamma: float = 1.0
    value_coef: float = 0.1
    value_clip_eps: float | None = 0.2
    value_model: str | None = None
    """ppo: critic initialisation; None = the policy's weights with a fresh scalar head."""
    importance_correction: Literal["none", "tis"] = "none"
    """none | tis: multiply each completion's advantage by min(pi_train / pi_sampler, importance_cap), the
    sequence-level truncated importance weight that corrects a rollout engine whose log-probs differ from
    the trainer's (vLLM, bf16). The mismatch itself is logged every step either way."""
    importance_cap: float = 2.0

    def __post_init__(self) -> None:
        """Fill the options left unset from the preset (an unknown preset is reported by validation)."""
        preset = PRESETS.get(self.preset, {})
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in preset:
                object.__setattr__(self, f.name, preset[f.name])
