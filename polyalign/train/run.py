"""Everything the online trainer holds for one run, built from a RunConfig: models (wrapped for DDP/FSDP),
engine, rewards, prompts, optimizer and logging. The holder the skeleton (`train/loop.py`) drives; it holds
no algorithm and no loop.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyalign.config import RunConfig
from polyalign.data.prompts import PromptSet, check_prompt_lengths, load_prompts, prompt_batch
from polyalign.models import load_policy, load_reference
from polyalign.rewards import RewardError, build_reward, score_all
from polyalign.rollout import build_engine
from polyalign.train import distributed, loop
from polyalign.train.distributed import World, gathered
from polyalign.train.logging import MetricsLogger, Progress
from polyalign.train.ppo import build_value_model
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
    def total_steps(self) -> int:
        return self.cfg.train.steps

    @property
    def has_eval(self) -> bool:
        return bool(self.cfg.eval.every)

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
        """(weighted total (B,), {reward name: its scores (B,)}); a score beyond +-reward.max_abs is an error
        naming its reward function (NaN/Inf ones are refused by `score_all`)."""
        total, components = score_all(
            self.rewards, self.cfg.reward.functions, prompts, completions, **columns
        )
        bound = self.cfg.reward.max_abs
        for name, scores in components.items():
            if bool((scores.abs() > bound).any()):
                row = int(scores.abs().argmax())
                raise RewardError(
                    f"reward {name!r} returned {float(scores[row]):.4g} for completion {row}, beyond "
                    f"reward.max_abs={bound:g}: rescale the reward, or raise reward.max_abs if it is meant"
                )
        return total, components

    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy} | ({"value": self.value_model} if self.value_model is not None else {})


def setup_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Run:
    world, cfg, run_dir = loop.start(cfg, resume, overwrite, check=check_split)
    policy, tokenizer = load_policy(
        cfg.model.policy,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    if cfg.model.lora is not None:
        from polyalign.lora import apply_lora  # peft: LoRA runs only

        policy = apply_lora(policy, cfg.model.lora)
    ref = build_reference(cfg, policy) if cfg.algo.kl_coef > 0 or cfg.algo.name == "copg" else None
    prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_column)
    check_prompt_lengths(prompts, tokenizer, cfg.data.max_prompt_tokens)
    eval_prompts = (
        load_prompts(cfg.data.eval_prompts, cfg.data.prompt_column) if cfg.data.eval_prompts else None
    )
    rewards = {spec: build_reward(spec) for spec in cfg.reward.functions}
    value_model = build_value_model(cfg, policy) if cfg.algo.name == "ppo" else None  # PPO's critic
    policy_train, value_train, ref = _distribute(cfg, world, policy, value_model, ref, rewards)
    params = list(policy.parameters()) + (list(value_model.parameters()) if value_model is not None else [])
    keys = ("reward", "score", "kl", "length", "tokens_per_s")
    optimizer, logger, progress = loop.plumbing(cfg, world, run_dir, params, cfg.train.steps, keys)
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
        logger,
        progress,
        value_model,
        world=world,
        policy_train=policy_train,
        value_train=value_train,
    )
    if resume and loop.resume(run):
        run.engine.load_weights(run.policy)
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


def build_reference(cfg, policy: torch.nn.Module) -> torch.nn.Module:
    """model.reference; else with LoRA the policy's base with the adapter disabled; else a frozen copy.
    Online and offline runs."""
    m = cfg.model
    if m.reference:
        return load_reference(m.reference, dtype=m.dtype, device=m.device)[0]
    if m.lora is not None:
        from polyalign.lora import reference_view  # peft: LoRA runs only

        return reference_view(policy)
    return copy.deepcopy(policy).eval().requires_grad_(False)


def _engine(cfg: RunConfig, policy: torch.nn.Module, tokenizer):
    if cfg.rollout.engine == "vllm":
        return build_engine("vllm", policy, tokenizer, **dataclasses.asdict(cfg.rollout.vllm))
    return build_engine(cfg.rollout.engine, policy, tokenizer)
