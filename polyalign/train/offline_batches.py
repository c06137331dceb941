"""Tokenized pairs -> tensors for the offline trainer: collation, the concatenated chosen + rejected forward
of a policy (log-probs) or a reward model (scores), and reference log-probs (cached once, or on the fly).

One forward per pair batch: `collate_pairs` pads chosen and rejected to one width T, so the prompt block is
repeated and [chosen; rejected] run as 2B rows (`pair_logprobs`, `pair_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polyalign.data.chat import PreferenceBatch, collate_pairs
from polyalign.logprobs import completion_logprobs, inner_model
from polyalign.rewards.model import sequence_scores
from polyalign.train.loop import micro_batches
from polyalign.train.offline_data import PairSet


@dataclass(frozen=True)
class Micro:
    """What one loss call sees: a collated batch of pairs and their reference log-probs."""

    batch: PreferenceBatch
    ref_chosen: torch.Tensor | None  # (b,) reference sequence log-probs, None when the loss needs none
    ref_rejected: torch.Tensor | None  # (b,)
    use_rejected: torch.Tensor | None  # (b,) bool, SFT training only: train on the rejected side; None = eval


def pair_logprobs(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of chosen and rejected, each (B, T) (0 on padding), from ONE forward of 2B rows."""
    b = batch
    logprobs = completion_logprobs(
        model,
        torch.cat([b.prompt_ids, b.prompt_ids]),
        torch.cat([b.prompt_mask, b.prompt_mask]),
        torch.cat([b.chosen_ids, b.rejected_ids]),
        torch.cat([b.chosen_mask, b.rejected_mask]),
    )  # (2B, T)
    return logprobs[: len(b.language)], logprobs[len(b.language) :]


def join_right_padded(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion as one RIGHT-padded sequence (B, Tp + T), padding filled with `pad_id`."""
    full_ids, full_mask = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1).long()
    order = torch.argsort(1 - full_mask, dim=1, stable=True)  # real tokens first, in order
    full_ids, full_mask = full_ids.gather(1, order), full_mask.gather(1, order)
    return full_ids.masked_fill(full_mask == 0, pad_id), full_mask


def pair_scores(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores (B,) of prompt + chosen and prompt + rejected, from one forward of 2B rows. The
    classifier reads the last real token (EOS when the completion was not truncated)."""
    b, pad_id = batch, inner_model(model).config.pad_token_id
    ids, mask = join_right_padded(
        torch.cat([b.prompt_ids, b.prompt_ids]),
        torch.cat([b.prompt_mask, b.prompt_mask]),
        torch.cat([b.chosen_ids, b.rejected_ids]),
        torch.cat([b.chosen_mask, b.rejected_mask]),
        pad_id,
    )
    scores = sequence_scores(model, ids, mask)  # (2B,)
    return scores[: len(b.language)], scores[len(b.language) :]


@torch.no_grad()
def reference_sequence_logprobs(ref: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(chosen), log pi_ref(rejected), each (B,), without gradients."""
    was_training = ref.training
    ref.eval()
    chosen, rejected = pair_logprobs(ref, batch)
    ref.train(was_training)
    return chosen.sum(-1), rejected.sum(-1)


def precompute_reference(ref: nn.Module, data: PairSet, pad_id: int, batch_size: int, device: str) -> None:
    """Fill data.ref_chosen / data.ref_rejected (N,) with the reference log-probs of every pair, batching
    consecutive rows (evaluation batches the same way, so at step 0 the policy's margins are exactly 0)."""
    chosen, rejected = [], []
    for part in micro_batches(len(data), batch_size):
        batch = collate_pairs(data.pairs[part], pad_id).to(device)
        c, r = reference_sequence_logprobs(ref, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    data.ref_chosen, data.ref_rejected = torch.cat(chosen), torch.cat(rejected)


def make_micro(
    data: PairSet,
    rows: list[int],
    pad_id: int,
    device: str,
    ref: nn.Module | None,
    needs_ref: bool,
    use_rejected: torch.Tensor | None = None,
) -> Micro:
    """Collate `rows` of `data` and attach their reference log-probs: cached when precomputed, else from a
    forward of `ref`; none when the loss needs no reference."""
    batch = collate_pairs([data.pairs[i] for i in rows], pad_id).to(device)
    ref_chosen = ref_rejected = None
    if needs_ref and data.ref_chosen is not None:
        index = torch.tensor(rows)
        ref_chosen, ref_rejected = data.ref_chosen[index].to(device), data.ref_rejected[index].to(device)
    elif needs_ref:
        if ref is None:
            raise RuntimeError(
                "the loss needs reference log-probs, but neither a cache nor a reference model exists"
            )
        ref_chosen, ref_rejected = reference_sequence_logprobs(ref, batch)
    return Micro(batch, ref_chosen, ref_rejected, None if use_rejected is None else use_rejected.to(device))
