"""Everything a trainer holds for one run, built from a RunConfig: models, engine, rewards, optimizer, logging,
checkpoints and resume, periodic evaluation and the closing report. The online loop (`train/online.py`) only
calls into this; it holds no algorithm.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyalign import losses
from polyalign.config import RunConfig, dump_yaml
from polyalign.data.prompts import PromptSet, check_prompt_lengths, load_prompts, prompt_batch
from polyalign.logprobs import completion_logprobs
from polyalign.models import load_policy, load_reference
from polyalign.rewards import build_reward, score_all
from polyalign.rollout import build_engine
from polyalign.train import distributed
from polyalign.train.checkpoint import (
    atomic_write_text,
    resume_run,
)
from polyalign.train.distributed import World, gathered
from polyalign.train.distributed_checkpoint import save_run_checkpoint
from polyalign.train.logging import MetricsLogger, NullLogger, Progress, print0
from polyalign.train.loop import build_optimizer, seed_everything
from polyalign.types import Sampling


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    tokenizer: object
    engine: object
    rewards: dict[str, Callable]
    prompts: PromptSet
    eval_prompts: PromptSet | None
    optimizer: torch.optim.Optimizer
    logger: MetricsLogger
    progress: Progress
    value_model: torch.nn.Module | None = None
    start_step: int = 0
    state: dict = field(default_factory=dict)  # step, REINFORCE baseline, best eval: saved in checkpoints
    world: World = field(default_factory=World)
    policy_train: torch.nn.Module | None = None  # what training forwards go through (DDP/FSDP wrapper)
    value_train: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.policy_train = self.policy_train or self.policy
        self.value_train = self.value_train or self.value_model

    @property
    def logprob_temperature(self) -> float:
        t = self.cfg.rollout.temperature
        return t if t > 0 else 1.0

    def next_prompts(self, step: int) -> tuple[list[str], dict]:
        """This process's share of step `step`'s prompts (all of them with one process)."""
        prompts, columns = prompt_batch(
            self.prompts, step, self.cfg.rollout.prompts_per_step, self.cfg.train.seed
        )
        part = distributed.shard(len(prompts), self.world, "rollout.prompts_per_step")
        return prompts[part], {k: v[part] for k, v in columns.items()}

    def generate(self, prompts: list[str], n: int, sampling: Sampling, extras: dict | None = None):
        """The engine's rollout, on gathered weights when the policy is FSDP-sharded."""
        sharded = self.world.distributed and self.cfg.rollout.engine == "hf"  # vLLM has its own copy
        with gathered(self.policy_train if sharded else None):
            return self.engine.generate(prompts, n=n, sampling=sampling, extras=extras)

    def score(self, prompts: list[str], completions: list[str], **columns) -> tuple[torch.Tensor, dict]:
        return score_all(self.rewards, self.cfg.reward.functions, prompts, completions, **columns)

    def console(self, message: str) -> None:
        self.progress.print(message)

    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy} | ({"value": self.value_model} if self.value_model is not None else {})


def setup_run(cfg: RunConfig, resume: bool = False) -> Run:
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    world, cfg = distributed.join(cfg)
    check_split(cfg, world)
    seed_everything(cfg.train.seed)
    run_dir = distributed.claim_on_main(cfg.output.run_dir, resume, world, dump_yaml(cfg))

    policy, tokenizer = load_policy(
        cfg.model.policy,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    if cfg.model.lora is not None:
        from polyalign.lora import apply_lora

        policy = apply_lora(policy, cfg.model.lora)
    ref = _reference(cfg, policy) if cfg.algo.kl_coef > 0 or cfg.algo.name == "copg" else None
    prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_column)
    check_prompt_lengths(prompts, tokenizer, cfg.data.max_prompt_tokens)
    eval_prompts = (
        load_prompts(cfg.data.eval_prompts, cfg.data.prompt_column) if cfg.data.eval_prompts else None
    )
    rewards = {spec: build_reward(spec) for spec in cfg.reward.functions}

    from polyalign.train import ppo  # PPO adds a critic with its own parameters

    value_model = ppo.build_value_model(cfg, policy) if cfg.algo.name == "ppo" else None
    policy_train, value_train, ref = _distribute(cfg, world, policy, value_model, ref, rewards)
    params = list(policy.parameters()) + (list(value_model.parameters()) if value_model is not None else [])
    optimizer = build_optimizer(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    run = Run(
        cfg,
        run_dir,
        policy,
        ref,
        tokenizer,
        _engine(cfg, policy, tokenizer),
        rewards,
        prompts,
        eval_prompts,
        optimizer,
        MetricsLogger(run_dir) if world.is_main else NullLogger(),
        Progress(
            total=cfg.train.steps,
            keys=("reward", "score", "kl", "length", "tokens_per_s"),
            enabled=cfg.output.progress and world.is_main,
            print_every=10 if cfg.output.progress else 0,
        ),
        value_model,
        world=world,
        policy_train=policy_train,
        value_train=value_train,
    )
    if resume:
        _resume(run)
    return run


def _distribute(cfg: RunConfig, world: World, policy, value_model, ref, rewards: dict):
    """Wrap the models for DDP / FSDP (no-ops in one process): (policy_train, value_train, reference).
    Under FSDP the reward models that score rollouts are sharded too (they are frozen)."""
    strategy = cfg.model.parallel
    policy_train = distributed.wrap(policy, strategy, world)
    value_train = distributed.wrap(value_model, strategy, world) if value_model is not None else None
    if world.distributed and strategy == "fsdp":
        for scorer in rewards.values():
            if isinstance(getattr(scorer, "model", None), torch.nn.Module):
                scorer.model = distributed.wrap(scorer.model, strategy, world, trainable=False)
    if ref is not None:
        ref = distributed.wrap_reference(ref, policy_train, policy, strategy, world)
    return policy_train, value_train, ref


def check_split(cfg: RunConfig, world: World) -> None:
    """Each process must get whole groups, as many in each of the algo.updates_per_batch minibatches."""
    prompts, parts = cfg.rollout.prompts_per_step, cfg.algo.updates_per_batch
    if prompts % (world.size * parts):
        raise ValueError(
            f"rollout.prompts_per_step ({prompts}) must be a multiple of processes x algo.updates_per_batch "
            f"({world.size} x {parts}) so that every process holds its share of every minibatch"
        )


def _reference(cfg: RunConfig, policy: torch.nn.Module) -> torch.nn.Module:
    """model.reference; else with LoRA the policy's base with the adapter disabled; else a frozen copy."""
    m = cfg.model
    if m.reference:
        return load_reference(m.reference, dtype=m.dtype, device=m.device)[0]
    if m.lora is not None:
        from polyalign.lora import reference_view

        return reference_view(policy)
    return _frozen_copy(policy)


def _engine(cfg: RunConfig, policy: torch.nn.Module, tokenizer):
    if cfg.rollout.engine == "vllm":
        return build_engine("vllm", policy, tokenizer, **dataclasses.asdict(cfg.rollout.vllm))
    return build_engine(cfg.rollout.engine, policy, tokenizer)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _resume(run: Run) -> None:
    if resume_run(run):
        run.engine.load_weights(run.policy)


def maybe_checkpoint(run: Run, step: int) -> None:
    cfg = run.cfg
    last = step == cfg.train.steps
    is_best = False
    if cfg.eval.every and (step % cfg.eval.every == 0 or last):
        result = evaluate(run, step)
        best = run.state.get("best_eval")
        if best is None or result["eval/reward"] > best["eval/reward"]:
            run.state["best_eval"] = {**result, "step": step}
            is_best = True
    if (cfg.output.checkpoint_every and step % cfg.output.checkpoint_every == 0) or last or is_best:
        save_run_checkpoint(run, step, is_best)


@torch.inference_mode()
def evaluate(run: Run, step: int) -> dict:
    """Greedy completions of held-out prompts: mean reward (the paper selects by test reward), KL and length.

    With several processes each evaluates its share of the prompts (all of them when the count does not
    split evenly) and the per-prompt results are gathered; rank 0 writes them."""
    if run.eval_prompts is None:
        return {}
    cfg, world = run.cfg, run.world
    prompts = run.eval_prompts.prompts[: cfg.eval.num_prompts]
    part = distributed.shard(len(prompts), world, "") if len(prompts) % world.size == 0 else slice(None)
    columns = {k: v[: len(prompts)][part] for k, v in run.eval_prompts.columns.items()}
    rollout = run.generate(
        prompts[part],
        n=1,
        sampling=Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0),
        extras=columns,
    )
    scores, _ = run.score(rollout.prompts_per_row, rollout.completions, **rollout.extras)
    kl = torch.zeros_like(scores)
    if run.ref is not None:
        ref_logprobs = completion_logprobs(
            run.ref, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
        kl = losses.sequence_kl(rollout.logprobs, ref_logprobs, rollout.completion_mask, kind="k1")
    per_prompt = torch.stack(
        [scores.float().cpu(), kl.float().cpu(), rollout.completion_lengths.float().cpu()]
    )
    completions = rollout.completions
    if part != slice(None):
        per_prompt = distributed.gather_rows(per_prompt.T.contiguous(), world).T
        completions = distributed.gather_objects(completions, world)
    scores, kl, lengths = per_prompt
    result = {
        "eval/reward": float(scores.mean()),
        "eval/kl": float(kl.mean()),
        "eval/length": float(lengths.mean()),
    }
    run.logger.log(step, result)
    if not world.is_main:
        return result
    samples = [
        {"prompt": p, "completion": c, "score": float(s)} for p, c, s in zip(prompts, completions, scores)
    ]
    (run.run_dir / "eval").mkdir(exist_ok=True)
    atomic_write_text(
        run.run_dir / "eval" / f"step_{step:06d}.json", json.dumps({**result, "samples": samples}, indent=1)
    )
    return result


def finish_run(run: Run) -> dict:
    run.progress.close()
    run.logger.close()
    distributed.barrier(run.world)
    summary = {
        "run_dir": str(run.run_dir),
        "steps": run.cfg.train.steps,
        "eval_start": run.state.get("eval_start"),
        "best_eval": run.state.get("best_eval"),
    }
    if not run.world.is_main:
        return summary
    if run.cfg.output.report:
        from polyalign.train.online_report import before_after, write_online_report

        summary["report"] = str(write_online_report(run.run_dir, run.cfg))
        for prompt, before, after in before_after(run.run_dir)[2]:
            print0(f"\n{prompt}\n  before: {before.strip()}\n  after:  {after.strip()}")
    atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=1))
    print0(f"run finished: {run.run_dir}")
    return summary
