"""Offline preference training: DPO, IPO, offline CoPG, SFT and Bradley-Terry reward models on fixed pairs.

One step is a loop of named phases (no generation), per micro-batch of this process's share of the batch:

    batch (rows of step s, a pure function of s) -> reference (cached log-probs, or a frozen model's forward)
          -> policy (chosen and rejected in one concatenated forward) -> loss (by name)
          -> update (backward, gradients accumulated over micro-batches, one guarded optimizer step)

Evaluation on held-out pairs reports the loss, the preference accuracy (fraction of pairs with a positive
margin, a tie counting half: at step 0 every DPO/IPO/CoPG margin is 0, accuracy 0.5; the implicit reward margin beta * (a_chosen - a_rejected), a = log pi/pi_ref, for DPO/IPO/CoPG; the
score margin for reward models; the log-likelihood margin for SFT) and the accuracy per language. The best
checkpoint is the one with the highest held-out accuracy. The loop is the shared skeleton of `train/loop.py`.
Run it: `polyalign train configs/offline/dpo.yaml [--loss.beta=0.1 ...] [--resume]`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from polyalign import losses
from polyalign.config_offline import LossConfig, OfflineRunConfig
from polyalign.data.chat import PreferenceBatch, collate_pairs
from polyalign.logprobs import completion_logprobs, pair_logprobs, pair_scores, reference_sequence_logprobs
from polyalign.train import distributed, loop
from polyalign.train.offline_data import PairSet, batch_indices, sft_sides
from polyalign.train.offline_run import OfflineRun, setup_offline_run, summary
from polyalign.train.optim import micro_batches

Ref = tuple[torch.Tensor, torch.Tensor] | None  # reference sequence log-probs of chosen and rejected (b,)
LossOut = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]  # loss, stats, margins (b,)

# ---------------------------------------------------------------- phases


def batch_phase(run: OfflineRun, data: PairSet, rows: list[int]) -> PreferenceBatch:
    """`rows` of `data` collated and on the device."""
    return collate_pairs([data.pairs[i] for i in rows], run.pad_id).to(run.cfg.model.device)


def reference_phase(run: OfflineRun, data: PairSet, rows: list[int], batch: PreferenceBatch) -> Ref:
    """Reference log-probs of the pairs: cached when precomputed, else a forward of the reference model;
    None when the loss needs no reference."""
    if not run.needs_ref:
        return None
    if data.ref_chosen is not None:
        index, device = torch.tensor(rows), run.cfg.model.device
        return data.ref_chosen[index].to(device), data.ref_rejected[index].to(device)
    if run.ref is None:
        raise RuntimeError(
            "the loss needs reference log-probs, but neither a cache nor a reference model exists"
        )
    return reference_sequence_logprobs(run.ref, batch)


def policy_phase(
    model: nn.Module, batch: PreferenceBatch, loss_name: str, use_rejected: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trained model's outputs for a batch, from one forward: per-token log-probs (b, T) of chosen and
    rejected; for reward models their scores (b,); for SFT training only the target side's log-probs (b, T)
    (the rejected completion where use_rejected)."""
    if loss_name == "reward_model":
        return pair_scores(model, batch)
    if loss_name == "sft" and use_rejected is not None:
        ids, mask = sft_target(batch, use_rejected)
        return completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, ids, mask), None
    return pair_logprobs(model, batch)


def sft_target(batch: PreferenceBatch, use_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    side = use_rejected[:, None]
    return (
        torch.where(side, batch.rejected_ids, batch.chosen_ids),
        torch.where(side, batch.rejected_mask, batch.chosen_mask),
    )


# ---------------------------------------------------------------- losses: policy outputs -> (loss, stats, margins)


def _margins(lc: LossConfig, chosen: torch.Tensor, rejected: torch.Tensor, ref: Ref) -> torch.Tensor:
    """The implicit reward margins beta * ((chosen - ref_chosen) - (rejected - ref_rejected)), (b,)."""
    return lc.beta * ((chosen - ref[0]) - (rejected - ref[1])).detach()


def dpo(lc: LossConfig, batch: PreferenceBatch, ref: Ref, chosen, rejected, use_rejected) -> LossOut:
    chosen, rejected = chosen.sum(-1), rejected.sum(-1)
    loss, stats = losses.dpo_loss(chosen, rejected, *ref, beta=lc.beta, label_smoothing=lc.label_smoothing)
    return loss, stats, _margins(lc, chosen, rejected, ref)


def ipo(lc: LossConfig, batch: PreferenceBatch, ref: Ref, chosen, rejected, use_rejected) -> LossOut:
    chosen_lengths, rejected_lengths = batch.chosen_mask.sum(-1).float(), batch.rejected_mask.sum(-1).float()
    chosen, rejected = chosen.sum(-1), rejected.sum(-1)
    loss, stats = losses.ipo_loss(
        chosen,
        rejected,
        *ref,
        beta=lc.beta,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        length_normalize=lc.length_normalize,
    )
    return loss, stats, _margins(lc, chosen, rejected, ref)


def copg(lc: LossConfig, batch: PreferenceBatch, ref: Ref, chosen, rejected, use_rejected) -> LossOut:
    """Offline CoPG: the pair (chosen, rejected) is (y, y') with their rewards (any scale, not a ranking)."""
    chosen, rejected = chosen.sum(-1), rejected.sum(-1)
    loss, stats = losses.copg_loss(
        chosen, rejected, *ref, batch.chosen_scores, batch.rejected_scores, beta=lc.beta, form=lc.copg_form
    )
    return loss, stats, _margins(lc, chosen, rejected, ref)


def sft(lc: LossConfig, batch: PreferenceBatch, ref: Ref, chosen, rejected, use_rejected) -> LossOut:
    """Training: NLL of the target side (`chosen` holds its log-probs). Evaluation (use_rejected None): NLL of
    chosen, margins = log pi(chosen) - log pi(rejected) (does the policy rank the pair like the data?)."""
    if use_rejected is None:
        loss, stats = losses.sft_loss(chosen, batch.chosen_mask)
        return loss, stats, (chosen.sum(-1) - rejected.sum(-1)).detach()
    loss, stats = losses.sft_loss(chosen, sft_target(batch, use_rejected)[1])
    return loss, stats, None


def reward_model(lc: LossConfig, batch: PreferenceBatch, ref: Ref, chosen, rejected, use_rejected) -> LossOut:
    """Bradley-Terry on the scores of (prompt + chosen, prompt + rejected); margins = score differences."""
    loss, stats = losses.bradley_terry_loss(chosen, rejected)
    return loss, stats, (chosen - rejected).detach()


LOSSES = {"dpo": dpo, "ipo": ipo, "copg": copg, "sft": sft, "reward_model": reward_model}


def row_weights(
    loss_name: str, pairs: list, rows: list[int], use_rejected: torch.Tensor | None
) -> list[float]:
    """How much each row counts in a mean loss: 1 per pair; for SFT (a token mean) its target's tokens."""
    if loss_name != "sft":
        return [1.0] * len(rows)
    flags = use_rejected.tolist() if use_rejected is not None else [False] * len(rows)
    return [float(len(pairs[r].rejected_ids if f else pairs[r].chosen_ids)) for r, f in zip(rows, flags)]


# ---------------------------------------------------------------- the step


def update_phase(
    run: OfflineRun, rows: list[int], weights: list[float], total: float, use_rejected: torch.Tensor
) -> dict[str, float]:
    """One optimizer step on this process's `rows`, gradients accumulated over micro-batches and weighted
    (`row_weights` / the whole batch's `total`) so that, averaged over processes, they are the batch mean."""
    cfg = run.cfg
    loss_fn, stats = LOSSES[cfg.loss.name], {}
    run.model.train()
    parts = micro_batches(len(rows), cfg.train.micro_batch_size or len(rows))
    for i, part in enumerate(parts):
        batch = batch_phase(run, run.train_set, rows[part])
        ref = reference_phase(run, run.train_set, rows[part], batch)
        side = use_rejected[part].to(cfg.model.device)
        with distributed.accumulating(run.train_model, last=i == len(parts) - 1):
            outputs = policy_phase(run.train_model, batch, cfg.loss.name, side)
            loss, loss_stats, _ = loss_fn(cfg.loss, batch, ref, *outputs, side)
            weight = sum(weights[part]) / total * run.world.size  # processes average their gradients
            (loss * weight).backward()
        loop.accumulate(stats, {"loss": loss, **loss_stats}, weight)
    loop.optimizer_step(run, run.model.parameters(), stats)
    return stats


def train_step(run: OfflineRun, step: int) -> dict[str, float]:
    cfg, world = run.cfg, run.world
    t0 = time.perf_counter()
    rows = batch_indices(len(run.train_set), step, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    use_rejected = sft_sides(step, len(rows), cfg.train.seed, cfg.loss.sft_target == "random")
    weights = row_weights(cfg.loss.name, run.train_set.pairs, rows, use_rejected)
    share = distributed.shard(len(rows), world, "train.batch_size")  # this process's rows
    stats = update_phase(run, rows[share], weights[share], sum(weights), use_rejected[share])
    stats = distributed.mean_metrics({**stats, "pairs_per_process": len(rows[share])}, world)
    seconds = time.perf_counter() - t0
    pairs = run.train_set.pairs
    tokens = sum(len(pairs[r].chosen_ids) + len(pairs[r].rejected_ids) for r in rows)
    return {
        **stats,
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch": (step + 1) * cfg.train.batch_size / len(run.train_set),
        "time/step": seconds,
        "pairs_per_s": len(rows) / seconds,
        "completion_tokens": float(tokens),
    }


# ---------------------------------------------------------------- evaluation: the loop's hooks


@torch.no_grad()
def evaluate(run: OfflineRun, step: int) -> dict[str, float]:
    """Held-out loss, accuracy (margin > 0; a tie counts half), mean margin and per-language accuracy; logged at `step`."""
    data, cfg = run.eval_set, run.cfg
    if data is None:
        return {}
    n = min(len(data), cfg.eval.max_pairs or len(data))
    rows = list(range(n))
    weights = row_weights(cfg.loss.name, data.pairs, rows, None)
    run.model.eval()
    loss_sum, margins = 0.0, []
    for part in micro_batches(n, cfg.eval.batch_size):
        batch = batch_phase(run, data, rows[part])
        ref = reference_phase(run, data, rows[part], batch)
        outputs = policy_phase(run.train_model, batch, cfg.loss.name, None)
        loss, _, part_margins = LOSSES[cfg.loss.name](cfg.loss, batch, ref, *outputs, None)
        loss_sum += float(loss) * sum(weights[part])
        margins.append(part_margins.float().cpu())
    run.model.train()
    margins_n = torch.cat(margins)  # (n,)
    correct = (margins_n > 0).float() + 0.5 * (margins_n == 0).float()  # a tie (step 0: all) is a coin flip
    result = {
        "eval/loss": loss_sum / sum(weights),
        "eval/accuracy": float(correct.mean()),
        "eval/margin": float(margins_n.mean()),
    }
    languages = [data.pairs[i].language for i in rows]
    for language in sorted({x for x in languages if x}):
        chosen = torch.tensor([x == language for x in languages])
        result[f"eval/accuracy/{language}"] = float(correct[chosen].mean())
    run.logger.log(step, result)
    return result


def is_better(result: dict, best: dict | None) -> bool:
    """Higher held-out accuracy; on a tie, lower held-out loss."""
    if best is None:
        return True
    a, b = result["eval/accuracy"], best["eval/accuracy"]
    return a > b or (a == b and result["eval/loss"] < best["eval/loss"])


TRAINER = loop.Trainer(step=train_step, evaluate=evaluate, is_better=is_better, summary=summary)


def train_loop(run: OfflineRun) -> None:
    """The shared loop with the offline step, from where `run` stands to its total steps."""
    loop.train_loop(run, TRAINER)


def train_offline(cfg: OfflineRunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train on a fixed preference dataset; returns a summary (held-out results at start, best and end, data
    report, run directory, exported model and its step). `resume` / `overwrite` as in `train_online`."""
    return loop.train(setup_offline_run(cfg, resume, overwrite), TRAINER)
