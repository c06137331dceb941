"""vLLM requests and outputs <-> polyalign's rollout tensors: pure functions that never import vllm.

`VLLMEngine` (recipes/vllm/engine.py) builds one request per row with `row_seeds` and `request_options`, and turns
vLLM's RequestOutputs back into HFEngine's layout with `collect_outputs`. Kept apart so that they are tested
on any machine, with plain objects standing in for vLLM's outputs.

Shapes: B rows, T completion tokens.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from polyalign.types import Sampling


def row_seeds(seed: int | None, row_offset: int, rows: int) -> list[int | None]:
    """One request seed per row, a function of (seed, row_offset + row) only; all None without a seed."""
    if seed is None:
        return [None] * rows
    keys = (f"{seed}:{row_offset + i}".encode() for i in range(rows))
    return [int.from_bytes(hashlib.blake2b(k, digest_size=4).digest(), "little") >> 1 for k in keys]


def request_options(sampling: Sampling, eos_ids: list[int]) -> dict:
    """Keyword arguments of vLLM's SamplingParams shared by every row (the seed is per row)."""
    greedy = sampling.temperature == 0
    return {
        "n": 1,
        "max_tokens": sampling.max_new_tokens,
        "temperature": float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "top_k": -1 if greedy or sampling.top_k == 0 else int(sampling.top_k),  # -1 = off in every version
        "stop": list(sampling.stop_strings),
        "stop_token_ids": list(eos_ids),
        "logprobs": 0,  # the sampled token's log-prob only
        "skip_special_tokens": True,
    }


def vllm_logprobs_exact(sampling: Sampling, logprobs_mode: str) -> bool:
    """Whether vLLM's log-probs are log-softmax(logits / T) before filtering (T = 1 when greedy)."""
    if sampling.temperature == 0:
        return True
    if logprobs_mode == "processed_logprobs":
        return sampling.top_p >= 1.0 and sampling.top_k == 0
    return sampling.temperature == 1.0  # raw_logprobs: log-softmax of the unscaled logits


def stop_length(tokenizer, ids: list[int], stops: tuple[str, ...]) -> int:
    """Tokens up to and including the first one whose decoded prefix contains a stop string (else all)."""

    def hit(length: int) -> bool:
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        return any(stop in text for stop in stops)

    if not stops or not ids or not hit(len(ids)):
        return len(ids)
    low, high = 1, len(ids)  # a prefix that contains a stop string keeps containing it: binary search
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if hit(mid) else (mid + 1, high)
    return low


def _token_logprob(position: Any, token: int) -> float | None:
    """The sampled token's log-prob from one position of vLLM's logprobs (a {token: Logprob} mapping)."""
    item = position.get(token) if position is not None and hasattr(position, "get") else None
    return None if item is None else float(getattr(item, "logprob", item))


def collect_outputs(outputs: list, pad_id: int, tokenizer, stops: tuple[str, ...]):
    """vLLM RequestOutputs (one per row, n=1) -> ids, mask, log-probs (B, T), finished, stopped (B,), and
    whether vLLM gave a log-prob for every real token."""
    seqs = [out.outputs[0] for out in outputs]
    stopped = [isinstance(seq.stop_reason, str) for seq in seqs]  # vLLM ran past the stop string: cut it
    rows = [list(seq.token_ids) for seq in seqs]
    rows = [ids[: stop_length(tokenizer, ids, stops)] if cut else ids for ids, cut in zip(rows, stopped)]
    width = max(1, max(len(ids) for ids in rows))
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    logprobs = torch.zeros((len(rows), width), dtype=torch.float32)  # (B, T)
    complete = True
    for i, (seq, ids) in enumerate(zip(seqs, rows)):
        lps = [_token_logprob(position, token) for position, token in zip(seq.logprobs or [], ids)]
        complete = complete and len(lps) == len(ids) and None not in lps
        ids_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        logprobs[i, : len(lps)] = torch.tensor([0.0 if lp is None else lp for lp in lps])
    finished = torch.tensor([seq.finish_reason == "stop" for seq in seqs])
    return ids_t, mask, logprobs, finished, torch.tensor(stopped), complete
