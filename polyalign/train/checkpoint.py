"""Checkpoints that survive `kill -9` at any moment, and atomic file writes.

Layout of `run_dir/checkpoints/`:
    step_000123/            one complete checkpoint
        <name>.safetensors  one per model (policy, value_model, ...); tied weights stored once
        optimizer.pt        optimizer.state_dict() (only when an optimizer was given)
        sharded/            instead of the two above, with output.checkpoint_format=sharded: every
                            process's shards of models and optimizer (torch.distributed.checkpoint)
        rng.pt              python, numpy, torch CPU (and CUDA) RNG states
        state.json          {"step", "trainer_state", "models", "format", "saved_at"}
        COMPLETE            written last; a directory without it is never loaded
    latest                  text file naming the newest checkpoint directory
    best                    text file naming the checkpoint chosen by `mark_best` (never pruned)
    .tmp-*                  work in progress or leftovers of a crash; ignored, removed by the next save

Crash safety: a checkpoint is written into `.tmp-step_...`, every file is fsynced, `COMPLETE` is written,
then the directory is renamed into place (atomic on POSIX) and the pointer files are replaced atomically.
A crash at any point leaves either the previous state or the new one. Deletions rename to `.tmp-*` first.

Knows nothing about trainers: `trainer_state` is any JSON-serialisable dict (data position, baselines, best
metric, ...); tensors in it are stored as lists/floats. Models must be unwrapped (pass `ddp.module`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from polyalign.files import atomic_write_text, fsync_dir, fsync_file, remove_dir, to_json
from polyalign.train.distributed import World, broadcast_object, is_sharded
from polyalign.train.distributed_checkpoint import (
    load_full_model_state,
    load_full_optimizer_state,
    load_sharded,
)
from polyalign.train.logging import METRICS, SAMPLES, cut_logs

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    return _step_of(path) is not None and (path / COMPLETE).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir() and _is_complete(p)]
    return sorted(found)


def _read_pointer(root: Path, name: str) -> Path | None:
    try:
        target = (root / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not _STEP_DIR.match(target):  # a pointer only ever names a sibling step_ directory
        return None
    return root / target if _is_complete(root / target) else None


def _rng_state() -> dict:
    """Python, numpy (its global state, the key array as a tensor: torch.load's weights_only mode takes no
    numpy arrays), torch CPU and CUDA random states."""
    kind, keys, *rest = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype("int64")), *rest]}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # checkpoints written before 2026-12 named the parts
        numpy_state = [numpy_state[k] for k in ("kind", "keys", "pos", "has_gauss", "cached_gaussian")]
    kind, keys, *rest = numpy_state
    np.random.set_state((kind, keys.numpy().astype("uint32"), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _write_checkpoint_files(
    tmp: Path,
    step: int,
    models: dict[str, nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | dict | None,
    trainer_state: dict | None,
    sharded: Path | None = None,
) -> None:
    if sharded is not None:  # shards every process wrote (torch.distributed.checkpoint), moved in whole
        os.replace(sharded, tmp / "sharded")
    for name, model in models.items():
        if model is None:
            continue
        if isinstance(model, dict):  # full weights gathered from shards (train/distributed.py)
            save_file(model, str(tmp / f"{name}.safetensors"))
        else:  # save_model stores tensors shared between parameters (tied embeddings) once.
            save_model(model, str(tmp / f"{name}.safetensors"))
    if optimizer is not None:
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save(state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    state = {
        "step": step,
        "trainer_state": trainer_state or {},
        "models": sorted(models),
        "format": "sharded" if sharded is not None else "full",
        "saved_at": time.time(),
    }
    (tmp / "state.json").write_text(to_json(state) + "\n")
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    (tmp / COMPLETE).write_text(f"{step}\n")
    fsync_file(tmp / COMPLETE)
    fsync_dir(tmp)


def _check_save_args(step: int, models: dict, keep_last: int | None) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if not models:
        raise ValueError("save_checkpoint: models is empty; pass e.g. {'policy': model}")
    for name in models:
        if not _MODEL_NAME.match(name) or name in ("optimizer", "rng", "state", "sharded"):
            raise ValueError(f"save_checkpoint: model name {name!r} is not a valid, unreserved file stem")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None (keep all), got {keep_last}")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    models: dict[str, nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | dict | None = None,
    trainer_state: dict | None = None,
    keep_last: int | None = 2,
    sharded: Path | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically, point `latest` at it, prune old ones.

    `models` values are modules, or full state dicts (gathered from FSDP shards); `optimizer` is an optimizer
    or its state dict. `sharded`: a torch.distributed.checkpoint directory holding the models' and
    optimizer's shards, moved into the checkpoint as `sharded/` (the `models` values are then None).

    Pruning (keep_last not None) keeps the `keep_last` newest checkpoints with step <= `step` plus the one
    `best` points to; checkpoints with a larger step belong to an abandoned timeline (the run was resumed
    from an earlier checkpoint) and are removed too. Returns the checkpoint directory.
    """
    _check_save_args(step, models, keep_last)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):  # a previous crash's partial work; one writer per run_dir
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, models, optimizer, trainer_state, sharded)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    if keep_last is not None:
        _prune(root, step, keep_last)
    return final


def _prune(root: Path, step: int, keep_last: int) -> None:
    best = _read_pointer(root, "best")
    complete = _complete_checkpoints(root)
    past = [p for s, p in complete if s <= step]
    keep = set(past[-keep_last:]) | ({best} if best else set())
    for _, path in complete:
        if path not in keep:
            remove_dir(path)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the highest complete step, else None.

    `.tmp-*` directories and step directories without a COMPLETE marker are never returned.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointed = _read_pointer(root, "latest")
    if pointed is not None:
        return pointed
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `mark_best` chose, or None."""
    return _read_pointer(Path(run_dir) / CHECKPOINTS, "best")


def mark_best(run_dir: str | os.PathLike, step: int) -> Path:
    """Point `best` at the (complete) checkpoint of `step`; pruning never removes it."""
    root = Path(run_dir) / CHECKPOINTS
    target = root / checkpoint_name(step)
    if not _is_complete(target):
        raise FileNotFoundError(f"mark_best: no complete checkpoint for step {step} at {target}")
    atomic_write_text(root / "best", target.name + "\n")
    return target


def _resolve(run_dir_or_ckpt: str | os.PathLike) -> Path:
    path = Path(run_dir_or_ckpt)
    if _step_of(path) is not None:
        if not _is_complete(path):
            raise FileNotFoundError(f"load_checkpoint: {path} has no {COMPLETE} marker (crashed mid-write?)")
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"load_checkpoint: no complete checkpoint under {path / CHECKPOINTS}")
    return ckpt


def load_checkpoint(
    run_dir_or_ckpt: str | os.PathLike,
    models: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore weights (and optimizer state and RNG states) from a checkpoint; return its state.json.

    `run_dir_or_ckpt` is a run directory (its latest checkpoint is used) or a `step_*` directory. Only the
    models named in `models` are loaded, so an evaluator may load just {"policy": model}. The returned dict
    also has "path", the checkpoint directory used.
    """
    ckpt = _resolve(run_dir_or_ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    if (ckpt / "sharded").is_dir():
        load_sharded(ckpt / "sharded", models, optimizer)
        models, optimizer = {}, None
    for name, model in models.items():
        weights = ckpt / f"{name}.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"load_checkpoint: {ckpt} has no model {name!r}; it has {state['models']}"
            )
        if is_sharded(model):
            load_full_model_state(model, load_file(str(weights)))
        else:
            load_model(model, str(weights), strict=True)
    if optimizer is not None:
        if not (ckpt / "optimizer.pt").is_file():
            raise FileNotFoundError(f"load_checkpoint: {ckpt} was saved without an optimizer")
        saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        if any(is_sharded(m) for m in models.values()):
            load_full_optimizer_state(models, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
    if restore_rng:
        _restore_rng(torch.load(ckpt / "rng.pt", weights_only=True))
    state["path"] = str(ckpt)
    return state


# What a run writes into its directory (trainer, `polyalign train`'s report); --overwrite removes these only.
RUN_OUTPUTS = (CHECKPOINTS, METRICS, SAMPLES, "config.yaml", "summary.json", "data_report.json", "report.md")
RUN_OUTPUTS += ("eval", "tensorboard", "model", "plots")


def claim_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool = False) -> Path:
    """The run directory, created and ready: a fresh run needs an empty (or new) one, or `overwrite`, which
    removes the previous run's outputs first; a resumed run's logs are cut back to its latest checkpoint's
    step (emptied without one: it starts from step 0), so that every step is logged exactly once."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in output.run_dir and --overwrite removes it: pass one")
    if overwrite:
        for path in (run_dir / name for name in RUN_OUTPUTS):
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
    elif not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} is not empty; pass --resume to continue its run, --overwrite to start afresh (removes "
            f"its checkpoints and logs), or choose another --output.run_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        cut_logs(run_dir, _step_of(ckpt) if ckpt is not None else -1)
    return run_dir


def claim_on_main(run_dir: str, resume: bool, overwrite: bool, world: World, config_yaml: str) -> Path:
    """Rank 0 claims the run directory (see `claim_run_dir`) and writes config.yaml; the others wait and
    raise the same error when it refuses."""
    error = None
    if world.is_main:
        try:
            atomic_write_text(claim_run_dir(run_dir, resume, overwrite) / "config.yaml", config_yaml)
        except (FileExistsError, ValueError) as e:
            error = str(e)
    error = broadcast_object(error, world)
    if error:
        raise FileExistsError(error)
    return Path(run_dir)
