"""Static-shape decoding over `fast_decode.FastDecoder`, the form a CUDA graph captures: finished rows keep
feeding padding (outputs masked out), each step writes the cache slot held in a tensor and attends to the whole
cache under a key mask, inputs are updated in place and nothing reads back to the host (but an all-finished
check every `CHECK_EVERY` steps). On CUDA the step (forward + sampling) is captured once per generate() as a
`torch.cuda.CUDAGraph` and replayed; on CPU it runs eagerly, which is how CI checks it against `hf`'s loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

CHECK_EVERY = 8


def graphed(step: Callable[[], tuple]) -> Callable[[], tuple]:
    """step captured as one CUDA graph, after a warm-up on a side stream (step must be safe to repeat); the
    function returned replays it and returns its output tensors (overwritten by the next replay). If the
    capture fails, step itself, with a warning."""
    try:
        return _capture(step)
    except RuntimeError as error:  # a kernel that cannot be captured: the same step, eagerly
        warnings.warn(f"CUDA graph capture failed ({error}); decoding eagerly", stacklevel=2)
        return step


def _capture(step: Callable[[], tuple]) -> Callable[[], tuple]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> tuple:
        graph.replay()
        return outputs

    return replay


def decode_static(fast, logits, prompt_mask, steps: int, sample, draw, eos, pad: int, graph: bool):
    """Decode `steps` tokens from the prefill's logits (B, V); returns ids, log-probs (B, T), lengths and
    finished flags (B,). prompt_mask (B, W) is left-padded; sample(logits, uniform) -> (tokens, log-probs);
    draw() -> this step's uniforms (B,), or None (greedy); `graph`: capture the step as a CUDA graph."""
    rows, width = prompt_mask.shape
    device = logits.device
    ids = torch.full((rows, steps), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, steps), device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    key_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(rows, fast.max_len - width)], 1).bool()
    feed, positions = torch.full((rows, 1), pad, device=device), prompt_mask.sum(1)[:, None]
    column, uniform = torch.tensor([width], device=device), draw()

    def step() -> tuple:  # idempotent for fixed inputs: it rewrites the same slot with the same values
        key_mask.index_fill_(1, column, True)
        return sample(fast.forward(feed, key_mask, positions, column), uniform)

    run = step
    tokens, token_logprobs = sample(logits, uniform)
    for t in range(steps):
        ids[:, t] = tokens.masked_fill(finished, pad)
        logprobs[:, t] = token_logprobs.masked_fill(finished, 0.0)
        lengths += ~finished
        finished |= torch.isin(tokens, eos)
        if t == steps - 1 or (t % CHECK_EVERY == CHECK_EVERY - 1 and bool(finished.all())):
            break
        feed.copy_(tokens.masked_fill(finished, pad)[:, None])  # finished rows decode padding
        if uniform is not None:
            uniform.copy_(draw())
        if t == 0 and graph:
            run = graphed(step)
        tokens, token_logprobs = run()
        positions += 1
        column += 1
    return ids, logprobs, lengths, finished
