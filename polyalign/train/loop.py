"""The one trainer skeleton: start, loop, evaluate, checkpoint, resume, finish. Online and offline plug in.

A trainer is a run holder plus a `Trainer` record of four functions: its step, its evaluation, its rule for
"this evaluation is the best so far" and its closing summary. The holder (`train/run.py`: `Run`,
`train/offline_run.py`: `OfflineRun`) has these fields: cfg, run_dir, world, optimizer, logger, progress,
state (JSON-friendly, saved in checkpoints), start_step, total_steps, has_eval, and the method models()
(name -> unwrapped module, what checkpoints hold).

    start (world, seed, run directory) -> [resume] -> evaluate at step 0
      -> for each step: set lr -> trainer step -> log -> progress -> evaluate / checkpoint when due
      -> finish (close logs, summary.json)
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyalign.config import dump_yaml
from polyalign.files import atomic_write_text
from polyalign.threads import apply_threads
from polyalign.train import distributed
from polyalign.train.checkpoint import (
    CHECKPOINTS,
    checkpoint_name,
    claim_on_main,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    save_checkpoint,
)
from polyalign.train.distributed import World, is_sharded
from polyalign.train.distributed_checkpoint import (
    checkpoint_payload,
    full_model_state,
    save_sharded,
    tied_names,
)
from polyalign.train.logging import MetricsLogger, NullLogger, Progress, print0
from polyalign.train.optim import (
    NonFiniteError,
    build_optimizer,
    lr_at,
    seed_everything,
    set_lr,
    step_optimizer,
)


@dataclass(frozen=True)
class Trainer:
    """What a trainer plugs into the skeleton: plain functions of its run holder."""

    step: Callable[[Any, int], dict[str, float]]  # (run, step) -> metrics of one optimizer step
    evaluate: Callable[[Any, int], dict[str, float]]  # (run, step) -> held-out metrics (logged)
    is_better: Callable[[dict, dict | None], bool]  # (result, best so far or None) -> is it the new best
    summary: Callable[[Any], dict] = lambda run: {}  # (run) -> its part of the summary, on every process


# ---------------------------------------------------------------- start


def start(
    cfg, resume: bool, overwrite: bool = False, check: Callable[[Any, World], None] | None = None
) -> tuple[World, Any, Path]:
    """Threads, the process group, seeds and the run directory (`checkpoint.claim_run_dir`: rank 0 cuts a
    resumed run's logs back to its checkpoint, or clears a run to `overwrite`, and writes config.yaml).

    Returns (world, cfg with this process's device, run_dir). `check(cfg, world)` runs before anything is
    written, so that a configuration that cannot split over the processes fails first."""
    apply_threads(cfg.model.threads)
    world, cfg = distributed.join(cfg)
    if check is not None:
        check(cfg, world)
    seed_everything(cfg.train.seed)
    return world, cfg, claim_on_main(cfg.output.run_dir, resume, overwrite, world, dump_yaml(cfg))


def plumbing(cfg, world: World, run_dir: Path, params, total_steps: int, keys: tuple[str, ...]):
    """(optimizer, metrics logger (rank 0; a NullLogger elsewhere), progress bar) of a run."""
    optimizer = build_optimizer(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    show = cfg.output.progress
    progress = Progress(total_steps, keys, enabled=show and world.is_main, print_every=10 if show else 0)
    return optimizer, (MetricsLogger(run_dir) if world.is_main else NullLogger()), progress


def resume(run) -> bool:
    """Continue `run` from its latest checkpoint, in place: weights, optimizer, RNG, state and start_step (its
    logs were cut back to that step in `start`). False when there is nothing to resume."""
    ckpt = latest_checkpoint(run.run_dir)
    if ckpt is None:
        run.progress.print(f"--resume: no checkpoint in {run.run_dir}; starting from step 0")
        return False
    state = load_checkpoint(ckpt, run.models(), run.optimizer)
    run.state = dict(state.get("trainer_state", {}))
    run.start_step = int(state["step"])
    run.progress.print(f"resumed from {ckpt} at step {run.start_step}")
    return True


# ---------------------------------------------------------------- the loop


def train_loop(run, trainer: Trainer) -> None:
    """Steps from where the run stands (0, or the resumed step) to run.total_steps, checkpointing on the way."""
    t = run.cfg.train
    if run.start_step == 0 and run.has_eval:
        run.state["eval_start"] = trainer.evaluate(run, 0)
    for step in range(run.start_step, run.total_steps):
        set_lr(run.optimizer, lr_at(step, t.lr, t.warmup_steps, run.total_steps, t.schedule))
        metrics = trainer.step(run, step)
        run.logger.log(step + 1, metrics)
        run.progress.update(step + 1, metrics)
        run.state["step"] = step + 1
        maybe_checkpoint(run, step + 1, trainer)


def maybe_checkpoint(run, step: int, trainer: Trainer) -> None:
    """Evaluate every eval.every steps and at the end; save every checkpoint_every steps, at the end, and
    whenever the evaluation is the best so far (that checkpoint is marked best)."""
    every, last, is_best = run.cfg.eval.every, step == run.total_steps, False
    if run.has_eval and ((every and step % every == 0) or last):
        result = trainer.evaluate(run, step)
        if last:
            run.state["eval_final"] = {**result, "step": step}
        if trainer.is_better(result, run.state.get("best_eval")):
            run.state["best_eval"], is_best = {**result, "step": step}, True
    save_every = run.cfg.output.checkpoint_every
    if (save_every and step % save_every == 0) or last or is_best:
        save_run_checkpoint(run, step, is_best)


def accumulate(into: dict[str, float], values: dict, weight: float) -> None:
    """into[k] += weight * values[k] (tensors detached): micro-batch statistics averaged into a step's."""
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * weight


def optimizer_step(run, params, stats: dict[str, float], steps: int = 1) -> None:
    """The guarded optimizer step on `params`; adds grad_norm / steps (the mean over a batch's `steps`
    updates) and the skip count to `stats`. train.max_skipped_steps skipped updates in a row stop the run."""
    t = run.cfg.train
    result = step_optimizer(params, run.optimizer, t.max_grad_norm)
    stats["grad_norm"] = stats.get("grad_norm", 0.0) + float(result.grad_norm) / steps
    stats["skipped_steps"] = stats.get("skipped_steps", 0.0) + float(result.skipped)
    in_a_row = run.state.get("skipped_in_a_row", 0) + 1 if result.skipped else 0
    run.state["skipped_in_a_row"] = in_a_row
    if in_a_row >= t.max_skipped_steps:
        raise NonFiniteError(
            f"{in_a_row} updates in a row had a non-finite loss or gradient norm (train.max_skipped_steps="
            f"{t.max_skipped_steps}): lower train.lr, check the rewards/data, or use a wider dtype"
        )
    if result.skipped:
        run.progress.print(f"update skipped: non-finite gradient norm ({in_a_row} in a row)")


# ---------------------------------------------------------------- checkpoint


def save_run_checkpoint(run, step: int, is_best: bool) -> None:
    """Rank 0 writes the checkpoint (FSDP gathers the full state first, on every rank), or with
    `output.checkpoint_format: sharded` every process writes its shards; with LoRA the adapter and/or merged
    exports go next to it."""
    lora, main = run.cfg.model.lora is not None, run.world.is_main
    if run.cfg.output.checkpoint_format == "sharded":
        path = _save_sharded_run_checkpoint(run, step)
        model = next(iter(run.models().values()))
        full = full_model_state(model, run.world) if lora and is_sharded(model) else model
    else:
        models, optimizer = checkpoint_payload(run.models(), run.optimizer, run.world)
        full = next(iter(models.values()))
        path = None
        if main:
            keep = run.cfg.output.keep_last
            path = save_checkpoint(run.run_dir, step, models, optimizer, run.state, keep_last=keep)
    if main and lora:
        export_lora_from(run, full, path)
    if main and is_best:
        mark_best(run.run_dir, step)
    distributed.barrier(run.world)


def _save_sharded_run_checkpoint(run, step: int) -> Path | None:
    """Every process writes its shards into a staging directory; rank 0 then completes the checkpoint."""
    root = Path(run.run_dir) / CHECKPOINTS
    staging = root / f".dcp-{checkpoint_name(step)}"
    if run.world.is_main:
        for leftover in root.glob(".dcp-*"):  # a crash's partial shards
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier(run.world)
    save_sharded(run.models(), run.optimizer, staging)
    distributed.barrier(run.world)
    if not run.world.is_main:
        return None
    names, keep = dict.fromkeys(run.models()), run.cfg.output.keep_last
    return save_checkpoint(run.run_dir, step, names, None, run.state, keep_last=keep, sharded=staging)


def export_lora_from(run, saved: nn.Module | dict, directory: Path) -> None:
    """Export the LoRA policy as `model.lora.save` says (rank 0). `saved` is the live model, or (FSDP) its
    full state gathered from the shards, loaded into an unsharded copy first."""
    from polyalign.lora import export_lora  # peft: LoRA runs only

    model = next(iter(run.models().values()))
    source = saved if isinstance(saved, nn.Module) else _unsharded_peft_copy(model, saved)
    export_lora(source, directory, run.cfg.model.lora.save, run.tokenizer)


def _unsharded_peft_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A PEFT model like `model` holding the full tensors of `state` (built on the meta device, then assigned:
    no other copy of the weights)."""
    from peft import get_peft_model  # LoRA runs only

    base = model.get_base_model()
    with torch.device("meta"):
        twin = get_peft_model(
            type(base)(copy.deepcopy(base.config)), copy.deepcopy(model.peft_config["default"])
        )
    state = dict(state)
    for name, kept in tied_names(model).items():
        state[name] = state[kept]
    twin.load_state_dict(state, strict=True, assign=True)
    return twin


# ---------------------------------------------------------------- finish


def finish(run, trainer: Trainer) -> dict:
    """Close the logs, add the trainer's summary (exports, report), write summary.json, leave the group."""
    run.progress.close()
    run.logger.close()
    summary = {
        "run_dir": str(run.run_dir),
        "steps": run.total_steps,
        "eval_start": run.state.get("eval_start"),
        "best_eval": run.state.get("best_eval"),
    }
    summary.update(trainer.summary(run))
    distributed.barrier(run.world)
    if run.world.is_main:
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
        print0(f"run finished: {run.run_dir}")
    if run.world.distributed:
        # Free the DDP/FSDP wrappers while the process group lives: a DDP reducer freed after
        # destroy_process_group runs gloo's destructor, which can wait forever on a peer that has left.
        for name in ("policy_train", "value_train", "train_model", "ref"):
            if hasattr(run, name):
                setattr(run, name, None)
        gc.collect()
    distributed.close_world(run.world)
    return summary


def train(run, trainer: Trainer) -> dict:
    """The loop from where `run` stands to its last step, then `finish`; returns the summary."""
    train_loop(run, trainer)
    return finish(run, trainer)
