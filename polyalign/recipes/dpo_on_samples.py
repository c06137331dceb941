"""DPO on the starting policy's own samples, the offline entry of the Back to Basics table in miniature.

All pairs are drawn from the starting policy before training (offline: never regenerated), two completions
per prompt, chosen = the one the reward model scores higher (ties dropped). The number of completions equals
the online methods' budget (train.steps x prompts_per_step x 2); one optimizer step per rollout-sized batch.
"""

from __future__ import annotations

import torch

from polyalign import losses
from polyalign.logprobs import sequence_logprobs
from polyalign.train.online import generate_phase
from polyalign.train.optim import step_optimizer
from polyalign.train.run import Run


def collect_pairs(run: Run) -> list[tuple]:
    """(prompt_ids, prompt_mask, chosen ids/mask, rejected ids/mask) batches from the starting policy."""
    batches = []
    for step in range(run.cfg.train.steps):
        rollout = generate_phase(run, step)
        scores, _ = run.score(rollout.prompts_per_row, rollout.completions, **rollout.extras)
        scores = scores.view(-1, 2)
        keep = scores[:, 0] != scores[:, 1]
        first_wins = scores[:, 0] > scores[:, 1]
        rows = torch.arange(rollout.num_prompts) * 2
        chosen = torch.where(first_wins, rows, rows + 1)[keep]
        rejected = torch.where(first_wins, rows + 1, rows)[keep]
        if len(chosen):
            batches.append(
                (
                    rollout.prompt_ids[chosen],
                    rollout.prompt_mask[chosen],
                    rollout.completion_ids[chosen],
                    rollout.completion_mask[chosen],
                    rollout.completion_ids[rejected],
                    rollout.completion_mask[rejected],
                )
            )
    return batches


def train_dpo_on_samples(run: Run, beta: float = 0.1) -> list[dict]:
    batches = collect_pairs(run)
    history = []
    for prompt_ids, prompt_mask, c_ids, c_mask, r_ids, r_mask in batches:
        with torch.no_grad():
            ref_c = sequence_logprobs(run.ref, prompt_ids, prompt_mask, c_ids, c_mask)
            ref_r = sequence_logprobs(run.ref, prompt_ids, prompt_mask, r_ids, r_mask)
        run.policy.train()
        pol_c = sequence_logprobs(run.policy, prompt_ids, prompt_mask, c_ids, c_mask)
        pol_r = sequence_logprobs(run.policy, prompt_ids, prompt_mask, r_ids, r_mask)
        loss, stats = losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta)
        loss.backward()
        step_optimizer(run.policy.parameters(), run.optimizer, run.cfg.train.max_grad_norm)
        history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}})
    return history
