"""Everything the offline trainer holds for one run, built from an OfflineRunConfig: the trained model (a
causal LM, or a sequence classifier for reward_model), the reference (cached log-probs or a frozen model),
the tokenized pair sets, optimizer and logging; and the closing summary (exported model, report).
`train/offline.py` holds the step and the losses, `train/loop.py` the loop; this file holds no algorithm.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polyalign.config import ConfigError
from polyalign.config_offline import OfflineRunConfig
from polyalign.data.chat import collate_pairs
from polyalign.files import atomic_write_text, fsync_file
from polyalign.logprobs import reference_sequence_logprobs
from polyalign.models import load_policy, load_score_model, load_tokenizer, resolve_model_path
from polyalign.train import distributed, loop
from polyalign.train.checkpoint import best_checkpoint, load_checkpoint
from polyalign.train.distributed import World
from polyalign.train.distributed_checkpoint import full_model_state
from polyalign.train.logging import MetricsLogger, Progress, ProgressLine, print0
from polyalign.train.offline_data import PairSet, build_pair_sets, rows_used
from polyalign.train.run import build_reference

# Losses whose pairs are compared against a reference policy.
NEEDS_REFERENCE = ("dpo", "ipo", "copg")


@dataclass
class OfflineRun:
    cfg: OfflineRunConfig
    run_dir: Path
    model: torch.nn.Module  # the policy (causal LM), or the reward model being trained
    ref: torch.nn.Module | None  # frozen reference for on-the-fly log-probs; None when cached or unused
    tokenizer: object
    train_set: PairSet
    eval_set: PairSet | None
    optimizer: torch.optim.Optimizer
    logger: MetricsLogger
    progress: Progress
    total_steps: int
    data_report: dict
    start_step: int = 0
    state: dict = field(default_factory=dict)  # step, eval at start, best eval: saved in checkpoints
    world: World = field(default_factory=World)
    train_model: torch.nn.Module | None = None  # what training forwards go through (DDP/FSDP wrapper)

    def __post_init__(self) -> None:
        self.train_model = self.train_model or self.model

    @property
    def has_eval(self) -> bool:
        return self.eval_set is not None

    @property
    def needs_ref(self) -> bool:
        return self.cfg.loss.name in NEEDS_REFERENCE

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def models(self) -> dict[str, torch.nn.Module]:
        return {"reward_model" if self.cfg.loss.name == "reward_model" else "policy": self.model}


def total_steps(cfg: OfflineRunConfig, num_pairs: int) -> int:
    """train.steps, or ceil(epochs * training pairs / batch_size) when steps == 0 (derived here only)."""
    t = cfg.train
    steps = t.steps if t.steps > 0 else max(1, -(-int(t.epochs * num_pairs) // t.batch_size))
    if t.schedule != "constant" and steps <= t.warmup_steps:
        raise ConfigError(
            f"train: {steps} steps ({t.epochs} epochs of {num_pairs} pairs) leave no room after "
            f"warmup_steps={t.warmup_steps} for the {t.schedule} schedule"
        )
    return steps


def load_trained_model(cfg: OfflineRunConfig) -> torch.nn.Module:
    """The model to train: the policy, or a one-output scorer initialised from it (`load_score_model`: the
    family's sequence classifier, else backbone + our head) with a head seeded by train.seed."""
    m = cfg.model
    if cfg.loss.name == "reward_model":
        return load_score_model(m.policy, m.dtype, m.device, seed=cfg.train.seed)[0]
    model, _ = load_policy(m.policy, m.dtype, m.device, m.gradient_checkpointing)
    return model


def _with_lora(cfg: OfflineRunConfig, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.model.lora is None:
        return model
    from polyalign.lora import apply_lora

    return apply_lora(model, cfg.model.lora)


def setup_reference(cfg: OfflineRunConfig, model, train_set: PairSet, eval_set: PairSet | None, pad_id: int):
    """Cache the reference log-probs of the pairs the run will read (returns None) or return a frozen reference
    model. The reference is model.reference, else the starting policy (which, when caching, is the policy)."""
    if not cfg.reference.precompute:
        return build_reference(cfg, model)
    ref = build_reference(cfg, model) if cfg.model.reference else model  # read before any update
    t, n = cfg.train, len(train_set)
    rows = rows_used(n, total_steps(cfg, n), t.batch_size, t.seed, cfg.data.shuffle)
    precompute_reference(ref, train_set, pad_id, cfg.reference.batch_size, cfg.model.device, rows, "train")
    if eval_set is not None:
        rows = torch.arange(min(len(eval_set), cfg.eval.max_pairs or len(eval_set)))  # what evaluate reads
        precompute_reference(ref, eval_set, pad_id, cfg.eval.batch_size, cfg.model.device, rows, "eval")
    return None  # a separately loaded reference goes out of scope here and is freed


def precompute_reference(
    ref: torch.nn.Module,
    data: PairSet,
    pad_id: int,
    batch_size: int,
    device: str,
    rows: torch.Tensor | None = None,
    name: str = "data",
) -> None:
    """Fill data.ref_chosen / data.ref_rejected (N,) with the reference log-probs of `rows` (default all; the
    others stay NaN), in batches of consecutive needed rows: with every row needed, the batches evaluation uses,
    so that at step 0 the policy's margins are exactly 0. With a tokens cache (data.cache) the values go to a
    file beside it, keyed by the reference's weights, flushed every few seconds: an interrupted or repeated
    precompute computes only the rows it lacks. Progress lines (done/total, rate) every 5 s."""
    values = _reference_cache(ref, data, batch_size)  # (N, 2) float32: chosen, rejected; NaN = not computed
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    todo = rows[np.isnan(values[rows]).any(axis=1)]
    progress = ProgressLine(f"reference log-probs ({name})", len(todo), "pairs")
    for done in range(0, len(todo), batch_size):
        part = todo[done : done + batch_size]
        batch = collate_pairs([data.pairs[int(i)] for i in part], pad_id).to(device)
        chosen, rejected = reference_sequence_logprobs(ref, batch)
        values[part] = torch.stack([chosen, rejected], 1).float().cpu().numpy()
        if progress.advance(len(part)) and isinstance(values, np.memmap):
            values.flush()  # every few seconds: what is computed survives a kill
    if isinstance(values, np.memmap):
        values.flush()
    data.ref_chosen, data.ref_rejected = (torch.from_numpy(np.array(values[:, k])) for k in (0, 1))  # (N,)


def _reference_cache(ref: torch.nn.Module, data: PairSet, batch_size: int) -> np.ndarray:
    """(N, 2) float32 NaN-initialised: in memory, or memory-mapped from the set's cache file for this
    reference (weights fingerprint), batch size and set of rows (created atomically, NaN-filled)."""
    if data.cache is None:
        return np.full((len(data), 2), np.nan, dtype=np.float32)
    digest = hashlib.sha256()
    for part in (
        weights_fingerprint(ref),
        batch_size,
        next(ref.parameters()).dtype,
        data.pairs.rows.tobytes(),
    ):
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    path = data.cache / f"ref-{digest.hexdigest()[:24]}.npy"
    if not path.is_file():
        tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
        np.lib.format.open_memmap(tmp, "w+", np.float32, (len(data), 2))[:] = np.nan
        fsync_file(tmp)
        os.replace(tmp, path)
    return np.lib.format.open_memmap(path, "r+")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's and buffer's name, shape, dtype and up to ~4096 evenly spaced values: any
    trained or perturbed checkpoint changes it, and it costs little even for a large model on a GPU."""
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def setup_offline_run(cfg: OfflineRunConfig, resume: bool = False, overwrite: bool = False) -> OfflineRun:
    world, cfg, run_dir = loop.start(cfg, resume, overwrite)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.policy))
    # Data before the model: bad data fails fast, naming file, line and field.
    train_set, eval_set, data_report = build_pair_sets(cfg, tokenizer, console=print0)
    model = _with_lora(cfg, load_trained_model(cfg))
    ref = None
    if cfg.loss.name in NEEDS_REFERENCE:
        ref = setup_reference(cfg, model, train_set, eval_set, tokenizer.pad_token_id)
    if world.is_main:
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=1, ensure_ascii=False))
    steps = total_steps(cfg, len(train_set))
    distributed.shard(cfg.train.batch_size, world, "train.batch_size")  # fails early when it cannot split
    train_model = distributed.wrap(model, cfg.model.parallel, world)
    if ref is not None:
        ref = distributed.wrap_reference(ref, train_model, model, cfg.model.parallel, world)
    params = model.named_parameters()  # named: biases and norm weights get no weight decay
    optimizer, logger, progress = loop.plumbing(cfg, world, run_dir, params, steps, ("loss", "accuracy"))
    run = OfflineRun(
        cfg,
        run_dir,
        model,
        ref,
        tokenizer,
        train_set,
        eval_set,
        optimizer,
        logger,
        progress,
        steps,
        data_report,
        world=world,
        train_model=train_model,
    )
    if resume:
        loop.resume(run)
    return run


def summary(run: OfflineRun) -> dict:
    """Export the model (Hugging Face format, or the LoRA adapter/merged model) to run_dir/model, on every
    process (FSDP gathers the weights): the final weights, or with output.export: best those of the best
    checkpoint (loaded into the model first). The loop's closing hook; `polyalign train` writes the report."""
    export, step = run.run_dir / "model", run.total_steps
    best = best_checkpoint(run.run_dir) if run.cfg.output.export == "best" else None
    if best is not None:
        step = load_checkpoint(best, run.models(), restore_rng=False)["step"]
    weights = full_model_state(run.model, run.world) if distributed.is_sharded(run.model) else None
    if run.world.is_main and run.cfg.model.lora is not None:  # model/adapter and/or model/merged
        loop.export_lora_from(run, run.model if weights is None else weights, export)
    elif run.world.is_main:
        run.model.save_pretrained(export, **({"state_dict": weights} if weights is not None else {}))
        run.tokenizer.save_pretrained(export)
    cfg = run.cfg
    out = {
        "loss": cfg.loss.name,
        "eval_final": run.state.get("eval_final"),
        "data": run.data_report,
        "model": str(export),
        "model_step": step,
    }
    return out
