"""Everything the offline trainer holds for one run, built from an OfflineRunConfig: the trained model (a
causal LM, or a sequence classifier for reward_model), the reference (cached log-probs or a frozen model),
the tokenized pair sets, optimizer, logging, resume, and the closing report. `train/offline.py` holds the
loop and the losses; this file holds no algorithm.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyalign.config import ConfigError, dump_yaml
from polyalign.config_offline import OfflineRunConfig
from polyalign.files import atomic_write_text
from polyalign.models import (
    load_base_classifier,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_model_path,
)
from polyalign.report import write_run_report
from polyalign.train import distributed
from polyalign.train.checkpoint import resume_run
from polyalign.train.distributed import World
from polyalign.train.distributed_checkpoint import export_lora_from, full_model_state
from polyalign.train.logging import MetricsLogger, NullLogger, Progress, print0
from polyalign.train.loop import build_optimizer, seed_everything
from polyalign.train.offline_batches import precompute_reference
from polyalign.train.offline_data import PairSet, build_pair_sets

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
    def needs_ref(self) -> bool:
        return self.cfg.loss.name in NEEDS_REFERENCE

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def console(self, message: str) -> None:
        self.progress.print(message)

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
    """The model to train: the policy, or a one-output sequence classifier initialised from it."""
    m = cfg.model
    if cfg.loss.name == "reward_model":
        model, _ = load_base_classifier(m.policy, cfg.train.seed)
        return model.to(device=m.device, dtype=getattr(torch, m.dtype)).train()
    model, _ = load_policy(m.policy, m.dtype, m.device, m.gradient_checkpointing)
    return model


def _with_lora(cfg: OfflineRunConfig, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.model.lora is None:
        return model
    from polyalign.lora import apply_lora

    return apply_lora(model, cfg.model.lora)


def setup_reference(cfg: OfflineRunConfig, model, train_set: PairSet, eval_set: PairSet | None, pad_id: int):
    """Cache the reference log-probs of every pair (returns None) or return a frozen reference model. The
    reference is model.reference, else the starting policy (which, when caching, is the policy itself)."""
    m = cfg.model
    if m.reference:
        ref = load_reference(m.reference, dtype=m.dtype, device=m.device)[0]
    elif cfg.reference.precompute:
        ref = model  # read before any update, so it is the starting policy
    elif m.lora is not None:
        from polyalign.lora import reference_view

        ref = reference_view(model)  # the base: the adapter disabled, no second copy
    else:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if not cfg.reference.precompute:
        return ref
    precompute_reference(ref, train_set, pad_id, cfg.reference.batch_size, m.device)
    if eval_set is not None:
        precompute_reference(ref, eval_set, pad_id, cfg.eval.batch_size, m.device)
    return None  # a separately loaded reference goes out of scope here and is freed


def setup_offline_run(cfg: OfflineRunConfig, resume: bool = False) -> OfflineRun:
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    world, cfg = distributed.join(cfg)
    seed_everything(cfg.train.seed)
    run_dir = distributed.claim_on_main(cfg.output.run_dir, resume, world, dump_yaml(cfg))
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
    optimizer = build_optimizer(
        model.named_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    progress = Progress(
        total=steps,
        keys=("loss", "accuracy"),
        enabled=cfg.output.progress and world.is_main,
        print_every=10 if cfg.output.progress else 0,
    )
    run = OfflineRun(
        cfg,
        run_dir,
        model,
        ref,
        tokenizer,
        train_set,
        eval_set,
        optimizer,
        MetricsLogger(run_dir) if world.is_main else NullLogger(),
        progress,
        steps,
        data_report,
        world=world,
        train_model=train_model,
    )
    if resume:
        resume_run(run)
    return run


def _eval_table(run: OfflineRun) -> str:
    rows = [
        ("start", run.state.get("eval_start")),
        ("best", run.state.get("best_eval")),
        ("final", run.state.get("eval_final")),
    ]
    keys = sorted({k for _, r in rows if r for k in r if k.startswith("eval/")})
    if not keys:
        return ""
    lines = ["| held-out | " + " | ".join(name for name, _ in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for key in keys:
        cells = [f"{r[key]:.4f}" if r and key in r else "" for _, r in rows]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    best = run.state.get("best_eval")
    return "\n".join(lines) + (f"\n\nBest checkpoint: step {best['step']}." if best else "")


def finish_offline_run(run: OfflineRun) -> dict:
    """Close logs, export the final model (Hugging Face format) to run_dir/model, write the report and
    summary.json; return the summary."""
    run.progress.close()
    run.logger.close()
    export = run.run_dir / "model"
    weights = full_model_state(run.model, run.world) if distributed.is_sharded(run.model) else None
    if run.world.is_main and run.cfg.model.lora is not None:  # model/adapter and/or model/merged
        export_lora_from(run, run.model if weights is None else weights, export)
    elif run.world.is_main:
        run.model.save_pretrained(export, **({"state_dict": weights} if weights is not None else {}))
        run.tokenizer.save_pretrained(export)
    distributed.barrier(run.world)
    cfg = run.cfg
    summary = {
        "run_dir": str(run.run_dir),
        "loss": cfg.loss.name,
        "steps": run.total_steps,
        "eval_start": run.state.get("eval_start"),
        "best_eval": run.state.get("best_eval"),
        "eval_final": run.state.get("eval_final"),
        "data": run.data_report,
        "model": str(export),
    }
    if not run.world.is_main:
        return summary
    if cfg.output.report:
        text = (
            f"Loss `{cfg.loss.name}` (beta {cfg.loss.beta}), model `{cfg.model.policy}`, data `{cfg.data.train}`, "
            f"{run.total_steps} steps of {cfg.train.batch_size} pairs.\n\n{_eval_table(run)}\n\n"
            f"Data: `{json.dumps(run.data_report, ensure_ascii=False)}`\n"
        )
        summary["report"] = str(
            write_run_report(
                run.run_dir,
                title=f"polyalign offline {cfg.loss.name} run",
                keys=("loss", "accuracy", "eval/loss", "eval/accuracy", "grad_norm"),
                extra_markdown=text,
            )
        )
    atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    print0(f"run finished: {run.run_dir}")
    return summary
