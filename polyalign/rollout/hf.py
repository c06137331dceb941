"""HFEngine: our own KV-cache decode loop over a transformers causal LM (no `model.generate()`).

Why not `generate()`: its per-step logits processors, stopping criteria and `torch.multinomial` cost time,
and it does not return the sampled tokens' log-probs, so trainers would need an extra forward. Here each
prompt is tokenized once, left padded, prefilled once, its KV cache repeated n times, then decoded one token
per step with exact inverse-CDF sampling from a seeded `torch.Generator` (one random number per row and
step). The families in `fast_families.FAMILIES` run on `fast_decode` (same logits as the HF forward, a
static KV cache, far fewer Python-level ops per token); others, or `fast_decode=False`, on the HF forward
(backbone + `logprobs.logits_head`, so the family's map after the head is applied on both paths).
The engine shares the training model, so `load_weights` has nothing to copy.

Sampling details (all documented in `Sampling`):
- temperature 0 is greedy; recorded log-probs then use temperature 1.
- top_k / top_p restrict which tokens can be sampled; the recorded log-probs are of the full (unrestricted)
  softmax(logits / temperature), the same quantity `completion_logprobs` recomputes.
- a row stops at its first EOS (kept in the mask) or when the decoded text of its last tokens contains a stop
  string (the mask ends at the token that completed it, the text is cut before the stop string).

Shapes: P prompts, G = n completions each, B = P * G rows, Tp prompt tokens, T completion tokens, V vocab.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import DynamicCache

from polyalign.logprobs import logits_head, selective_log_softmax, unwrap_peft
from polyalign.rollout import fast_decode, static_decode
from polyalign.types import Rollout, Sampling

_FastRunner = fast_decode.FastDecoder  # the `_CachedRunner` interface over a static cache, exact maths


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf; (B, V) -> (B, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keeps >= 1 token).
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return (tokens (B,), their log-probs (B,) under logits / temperature).

    Inverse-CDF sampling: with e_v = exp(l_v - max l) over the allowed tokens and C_v = e_1 + ... + e_v, the
    token is the first v with C_v > u * C_V, u ~ U[0, 1): an exact sample of the softmax (up to float32
    rounding of the running sum, as in `torch.multinomial`), with one random number per row instead of one
    per vocabulary entry (Gumbel-max) and a cumulative sum instead of two logs and an argmax over the
    vocabulary. A token of zero probability is never drawn. `uniform` (B,) supplies u; otherwise it is
    drawn from `generator`.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, selective_log_softmax(logits, tokens)
    scaled = logits / sampling.temperature if sampling.temperature != 1 else logits
    filtered = filter_top_k_top_p(scaled, sampling.top_k, sampling.top_p)
    if uniform is None:
        uniform = torch.rand(filtered.shape[0], generator=generator, device=filtered.device)
    top = scaled.amax(-1, keepdim=True)  # (B, 1); the filtered maximum is the same token
    cdf = torch.exp(filtered - top).cumsum_(-1)  # (B, V)
    total = cdf[:, -1:]
    tokens = torch.searchsorted(cdf, uniform[:, None] * total, right=True).squeeze(-1)
    tokens = tokens.clamp_(max=logits.shape[-1] - 1)  # u * C_V < C_V already; guards rounding only
    if filtered is scaled:  # log-sum-exp of the full softmax is already at hand
        log_norm = top.squeeze(-1) + total.squeeze(-1).log()
    else:
        log_norm = torch.logsumexp(scaled, dim=-1)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


def _check_sampling(prompts: list[str], n: int, sampling: Sampling, extras: dict | None) -> None:
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an int >= 1, got {n!r}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if sampling.temperature < 0:
        raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {sampling.top_k}")
    if any(not s for s in sampling.stop_strings):
        raise ValueError("sampling.stop_strings must not contain empty strings")
    for column, values in (extras or {}).items():
        if len(values) != len(prompts):
            raise ValueError(f"extras[{column!r}] has {len(values)} values for {len(prompts)} prompts")


class HFEngine:
    """Rollout engine over a transformers causal LM that is shared with the trainer.

    Args:
        model: the policy (a transformers causal LM, optionally PEFT-wrapped).
        tokenizer: its tokenizer; prompts are encoded with its special tokens (e.g. BOS).
        prefill_once: prefill each distinct prompt once and repeat its KV cache n times (default);
            False prefills the n-times repeated batch.
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to each prompt; set False
            when prompts are already rendered with them (a chat template that writes BOS itself).
        fast_decode: decode the families `fast_decode` covers with it (same logits, several times less
            per-token overhead) and others with the HF forward; False forces the HF
            forward. None (default) reads the environment variable POLYALIGN_FAST_DECODE ("0" = off).
        static_decode: fast path, no stop strings: decode with fixed shapes (`static_decode`), as a CUDA graph
            on CUDA. None (default): POLYALIGN_STATIC_DECODE ("1" / "0") if set, else on for CUDA only.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        prefill_once: bool = True,
        add_special_tokens: bool = True,
        fast_decode: bool | None = None,
        static_decode: bool | None = None,
    ) -> None:
        self.model = model
        if static_decode is None:
            static_decode = {"1": True, "0": False}.get(os.environ.get("POLYALIGN_STATIC_DECODE", ""))
        self.static_decode = static_decode
        if fast_decode is None:
            fast_decode = os.environ.get("POLYALIGN_FAST_DECODE", "1") != "0"
        self.fast_decode = fast_decode
        self.tokenizer = tokenizer
        self.prefill_once = prefill_once
        self.add_special_tokens = add_special_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "tokenizer needs a pad or eos token (load it with polyalign.models.load_tokenizer)"
            )
        self.pad_id: int = pad
        self.eos_ids: list[int] = _eos_ids(model, tokenizer)

    def load_weights(self, model: nn.Module) -> None:
        """The engine runs the training model itself, so there is nothing to copy; just track the module."""
        self.model = model

    def _encode(self, prompts: list[str], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask (P, Tp), with context-length checks."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
        config = unwrap_peft(self.model).config
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} encodes to zero tokens")
            if limit is not None and len(ids) > limit - max_new_tokens:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; the model's context is {limit} tokens, so with "
                    f"max_new_tokens={max_new_tokens} a prompt may have at most {limit - max_new_tokens}"
                )
        width = max(len(ids) for ids in encoded)
        prompt_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            prompt_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            prompt_mask[i, width - len(ids) :] = 1
        return prompt_ids, prompt_mask

    def generate(self, prompts: list[str], n: int, sampling: Sampling, extras: dict | None = None) -> Rollout:
        """Sample n completions per prompt, group-major; see the module docstring for the details."""
        _check_sampling(prompts, n, sampling, extras)
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in self._encode(prompts, sampling.max_new_tokens))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                outputs = self._decode(prompt_ids, prompt_mask, n, sampling)
        finally:
            self.model.train(was_training)
        # Clones made outside inference mode are ordinary tensors that autograd may save for backward.
        ids, mask, logprobs, finished, stopped = (t.clone() for t in outputs)
        return Rollout(
            prompts=list(prompts),
            completions=self._texts(ids, mask, stopped, sampling.stop_strings),
            group_size=n,
            prompt_ids=prompt_ids.repeat_interleave(n, 0),
            prompt_mask=prompt_mask.repeat_interleave(n, 0),
            completion_ids=ids,
            completion_mask=mask,
            logprobs=logprobs,
            finished=finished,
            extras={k: [v for v in values for _ in range(n)] for k, values in (extras or {}).items()},
        )

    def _decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, sampling: Sampling):
        """Returns completion ids, mask, log-probs (B, T), finished and stopped flags (B,).

        Random numbers are drawn for all B rows every step and indexed by row, so a row's completion depends
        on the seed and its own prompt only, never on when other rows finished. A batch split across
        processes draws the whole batch's numbers (`sampling.total_rows`) and uses its rows' share
        (from `sampling.row_offset`), so the split does not change any completion.
        """
        device = prompt_ids.device
        generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
        rows, width, steps = prompt_ids.shape[0] * n, prompt_ids.shape[1], sampling.max_new_tokens
        offset, total = sampling.row_offset, sampling.total_rows or rows
        if offset < 0 or offset + rows > total:
            raise ValueError(f"sampling: rows {offset}..{offset + rows} do not fit in total_rows={total}")

        def draw() -> torch.Tensor | None:  # this step's uniforms (B,); None when greedy
            if sampling.temperature == 0:
                return None
            return torch.rand(total, generator=generator, device=device)[offset : offset + rows]

        runner = self._runner(rows, width + steps)
        logits = _prefill(runner, prompt_ids, prompt_mask, n, repeat_cache=self.prefill_once)  # (B, V)
        prompt_mask = prompt_mask.repeat_interleave(n, 0)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        static = device.type == "cuda" if self.static_decode is None else self.static_decode
        if static and isinstance(runner, _FastRunner) and not sampling.stop_strings:
            sample = lambda x, u: sample_tokens(x, sampling, uniform=u)  # noqa: E731
            out = static_decode.decode_static(
                runner, logits, prompt_mask, steps, sample, draw, eos, self.pad_id, device.type == "cuda"
            )
            return self._trim(*out, torch.zeros(rows, dtype=torch.bool, device=device))
        return self._decode_dynamic(runner, logits, prompt_mask, sampling, draw, eos)

    def _decode_dynamic(self, runner, logits, prompt_mask, sampling: Sampling, draw, eos: torch.Tensor):
        """The decode loop over the live rows: rows that finish are dropped from the KV cache and the batch,
        so later steps cost only the live rows."""
        device, (rows, width), steps = logits.device, prompt_mask.shape, sampling.max_new_tokens
        ids = torch.full((rows, steps), self.pad_id, dtype=torch.long, device=device)  # (B, T)
        logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)  # (B, T)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)  # (B,)
        finished, stopped = torch.zeros((2, rows), dtype=torch.bool, device=device)  # stopped: by a string
        live = torch.arange(rows, device=device)  # (L,) rows still in the cache, in cache order
        attention = torch.cat([prompt_mask, prompt_mask.new_ones((rows, steps))], 1)
        next_position = prompt_mask.sum(1)[:, None]  # (L, 1)
        stop_checker = _StopChecker(self.tokenizer, sampling.stop_strings) if sampling.stop_strings else None
        for step in range(steps):
            uniform = draw()
            uniform = uniform if uniform is None or len(live) == rows else uniform[live]
            tokens, token_logprobs = sample_tokens(logits, sampling, uniform=uniform)  # (L,), (L,)
            ids[live, step], logprobs[live, step] = tokens, token_logprobs
            lengths[live] += 1
            ended = torch.isin(tokens, eos)  # (L,)
            if stop_checker is not None:
                hit = stop_checker.check(ids[live, : step + 1]) & ~ended
                stopped[live[hit]] = True
                ended |= hit
            finished[live[ended]] = True
            if step == steps - 1 or bool(ended.all()):
                break
            if bool(ended.any()):
                keep = (~ended).nonzero().flatten()
                runner.select(keep)
                live, tokens, attention, next_position = (
                    t[keep] for t in (live, tokens, attention, next_position)
                )
            logits = runner(tokens[:, None], attention[:, : width + step + 1], next_position + step)
        return self._trim(ids, logprobs, lengths, finished, stopped)

    def _runner(self, rows: int, max_len: int):
        """The fast path when `fast_decode` is on and the model supports it, else the HF forward."""
        model = unwrap_peft(self.model)
        if self.fast_decode and fast_decode.unsupported_reason(model, max_len) is None:
            return _FastRunner(model, rows, max_len)
        return _CachedRunner(model)

    def _trim(self, ids, logprobs, lengths, finished, stopped):
        width = int(lengths.max())
        mask = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).long()  # (B, T)
        return ids[:, :width], mask, logprobs[:, :width], finished, stopped

    def _texts(self, ids: torch.Tensor, mask: torch.Tensor, stopped: torch.Tensor, stops) -> list[str]:
        rows = [row[:length] for row, length in zip(ids.tolist(), mask.sum(1).tolist())]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [_cut_at_stop(t, stops) if s else t for t, s in zip(texts, stopped.tolist())]


class _CachedRunner:
    """Runs a causal LM's backbone with a KV cache and its logits head (`logits_head`) on the last position."""

    def __init__(self, model: nn.Module) -> None:
        self.backbone = model.base_model
        self.head = logits_head(model)
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self.cache = DynamicCache(config=model.config)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed new tokens (rows, t) given the mask over all tokens so far; return next-token logits (rows, V)."""
        out = self.backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        return self.head(out.last_hidden_state[:, -1])

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)

    def repeat(self, n: int, width: int) -> None:
        self.cache.batch_repeat_interleave(n)


def _prefill(runner, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, repeat_cache: bool):
    """Fill the runner's cache with the prompts; return first-token logits (B, V), rows group-major."""
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    if repeat_cache and n > 1:
        logits = runner(prompt_ids, prompt_mask, positions)
        runner.repeat(n, prompt_ids.shape[1])
        return logits.repeat_interleave(n, 0)
    return runner(*(t.repeat_interleave(n, 0) for t in (prompt_ids, prompt_mask, positions)))


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


class _StopChecker:
    """Finds rows whose latest tokens complete a stop string.

    Only the last `window` tokens of each unfinished row are decoded each step: enough to hold the longest
    stop string (a token is at least one UTF-8 byte) plus a margin so the window's first token, which
    decodes without its context, cannot be part of a match.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = max(len(s.encode()) for s in stops) + 8

    def check(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (L, t) of live rows (no padding: a live row has a token at every step) -> hit flags (L,)."""
        texts = self.tokenizer.batch_decode(ids[:, -self.window :].tolist(), skip_special_tokens=True)
        hits = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=ids.device)
