"""Online RL from a reward: RLOO, REINFORCE (moving-average baseline), vanilla PG, RAFT, online CoPG, PPO.

The whole completion is one action (arXiv:2402.14740). One step is a loop of named phases:

    prompts -> generate (k completions each) -> score (reward functions, penalties)
            -> reference (log pi_ref, for the KL-shaped reward r - beta * log(pi/pi_ref))
            -> advantages (per algorithm) -> update (updates_per_batch minibatches, micro-batched)

PPO's update (critic, GAE, clipped ratio, epochs) lives in `train/ppo.py` and plugs into the same loop.
Run it: `polyalign train [CONFIG.yaml] [--algo.name=rloo --train.steps=200 ...] [--resume]`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from polyalign import losses
from polyalign.config import RunConfig
from polyalign.logprobs import completion_logprobs
from polyalign.rollout.mismatch import logprob_mismatch
from polyalign.train import distributed, ppo
from polyalign.train.loop import lr_at, set_lr, step_optimizer
from polyalign.train.run import Run, evaluate, finish_run, maybe_checkpoint, setup_run
from polyalign.types import Rollout, Sampling


@dataclass
class Scored:
    """What the score and reference phases add to a rollout."""

    scores: torch.Tensor  # (B,) raw reward-function scores, penalties applied
    components: dict[str, torch.Tensor]  # name -> (B,) unweighted sub-rewards, for logging
    ref_logprobs: torch.Tensor | None  # (B, T) reference per-token log-probs, None when kl_coef == 0
    kl: torch.Tensor  # (B,) sequence KL estimate (0 without a reference)
    rewards: torch.Tensor  # (B,) KL-shaped rewards R = scores - beta * kl
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- phases


def generate_phase(run: Run, step: int) -> Rollout:
    cfg = run.cfg
    prompts, columns = run.next_prompts(step)  # this process's share
    rows = len(prompts) * cfg.rollout.samples_per_prompt
    sampling = Sampling(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop_strings=tuple(cfg.rollout.stop_strings),
        seed=cfg.train.seed * 7919 + step,
        row_offset=run.world.rank * rows,
        total_rows=run.world.size * rows,
    )
    return run.generate(prompts, n=cfg.rollout.samples_per_prompt, sampling=sampling, extras=columns)


def score_phase(run: Run, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw scores from the reward functions, minus the configured guards (no-EOS and length penalties)."""
    scores, components = run.score(rollout.prompts_per_row, rollout.completions, **rollout.extras)
    r = run.cfg.reward
    if r.no_eos_penalty:
        scores = scores - r.no_eos_penalty * (~rollout.finished).float()
    if r.length_penalty:
        scores = scores - r.length_penalty * rollout.completion_lengths.float()
    return scores, components


@torch.inference_mode()
def reference_phase(run: Run, rollout: Rollout, scores: torch.Tensor, components: dict) -> Scored:
    a = run.cfg.algo
    if run.ref is None:
        zero = torch.zeros_like(scores)
        return Scored(scores, components, None, zero, scores.clone())
    ref_logprobs = completion_logprobs(
        run.ref,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        temperature=run.logprob_temperature,
    )
    # The sampler's log-probs are the current policy's (on-policy): no extra forward for log pi.
    kl = losses.sequence_kl(
        rollout.logprobs, ref_logprobs, rollout.completion_mask, kind=a.kl_estimator, aggregate=a.kl_aggregate
    )
    rewards = scores - a.kl_coef * kl
    return Scored(scores, components, ref_logprobs, kl, rewards)


def advantage_phase(run: Run, scored: Scored) -> torch.Tensor:
    """Per-completion advantages (B,) for the REINFORCE family; RAFT/CoPG/PPO use their own signals.

    Computed on the whole batch gathered from every process (baselines and whitening see all rows), then
    this process's rows are returned."""
    a, G = run.cfg.algo, run.cfg.rollout.samples_per_prompt
    R = distributed.gather_rows(scored.rewards, run.world)
    if a.name == "rloo":
        adv = losses.rloo_advantages(R.view(-1, G)).flatten()
    elif a.name == "reinforce":
        saved = run.state.get("baseline")  # kept JSON-friendly so that it rides in checkpoints
        state = losses.BaselineState(saved["mean"], saved["count"]) if saved else None
        adv, new = losses.moving_average_baseline(R, state, momentum=a.baseline_momentum)
        run.state["baseline"] = {"mean": float(new.mean), "count": int(new.count)}
    else:  # vanilla_pg, and the signals others ignore
        adv = R.clone()
    adv = losses.whiten(adv) if a.whiten_advantages else adv
    return adv[distributed.shard(len(adv), run.world, "rollout rows")]


# ---------------------------------------------------------------- update


def group_minibatches(
    num_groups: int, group_size: int, parts: int, micro_rows: int
) -> list[list[torch.Tensor]]:
    """Split whole groups into `parts` minibatches, each into micro-batches of row indices.

    Minibatch p holds groups p, p + parts, p + 2 * parts, ...: strided, so that when the batch is split
    across processes in contiguous shares, each process's minibatch p is its share of the global one.
    """
    per_part = num_groups // parts
    micro_groups = max(1, micro_rows // group_size) if micro_rows else per_part
    out = []
    for p in range(parts):
        groups = torch.arange(p, num_groups, parts)
        micros = [groups[i : i + micro_groups] for i in range(0, per_part, micro_groups)]
        out.append([(g[:, None] * group_size + torch.arange(group_size)).flatten() for g in micros])
    return out


def policy_loss_fn(run: Run, rollout: Rollout, scored: Scored, advantages: torch.Tensor) -> Callable:
    """The per-micro-batch loss of the configured algorithm: (logprobs (b, T), rows (b,)) -> (loss, stats)."""
    a, G = run.cfg.algo, run.cfg.rollout.samples_per_prompt
    mask = rollout.completion_mask

    def reinforce(logp, rows):
        old = rollout.logprobs[rows] if a.clip_eps is not None else None
        return losses.reinforce_loss(
            logp,
            advantages[rows],
            mask[rows],
            aggregate=a.logprob_aggregate,
            old_logprobs=old,
            clip_eps=a.clip_eps,
        )

    def raft(logp, rows):
        return losses.sft_loss(logp, mask[rows])

    def copg(logp, rows):
        seq = losses.masked_sum(logp, mask[rows], dim=-1).view(-1, G)
        ref = losses.masked_sum(scored.ref_logprobs[rows], mask[rows], dim=-1).view(-1, G)
        return losses.copg_group_loss(
            seq, ref, scored.scores[rows].view(-1, G), beta=a.kl_coef, form=a.copg_form
        )

    return {"raft": raft, "copg": copg}.get(a.name, reinforce)


def update_phase(run: Run, rollout: Rollout, scored: Scored, advantages: torch.Tensor) -> dict[str, float]:
    """updates_per_batch optimizer steps over minibatches of whole groups, gradients accumulated over micro-batches."""
    cfg, G = run.cfg, run.cfg.rollout.samples_per_prompt
    parts = group_minibatches(rollout.num_prompts, G, cfg.algo.updates_per_batch, cfg.train.micro_batch_size)
    stats: dict[str, float] = {}
    if cfg.algo.importance_correction == "tis":
        advantages, stats = importance_corrected(run, rollout, advantages, parts)
    loss_fn = policy_loss_fn(run, rollout, scored, advantages)
    if cfg.algo.name == "raft":  # best of k by KL-shaped reward; the other rows need no forward at all
        best = scored.rewards.view(-1, G).argmax(-1) + torch.arange(rollout.num_prompts) * G
        parts = [[best[torch.isin(best, r)] for r in micros] for micros in parts]
    run.policy.train()
    for index, micros in enumerate(parts):
        total = sum(len(r) for r in micros)
        for m, rows in enumerate(micros):
            with distributed.accumulating(run.policy_train, last=m == len(micros) - 1):
                logp = _policy_logprobs(run, rollout, rows)
                loss, loss_stats = loss_fn(logp, rows)
                (loss * (len(rows) / total)).backward()
            if index == 0 and "mismatch/token_abs_mean" not in stats:  # still the policy the sampler used
                stats.update(
                    logprob_mismatch(rollout.logprobs[rows], logp.detach(), rollout.completion_mask[rows])
                )
            _accumulate(stats, {"loss": loss, **loss_stats}, len(rows) / total / len(parts))
        result = step_optimizer(run.policy.parameters(), run.optimizer, cfg.train.max_grad_norm)
        stats["grad_norm"] = stats.get("grad_norm", 0.0) + float(result.grad_norm) / len(parts)
        stats["skipped_steps"] = stats.get("skipped_steps", 0.0) + float(result.skipped)
        if result.skipped:
            run.console(f"step skipped: {result.reason}")
    run.engine.load_weights(run.policy)
    return stats


def _policy_logprobs(run: Run, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    return completion_logprobs(
        run.policy_train,
        rollout.prompt_ids[rows],
        rollout.prompt_mask[rows],
        rollout.completion_ids[rows],
        rollout.completion_mask[rows],
        temperature=run.logprob_temperature,
    )


@torch.no_grad()
def importance_corrected(
    run: Run, rollout: Rollout, advantages: torch.Tensor, parts: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (algo.importance_correction: tis) at the sequence level.

    w_b = min(exp(sum_t log pi_train(y_bt) - log pi_sampler(y_bt)), importance_cap), A_b <- w_b * A_b:
    the gradient becomes that of samples from the trainer's own policy when the engine's numerics differ
    (vLLM, bf16). pi_train is the policy before this batch's updates (one extra no-grad forward).
    """
    trainer = torch.zeros_like(rollout.logprobs)
    for micros in parts:
        for rows in micros:
            trainer[rows] = _policy_logprobs(run, rollout, rows).float()
    mask = rollout.completion_mask
    log_ratio = ((trainer - rollout.logprobs.float()) * mask).sum(-1)
    weights = log_ratio.exp().clamp(max=run.cfg.algo.importance_cap)
    stats = logprob_mismatch(rollout.logprobs, trainer, mask)
    stats["importance_weight_mean"] = float(weights.mean())
    stats["importance_weight_capped"] = float((log_ratio.exp() > run.cfg.algo.importance_cap).float().mean())
    return advantages * weights.to(advantages.dtype), stats


def _accumulate(into: dict[str, float], values: dict, weight: float) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * weight


# ---------------------------------------------------------------- the loop


def train_step(run: Run, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    rollout = generate_phase(run, step)
    t1 = time.perf_counter()
    scores, components = score_phase(run, rollout)
    scored = reference_phase(run, rollout, scores, components)
    t2 = time.perf_counter()
    if run.cfg.algo.name == "ppo":
        stats = ppo.ppo_update(run, rollout, scored)
    else:
        stats = update_phase(run, rollout, scored, advantage_phase(run, scored))
    t3 = time.perf_counter()
    tokens = int(rollout.completion_lengths.sum())
    metrics: dict = {
        "reward": scored.rewards.mean(),
        "score": scored.scores.mean(),
        "kl": scored.kl.mean(),
        "length": rollout.completion_lengths.float().mean(),
        "finished": rollout.finished.float().mean(),
        **{f"reward/{k}": v.mean() for k, v in components.items()},
        **stats,
        "lr": run.optimizer.param_groups[0]["lr"],
        "time/generate": t1 - t0,
        "time/score_ref": t2 - t1,
        "time/update": t3 - t2,
        "time/step": t3 - t0,
        "tokens_per_s": tokens / max(t1 - t0, 1e-9),
        "rows_per_process": len(rollout.completions),
    }
    metrics = distributed.mean_metrics({k: float(v) for k, v in metrics.items()}, run.world)
    metrics["tokens_per_s"] *= run.world.size  # all processes together
    if run.cfg.output.sample_every and step % run.cfg.output.sample_every == 0:
        run.logger.log_samples(
            step, rollout.prompts_per_row[:4], rollout.completions[:4], scored.rewards[:4].tolist()
        )
    return {k: float(v) for k, v in metrics.items()}


def train_loop(run: Run) -> None:
    """Steps from where the run stands (0, or the resumed step) to train.steps, checkpointing on the way."""
    cfg = run.cfg
    if run.start_step == 0 and cfg.eval.every:
        run.state["eval_start"] = evaluate(run, step=0)
    for step in range(run.start_step, cfg.train.steps):
        set_lr(
            run.optimizer,
            lr_at(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.schedule),
        )
        metrics = train_step(run, step)
        run.logger.log(step + 1, metrics)
        run.progress.update(step + 1, metrics)
        run.state["step"] = step + 1
        maybe_checkpoint(run, step + 1)


def train_online(cfg: RunConfig, resume: bool = False) -> dict:
    """Train a policy online from a reward; returns a summary (start and best evaluation, run directory)."""
    run = setup_run(cfg, resume=resume)
    train_loop(run)
    summary = finish_run(run)
    distributed.close_world(run.world)
    return summary
