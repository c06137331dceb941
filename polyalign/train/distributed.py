"""Training on N processes under torchrun, on torch.distributed's own engines: DDP and FSDP2 (`fully_shard`).

Launch: `torchrun --nproc_per_node=N --no-python polyalign train CONFIG.yaml` (multi-node: add torchrun's
`--nnodes --node_rank --rdzv_endpoint` flags; docs/scale.md). The trainer reads WORLD_SIZE/RANK/LOCAL_RANK
from the environment; with one process nothing here changes anything.

How a run is split (so that N processes compute what one process computes, within float tolerance):
- Data: every process builds the same global batch (the same seeded prompts or pair indices), then keeps
  its contiguous share (`shard`). Per-row sampling streams (`Sampling.row_offset`) make a completion depend
  on the seed and its row, not on the process count. Batch-wide statistics (moving-average baselines,
  whitening) are computed on the gathered global batch.
- Gradients: each process's loss is the mean over its own rows; DDP's all-reduce and FSDP's reduce-scatter
  average over processes, which is the global mean because every process holds as many rows.
- Models: training forwards go through `TrainForward` (logprobs.py), the one module whose forward the
  wrapper sees. DDP replicates the weights; FSDP2 shards each decoder layer (the model's
  `_no_split_modules`) and the rest at the root. Generation with FSDP runs on gathered weights (`gathered`).
- Checkpoints: rank 0 writes the same files as a one-process run (full weights, optimizer state keyed by
  parameter index); FSDP gathers them first (`distributed_checkpoint.py`). Any process count can resume
  any checkpoint.
- Logging, reports and files: rank 0 only; logged metrics are averaged over processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from polyalign.logprobs import TrainForward, unwrap_peft


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun describes in the environment (size 1 when not launched by torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: str) -> tuple[World, str]:
    """Join the process group (gloo on CPU, nccl on CUDA) when torchrun started several processes.

    Returns the world and the device this process uses: "cuda" becomes "cuda:<local rank>".
    """
    world = launched_world()
    if not world.distributed:
        return world, device
    if device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return world, device


def join(cfg):
    """`init_world` for a run config (online or offline): the world and the config with this process's
    device in `model.device`."""
    world, device = init_world(cfg.model.device)
    return world, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device))


def shard(n: int, world: World, what: str) -> slice:
    """This process's contiguous share of n items; n must split evenly (a clear error names `what`)."""
    if n % world.size:
        raise ValueError(f"{what} ({n}) must be a multiple of the number of processes ({world.size})")
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every process's (n, ...) tensor in rank order (all the same shape)."""
    if not world.distributed:
        return t
    local = t.contiguous().to(_comm_device())
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def gather_objects(items: list, world: World) -> list:
    """Concatenate every process's list (picklable items) in rank order."""
    if not world.distributed:
        return items
    parts: list = [None] * world.size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def mean_metrics(metrics: dict[str, float], world: World) -> dict[str, float]:
    """Average each metric over processes (every process logs the same keys)."""
    if not world.distributed:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    return dict(zip(keys, (values / world.size).tolist()))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every process."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- wrapping models


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: transformers' `_no_split_modules` (decoder layers)."""
    names = set(getattr(unwrap_peft(model), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"fsdp: {type(unwrap_peft(model)).__name__} names no decoder layer class in _no_split_modules; "
            "use model.parallel: ddp"
        )
    return units


def wrap(model: nn.Module, strategy: str, world: World, trainable: bool = True) -> nn.Module:
    """The module training forwards go through (see `logprobs.TrainForward`).

    One process: the model itself. ddp: `DistributedDataParallel(TrainForward(model))` for a trained model,
    the model itself (replicated, no gradients) for a frozen one. fsdp: `fully_shard` on every decoder
    layer and on `TrainForward(model)`; the model's parameters become shards (DTensors) in place.
    """
    if not world.distributed:
        return model
    if strategy == "ddp":
        if not trainable:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(TrainForward(model), device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in _shard_units(model):
            fully_shard(unit)
        root = fully_shard(TrainForward(model))
        # One empty forward through the root: FSDP initialises its tree from the root now, before any
        # rollout runs a decoder layer's forward directly (which would make that layer a root of its own).
        # The root keeps its own parameters gathered after forward; reshard so that the registered
        # parameters (the ones an optimizer will hold) are the shards.
        root(_nothing)
        root.reshard()
        return root
    raise ValueError(f"unknown parallel strategy {strategy!r}; choose ddp or fsdp")


def _nothing(model: nn.Module) -> None:
    return None


class AdapterDisabledForward(TrainForward):
    """The reference of a LoRA policy under FSDP: the policy's own FSDP root, run with the adapter disabled
    (`polyalign.lora.base_model_mode`), so the reference needs no weights of its own and FSDP still gathers
    every shard. Holds no submodules: `.eval()` / `.train()` on it leave the policy alone."""

    def __init__(self, root: nn.Module, policy: nn.Module) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "model", policy)

    def forward(self, fn, *args, **kwargs):
        from polyalign.lora import base_model_mode

        with base_model_mode(self.model):
            return self._root(fn, *args, **kwargs)


def wrap_reference(ref: nn.Module, root: nn.Module, policy: nn.Module, strategy: str, world: World):
    """The reference as training runs it. A LoRA reference view (`polyalign.lora.reference_view`, no weights
    of its own) stays the view in one process or under DDP and becomes the policy's FSDP root with the
    adapter disabled under FSDP; any other reference is wrapped as a frozen model (`wrap`)."""
    if type(ref).__module__ != "polyalign.lora":
        return wrap(ref, strategy, world, trainable=False)
    if world.distributed and strategy == "fsdp":
        return AdapterDisabledForward(root, policy)
    return ref


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(wrapper: nn.Module | None) -> Iterator[None]:
    """Within the block an FSDP-sharded model holds full weights (for generation, exports); a no-op otherwise.

    Forwards inside the block may run any number of times on each process (rollouts end at different
    lengths): with every unit gathered and resharding after forward off, they need no collective."""
    units = _fsdp_modules(wrapper) if wrapper is not None else []
    # Gather outside inference mode even when called inside it (evaluation): FSDP reuses its all-gather
    # buffers, and inference tensors could not be written by the next, training, gather.
    with torch.inference_mode(False):
        for unit in units:  # every process gathers every unit: the same collectives in the same order
            unit.unshard()
            unit.set_reshard_after_forward(False)  # forwards inside (any number per process) gather nothing
    try:
        yield
    finally:
        with torch.inference_mode(False):
            for unit in units:
                unit.set_reshard_after_forward(True)
                unit.reshard()


def accumulating(wrapper: nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapper, DistributedDataParallel) and not last:
        return wrapper.no_sync()
    return contextlib.nullcontext()


def close_world(world: World) -> None:
    """Leave the process group at the end of a distributed run."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
