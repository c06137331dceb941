"""Offline preference training: DPO, IPO, offline CoPG, SFT and Bradley-Terry reward models on fixed pairs.

One step is a loop of named phases (no generation):

    batch (rows of step s, a pure function of s) -> reference log-probs (cached, or a frozen model)
          -> policy log-probs of chosen and rejected (one concatenated forward) -> loss by name
          -> backward (micro-batches, gradients accumulated) -> guarded optimizer step

Evaluation on held-out pairs reports the loss, the preference accuracy (fraction of pairs with a positive
margin: the implicit reward margin beta * (a_chosen - a_rejected), a = log pi/pi_ref, for DPO/IPO/CoPG; the
score margin for reward models; the log-likelihood margin for SFT) and the accuracy per language. The best
checkpoint is the one with the highest held-out accuracy.
Run it: `polyalign train configs/offline/dpo.yaml [--loss.beta=0.1 ...] [--resume]`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from polyalign import losses
from polyalign.config_offline import LossConfig, OfflineRunConfig
from polyalign.logprobs import completion_logprobs
from polyalign.train import distributed
from polyalign.train.distributed_checkpoint import save_run_checkpoint
from polyalign.train.loop import lr_at, micro_batches, set_lr, step_optimizer
from polyalign.train.offline_batches import Micro, make_micro, pair_logprobs, pair_scores
from polyalign.train.offline_data import batch_indices, sft_sides
from polyalign.train.offline_run import OfflineRun, finish_offline_run, setup_offline_run

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]  # loss, stats, margins (B,)

# ---------------------------------------------------------------- losses: (model, loss config, micro) -> LossOut


def _policy_pair(
    model: nn.Module, m: Micro, lc: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected (B,) and the implicit reward margins (B,)."""
    chosen_tokens, rejected_tokens = pair_logprobs(model, m.batch)
    chosen, rejected = chosen_tokens.sum(-1), rejected_tokens.sum(-1)
    margins = lc.beta * ((chosen - m.ref_chosen) - (rejected - m.ref_rejected)).detach()
    return chosen, rejected, margins


def dpo(model: nn.Module, lc: LossConfig, m: Micro) -> LossOut:
    chosen, rejected, margins = _policy_pair(model, m, lc)
    loss, stats = losses.dpo_loss(
        chosen, rejected, m.ref_chosen, m.ref_rejected, beta=lc.beta, label_smoothing=lc.label_smoothing
    )
    return loss, stats, margins


def ipo(model: nn.Module, lc: LossConfig, m: Micro) -> LossOut:
    chosen, rejected, margins = _policy_pair(model, m, lc)
    b = m.batch
    loss, stats = losses.ipo_loss(
        chosen,
        rejected,
        m.ref_chosen,
        m.ref_rejected,
        beta=lc.beta,
        chosen_lengths=b.chosen_mask.sum(-1).float(),
        rejected_lengths=b.rejected_mask.sum(-1).float(),
        length_normalize=lc.length_normalize,
    )
    return loss, stats, margins


def copg(model: nn.Module, lc: LossConfig, m: Micro) -> LossOut:
    """Offline CoPG: the pair (chosen, rejected) is (y, y') with their rewards (any scale, not a ranking)."""
    chosen, rejected, margins = _policy_pair(model, m, lc)
    b = m.batch
    loss, stats = losses.copg_loss(
        chosen,
        rejected,
        m.ref_chosen,
        m.ref_rejected,
        b.chosen_scores,
        b.rejected_scores,
        beta=lc.beta,
        form=lc.copg_form,
    )
    return loss, stats, margins


def sft(model: nn.Module, lc: LossConfig, m: Micro) -> LossOut:
    """Training: NLL of the target side (chosen, or rejected where use_rejected). Evaluation: NLL of chosen,
    margins = log pi(chosen) - log pi(rejected) (does the policy rank the pair like the data?)."""
    b = m.batch
    if m.use_rejected is None:
        chosen_tokens, rejected_tokens = pair_logprobs(model, b)
        loss, stats = losses.sft_loss(chosen_tokens, b.chosen_mask)
        return loss, stats, (chosen_tokens.sum(-1) - rejected_tokens.sum(-1)).detach()
    side = m.use_rejected[:, None]
    ids, mask = (
        torch.where(side, b.rejected_ids, b.chosen_ids),
        torch.where(side, b.rejected_mask, b.chosen_mask),
    )
    logprobs = completion_logprobs(model, b.prompt_ids, b.prompt_mask, ids, mask)  # (B, T)
    loss, stats = losses.sft_loss(logprobs, mask)
    return loss, stats, None


def reward_model(model: nn.Module, lc: LossConfig, m: Micro) -> LossOut:
    """Bradley-Terry on (prompt + chosen, prompt + rejected); margins = score differences."""
    chosen, rejected = pair_scores(model, m.batch)
    loss, stats = losses.bradley_terry_loss(chosen, rejected)
    return loss, stats, (chosen - rejected).detach()


LOSSES = {"dpo": dpo, "ipo": ipo, "copg": copg, "sft": sft, "reward_model": reward_model}

# ---------------------------------------------------------------- update


def row_weights(
    loss_name: str, pairs: list, rows: list[int], use_rejected: torch.Tensor | None
) -> list[float]:
    """How much each row counts in a mean loss: 1 per pair; for SFT (a token mean) its target's tokens."""
    if loss_name != "sft":
        return [1.0] * len(rows)
    flags = use_rejected.tolist() if use_rejected is not None else [False] * len(rows)
    return [float(len(pairs[r].rejected_ids if f else pairs[r].chosen_ids)) for r, f in zip(rows, flags)]


def _accumulate(into: dict[str, float], values: dict, weight: float) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * weight


def update_phase(run: OfflineRun, rows: list[int], use_rejected: torch.Tensor) -> dict[str, float]:
    """One optimizer step on `rows` (the whole batch; this process trains on its share), gradients
    accumulated over micro-batches and weighted so that, averaged over processes, they are the batch mean."""
    cfg, world = run.cfg, run.world
    loss_fn = LOSSES[cfg.loss.name]
    weights = row_weights(cfg.loss.name, run.train_set.pairs, rows, use_rejected)
    total, stats = sum(weights), {}
    share = distributed.shard(len(rows), world, "train.batch_size")
    rows, weights, use_rejected = rows[share], weights[share], use_rejected[share]
    run.model.train()
    parts = micro_batches(len(rows), cfg.train.micro_batch_size or len(rows))
    for i, part in enumerate(parts):
        micro = make_micro(
            run.train_set,
            rows[part],
            run.pad_id,
            cfg.model.device,
            run.ref,
            run.needs_ref,
            use_rejected[part],
        )
        with distributed.accumulating(run.train_model, last=i == len(parts) - 1):
            loss, loss_stats, _ = loss_fn(run.train_model, cfg.loss, micro)
            weight = sum(weights[part]) / total * world.size  # processes average their gradients
            (loss * weight).backward()
        _accumulate(stats, {"loss": loss, **loss_stats}, weight)
    result = step_optimizer(run.model.parameters(), run.optimizer, cfg.train.max_grad_norm)
    if result.skipped:
        run.console(f"step skipped: {result.reason}")
    stats = distributed.mean_metrics({**stats, "pairs_per_process": len(rows)}, world)
    return {**stats, "grad_norm": result.grad_norm, "skipped_steps": float(result.skipped)}


def train_step(run: OfflineRun, step: int) -> dict[str, float]:
    cfg = run.cfg
    t0 = time.perf_counter()
    rows = batch_indices(len(run.train_set), step, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    use_rejected = sft_sides(step, len(rows), cfg.train.seed, cfg.loss.sft_target == "random")
    stats = update_phase(run, rows, use_rejected)
    seconds = time.perf_counter() - t0
    tokens = sum(
        len(run.train_set.pairs[r].chosen_ids) + len(run.train_set.pairs[r].rejected_ids) for r in rows
    )
    return {
        **stats,
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch": (step + 1) * cfg.train.batch_size / len(run.train_set),
        "time/step": seconds,
        "pairs_per_s": len(rows) / seconds,
        "completion_tokens": float(tokens),
    }


# ---------------------------------------------------------------- evaluation and checkpoints


@torch.no_grad()
def evaluate(run: OfflineRun, step: int) -> dict[str, float]:
    """Held-out loss, accuracy (margin > 0), mean margin and per-language accuracy; logged at `step`."""
    data, cfg = run.eval_set, run.cfg
    if data is None:
        return {}
    n = min(len(data), cfg.eval.max_pairs or len(data))
    rows = list(range(n))
    weights = row_weights(cfg.loss.name, data.pairs, rows, None)
    run.model.eval()
    loss_sum, margins = 0.0, []
    for part in micro_batches(n, cfg.eval.batch_size):
        micro = make_micro(data, rows[part], run.pad_id, cfg.model.device, run.ref, run.needs_ref)
        loss, _, part_margins = LOSSES[cfg.loss.name](run.train_model, cfg.loss, micro)
        loss_sum += float(loss) * sum(weights[part])
        margins.append(part_margins.float().cpu())
    run.model.train()
    margins_n = torch.cat(margins)  # (n,)
    correct = margins_n > 0
    result = {
        "eval/loss": loss_sum / sum(weights),
        "eval/accuracy": float(correct.float().mean()),
        "eval/margin": float(margins_n.mean()),
    }
    languages = [data.pairs[i].language for i in rows]
    for language in sorted({x for x in languages if x}):
        chosen = torch.tensor([x == language for x in languages])
        result[f"eval/accuracy/{language}"] = float(correct[chosen].float().mean())
    run.logger.log(step, result)
    return result


def _is_better(result: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = result["eval/accuracy"], best["eval/accuracy"]
    return a > b or (a == b and result["eval/loss"] < best["eval/loss"])


def maybe_checkpoint(run: OfflineRun, step: int) -> None:
    """Evaluate every eval.every steps and at the end; save every checkpoint_every steps, at the end, and
    whenever held-out accuracy improves (that checkpoint is marked best)."""
    cfg, last = run.cfg, step == run.total_steps
    is_best = False
    if run.eval_set is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or last):
        result = evaluate(run, step)
        if last:
            run.state["eval_final"] = {**result, "step": step}
        if _is_better(result, run.state.get("best_eval")):
            run.state["best_eval"], is_best = {**result, "step": step}, True
    if (cfg.output.checkpoint_every and step % cfg.output.checkpoint_every == 0) or last or is_best:
        save_run_checkpoint(run, step, is_best)


# ---------------------------------------------------------------- the loop


def train_loop(run: OfflineRun) -> None:
    """Steps from where the run stands (0, or the resumed step) to the total, checkpointing on the way."""
    t = run.cfg.train
    if run.start_step == 0 and run.eval_set is not None:
        run.state["eval_start"] = evaluate(run, step=0)
    for step in range(run.start_step, run.total_steps):
        set_lr(run.optimizer, lr_at(step, t.lr, t.warmup_steps, run.total_steps, t.schedule))
        metrics = train_step(run, step)
        run.logger.log(step + 1, metrics)
        run.progress.update(step + 1, metrics)
        run.state["step"] = step + 1
        maybe_checkpoint(run, step + 1)


def train_offline(cfg: OfflineRunConfig, resume: bool = False) -> dict:
    """Train on a fixed preference dataset; returns a summary (held-out results at start, best and end, data
    report, run directory, exported model)."""
    run = setup_offline_run(cfg, resume=resume)
    train_loop(run)
    summary = finish_offline_run(run)
    distributed.close_world(run.world)
    return summary
