"""Advantage estimators: RLOO (leave-one-out), a moving-average baseline, token-level GAE, and RAFT's best of k.

Pure torch. Sequence-level estimators take one reward per completion (shaped with `kl_shaped_rewards`
first when a KL penalty is wanted); GAE takes one reward per token. Vanilla policy gradient needs no
estimator: its advantages are the rewards themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyalign.losses.kl import token_rewards
from polyalign.losses.masks import check_shapes


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each reward minus the mean of the other rewards of its group.

    Formula (Kool et al. 2019; Back to Basics, arXiv:2402.14740, Sec. 2.3):
        A_i = R_i - (1/(G-1)) * sum_{j != i} R_j  =  G/(G-1) * (R_i - mean_j R_j)
    Each baseline is independent of its own sample, so the estimator is unbiased. Pass KL-shaped rewards
    (`kl_shaped_rewards`) to follow the paper, whose baseline uses the KL-penalised R.

    Shapes: rewards (P, G), group-major (`Rollout` rows view as (P, G)), G >= 2. Returns (P, G); each
    group's advantages sum to 0. Gradients pass through (callers give constant rewards; `reinforce_loss`
    detaches advantages anyway).
    """
    check_shapes("P G", rewards=rewards)
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError(f"RLOO needs a group size G >= 2 completions per prompt, got G={group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - baseline


def group_advantages(
    rewards: torch.Tensor, baseline: str = "loo", std_normalize: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """Group baselines of the RLOO/GRPO family, optionally scaled by the group's reward std.

    Formulas (per group of G rewards R_1..R_G):
        "loo":         A_i = R_i - (1/(G-1)) sum_{j != i} R_j        (`rloo_advantages`, the paper)
        "group_mean":  A_i = R_i - (1/G) sum_j R_j                   (GRPO, arXiv:2402.03300 Sec. 4.1.2; Dr. GRPO)
        std_normalize: A_i <- A_i / (std_j R_j + eps), unbiased std   (GRPO; Dr. GRPO removes it)

    Shapes: rewards (P, G), G >= 2. Returns (P, G).
    """
    advantages = rloo_advantages(rewards)  # checks shapes and G
    rewards = rewards.to(advantages.dtype)
    if baseline == "group_mean":
        advantages = rewards - rewards.mean(dim=1, keepdim=True)
    elif baseline != "loo":
        raise ValueError(f"baseline={baseline!r} is not one of ('loo', 'group_mean')")
    if std_normalize:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    return advantages


def token_kl_advantages(
    advantages: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Token-level advantages with the KL as a per-token reward after the baseline (OpenRLHF's RLOO):
        A_{b,t} = A_b - beta * sum_{t' >= t} kl_{b,t'}      (reward-to-go with gamma = 1, 0 on padding)
    where A_b is the baselined score (the KL is not in the baseline).

    Shapes: advantages (B,), kl_per_token, mask (B, T) right padded. Returns (B, T), detached.
    """
    rewards = token_rewards(advantages.detach(), kl_per_token.detach(), mask, beta)
    return gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)[0]


@dataclass(frozen=True)
class BaselineState:
    """What `moving_average_baseline` carries between batches (the caller keeps it)."""

    mean: float | torch.Tensor = 0.0  # baseline for the next batch: running mean (or EMA) of past rewards
    count: int = 0  # number of rewards seen so far; 0 = no history, the next baseline is 0


def moving_average_baseline(
    rewards: torch.Tensor, state: BaselineState | None, momentum: float | None = None
) -> tuple[torch.Tensor, BaselineState]:
    """REINFORCE-with-baseline advantages A = R - b, with b a moving average of the rewards of past batches.

    Formula (Back to Basics, arXiv:2402.14740, "REINFORCE w/ baseline"; SPEC 1.1):
        b_MA = (1/S) * sum_{s < now} R_s       (momentum=None: mean of every reward seen before this batch)
        b    <- momentum * b + (1 - momentum) * mean(R_batch)    (momentum in [0, 1): exponential option)
    The batch is NOT part of its own baseline: A uses the state from before the batch, and only then is the
    state updated. So b is independent of the batch and the gradient stays unbiased. With no history
    (state None or count 0) the baseline is 0 and the first update sets b to the batch mean (also for the
    exponential option, so that b does not start biased towards 0). The paper does not say whether its
    average is windowed or exponential; the cumulative mean is the default.

    Shapes: rewards any shape, e.g. (B,) or (P, G). Returns (advantages of that shape, detached;
    the new BaselineState whose mean is a detached 0-dim tensor).
    """
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1) or None (cumulative mean), got {momentum}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: a baseline update needs at least one reward")
    state = state if state is not None else BaselineState()
    rewards = rewards.detach().float() if not rewards.is_floating_point() else rewards.detach()
    old_mean = torch.as_tensor(state.mean, dtype=rewards.dtype, device=rewards.device)
    advantages = rewards - old_mean
    n = rewards.numel()
    if state.count == 0:
        new_mean = rewards.mean()
    elif momentum is None:
        new_mean = (old_mean * state.count + rewards.sum()) / (state.count + n)
    else:
        new_mean = momentum * old_mean + (1.0 - momentum) * rewards.mean()
    return advantages, BaselineState(mean=new_mean, count=state.count + n)


def best_of_group(rewards: torch.Tensor) -> torch.Tensor:
    """RAFT's selection: the row index of the highest-reward completion of each group.

    Formula (Dong et al. 2023, arXiv:2304.06767, Alg. 1): for prompt p with rewards R_{p,1..G},
        best_p = p * G + argmax_g R_{p,g}     (ties: the first)
    RAFT then trains with `sft_loss` on these rows only.

    Shapes: rewards (P, G), group-major. Returns (P,) long indices into the flattened (P * G,) rows.
    """
    check_shapes("P G", rewards=rewards)
    num_prompts, group_size = rewards.shape
    return rewards.argmax(-1) + torch.arange(num_prompts, device=rewards.device) * group_size


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens, for PPO / vanilla PG with a critic.

    Formula (Schulman et al. 2016, arXiv:1506.02438, Eq. 16; PPO's token-level view, SPEC 1.1):
        delta_t = r_t + gamma * V_{t+1} - V_t,      A_t = delta_t + gamma * lam * A_{t+1},
        returns_t = A_t + V_t                       (the TD(lambda) target for `value_loss`)
    The last real token of each sequence is terminal: V and A beyond it are 0 (no bootstrapping, also for
    completions cut at max_new_tokens). gamma = lam = 1 gives A_t = sum_{t' >= t} r_t' - V_t, the
    reward-to-go minus the value.

    Shapes: rewards, values, mask (B, T), RIGHT padded (mask non-increasing along T; ValueError otherwise).
    Typically rewards_t = -beta * kl_t plus the score on the last real token. Returns (advantages, returns),
    both (B, T), detached, 0 on padding.
    """
    check_shapes("B T", rewards=rewards, values=values, mask=mask)
    real = mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("mask must be right padded (no real token after a padding position) for GAE")
    with torch.no_grad():
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        rewards = torch.where(real, rewards.to(values.dtype), zero)
        values = torch.where(real, values, zero)
        next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
        deltas = rewards + gamma * next_values - values  # (B, T); 0 on padding: nothing crosses a row's end
        running = torch.zeros_like(values[:, 0])  # (B,)
        reversed_advantages = []
        for t in reversed(range(values.shape[1])):
            running = deltas[:, t] + gamma * lam * running
            reversed_advantages.append(running)
        advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
        advantages = torch.where(real, advantages, zero)
        returns = torch.where(real, advantages + values, zero)
    return advantages, returns
