"""KL estimators between the policy and the reference policy, and KL-shaped rewards.

Pure torch. Inputs are per-token log-probs of the *sampled* tokens, so every estimator here is a
single-sample Monte-Carlo estimate of KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020).
"""

from __future__ import annotations

import torch

from polyalign.losses.masks import check_choice, check_shapes, fill_padding, masked_mean, masked_sum

KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the log-probs of tokens sampled from pi.

    With d = logprobs - ref_logprobs (= log pi/pi_ref of the sampled token):
      "k1":  d                          unbiased, signed; what RLOO/CoPG put inside R (SPEC 1.1, 5)
      "k2":  d^2 / 2                    biased, >= 0, low variance
      "k3":  exp(-d) - 1 + d            unbiased, >= 0 (the "low_var_kl" of GRPO/verl)
      "abs": |d|                        NeMo-Aligner's use_absolute_kl (SPEC 6.4)

    Shapes: logprobs, ref_logprobs any shape, e.g. (B, T). Returns a tensor of that shape; gradients flow
    into both inputs (callers detach what they want constant). Padding is not handled here: reduce with
    `sequence_kl`.
    """
    check_choice("kind", kind, KL_KINDS)
    check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    return d.abs()


def sequence_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k1",
    aggregate: str = "sum",
) -> torch.Tensor:
    """Per-sequence KL estimate: the per-token `kl_estimate` summed ("sum", the papers') or averaged
    ("mean", NeMo-Aligner's) over the completion tokens.

    Shapes: logprobs, ref_logprobs, mask (B, T). Returns (B,). With kind="k1", aggregate="sum" this is
    log pi(y|x) - log pi_ref(y|x), the sequence log-ratio of SPEC 1.1 Eq. 3/4.
    """
    check_choice("aggregate", aggregate, ("sum", "mean"))
    check_shapes("B T", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    # Padding is zeroed before the estimate so garbage there cannot overflow exp() in k3.
    per_token = kl_estimate(fill_padding(logprobs, mask), fill_padding(ref_logprobs, mask), kind)
    if aggregate == "sum":
        return masked_sum(per_token, mask, dim=-1)
    return masked_mean(per_token, mask, dim=-1)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k1",
    aggregate: str = "sum",
) -> torch.Tensor:
    """The KL-regularised sequence reward R = score - beta * KL_seq, as a constant (no gradient).

    Formula (Back to Basics, arXiv:2402.14740, Eq. 3/4; CoPG arXiv:2406.19185 Eq. 1):
        R(x, y) = r(x, y) - beta * sum_t (log pi(y_t|.) - log pi_ref(y_t|.))      (kind="k1", "sum")
    Other `kind`/`aggregate` values swap the KL estimate (see `kl_estimate`, `sequence_kl`).

    Shapes: scores (B,), logprobs, ref_logprobs, mask (B, T). Returns a detached float tensor (B,).
    Detached because RLOO/REINFORCE treat R as a return: the gradient of E[R] through the -beta log pi term
    is already in R * grad log pi (SPEC 1.1, CoPG Appx. A Eqs. 47-49).
    """
    check_shapes("B", scores=scores, logprobs_rows=logprobs.shape[:1])
    with torch.no_grad():
        kl = sequence_kl(logprobs, ref_logprobs, mask, kind=kind, aggregate=aggregate)
        # At least float32, so bf16 log-probs do not round the rewards.
        dtype = torch.promote_types(torch.promote_types(scores.dtype, kl.dtype), torch.float32)
        return (scores.to(dtype) - beta * kl.to(dtype)).detach()


def token_rewards(
    scores: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """PPO's per-token reward: the KL penalty on every completion token, the score on the last one.

    Formula (Back to Basics, arXiv:2402.14740, Sec. 2.1; Ziegler et al. 2019):
        r_t = -beta * kl_t  (t < T_b),     r_{T_b} = -beta * kl_{T_b} + score_b,    0 on padding
    so that sum_t r_t = score - beta * KL_seq, the sequence reward of `kl_shaped_rewards` (kind "k1", "sum").

    Shapes: scores (B,), kl_per_token (B, T) (e.g. `kl_estimate`), mask (B, T) right padded. Returns (B, T).
    A row with no real token gets its score at t = 0.
    """
    check_shapes("B T", kl_per_token=kl_per_token, mask=mask)
    check_shapes("B", scores=scores, mask_rows=mask.shape[:1])
    rewards = -beta * kl_per_token * mask
    last = (mask.sum(-1) - 1).clamp(min=0)  # (B,) index of each row's last completion token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
