"""Optimizer plumbing shared by every trainer, as plain functions.

Owns: optimizer construction, the learning-rate schedule (a pure function of the step), the guarded optimizer
step (clip, NaN/Inf skip, zero grads, finite weights), micro-batch slicing and seeding. It knows nothing
about losses, models' architectures, rollouts or configs: trainers pass plain numbers and tensors in.

Step convention: `step` counts optimizer steps already taken, so the first update uses `lr_at(0, ...)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SCHEDULES = ("constant", "linear", "cosine")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and other vectors/scalars are not weight-decayed (nanoGPT's rule: ndim < 2)."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def _param_groups(params: list, weight_decay: float) -> list[dict]:
    named = bool(params) and isinstance(params[0], tuple)
    if not named:
        trainable = [p for p in params if p.requires_grad]
        return [{"params": trainable, "weight_decay": weight_decay}]
    decay = [p for n, p in params if p.requires_grad and not _no_decay(n, p)]
    no_decay = [p for n, p in params if p.requires_grad and _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: `model.parameters()` (every parameter gets `weight_decay`) or
    `model.named_parameters()` (biases, norm weights and other 0-/1-d tensors get no weight decay)."""
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"build_optimizer: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
    groups = _param_groups(list(params), weight_decay)
    if not groups or not any(g["params"] for g in groups):
        raise ValueError(
            "build_optimizer: no trainable parameters (all have requires_grad=False or none given)"
        )
    # The fused kernels (CPU and CUDA, floating-point tensors) are ~4x faster than the per-tensor loop.
    tensors = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    schedule: str = "constant",
) -> float:
    """Learning rate for optimizer step `step` (0-based). Pure function.

    Warmup: `base_lr * (step + 1) / warmup_steps` for `step < warmup_steps` (so the first step is not wasted
    at lr 0 and step `warmup_steps - 1` reaches `base_lr`). After warmup, with
    `progress = (step - warmup_steps) / (total_steps - warmup_steps)` clipped to [0, 1]:
    - constant: `base_lr`
    - linear:   `base_lr * (1 - progress)`
    - cosine:   `base_lr * (1 + cos(pi * progress)) / 2`
    The decay reaches 0 at `step == total_steps` (the Hugging Face convention) and stays there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_at: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"lr_at: step ({step}) and warmup_steps ({warmup_steps}) must be >= 0")
    if schedule != "constant":
        if total_steps is None:
            raise ValueError(f"lr_at: schedule {schedule!r} needs total_steps")
        if total_steps <= warmup_steps:
            raise ValueError(f"lr_at: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class StepResult:
    """What `step_optimizer` did."""

    grad_norm: float  # total L2 norm of the gradients before clipping (may be nan/inf when skipped)
    skipped: bool  # True when the update was not applied (a non-finite gradient norm)


class NonFiniteError(FloatingPointError):
    """Training produced non-finite weights, or too many non-finite steps in a row: the run stops."""


def _weights_finite(params: list[nn.Parameter]) -> bool:
    """Every weight finite, on every process: FSDP shards (DTensors, some empty) are checked where they
    live, next to plain tensors, and the processes agree, so that all raise together or none does."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    # Skip empty shards and FSDP's unsharded views whose storage is freed between gathers (reading them
    # would touch freed memory); the sharded copy of those weights is checked as a DTensor.
    local = [t for t in local if t.numel() and t.untyped_storage().nbytes() > 0]
    if not local:
        bad = torch.zeros(1, device=params[0].device if params else "cpu")
    else:
        bad = torch.stack([(~torch.isfinite(t)).any() for t in local]).any().float().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    return float(bad) == 0


def step_optimizer(
    model_params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 1.0
) -> StepResult:
    """Clip gradients, step, zero gradients; skip the update when the gradient norm is NaN/Inf (a non-finite
    loss gives one) instead of training on it. `max_grad_norm` None or <= 0 measures without clipping.

    Raises NonFiniteError when an applied update left a weight NaN/Inf (an lr far too high): checked here,
    after every update, with one max-abs reduction, so that no checkpoint or export ever holds such weights.
    """
    params = list(model_params)
    if not any(p.grad is not None for p in params):
        raise ValueError("step_optimizer: no parameter has a .grad; call loss.backward() before stepping")
    clip = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    if not skipped and not _weights_finite(params):
        raise NonFiniteError(
            f"the update made weights non-finite (gradient norm {grad_norm:.3g}); nothing was saved from "
            "it: lower train.lr or raise the precision"
        )
    return StepResult(grad_norm=grad_norm, skipped=skipped)


def micro_batches(n_rows: int, micro_batch_size: int) -> list[slice]:
    """Consecutive row slices of at most `micro_batch_size` rows covering `range(n_rows)`."""
    if n_rows <= 0 or micro_batch_size <= 0:
        raise ValueError(
            f"micro_batches: n_rows ({n_rows}) and micro_batch_size ({micro_batch_size}) must be > 0"
        )
    return [slice(i, min(i + micro_batch_size, n_rows)) for i in range(0, n_rows, micro_batch_size)]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
