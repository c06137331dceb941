"""Offline run configuration: DPO, IPO, offline CoPG, SFT and Bradley-Terry reward models trained on a fixed
preference dataset (no generation).

Same rules as `polyalign/config.py` (strict keys, dotted overrides, `__post_init__` validation); the model
and output sections are shared with online runs. A YAML file with a top-level `loss:` section is an offline
config (`is_offline_config`); one with `algo:` is online. Imports no transformers.

    polyalign train configs/offline/dpo.yaml [--loss.beta=0.1 --train.steps=50 ...] [--resume]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from polyalign.config import (
    ModelConfig,
    OutputConfig,
    Schedule,
    check,
    find_config,
    load_config,
    validate_common,
)

Loss = Literal["dpo", "ipo", "copg", "sft", "reward_model"]
COLUMN_NAMES = ("prompt", "chosen", "rejected", "conversations", "completion", "reward", "language")


@dataclass(frozen=True)
class OfflineDataConfig:
    train: str = "builtin:dpo-demo-en"
    """Training pairs: a built-in set (builtin:dpo-demo-en | builtin:dpo-demo-zh), a JSONL/JSON/CSV/Parquet
    file, or a Hugging Face dataset id."""
    eval: str | None = None
    """Held-out pairs; None = split `eval_fraction` of the training prompts off instead."""
    eval_fraction: float = 0.1
    """Fraction of training pairs held out when `eval` is None (split by prompt, seeded); 0 = no eval."""
    fmt: Literal["auto", "pairs", "hh", "sharegpt", "scored"] = "auto"
    """See polyalign/data/preference.py."""
    split: str = "train"
    """Split of a hub dataset (the eval file uses the same split name)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Source column names that differ from the defaults, e.g. {language: lang, prompt: question}; keys from
    prompt|chosen|rejected|conversations|completion|reward|language."""
    language: str | None = None
    """Language (BCP-47) of rows without a language value."""
    max_length: int = 512
    """Prompt + completion tokens per example; longer examples are truncated (counts are logged)."""
    max_prompt_length: int = 256
    on_error: Literal["error", "skip"] = "error"
    """error: the first bad row stops the run, naming file, line and field | skip: skip and count bad rows."""
    pair_strategy: Literal["best_worst", "all_pairs", "random_pairs"] = "best_worst"
    """Scored data -> pairs: best_worst (DPO) | all_pairs | random_pairs (CoPG)."""
    rescore_with: str | None = None
    """A reward model (built-in name or path) that scores both sides of every pair once at setup; the pair is
    then re-ranked so that chosen has the higher score (the CoPG paper's offline protocol)."""
    use_chat_template: bool | None = None
    """None = the tokenizer's chat template for message-list prompts only; True/False to force."""
    shuffle: bool = True
    """Reshuffle the training pairs every epoch (seeded by train.seed and the epoch)."""
    cache_dir: str | None = "~/.cache/polyalign/data"
    """Tokens of data files of 1 MB or more, and their reference log-probs, are cached here for the next run
    (keyed by file path, size and mtime, tokenizer, settings; safe to delete); null = no cache."""


@dataclass(frozen=True)
class LossConfig:
    name: Loss = "dpo"
    beta: float = 0.1
    """KL strength: DPO's and CoPG's beta, IPO's tau (target margin 1/(2 beta))."""
    label_smoothing: float = 0.0
    """dpo: conservative-DPO label noise eps in [0, 0.5)."""
    length_normalize: bool = False
    """ipo: divide sequence log-probs by completion length (TRL's variant); False = the paper."""
    copg_form: Literal["squared", "surrogate"] = "squared"
    """copg: squared | surrogate (same gradient)."""
    sft_target: Literal["chosen", "random"] = "chosen"
    """sft: train on the chosen completion, or on a random side of each pair (seeded per step)."""


@dataclass(frozen=True)
class ReferenceConfig:
    precompute: bool = True
    """True: reference log-probs of every pair are computed once before training and cached (the reference
    model is then freed); False: a frozen reference model runs on every batch."""
    batch_size: int = 32
    """Pairs per forward while precomputing."""


@dataclass(frozen=True)
class OfflineTrainConfig:
    steps: int = 0
    """Optimizer steps; 0 = derive from `epochs` (ceil(epochs * train pairs / batch_size))."""
    epochs: float = 1.0
    """Passes over the training pairs when steps == 0."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    micro_batch_size: int = 0
    """Pairs per forward/backward; 0 = the whole batch. Gradients accumulate over micro-batches."""
    lr: float = 5e-4
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_skipped_steps: int = 3
    """Updates with a non-finite loss or gradient norm are skipped; this many in a row stop the run with an
    error (the weights, checked finite after every update, are never saved or exported non-finite)."""


@dataclass(frozen=True)
class OfflineEvalConfig:
    every: int = 0
    """Evaluate on the held-out pairs every N steps (and at the start and the end); 0 = start and end only."""
    batch_size: int = 32
    max_pairs: int = 0
    """Evaluate on at most this many held-out pairs; 0 = all."""


@dataclass(frozen=True)
class OfflineRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: OfflineTrainConfig = field(default_factory=OfflineTrainConfig)
    eval: OfflineEvalConfig = field(default_factory=OfflineEvalConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(run_dir="runs/offline"))
    """output.sample_every is not used offline (nothing is generated)."""

    def __post_init__(self) -> None:
        validate_offline(self)


# Numbers that must be > 0; every other number >= 0 (config.check_numbers), besides the shared ones.
POSITIVE = tuple(
    """data.max_length data.max_prompt_length loss.beta train.epochs train.batch_size reference.batch_size
    eval.batch_size""".split()
)


def validate_offline(cfg: OfflineRunConfig) -> None:
    d, lo, t = cfg.data, cfg.loss, cfg.train
    validate_common(cfg, POSITIVE, t.steps)
    unknown = sorted(set(d.columns) - set(COLUMN_NAMES))
    check(not unknown, f"data.columns: unknown key(s) {unknown}; valid keys: {list(COLUMN_NAMES)}")
    check(d.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    check(
        d.max_prompt_length < d.max_length,
        f"data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length ({d.max_length})",
    )
    check(lo.label_smoothing < 0.5, f"loss.label_smoothing must be in [0, 0.5), got {lo.label_smoothing}")
    check(
        t.micro_batch_size <= t.batch_size,
        f"train.micro_batch_size must be in 0..{t.batch_size} (got {t.micro_batch_size})",
    )


def load_offline_config(path: str | Path | None = None, overrides: list[str] = ()) -> OfflineRunConfig:
    """YAML file (or the defaults when path is None) + dotted overrides -> a validated OfflineRunConfig."""
    return load_config(path, overrides, cls=OfflineRunConfig)


def is_offline_config(data: dict | str | Path) -> bool:
    """True when a config (parsed dict, or a YAML path) has a top-level `loss:` section (offline), False for
    online configs. The CLI dispatches `polyalign train CONFIG` on this."""
    if not isinstance(data, dict):
        data = yaml.safe_load(find_config(data).read_text()) or {}
    return isinstance(data, dict) and "loss" in data
