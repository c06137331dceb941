"""How far the sampler's log-probs are from the trainer's: the rollout engine / trainer mismatch.

A rollout engine other than the trainer's own forward (vLLM, or the same model in bf16 with other kernels)
samples from a slightly different distribution mu than the policy pi the trainer differentiates. This module
only measures the gap, from tensors; correcting for it (truncated importance sampling) is the trainer's.

Shapes: sampler_logprobs, trainer_logprobs, mask (B, T).
"""

from __future__ import annotations

import torch

from polyalign.losses.masks import check_shapes


def logprob_mismatch(
    sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Summary statistics of d_t = log pi(y_t) - log mu(y_t) over the real tokens (mask 1).

    Returns (floats, for logging):
        mismatch/token_abs_mean: mean over all real tokens of |d_t|.
        mismatch/token_abs_max: max over all real tokens of |d_t|.
        mismatch/seq_log_ratio_mean: mean over sequences of D = sum_t d_t = log pi(y) / mu(y), the
            sequence-level log importance ratio (> 0: the trainer finds the completions more likely).
        mismatch/seq_frac_abs_gt_1: fraction of sequences with |D| > 1 (an importance weight beyond
            e or below 1/e), the ones a truncated importance weight would cap or shrink.
    Sequences without real tokens count as D = 0.
    """
    check_shapes("B T", sampler_logprobs=sampler_logprobs, trainer_logprobs=trainer_logprobs, mask=mask)
    real = mask.bool()
    if not bool(real.any()):
        raise ValueError("logprob_mismatch: the mask has no real tokens")
    diff = (trainer_logprobs.detach().double() - sampler_logprobs.detach().double()).masked_fill(~real, 0.0)
    abs_diff = diff.abs()
    seq = diff.sum(-1)  # (B,) log pi(y) - log mu(y)
    return {
        "mismatch/token_abs_mean": float(abs_diff.sum() / real.sum()),
        "mismatch/token_abs_max": float(abs_diff.max()),
        "mismatch/seq_log_ratio_mean": float(seq.mean()),
        "mismatch/seq_frac_abs_gt_1": float((seq.abs() > 1).double().mean()),
    }
