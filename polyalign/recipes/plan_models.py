"""Which models a run holds, in which dtype and with how many parameters: the memory planner's copy of the
model setup in `train/run.py` (online) and `train/offline_run.py` (offline). Every choice that changes what is
held (no reference, LoRA's disabled adapter, precomputed reference log-probs) adds a note to the plan.
"""

from __future__ import annotations

from typing import NamedTuple

from polyalign.config import RunConfig
from polyalign.config_offline import OfflineRunConfig
from polyalign.recipes.plan_counts import Count, count_model

# Offline losses compared against a reference policy (train/offline_run.NEEDS_REFERENCE; tests/test_plan.py
# checks that the two agree).
OFFLINE_NEEDS_REFERENCE = ("dpo", "ipo", "copg")


class Entry(NamedTuple):
    """A model the run holds, before per-process division."""

    role: str
    source: str
    dtype: str
    count: Count
    shardable: bool
    setup_only: bool = False


def _frozen(source: str, dtype: str) -> Count:
    return count_model(source, "causal_lm", dtype, None, trains=False)


def _online_reference(cfg: RunConfig, notes: list[str]) -> list[Entry]:
    """train/run.py: a reference unless kl_coef == 0 (CoPG always needs one)."""
    m, a = cfg.model, cfg.algo
    if a.kl_coef == 0 and a.name != "copg":
        notes.append("no reference model: algo.kl_coef = 0")
        return []
    if m.reference:
        return [Entry("reference", m.reference, m.dtype, _frozen(m.reference, m.dtype), True)]
    if m.lora is not None:
        notes.append("LoRA: reference = base with adapter disabled (no extra weights)")
        return []
    notes.append("reference = frozen copy of the starting policy")
    return [Entry("reference", m.policy, m.dtype, _frozen(m.policy, m.dtype), True)]


def online_models(cfg: RunConfig, notes: list[str]) -> list[Entry]:
    """The policy, its reference, PPO's value model and the reward models that score completions."""
    m = cfg.model
    entries = [Entry("policy", m.policy, m.dtype, count_model(m.policy, "causal_lm", m.dtype, m.lora), True)]
    entries += _online_reference(cfg, notes)
    if cfg.algo.name == "ppo":  # train/ppo.build_value_model: load_score_model(policy or value_model)
        source = cfg.algo.value_model or m.policy
        entries.append(Entry("value_model", source, m.dtype, count_model(source, "sequence", m.dtype), True))
        notes.append("PPO value model trains every weight (policy weights + a fresh scalar head)")
    for spec in cfg.reward.functions:
        if spec.startswith("model:"):  # RewardModelScorer loads in float32 unless told otherwise
            name = spec.removeprefix("model:")
            count = count_model(name, "sequence", "float32", trains=False)
            entries.append(Entry("reward_model", name, "float32", count, True))
            notes.append(f"reward model {name} held in float32 (RewardModelScorer's default)")
    return entries


def offline_models(cfg: OfflineRunConfig, notes: list[str]) -> list[Entry]:
    """The trained model (a policy, or a reward model for loss.name = reward_model) and its reference."""
    m, name = cfg.model, cfg.loss.name
    is_rm = name == "reward_model"
    trained = count_model(m.policy, "sequence" if is_rm else "causal_lm", m.dtype, m.lora)
    entries = [Entry("reward_model" if is_rm else "policy", m.policy, m.dtype, trained, True)]
    if name in OFFLINE_NEEDS_REFERENCE:
        entries += _offline_reference(cfg, notes)
    return entries


def _offline_reference(cfg: OfflineRunConfig, notes: list[str]) -> list[Entry]:
    """train/offline_run.setup_reference: cached log-probs (reference freed after precompute) or a model."""
    m, precompute = cfg.model, cfg.reference.precompute
    if m.reference:
        if precompute:
            notes.append(
                f"reference {m.reference} held only while its log-probs are precomputed; freed after precompute"
            )
        return [Entry("reference", m.reference, m.dtype, _frozen(m.reference, m.dtype), True, precompute)]
    if precompute:
        notes.append(
            "reference log-probs precomputed from the starting policy before training: "
            "no reference model held during training (reference freed after precompute)"
        )
        return []
    if m.lora is not None:
        notes.append("LoRA: reference = base with adapter disabled (no extra weights)")
        return []
    notes.append("reference = frozen copy of the starting policy, held for the whole run (precompute: false)")
    return [Entry("reference", m.policy, m.dtype, _frozen(m.policy, m.dtype), True)]
