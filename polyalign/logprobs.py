"""Model -> tensors: per-token log-probs, entropies and values of completions given prompts, and the
concatenated chosen + rejected forward of a preference pair batch (log-probs, or a reward model's scores).

The only place that runs a model forward for training (policy, reference, value and reward model). It knows
token ids and masks, not losses, rewards or text.

Layout handled here: prompts padded on the LEFT or the RIGHT (any 0/1 mask), completions padded on the
RIGHT. Each row's real prompt and completion tokens are packed to the right end of one left-padded block as
wide as the longest row (no compute on padding between a short prompt and the completion). Positions are
`cumsum(attention_mask) - 1`, so padding never shifts a token's position. Only the hidden states that
predict real completion tokens go through the output head, and the log-softmax is "selective": a logsumexp
over the vocabulary and a gather of one entry (with a hand-written backward), chunked, so the full
(B, T, V) log-softmax is never materialised.

Shapes: prompt_ids/prompt_mask (B, Tp), completion_ids/completion_mask (B, T), outputs (B, T) or (B,).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from polyalign.data.chat import PreferenceBatch

# Sequences' worth of completion tokens sent through the output head at once (HEAD_CHUNK_ROWS * T tokens);
# bounds the logits held in memory.
HEAD_CHUNK_ROWS = 8


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TrainForward(nn.Module):
    """One module whose forward runs any model->tensors function of this file on `model`.

    Distributed wrappers (DDP, FSDP2's `fully_shard`) act in a module's forward; our forwards call the
    backbone and the output head separately. Wrapping `TrainForward(model)` and calling
    `wrapper(fn, *args)` puts the whole computation inside one forward the wrapper sees. The functions
    below do this by themselves when handed such a wrapper (`routed`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def inner_model(model: nn.Module) -> nn.Module:
    """The model inside a TrainForward (bare or inside DDP), else the model itself."""
    inner = getattr(model, "module", model)
    return inner.model if isinstance(inner, TrainForward) else model


def routed(fn):
    """Decorator: `fn(model, ...)` called with a TrainForward (bare or inside DDP) runs through its forward."""

    @functools.wraps(fn)
    def call(model: nn.Module, *args, **kwargs):
        if isinstance(getattr(model, "module", model), TrainForward):
            return model(fn, *args, **kwargs)
        return fn(model, *args, **kwargs)

    return call


def _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask) -> None:
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"ids and masks must match: prompt_ids {tuple(prompt_ids.shape)} vs prompt_mask "
            f"{tuple(prompt_mask.shape)}, completion_ids {tuple(completion_ids.shape)} vs completion_mask "
            f"{tuple(completion_mask.shape)}"
        )
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"expected 2-D prompt and completion tensors with the same batch size, got prompt "
            f"{tuple(prompt_ids.shape)} and completion {tuple(completion_ids.shape)}"
        )


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens (mask 1) to the right end, keeping their order: left padding."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # zeros first, ones keep their order
    return ids.gather(1, order), mask.gather(1, order)


def _completion_hidden(
    backbone: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Hidden states (B, T, H) at the positions that predict each completion token.

    Each row's real tokens (prompt, then completion but its last token) are packed to the right end of one
    left-padded block whose width is the longest row, not the longest prompt plus the longest completion,
    so no position is computed for padding between a short prompt or completion and the next row's width.
    Rows in the padding of completion_mask read an arbitrary real position (callers mask them).
    """
    _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    prompt_lengths = prompt_mask.sum(1)  # (B,)
    if bool((prompt_lengths == 0).any()):
        raise ValueError("every row needs at least one real prompt token (prompt_mask row of all zeros)")
    num_tokens = completion_ids.shape[1]
    # The last completion token predicts nothing we score, so it is not fed in.
    ids, mask = left_align(
        torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1),
        torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).long(),
    )
    lengths = mask.sum(1)  # (B,) real tokens fed per row
    width = int(lengths.max())
    ids, mask = ids[:, -width:], mask[:, -width:]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    # Completion token j of row i is predicted at column width - lengths_i + prompt_lengths_i - 1 + j.
    first = width - lengths + prompt_lengths - 1  # (B,)
    columns = (first[:, None] + torch.arange(num_tokens, device=ids.device)).clamp(max=width - 1)  # (B, T)
    hidden = out.last_hidden_state
    return hidden.gather(1, columns[:, :, None].expand(-1, -1, hidden.shape[-1]))


def logits_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states (..., H) -> float32 logits (..., V) exactly as the model's ForCausalLM forward gives them:
    the output head, then the map some families apply after it (gemma2/gemma3: c tanh(logits / c) with
    c = config.final_logit_softcapping; cohere: logits * config.logit_scale). Rollouts and training share it."""
    head, config = model.get_output_embeddings(), model.config.get_text_config()
    cap, scale = getattr(config, "final_logit_softcapping", None), getattr(config, "logit_scale", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden).float()
        out = out if cap is None else torch.tanh(out / cap) * cap
        return out if scale is None else out * scale

    return logits


def _head_chunks(head, hidden: torch.Tensor, temperature: float, chunk: int):
    """Yield (row slice, float32 logits / temperature), `chunk` rows of `hidden` at a time."""
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = head(hidden[rows])
        yield rows, (logits / temperature if temperature != 1.0 else logits)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """y = l[i] - logsumexp(l) with a hand-written backward: dy/dl = onehot(i) - softmax(l).

    The forward computes e = exp(l - max l) for the log-sum-exp anyway, so when a gradient is needed it keeps
    the softmax p = e / sum(e) (instead of the logits); the backward is then -g * p plus g at index i. That is
    about half the passes over the (rows, T, V) logits that autograd's logsumexp + gather backward makes.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        top = logits.amax(-1, keepdim=True)
        exp = (logits - top).exp_()
        total = exp.sum(-1, keepdim=True)
        log_norm = (top + total.log()).squeeze(-1)
        out = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - log_norm
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(exp.div_(total), index)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, index = ctx.saved_tensors
        grad_logits = probs * -grad.unsqueeze(-1)
        grad_logits.scatter_add_(-1, index.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full log-softmax: gather - logsumexp.

    Same value as `torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`; differentiable in
    `logits` (a custom backward that touches the (..., V) tensor about half as often as autograd would).
    """
    if logits.is_inference():  # inference tensors cannot be saved for backward; none is needed
        return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return _SelectiveLogSoftmax.apply(logits, index)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to compute log-probs, got {temperature}")


@routed
def completion_logprobs_and_entropy(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, T) and, if asked, entropies (B, T) of softmax(logits / temperature).

    Both are 0 where completion_mask == 0. Works for any causal LM whose `base_model` returns
    `last_hidden_state` and whose `get_output_embeddings()` is the LM head (all HF decoder models); the
    logits are the ForCausalLM forward's (`logits_head`).
    """
    _check_temperature(temperature)
    model = unwrap_peft(model)
    batch, num_tokens = completion_ids.shape
    if num_tokens == 0:
        empty = completion_ids.new_zeros((batch, 0), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    hidden = _completion_hidden(model.base_model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    head = logits_head(model)
    mask = completion_mask.bool()
    # Only real completion tokens go through the head: (N, H) with N = mask.sum() <= B * T.
    hidden_n, ids_n = hidden[mask], completion_ids[mask]
    logprobs, entropies = [], []
    for rows, logits in _head_chunks(head, hidden_n, temperature, HEAD_CHUNK_ROWS * num_tokens):
        logprobs.append(selective_log_softmax(logits, ids_n[rows]))
        if with_entropy:
            entropies.append(_entropy(logits))
    zeros = hidden.new_zeros((batch, num_tokens), dtype=torch.float32)
    logprobs_bt = (
        zeros.masked_scatter(mask, torch.cat(logprobs)) if logprobs else zeros
    )  # (B, T), 0 on padding
    entropy_bt = None
    if with_entropy:
        entropy_bt = zeros.masked_scatter(mask, torch.cat(entropies)) if entropies else zeros
    return logprobs_bt, entropy_bt


def completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log pi(completion_t | prompt, completion_<t) under logits / temperature; (B, T), 0 on padding."""
    logprobs, _ = completion_logprobs_and_entropy(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, with_entropy=False
    )
    return logprobs


def sequence_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(completion | prompt) = sum of the per-token log-probs over the completion; (B,)."""
    return completion_logprobs(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature
    ).sum(-1)


@routed
def value_forward(
    value_model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token values (B, T), 0 on padding: V(state before completion token t).

    The value model is any one-output scorer with a `score` head on top of `base_model`
    (`models.load_score_model`: a transformers sequence or token classifier, or a `ScoreModel`; e.g. a reward
    model, the usual PPO initialisation). The head is applied at every position here, so each gives
    token-level values; values[:, t] is read at the same position whose logits give the log-prob of
    completion token t, which is what GAE pairs with reward t.
    """
    model = unwrap_peft(value_model)
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(
            f"value model {type(model).__name__} has no `score` head; load it with "
            "polyalign.models.load_score_model"
        )
    if completion_ids.shape[1] == 0:
        return completion_ids.new_zeros((completion_ids.shape[0], 0), dtype=torch.float32)
    hidden = _completion_hidden(model.base_model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    values = head(hidden)
    if values.shape[-1] != 1:
        raise ValueError(f"value model head must output 1 number per token, got {values.shape[-1]}")
    return values.squeeze(-1).float().masked_fill(~completion_mask.bool(), 0.0)


# ---------------------------------------------------------------- preference pairs: one forward of 2B rows


def _pair_rows(b: PreferenceBatch) -> tuple[torch.Tensor, ...]:
    """[chosen; rejected] as 2B rows with the prompt repeated: prompt_ids, prompt_mask, ids, mask."""
    return (
        torch.cat([b.prompt_ids, b.prompt_ids]),
        torch.cat([b.prompt_mask, b.prompt_mask]),
        torch.cat([b.chosen_ids, b.rejected_ids]),
        torch.cat([b.chosen_mask, b.rejected_mask]),
    )


def pair_logprobs(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of chosen and rejected, each (B, T) (0 on padding), from ONE forward of 2B rows."""
    logprobs = completion_logprobs(model, *_pair_rows(batch))  # (2B, T)
    return logprobs[: len(batch.language)], logprobs[len(batch.language) :]


@torch.no_grad()
def reference_sequence_logprobs(ref: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(chosen), log pi_ref(rejected), each (B,), in eval mode and without gradients."""
    was_training = ref.training
    ref.eval()
    chosen, rejected = pair_logprobs(ref, batch)
    ref.train(was_training)
    return chosen.sum(-1), rejected.sum(-1)


def join_right_padded(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion as one RIGHT-padded sequence (B, Tp + T), padding filled with `pad_id`."""
    full_ids, full_mask = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1).long()
    order = torch.argsort(1 - full_mask, dim=1, stable=True)  # real tokens first, in order
    full_ids, full_mask = full_ids.gather(1, order), full_mask.gather(1, order)
    return full_ids.masked_fill(full_mask == 0, pad_id), full_mask


@routed
def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) float scores of a one-output scorer (`models.load_score_model`); differentiable.

    Shapes: input_ids, attention_mask (B, L), left or right padded. A transformers classifier reads the last
    token that is not `config.pad_token_id` (which must be the tokenizer's pad id); a `ScoreModel` the last
    token with attention_mask 1.
    """
    if getattr(inner_model(model).config, "pad_token_id", None) is None:
        raise ValueError("reward model config has no pad_token_id: set it to the tokenizer's pad token id")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
    if logits.shape != (input_ids.shape[0], 1):
        raise ValueError(f"reward model must output logits of shape (B, 1), got {tuple(logits.shape)}")
    return logits[:, 0].float()


def pair_scores(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores (B,) of prompt + chosen and prompt + rejected, from one forward of 2B rows. The
    classifier reads the last real token (EOS when the completion was not truncated)."""
    pad_id = inner_model(model).config.pad_token_id or 0  # sequence_scores names a missing one
    scores = sequence_scores(model, *join_right_padded(*_pair_rows(batch), pad_id))  # (2B,)
    return scores[: len(batch.language)], scores[len(batch.language) :]


def truncate_at_eos(
    completion_ids: torch.Tensor, eos_id: int | list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row after its first EOS: (ids with pad after the EOS, mask (B, T) that includes the EOS).

    `eos_id` may be one id or a list (models with several end tokens). Rows without EOS keep every token.
    """
    eos = torch.as_tensor(eos_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos).long()  # (B, T)
    # Tokens strictly after the first EOS have a positive count of EOS before them.
    eos_before = is_eos.cumsum(1) - is_eos
    mask = (eos_before == 0).long()
    return completion_ids.masked_fill(mask == 0, pad_id), mask
