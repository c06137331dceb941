"""Online RL from a reward: RLOO, REINFORCE (moving-average baseline), vanilla PG, RAFT, online CoPG, PPO.

The whole completion is one action (arXiv:2402.14740). One step is a loop of named phases:

    prompts -> generate (k completions each) -> score (reward functions, penalties)
            -> reference (log pi_ref, for the KL-shaped reward r - beta * log(pi/pi_ref))
            -> advantages (per algorithm) -> update (updates_per_batch minibatches, micro-batched)

Gathering (rewards for batch-wide baselines, metrics) and sharding (prompts, advantages) happen at the edges
of `train_step`; the phases in between see this process's rows. PPO's update (critic, GAE, clipped ratio,
epochs) lives in `train/ppo.py`. The loop itself is the shared skeleton of `train/loop.py`.
Run it: `polyalign train [CONFIG.yaml] [--algo.name=rloo --train.steps=200 ...] [--resume]`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from polyalign import losses
from polyalign.config import AlgoConfig, RewardConfig, RunConfig
from polyalign.files import atomic_write_text
from polyalign.logprobs import completion_logprobs
from polyalign.rollout.mismatch import logprob_mismatch
from polyalign.train import distributed, loop, monitors
from polyalign.train.ppo import ppo_update
from polyalign.train.run import Run, setup_run
from polyalign.types import Rollout, Sampling


@dataclass
class Scored:
    """What the score and reference phases add to a rollout."""

    scores: torch.Tensor  # (B,) raw reward-function scores, penalties applied
    components: dict[str, torch.Tensor]  # name -> (B,) unweighted sub-rewards, for logging
    ref_logprobs: torch.Tensor | None  # (B, T) reference per-token log-probs, None without a reference
    kl: torch.Tensor  # (B,) sequence KL estimate (0 without a reference)
    rewards: torch.Tensor  # (B,) KL-shaped rewards R = scores - beta * kl


# ---------------------------------------------------------------- phases


def generate_phase(run: Run, step: int) -> Rollout:
    """This process's share of step `step`'s prompts, k completions each."""
    cfg = run.cfg
    prompts, columns = run.next_prompts(step)  # sharded here, at the start of the step
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


def score_phase(
    rollout: Rollout, score: Callable, r: RewardConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw scores from the reward functions, minus the configured guards (no-EOS and length penalties)."""
    scores, components = score(rollout.prompts_per_row, rollout.completions, **rollout.extras)
    if r.no_eos_penalty:
        scores = scores - r.no_eos_penalty * (~rollout.finished).float()
    if r.length_penalty:
        scores = scores - r.length_penalty * rollout.completion_lengths.float()
    return scores, components


@torch.inference_mode()
def reference_phase(
    ref, rollout: Rollout, scores: torch.Tensor, components: dict, a: AlgoConfig, temperature: float
) -> Scored:
    """Reference log-probs and the KL-shaped reward R = score - beta * KL (R = score without a reference).
    The sampler's log-probs are the current policy's (on-policy): no extra forward for log pi."""
    if ref is None:
        return Scored(scores, components, None, torch.zeros_like(scores), scores.clone())
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    ref_logprobs = completion_logprobs(ref, *args, temperature=temperature)
    return shaped(scores, components, rollout.logprobs, ref_logprobs, rollout.completion_mask, a)


def shaped(scores, components, logprobs, ref_logprobs, mask, a: AlgoConfig) -> Scored:
    """The sequence KL and the rewards the baseline sees: R = score - beta * KL with algo.kl_in "reward";
    the raw scores when the KL enters the loss ("loss", "token_reward")."""
    kind, aggregate = a.kl_estimator, a.kl_aggregate
    kl = losses.sequence_kl(logprobs, ref_logprobs, mask, kind=kind, aggregate=aggregate)
    rewards = losses.kl_shaped_rewards(
        scores, logprobs, ref_logprobs, mask, a.kl_coef if a.kl_in == "reward" else 0.0, kind, aggregate
    )
    return Scored(scores, components, ref_logprobs, kl, rewards)


def advantage_phase(rewards: torch.Tensor, a: AlgoConfig, group_size: int, state: dict) -> torch.Tensor:
    """Per-completion advantages (B,) of the whole batch (every process's rewards, so that baselines and
    whitening see all rows) for the REINFORCE family; RAFT/CoPG/PPO use their own signals."""
    if a.name == "rloo":
        adv = losses.group_advantages(rewards.view(-1, group_size), a.baseline, a.std_normalize).flatten()
    elif a.name == "reinforce":
        saved = state.get("baseline")  # kept JSON-friendly in the run state, so that it rides in checkpoints
        baseline = losses.BaselineState(saved["mean"], saved["count"]) if saved else None
        adv, new = losses.moving_average_baseline(rewards, baseline, momentum=a.baseline_momentum)
        state["baseline"] = {"mean": float(new.mean), "count": int(new.count)}
    else:  # vanilla_pg, and the signals others ignore
        adv = rewards.clone()
    return losses.whiten(adv) if a.whiten_advantages else adv


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


def policy_loss_fn(a: AlgoConfig, rollout: Rollout, scored: Scored, adv_all: torch.Tensor, max_tokens: int):
    """The per-micro-batch loss of the configured algorithm: (logprobs (b, T), rows (b,)) -> (loss, stats).
    The REINFORCE family follows algo.kl_in, ratio, clip_eps and logprob_aggregate (docs/presets.md)."""
    mask, G, ref = rollout.completion_mask, rollout.group_size, scored.ref_logprobs
    old_logprobs = rollout.logprobs
    agg, kl_in = a.logprob_aggregate, a.kl_in if ref is not None else "reward"  # no reference: no KL

    def reinforce(logp, rows):
        m, adv = mask[rows], adv_all[rows]
        if kl_in == "token_reward":  # OpenRLHF: the sampler's per-token KL as a reward-to-go
            kl_t = losses.kl_estimate(old_logprobs[rows], ref[rows], kind=a.kl_estimator)
            adv = losses.token_kl_advantages(adv, kl_t, m, a.kl_coef)
        if a.ratio == "sequence":  # clip_eps 0: no ratio (the paper)
            old, clip = (old_logprobs[rows], a.clip_eps) if a.clip_eps else (None, None)
            loss, stats = losses.reinforce_loss(logp, adv, m, agg, old_logprobs=old, clip_eps=clip)
        else:
            clip = a.clip_eps or math.inf
            loss, stats = losses.ppo_clip_loss(logp, old_logprobs[rows], adv, m, clip, agg, max_tokens)
        if kl_in == "loss":  # after the baseline, gradient through log pi (GRPO, verl use_kl_loss)
            kl = losses.kl_loss(logp, ref[rows], m, a.kl_estimator, agg, max_tokens)
            loss, stats = loss + a.kl_coef * kl, {**stats, "kl_loss": kl.detach()}
        return loss, stats

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
    """updates_per_batch optimizer steps over minibatches of whole groups, gradients accumulated over
    micro-batches. `advantages` are this process's rows."""
    cfg, G = run.cfg, run.cfg.rollout.samples_per_prompt
    parts = group_minibatches(rollout.num_prompts, G, cfg.algo.updates_per_batch, cfg.train.micro_batch_size)
    stats: dict[str, float] = {}
    if cfg.algo.importance_correction == "tis":
        advantages, stats = importance_corrected(run, rollout, advantages, parts)
    loss_fn = policy_loss_fn(cfg.algo, rollout, scored, advantages, cfg.rollout.max_new_tokens)
    if cfg.algo.name == "raft":  # best of k by KL-shaped reward; the other rows need no forward at all
        best = losses.best_of_group(scored.rewards.view(-1, G))
        parts = [[best[torch.isin(best, r)] for r in micros] for micros in parts]
    run.policy.train()
    for index, micros in enumerate(parts):
        total = sum(len(r) for r in micros)
        for m, rows in enumerate(micros):
            with distributed.accumulating(run.policy_train, last=m == len(micros) - 1):
                logp = policy_logprobs(run, rollout, rows)
                loss, loss_stats = loss_fn(logp, rows)
                (loss * (len(rows) / total)).backward()
            if index == 0 and "mismatch/token_abs_mean" not in stats:  # still the policy the sampler used
                stats.update(
                    logprob_mismatch(rollout.logprobs[rows], logp.detach(), rollout.completion_mask[rows])
                )
            loop.accumulate(stats, {"loss": loss, **loss_stats}, len(rows) / total / len(parts))
        loop.optimizer_step(run, run.policy.parameters(), stats, len(parts))
    return stats


def policy_logprobs(run: Run, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs (b, T) of the rollout's `rows` under the policy being trained."""
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    return completion_logprobs(
        run.policy_train, *(t[rows] for t in args), temperature=run.logprob_temperature
    )


@torch.no_grad()
def importance_corrected(
    run: Run, rollout: Rollout, advantages: torch.Tensor, parts: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages times the truncated importance weights (algo.importance_correction: tis,
    `losses.truncated_importance_weights`) of the trainer's policy before this batch's updates (one extra
    no-grad forward) against the sampler's log-probs; with the log-prob mismatch statistics."""
    trainer = torch.zeros_like(rollout.logprobs)
    for micros in parts:
        for rows in micros:
            trainer[rows] = policy_logprobs(run, rollout, rows).float()
    mask = rollout.completion_mask
    weights, weight_stats = losses.truncated_importance_weights(
        trainer, rollout.logprobs, mask, cap=run.cfg.algo.importance_cap
    )
    stats = logprob_mismatch(rollout.logprobs, trainer, mask)
    stats.update({k: float(v) for k, v in weight_stats.items()})
    return advantages * weights.to(advantages.dtype), stats


# ---------------------------------------------------------------- the step


def train_step(run: Run, step: int) -> dict[str, float]:
    cfg, world = run.cfg, run.world
    t0 = time.perf_counter()
    rollout = generate_phase(run, step)
    t1 = time.perf_counter()
    scores, components = score_phase(rollout, run.score, cfg.reward)
    scored = reference_phase(run.ref, rollout, scores, components, cfg.algo, run.logprob_temperature)
    t2 = time.perf_counter()
    if cfg.algo.name == "ppo":
        stats = ppo_update(run, rollout, scored.scores, scored.ref_logprobs)
    else:
        rewards = distributed.gather_rows(scored.rewards, world)  # every process's rows
        advantages = advantage_phase(rewards, cfg.algo, cfg.rollout.samples_per_prompt, run.state)
        advantages = advantages[distributed.shard(len(advantages), world, "rollout rows")]  # this process's
        stats = update_phase(run, rollout, scored, advantages)
    run.engine.load_weights(run.policy)
    t3 = time.perf_counter()
    if cfg.output.sample_every and step % cfg.output.sample_every == 0:
        rows = slice(0, 4)
        run.logger.log_samples(
            step, rollout.prompts_per_row[rows], rollout.completions[rows], scored.rewards[rows].tolist()
        )
    metrics: dict = {
        "reward": scored.rewards.mean(),
        "score": scored.scores.mean(),
        "kl": scored.kl.mean(),
        "length": rollout.completion_lengths.float().mean(),
        "finished": rollout.finished.float().mean(),
        **monitors.step_monitors(rollout, scored.ref_logprobs, run.state),  # reward-hacking signs
        **{f"reward/{k}": v.mean() for k, v in components.items()},
        **stats,
        "lr": run.optimizer.param_groups[0]["lr"],
        "time/generate": t1 - t0,
        "time/score_ref": t2 - t1,
        "time/update": t3 - t2,
        "time/step": t3 - t0,
        "tokens_per_s": int(rollout.completion_lengths.sum()) / max(t1 - t0, 1e-9),
        "rows_per_process": len(rollout.completions),
    }
    metrics = distributed.mean_metrics({k: float(v) for k, v in metrics.items()}, world)  # over processes
    metrics["tokens_per_s"] *= world.size  # all processes together
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- evaluation, summary: the loop's hooks


@torch.inference_mode()
def evaluate(run: Run, step: int) -> dict:
    """Greedy completions of held-out prompts: mean reward (the paper selects by test reward), KL and length.

    With several processes each evaluates its share of the prompts (all of them when the count does not
    split evenly) and the per-prompt results are gathered; rank 0 writes them."""
    if run.eval_prompts is None:
        return {}
    cfg, world = run.cfg, run.world
    prompts = run.eval_prompts.prompts[: cfg.eval.num_prompts]
    part = distributed.shard(len(prompts), world, "") if len(prompts) % world.size == 0 else slice(None)
    columns = {k: v[: len(prompts)][part] for k, v in run.eval_prompts.columns.items()}
    greedy = Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    rollout = run.generate(prompts[part], n=1, sampling=greedy, extras=columns)
    scores, _ = run.score(rollout.prompts_per_row, rollout.completions, **rollout.extras)
    kl = torch.zeros_like(scores)
    if run.ref is not None:
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        ref_logprobs = completion_logprobs(run.ref, *args)
        kl = losses.sequence_kl(rollout.logprobs, ref_logprobs, rollout.completion_mask, kind="k1")
    per_prompt = torch.stack(
        [scores.float().cpu(), kl.float().cpu(), rollout.completion_lengths.float().cpu()]
    )
    completions = rollout.completions
    if part != slice(None):
        per_prompt = distributed.gather_rows(per_prompt.T.contiguous(), world).T
        completions = distributed.gather_objects(completions, world)
    scores, kl, lengths = per_prompt
    result = {
        "eval/reward": float(scores.mean()),
        "eval/kl": float(kl.mean()),
        "eval/length": float(lengths.mean()),
    }
    columns = {k: v[: len(prompts)] for k, v in run.eval_prompts.columns.items()}  # every prompt's
    second = monitors.scorer(cfg.eval.scorer)(prompts, completions, **columns) if cfg.eval.scorer else None
    result.update(monitors.eval_monitors(completions, scores, second, run.state))
    run.logger.log(step, result)
    if world.is_main:
        samples = [
            {"prompt": p, "completion": c, "score": float(s)} for p, c, s in zip(prompts, completions, scores)
        ]
        (run.run_dir / "eval").mkdir(exist_ok=True)
        text = json.dumps({**result, "samples": samples}, indent=1)
        atomic_write_text(run.run_dir / "eval" / f"step_{step:06d}.json", text)
    return result


def is_better(result: dict, best: dict | None) -> bool:
    """The paper selects by held-out reward."""
    return best is None or result["eval/reward"] > best["eval/reward"]


TRAINER = loop.Trainer(step=train_step, evaluate=evaluate, is_better=is_better)  # the loop's summary only


def train_loop(run: Run) -> None:
    """The shared loop with the online step, from where `run` stands to train.steps."""
    loop.train_loop(run, TRAINER)


def train_online(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a policy online from a reward; returns a summary (start and best evaluation, run directory).
    `resume` continues the run in output.run_dir; `overwrite` replaces it (a used run_dir is refused)."""
    return loop.train(setup_run(cfg, resume, overwrite), TRAINER)
