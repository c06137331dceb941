"""Checkpoints of runs on several processes: rank 0 writes the same files a one-process run writes.

FSDP's shards are gathered first (full weights on rank 0's CPU; the AdamW state converted to
`optimizer.state_dict()`'s index-keyed layout), so any process count resumes any checkpoint: loading
(`checkpoint.load_checkpoint`) scatters full weights and state back into shards. Knows nothing about files
beyond torch.distributed.checkpoint's directories, nor about runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from polyalign.train.distributed import World, is_sharded


def tied_names(model: nn.Module) -> dict[str, str]:
    """name -> kept name for parameters registered under several names (tied embeddings). The kept name is
    the alphabetically first one, the one `safetensors.torch.save_model` writes."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: min(names) for names in by_id.values() if len(names) > 1 for n in names if n != min(names)}


def full_model_state(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) weights on CPU, on rank 0 (None elsewhere): collective, call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    tied = tied_names(model)
    return {k: v.contiguous() for k, v in state.items() if k not in tied}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (as saved by a run with any process count) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(state)
    for name, kept in tied_names(model).items():
        state[name] = state[kept]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _param_names(models: dict[str, nn.Module]) -> dict[int, str]:
    return {id(p): f"{key}.{name}" for key, m in models.items() for name, p in m.named_parameters()}


def full_optimizer_state(models: dict[str, nn.Module], optimizer, world: World) -> dict | None:
    """The optimizer state gathered to rank 0 in `optimizer.state_dict()`'s own layout (keyed by parameter
    index), so that a one-process run can load it; None on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    container = nn.ModuleDict(models)
    full = get_optimizer_state_dict(
        container, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not world.is_main:
        return None
    names = _param_names(models)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for saved, live in zip(full["param_groups"], optimizer.param_groups):
        count = len(live["params"])
        groups.append(
            {**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, start + count))}
        )
        start += count
    state = {index[name]: value for name, value in full["state"].items()}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(models: dict[str, nn.Module], optimizer, saved: dict) -> None:
    """Load an index-keyed optimizer state (any process count) into the optimizer of sharded models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(models)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
        for g in saved["param_groups"]
    ]
    state = {order[int(i)]: value for i, value in saved["state"].items()}
    set_optimizer_state_dict(
        nn.ModuleDict(models),
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def checkpoint_payload(models: dict[str, nn.Module], optimizer, world: World) -> tuple[dict, object]:
    """What rank 0 hands to `save_checkpoint`: the models and optimizer themselves, or (FSDP) their full
    state gathered from the shards. Collective when sharded: call on every rank."""
    if not any(is_sharded(m) for m in models.values()):
        return models, optimizer
    states = {name: full_model_state(m, world) for name, m in models.items()}
    return states, full_optimizer_state(models, optimizer, world)


def _sharded_state(models: dict[str, nn.Module], optimizer) -> tuple[nn.Module, dict]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    box = nn.ModuleDict(models)  # keys "policy.<param>", "value_model.<param>": the same at any process count
    state = {"model": get_model_state_dict(box)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(box, optimizer)
    return box, state


def save_sharded(models: dict[str, nn.Module], optimizer, directory: Path) -> None:
    """Every process writes its shards of the models and optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(models, optimizer)[1], checkpoint_id=str(directory))


def load_sharded(directory: Path, models: dict[str, nn.Module], optimizer) -> None:
    """Load a `save_sharded` directory written by any number of processes into `models` (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    box, state = _sharded_state(models, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(box, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(box, optimizer, state["optim"])
