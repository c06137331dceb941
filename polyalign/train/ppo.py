"""PPO, the reference point of arXiv:2402.14740: token-level actions, a learned critic, GAE and a clipped ratio.

Per-token reward (`losses.token_rewards`): r_t = -beta * kl_t for every completion token, plus the score at
the last token, so sum_t r_t equals the sequence-level KL-shaped reward the REINFORCE family uses. Advantages come
from GAE(gamma, lambda) on the critic's values; the policy takes `ppo_epochs` passes over shuffled
minibatches with the clipped surrogate, and the critic a (clipped) squared error to the GAE returns.
The old log-probs are the sampler's (the rollout is on-policy), so no extra forward is spent on them.
"""

from __future__ import annotations

import torch

from polyalign import losses
from polyalign.logprobs import completion_logprobs, value_forward
from polyalign.train import loop
from polyalign.types import Rollout


def build_value_model(cfg, policy: torch.nn.Module) -> torch.nn.Module:
    """The critic: `algo.value_model`, or the policy's starting weights with a fresh scalar head seeded by
    train.seed (`models.load_score_model`: the family's sequence classifier, else backbone + our head)."""
    from polyalign.models import load_score_model

    source = cfg.algo.value_model or cfg.model.policy
    model, _ = load_score_model(source, policy.dtype, policy.device, seed=cfg.train.seed)
    if policy.config.pad_token_id is not None:
        model.config.pad_token_id = policy.config.pad_token_id
    return model


def ppo_update(
    run, rollout: Rollout, scores: torch.Tensor, ref_logprobs: torch.Tensor | None
) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches of this process's rollout rows (policy and critic)."""
    cfg, a = run.cfg, run.cfg.algo
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    mask = rollout.completion_mask
    with torch.no_grad():
        old_values = value_forward(run.value_train, *args)  # (B, T)
        kl_t = torch.zeros_like(rollout.logprobs)
        if ref_logprobs is not None:
            kl_t = losses.kl_estimate(rollout.logprobs, ref_logprobs, kind=a.kl_estimator)
        rewards = losses.token_rewards(scores, kl_t, mask, a.kl_coef)  # (B, T)
        advantages, returns = losses.gae_advantages(
            rewards, old_values, mask, gamma=a.gamma, lam=a.gae_lambda
        )
        if a.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
    params = list(run.policy.parameters()) + list(run.value_model.parameters())
    B = mask.shape[0]
    minibatch = B // a.updates_per_batch
    micro = cfg.train.micro_batch_size or minibatch
    generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + int(run.state.get("step", 0)))
    stats: dict[str, float] = {}
    n_updates = a.ppo_epochs * a.updates_per_batch
    run.policy.train()
    for _ in range(a.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, minibatch):
            rows_mb = order[start : start + minibatch]
            for m in range(0, len(rows_mb), micro):
                rows = rows_mb[m : m + micro]
                sub = tuple(t[rows] for t in args)
                logp = completion_logprobs(run.policy_train, *sub, temperature=run.logprob_temperature)
                pl, pstats = losses.ppo_clip_loss(
                    logp, rollout.logprobs[rows], advantages[rows], mask[rows], clip_eps=a.ppo_clip_eps
                )
                values = value_forward(run.value_train, *sub)
                vl, vstats = losses.value_loss(
                    values, old_values[rows], returns[rows], mask[rows], clip_eps=a.value_clip_eps
                )
                loss = pl + a.value_coef * vl
                (loss * (len(rows) / len(rows_mb))).backward()
                terms = {"loss": loss, "policy_loss": pl, "value_loss": vl, **pstats, **vstats}
                loop.accumulate(stats, terms, len(rows) / len(rows_mb) / n_updates)
            loop.optimizer_step(run, params, stats, n_updates)
    return stats
