"""Losses over pairs or groups of completions of the same prompt: DPO, IPO, CoPG and Bradley-Terry.

Pure torch. Inputs are sequence log-probs (B,) = sums over completion tokens (use `masked_sum` on the
per-token log-probs), for the policy and the frozen reference; reference log-probs and rewards are
treated as constants (detached inside). Each loss returns (loss, stats): loss is the mean over pairs
(or prompts), stats a dict of detached scalar tensors.

Notation: a = log pi(y)/pi_ref(y) (sequence log-ratio), h = a_chosen - a_rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.losses.masks import check_choice, check_positive, check_shapes


def _pair_logratios(*logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_chosen, a_rejected), each (B,), from the chosen, rejected, ref_chosen and ref_rejected log-probs."""
    check_shapes("B", **dict(zip(("chosen", "rejected", "ref_chosen", "ref_rejected"), logps, strict=True)))
    chosen, rejected, ref_chosen, ref_rejected = logps
    return chosen - ref_chosen.detach(), rejected - ref_rejected.detach()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation: logistic regression of the implicit reward margin beta * h.

    Formula (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; SPEC 5):
        L = -log sigma(beta * h),   h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    label_smoothing = eps > 0 gives the conservative DPO of Mitchell (2023):
        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).

    Shapes: all inputs (B,) sequence log-probs. Returns (loss, stats): chosen_reward, rejected_reward
    (beta * a, means), reward_margin (mean beta * h), accuracy (fraction with beta * h > 0).
    """
    check_positive(beta=beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio = _pair_logratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    stats = {
        "chosen_reward": beta * chosen_ratio.detach().mean(),
        "rejected_reward": beta * rejected_ratio.detach().mean(),
        "reward_margin": logits.detach().mean(),
        "accuracy": (logits.detach() > 0).float().mean(),
    }
    return losses.mean(), stats


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Identity preference optimisation: regress the log-ratio margin h onto 1/(2 beta).

    Formula (Azar et al. 2024, arXiv:2310.12036, Eq. 17, with tau = beta; SPEC 5):
        L = (h - 1/(2 beta))^2,    minimised at h = 1/(2 beta).
    CoPG (arXiv:2406.19185, Property 3, Eq. 21-22) writes the sample IPO loss as (1/2 - beta h)^2
    = beta^2 (h - 1/(2 beta))^2: the same loss scaled by beta^2, so its gradient is beta^2 times ours.
    Default h is the papers' unnormalised sequence log-ratio. length_normalize=True divides every
    log-prob by its completion length before forming h, as TRL does (a deviation "confirmed with the IPO
    authors" per TRL; SPEC 5); then chosen_lengths and rejected_lengths (B,) are required and must be > 0.

    Shapes: log-probs (B,). Returns (loss, stats): margin (mean h), target (1/(2 beta)), accuracy (h > 0).
    """
    check_positive(beta=beta)
    chosen_ratio, rejected_ratio = _pair_logratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if length_normalize:  # (log pi - log pi_ref) / n, i.e. both log-probs divided by the length n
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length_normalize=True needs chosen_lengths and rejected_lengths")
        check_shapes(
            chosen_ratio=chosen_ratio, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
        )
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("completion lengths must be > 0 to length-normalise log-probs")
        chosen_ratio, rejected_ratio = chosen_ratio / chosen_lengths, rejected_ratio / rejected_lengths
    margin = chosen_ratio - rejected_ratio  # (B,)
    target = 1.0 / (2.0 * beta)
    losses = (margin - target) ** 2
    stats = {
        "margin": margin.detach().mean(),
        "target": torch.full((), target, dtype=margin.dtype, device=margin.device),
        "accuracy": (margin.detach() > 0).float().mean(),
    }
    return losses.mean(), stats


def copg_loss(
    logps: torch.Tensor,
    logps_prime: torch.Tensor,
    ref_logps: torch.Tensor,
    ref_logps_prime: torch.Tensor,
    rewards: torch.Tensor,
    rewards_prime: torch.Tensor,
    beta: float = 0.1,
    form: str = "squared",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Contrastive policy gradient for a pair (y, y') of completions of one prompt with any scalar rewards.

    The pair need not be ranked nor sampled from pi. With a = log pi(y)/pi_ref(y), Da = a - a',
    DR = R(y) - R(y') and R_beta(y) = R(y) - beta a (Eq. 1), CoPG (arXiv:2406.19185) MAXIMISES Eq. 7-9
        l_CoPG = (R_{beta/2}(y) - R_{beta/2}(y')) a + (R_{beta/2}(y') - R_{beta/2}(y)) a'
               = DR Da - (beta/2) Da^2,       and beta l_CoPG = DR^2/2 - (DR - beta Da)^2 / 2 (Appx. A).
    We minimise one of two losses with the same gradient, -grad l_CoPG = -(R_beta(y) - R_beta(y')) *
    (grad log pi(y) - grad log pi(y')) (Eq. 18-19):
        form="squared":   (DR - beta Da)^2 / (2 beta)   = DR^2/(2 beta) - l_CoPG, gradient through both a, a'
        form="surrogate": -sg(R_beta(y) - R_beta(y')) * (log pi(y) - log pi(y'))
    Paper deviation: none in the gradient; the squared form is the paper's objective up to a constant.
    On-policy, the gradient is 2x that of `reinforce_loss` with `rloo_advantages` (G=2) of KL-shaped rewards
    (Property 2), and with R(y) = -R(y') = 1/4 it is beta/2 x the gradient of `ipo_loss` (Property 3).

    Shapes: all inputs (B,) (log-probs are sequence sums; rewards and ref log-probs are constants).
    Returns (loss, stats): copg_objective (mean l_CoPG, to be maximised), weight_mean (mean |R_beta(y) -
    R_beta(y')|), reward_diff (mean |DR|), logratio_diff (mean Da).
    """
    check_positive(beta=beta)
    check_choice("form", form, ("squared", "surrogate"))
    logratio, logratio_prime = _pair_logratios(logps, logps_prime, ref_logps, ref_logps_prime)
    check_shapes(logps=logps, rewards=rewards, rewards_prime=rewards_prime)
    reward_diff = (rewards - rewards_prime).detach().to(logratio.dtype)  # (B,)
    logratio_diff = logratio - logratio_prime  # (B,)
    residual = reward_diff - beta * logratio_diff  # (B,) = R_beta(y) - R_beta(y')
    if form == "squared":
        losses = residual**2 / (2.0 * beta)
    else:
        losses = -residual.detach() * (logps - logps_prime)
    with torch.no_grad():
        stats = {
            "copg_objective": (reward_diff * logratio_diff - 0.5 * beta * logratio_diff**2).mean(),
            "weight_mean": residual.abs().mean(),
            "reward_diff": reward_diff.abs().mean(),
            "logratio_diff": logratio_diff.mean(),
        }
    return losses.mean(), stats


def copg_group_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 0.1,
    form: str = "squared",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoPG over a group of G completions per prompt: the squared pair loss summed over all pairs.

    Formula (k-sample CoPG of the Command A report, SPEC 4.2 [S]), with x_i = R_beta(y_i) = R_i - beta a_i:
        L_p = 1/(G-1) * sum_{i>j} (x_i - x_j)^2 / (2 beta)  =  G/(G-1) * sum_i (x_i - mean x)^2 / (2 beta)
        L   = mean over prompts of L_p
    Scale convention: the 1/(2 beta) makes G=2 equal `copg_loss(form="squared")` exactly; the report's form
    omits it (multiply by 2 beta). The gradient is -sum_i A_i grad log pi(y_i) with A_i the RLOO advantage
    of the R_beta (Eq. 65, a sum over the group), i.e. G x `reinforce_loss` with `rloo_advantages`.
    form="surrogate" gives that same gradient as -mean_p sum_i sg(G/(G-1) (x_i - mean x)) log pi(y_i).

    Shapes: logps, ref_logps, rewards (P, G), G >= 2, group-major. Returns (loss, stats): copg_objective
    (mean over prompts of 1/(G-1) sum_{i>j} l_CoPG(y_i, y_j)), weight_mean (mean |x_i - mean x|).
    """
    check_positive(beta=beta)
    check_choice("form", form, ("squared", "surrogate"))
    check_shapes("P G", logps=logps, ref_logps=ref_logps, rewards=rewards)
    if logps.shape[1] < 2:
        raise ValueError(f"inputs must be (P, G) with G >= 2, got shape {tuple(logps.shape)}")
    group_size = logps.shape[1]
    logratio = logps - ref_logps.detach()  # (P, G)
    rewards = rewards.detach().to(logratio.dtype)
    centred = (rewards - beta * logratio) - (rewards - beta * logratio).mean(dim=1, keepdim=True)  # (P, G)
    if form == "squared":
        losses = group_size / (group_size - 1) * (centred**2).sum(dim=1) / (2.0 * beta)  # (P,)
    else:
        losses = -(group_size / (group_size - 1) * centred.detach() * logps).sum(dim=1)  # (P,)
    with torch.no_grad():
        # sum_{i>j} (DR Da - beta/2 Da^2) = G * sum_i (r_i - mean r)(a_i - mean a) - beta/2 * G * sum_i (a_i - mean a)^2
        r_c = rewards - rewards.mean(dim=1, keepdim=True)
        a_c = logratio - logratio.mean(dim=1, keepdim=True)
        pair_sum = group_size * ((r_c * a_c).sum(dim=1) - 0.5 * beta * (a_c**2).sum(dim=1))
        stats = {"copg_objective": (pair_sum / (group_size - 1)).mean(), "weight_mean": centred.abs().mean()}
    return losses.mean(), stats


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss: the chosen completion should score higher than the rejected one.

    Formula (Bradley-Terry; CoPG arXiv:2406.19185 Eq. 26; InstructGPT arXiv:2203.02155 Eq. 1):
        L = -log sigma(s_chosen - s_rejected - m)
    with an optional margin m (B,) or scalar (Llama 2, arXiv:2307.09288 Eq. 2); m = 0 by default.

    Shapes: scores (B,). Returns (loss, stats): accuracy (fraction s_chosen > s_rejected), margin (mean
    s_chosen - s_rejected), chosen_score and rejected_score (means).
    """
    check_shapes(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "accuracy": (diff.detach() > 0).float().mean(),
        "margin": diff.detach().mean(),
        "chosen_score": chosen_scores.detach().mean(),
        "rejected_score": rejected_scores.detach().mean(),
    }
    return loss, stats
