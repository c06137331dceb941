"""Masked reductions shared by every loss: sums, means, whitening and token aggregation.

Pure torch. A mask marks real tokens with any non-zero value (bool, long or float); masked positions are
*selected away* with `torch.where`, never multiplied by zero, so garbage on padding (even inf or NaN)
cannot leak into a value or a gradient.
"""

from __future__ import annotations

import torch

# How per-token terms of shape (B, T) become one scalar. Every loss that takes `aggregate` uses these names.
#   "sum":              sum over each sequence's tokens, mean over sequences (the papers' sequence log-prob).
#   "token_mean":       mean over each sequence's tokens, mean over sequences (verl "seq-mean-token-mean").
#   "batch_token_mean": sum over all tokens of the batch / number of tokens of the batch (verl "token-mean",
#                       the usual cross-entropy: long sequences weigh more).
#   "max_tokens":       sum over all tokens of the batch / (B * max_tokens), a constant (Dr. GRPO,
#                       arXiv:2503.20783; max_tokens = the generation budget, T when not given).
AGGREGATES = ("sum", "token_mean", "batch_token_mean", "max_tokens")


def check_shapes(dims: str = "", **tensors: torch.Tensor | torch.Size) -> None:
    """Raise ValueError naming the arguments unless all `tensors` (or shapes) have one shape, with as many
    dimensions as `dims` has letters ("B T", "P G"; only the number of dimensions is checked)."""
    shapes = {name: tuple(getattr(t, "shape", t)) for name, t in tensors.items()}
    letters = tuple(dims.split())
    if len(set(shapes.values())) > 1 or (letters and len(next(iter(shapes.values()))) != len(letters)):
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        expected = str(letters).replace("'", "") if letters else ""  # e.g. "(B,)", "(B, T)"
        expected = f"one shape {expected}".strip() if len(shapes) > 1 else expected
        raise ValueError(f"shape mismatch: {listed}; expected {expected}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError when a string option is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_positive(**values: float | None) -> None:
    """Raise ValueError naming the first hyper-parameter that is given (not None) and not > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def fill_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` with 0 on padding, so inf/NaN there cannot reach exp(), a square or a gradient."""
    check_shapes(x=x, mask=mask)
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is non-zero (over all positions when dim is None)."""
    kept = fill_padding(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is non-zero.

    An empty selection (a row with no real token) gives 0, not NaN: the count is clamped to at least 1.
    """
    count = masked_sum(torch.ones_like(x), mask, dim).clamp(min=1.0)
    return masked_sum(x, mask, dim) / count


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the masked positions.

    Formula: (x - mean) / sqrt(var + eps), with the population variance (divide by n, not n - 1) over the
    real positions. With shift_mean=False the mean is added back, so only the scale changes (the PPO
    reward-whitening convention). Masked positions of the result are 0. Gradients flow through mean and var;
    callers whitening advantages pass detached tensors.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    x = fill_padding(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return fill_padding(out, mask)


def aggregate_tokens(
    per_token: torch.Tensor, mask: torch.Tensor, aggregate: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce per-token terms (B, T) to a scalar with one of AGGREGATES (see the table above)."""
    check_choice("aggregate", aggregate, AGGREGATES)
    check_shapes("B T", per_token=per_token, mask=mask)
    if aggregate == "sum":
        return masked_sum(per_token, mask, dim=-1).mean()
    if aggregate == "token_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregate == "max_tokens":
        return masked_sum(per_token, mask) / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    return masked_mean(per_token, mask)
