"""Every loss, advantage estimator and KL helper of polyalign, as pure functions over torch tensors.

This package imports only torch and the standard library (no transformers, no config objects), so it can
be read, tested and reused on its own. `from polyalign.losses import X` works for every name below.

Files: masks.py (masked reductions, token aggregation), kl.py (KL estimators, KL-shaped sequence rewards
and PPO's per-token rewards), advantages.py (RLOO, moving-average baseline, GAE, RAFT's best of k),
policy.py (REINFORCE, PPO, value, SFT, truncated importance weights), preference.py (DPO, IPO, CoPG,
Bradley-Terry). Formulas and paper references are in each docstring.
"""

# ruff: noqa: F401  (this file only re-exports: the imports below are the package's public names)

from polyalign.losses.advantages import (
    BaselineState,
    best_of_group,
    gae_advantages,
    group_advantages,
    moving_average_baseline,
    rloo_advantages,
    token_kl_advantages,
)
from polyalign.losses.kl import KL_KINDS, kl_estimate, kl_shaped_rewards, sequence_kl, token_rewards
from polyalign.losses.masks import AGGREGATES, aggregate_tokens, masked_mean, masked_sum, whiten
from polyalign.losses.policy import (
    kl_loss,
    ppo_clip_loss,
    reinforce_loss,
    sft_loss,
    truncated_importance_weights,
    value_loss,
)
from polyalign.losses.preference import bradley_terry_loss, copg_group_loss, copg_loss, dpo_loss, ipo_loss
