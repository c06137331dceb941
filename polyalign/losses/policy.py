"""Policy-gradient losses over sampled completions: REINFORCE/RLOO, PPO clip, the PPO value loss, SFT and TIS.

Pure torch. Inputs are per-token log-probs (B, T) of the completion tokens from `logprobs.py` and a
completion mask (B, T); padding is selected away before any arithmetic, so whatever sits there changes
neither the loss nor the gradients. Each loss returns (loss, stats): a scalar tensor to minimise and a dict
of detached scalar tensors for logging. `aggregate` names are those of `masks.AGGREGATES`.
"""

from __future__ import annotations

import torch

from polyalign.losses.kl import kl_estimate
from polyalign.losses.masks import (
    aggregate_tokens,
    check_choice,
    check_positive,
    check_shapes,
    fill_padding,
    masked_mean,
    masked_sum,
)


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32, so bf16/fp16 log-probs are reduced in full precision (gradients still flow)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def reinforce_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    aggregate: str = "sum",
    old_logprobs: torch.Tensor | None = None,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level REINFORCE: raise the log-likelihood of each completion in proportion to its advantage.

    Formula (Back to Basics, arXiv:2402.14740, Sec. 2.3 / SPEC 1.2; CoPG Eq. 4):
        L = -mean_b [ sg(A_b) * log pi(y_b|x_b) ],   log pi(y_b|x_b) = sum_t logprobs[b, t]   ("sum")
    aggregate="token_mean" divides each sequence's log-prob by its number of tokens (a deviation from the
    paper, as in NeMo-Aligner/verl's length normalisation). With `old_logprobs` (sampler log-probs) the
    sequence importance ratio rho_b = exp(log pi(y_b) - log pi_old(y_b)) replaces the log-prob (TRL RLOO):
        L = -mean_b [ rho_b * A_b ],   or with clip_eps:   L = -mean_b min(rho_b A_b, clip(rho_b, 1-eps, 1+eps) A_b)
    With "token_mean", rho_b uses the length-normalised log-probs (a geometric mean of token ratios, as in
    GSPO). Off by default: the paper uses no ratio and no clipping. At rho = 1 both forms have the same
    gradient; their values differ (A vs A * log pi). rho is not clamped, so a huge log-ratio can overflow.

    Shapes: logprobs, mask, old_logprobs (B, T); advantages (B,), detached inside.
    Returns (loss, stats): stats has advantage_mean, logprob_mean (the aggregated log-prob per sequence),
    and with a ratio ratio_mean, ratio_max and clip_frac (fraction of sequences whose clipped term is active).
    """
    check_choice("aggregate", aggregate, ("sum", "token_mean"))
    check_shapes("B T", logprobs=logprobs, mask=mask)
    check_shapes("B", advantages=advantages, logprobs_rows=logprobs.shape[:1])
    if clip_eps is not None and old_logprobs is None:
        raise ValueError("clip_eps needs old_logprobs: clipping acts on the ratio pi / pi_old")
    check_positive(clip_eps=clip_eps)
    reduce = masked_sum if aggregate == "sum" else masked_mean
    advantages = _float(advantages.detach())
    seq_logprobs = reduce(_float(logprobs), mask, dim=-1)  # (B,)
    stats = {"advantage_mean": advantages.mean(), "logprob_mean": seq_logprobs.detach().mean()}
    if old_logprobs is None:
        return -(advantages * seq_logprobs).mean(), stats
    check_shapes(logprobs=logprobs, old_logprobs=old_logprobs)
    old_seq_logprobs = reduce(_float(old_logprobs.detach()), mask, dim=-1)  # (B,)
    ratio = torch.exp(seq_logprobs - old_seq_logprobs)  # (B,)
    objective = ratio * advantages
    if clip_eps is not None:
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
        stats["clip_frac"] = (clipped < objective).float().mean()
        objective = torch.minimum(objective, clipped)
    stats["ratio_mean"] = ratio.detach().mean()
    stats["ratio_max"] = ratio.detach().max()
    return -objective.mean(), stats


@torch.no_grad()
def truncated_importance_weights(
    logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level truncated importance sampling (TIS) weights between the trainer and the sampler.

    Formula (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
        w_b = min(exp(sum_t logprobs_bt - sampler_logprobs_bt), cap),     A_b <- w_b * A_b
    The reweighted gradient is that of samples from the trainer's own policy when the sampler's numerics
    differ (vLLM, bf16); the cap bounds the variance.

    Shapes: logprobs, sampler_logprobs, mask (B, T). Returns (weights (B,) float32, no gradient; stats:
    importance_weight_mean, importance_weight_capped = fraction of rows whose weight hit the cap).
    """
    check_shapes("B T", logprobs=logprobs, sampler_logprobs=sampler_logprobs, mask=mask)
    ratio = masked_sum(logprobs.float() - sampler_logprobs.float(), mask, dim=-1).exp()  # (B,)
    weights = ratio.clamp(max=cap)
    return weights, {
        "importance_weight_mean": weights.mean(),
        "importance_weight_capped": (ratio > cap).float().mean(),
    }


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    aggregate: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clipped surrogate: each token is an action with its own ratio and advantage.

    Formula (Schulman et al. 2017, arXiv:1707.06347, Eq. 7; SPEC 1.1 "PPO's token-level view"):
        r_t = exp(logprobs_t - old_logprobs_t),   L = aggregate_t[ -min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t) ]
    The default aggregate "token_mean" averages each sequence's tokens, then the sequences; "batch_token_mean"
    (all tokens of the batch equal, verl/TRL), "sum" and "max_tokens" (Dr. GRPO) are options; clip_eps=inf
    leaves the ratio unclipped. With r = 1 the gradient is the vanilla
    token-level policy gradient -A_t grad logprobs_t (Back to Basics' "Vanilla PG" drops ratio and clip).

    Shapes: logprobs, old_logprobs, mask (B, T); advantages (B, T) (e.g. from `gae_advantages`) or (B,)
    broadcast over tokens; both old_logprobs and advantages are detached inside.
    Returns (loss, stats): clip_frac (tokens whose clipped term is active), ratio_mean, approx_kl
    (k3 estimate of KL(pi_old || pi): mean of r - 1 - log r), all over real tokens.
    """
    check_positive(clip_eps=clip_eps)
    check_shapes("B T", logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    advantages = _float(advantages.detach())
    if advantages.dim() == 1:  # one per sequence, broadcast over its tokens
        advantages = advantages[:, None].expand(-1, logprobs.shape[1])
    check_shapes(advantages=advantages, logprobs=logprobs)
    log_ratio = fill_padding(_float(logprobs) - _float(old_logprobs.detach()), mask)  # (B, T)
    advantages = fill_padding(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = aggregate_tokens(-torch.minimum(unclipped, clipped), mask, aggregate, max_tokens)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    aggregate: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squared-error loss of a value head against returns, optionally clipped around the old values.

    Formula (PPO value loss as in OpenAI baselines / lm-human-preferences):
        L = aggregate_t[ 1/2 (V_t - R_t)^2 ]
        clipped: V'_t = V_old,t + clip(V_t - V_old,t, -eps, eps),  L = aggregate_t[ 1/2 max((V_t - R_t)^2, (V'_t - R_t)^2) ]
    The 1/2 is the common convention (scale with the trainer's value coefficient).

    Shapes: values, old_values, returns, mask (B, T); old_values and returns are detached inside.
    Returns (loss, stats): value_mean, value_error (mean |V - R|), and with clipping value_clip_frac.
    """
    check_shapes("B T", values=values, old_values=old_values, returns=returns, mask=mask)
    check_positive(clip_eps=clip_eps)
    values = fill_padding(_float(values), mask)
    returns = fill_padding(_float(returns.detach()), mask)
    error = (values - returns) ** 2  # (B, T)
    stats: dict[str, torch.Tensor] = {}
    if clip_eps is not None:
        old_values = fill_padding(_float(old_values.detach()), mask)
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped_error = (clipped_values - returns) ** 2
        stats["value_clip_frac"] = masked_mean((clipped_error > error).float(), mask)
        error = torch.maximum(error, clipped_error)
    loss = aggregate_tokens(0.5 * error, mask, aggregate)
    stats["value_mean"] = masked_mean(values.detach(), mask)
    stats["value_error"] = masked_mean((values - returns).detach().abs(), mask)
    return loss, stats


def sft_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, aggregate: str = "batch_token_mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning: negative log-likelihood of the completion tokens (RAFT's update, SFT).

    Formula: L = -sum_{b,t} mask_{b,t} logprobs_{b,t} / sum_{b,t} mask_{b,t}   (default "batch_token_mean",
    the usual cross-entropy); "token_mean" (per-sequence mean, then mean) and "sum" are options.
    RAFT (Dong et al. 2023, arXiv:2304.06767) applies it to the best-of-k completion of each prompt.

    Shapes: logprobs, mask (B, T). Returns (loss, stats): nll (= loss), tokens (number of real tokens).
    """
    loss = aggregate_tokens(-_float(logprobs), mask, aggregate)
    stats = {"nll": loss.detach(), "tokens": mask.bool().sum().float()}
    return loss, stats


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    aggregate: str = "token_mean",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """KL as a loss term after the baseline (GRPO, DeepSeekMath arXiv:2402.03300 Eq. 3-4; verl use_kl_loss):
        L_KL = aggregate_t[ kl_estimate(logprobs_t, ref_logprobs_t) ]      (GRPO: kind "k3", "token_mean")
    added as + beta * L_KL to the policy loss, aggregated like it (`masks.AGGREGATES`). The gradient flows
    through `logprobs` (the policy being trained); `ref_logprobs` is detached.

    Shapes: logprobs, ref_logprobs, mask (B, T). Returns a scalar.
    """
    check_shapes("B T", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    per_token = kl_estimate(fill_padding(logprobs, mask), fill_padding(ref_logprobs.detach(), mask), kind)
    return aggregate_tokens(per_token, mask, aggregate, max_tokens)
