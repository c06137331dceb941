"""Configuration of `polyalign experiment`: the cross-lingual transfer / safety-mixture experiment (frozen
dataclasses; YAML loaded strictly by `polyalign.config.load_config(path, overrides, cls=ExperimentConfig)`).
Imports no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from polyalign.config import check
from polyalign.eval.config import JudgeConfig, check_languages
from polyalign.recipes.evaluate.config import GenerationConfig

METHODS = ("dpo", "sft_random", "sft_chosen", "dpo_sft", "rloo")
METRICS = ("harm", "win_rate")
PATHS = (
    "general.synth", "general.pairs", "safety.synth", "safety.pairs", "training.offline", "training.online",
    "eval.prompts",
)  # fmt: skip


@dataclass(frozen=True)
class DataSource:
    synth: str | None = None
    """A synth config (YAML, relative to this config file) to run; its out_dir becomes
    <experiment out_dir>/synth/<general|safety>."""
    synth_overrides: list[str] = field(default_factory=list)
    """Dotted overrides for that synth config, e.g. ["source.limit=8"]; a source.path here is relative to this
    config file too."""
    pairs: str | None = None
    """OR a ready pairs file (a synth final.jsonl, or any JSONL with prompt, chosen, rejected, language),
    relative to this config file."""


@dataclass(frozen=True)
class TrainSetConfig:
    name: str = "all"
    """Row label in the report (with the method): letters, digits, - _ + . only."""
    languages: list[str] = field(default_factory=list)
    """Training languages (BCP-47); empty = every language in the data."""
    safety_share: float = 0.0
    """Share of safety pairs in the mixture: 0 (none), e.g. 0.15, or 1 (safety only)."""
    safety_label: str = "all"
    """Safety pairs used: all | global (global-only ablation) | local (local-only ablation)."""
    size: int = 0
    """Pairs in the mixture; 0 = as many as the data allows at that share."""


@dataclass(frozen=True)
class TrainingConfig:
    methods: list[str] = field(default_factory=lambda: ["dpo"])
    """Any of dpo (DPO on the starting model) | sft_random (SFT on a random side of each pair) | sft_chosen
    (SFT on the chosen side) | dpo_sft (DPO after sft_chosen) | rloo (online, on the set's prompts)."""
    offline: str | None = None
    """Offline trainer YAML (relative to this config file, e.g. ../offline/dpo.yaml) for every offline method;
    None = its defaults.
    The experiment sets model.policy, data.train, loss.name, loss.sft_target and output.run_dir."""
    offline_overrides: list[str] = field(default_factory=list)
    online: str | None = None
    """Online trainer YAML (relative to this config file) for rloo; None = its defaults. The experiment sets model.policy, data.prompts,
    algo.name and output.run_dir."""
    online_overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExperimentEvalConfig:
    prompts: str = "xsafety"
    """xsafety | a prompt file (relative to this config file): the Aya red-teaming layout (prompt, language,
    harm_category, global_or_local) or, with layout: wide, one column per language (MultiJail)."""
    layout: str = "long"
    """long (one prompt per row) | wide (one column per language; see polyalign/synth/sources.py)."""
    columns: dict[str, str] = field(default_factory=dict)
    """{field: column in the file} for a file with other column names, e.g. {prompt: text, language: lang}."""
    categories: list[str] = field(default_factory=list)
    """xsafety categories; empty = the 13 unsafe ones."""
    per_group: int = 2
    """First N prompts per (language, category); 0 = all."""
    metrics: list[str] = field(default_factory=lambda: ["harm", "win_rate"])
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    harm_judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Harm judge (default: the offline lexicon judge)."""
    win_judge: JudgeConfig = field(
        default_factory=lambda: JudgeConfig(kind="reward_model", model="stories260K-sentiment-rm")
    )
    """Pairwise judge for the win-rate of every trained model against the starting model."""
    tie_policy: str = "half"
    bootstrap_resamples: int = 200


@dataclass(frozen=True)
class ExperimentConfig:
    base_model: str = "stories260K"
    """The starting model (and the win-rate baseline)."""
    general: DataSource = field(default_factory=DataSource)
    safety: DataSource = field(default_factory=DataSource)
    """Optional safety pairs, needed by any train set with safety_share > 0."""
    train_sets: list[TrainSetConfig] = field(default_factory=lambda: [TrainSetConfig()])
    eval_languages: list[str] = field(default_factory=lambda: ["en"])
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: ExperimentEvalConfig = field(default_factory=ExperimentEvalConfig)
    seed: int = 0
    out_dir: str = "runs/experiment"
    threads: int = 0
    """CPU threads (torch.set_num_threads); 0 = the process's setting (the polyalign command's default, see
    docs/threads.md); its
    synth, training and evaluation runs share it unless their own configs set theirs.."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: ExperimentConfig) -> None:
    check_languages(
        [*cfg.eval_languages, *(c for s in cfg.train_sets for c in s.languages)], "experiment languages"
    )
    check(bool(cfg.eval_languages), "eval_languages: give at least one evaluation language")
    for name, d in (("general", cfg.general), ("safety", cfg.safety)):
        check(d.synth is None or d.pairs is None, f"{name}: give synth or pairs, not both")
    check(cfg.general.synth is not None or cfg.general.pairs is not None, "general: give synth or pairs")
    names = [s.name for s in cfg.train_sets]
    check(bool(names) and len(set(names)) == len(names), f"train_sets: need unique names, got {names}")
    for s in cfg.train_sets:
        check(
            bool(s.name) and all(ch.isalnum() or ch in "-_+." for ch in s.name),
            f"train set name {s.name!r}: use letters, digits, - _ + . only",
        )
        check(0.0 <= s.safety_share <= 1.0, f"train set {s.name}: safety_share must be in [0, 1]")
        check(
            s.safety_label in ("all", "global", "local"), f"train set {s.name}: safety_label all|global|local"
        )
        check(
            s.safety_share == 0 or cfg.safety.synth is not None or cfg.safety.pairs is not None,
            f"train set {s.name}: safety_share {s.safety_share} needs safety data (safety.synth or safety.pairs)",
        )
        check(s.size >= 0, f"train set {s.name}: size must be >= 0")
    bad = [m for m in cfg.training.methods if m not in METHODS]
    check(
        bool(cfg.training.methods) and not bad,
        f"training.methods: {cfg.training.methods} must be from {METHODS}",
    )
    bad = [m for m in cfg.eval.metrics if m not in METRICS]
    check(bool(cfg.eval.metrics) and not bad, f"eval.metrics: {cfg.eval.metrics} must be from {METRICS}")
    check(cfg.eval.layout in ("long", "wide"), f"eval.layout: {cfg.eval.layout!r} not in long|wide")
    check(cfg.eval.harm_judge.kind in ("lexicon", "openai", "hf"), "eval.harm_judge.kind: lexicon|openai|hf")
    check(
        cfg.eval.win_judge.kind in ("reward_model", "openai", "hf"),
        "eval.win_judge.kind: reward_model|openai|hf",
    )


def load_experiment_config(path: str | None, overrides: list[str] = ()) -> ExperimentConfig:
    """The config with its input paths (`PATHS`, and source.path in `synth_overrides`) resolved relative to
    the config file (`polyalign.synth.paths`); command-line overrides stay relative to the current folder."""
    from polyalign.synth.paths import SYNTH_PATHS, load_config_at, resolve_override

    cfg = load_config_at(path, list(overrides), ExperimentConfig, PATHS)
    if path is None:
        return cfg
    base = Path(path).parent
    fix = lambda d: replace(
        d, synth_overrides=[resolve_override(o, SYNTH_PATHS, base) for o in d.synth_overrides]
    )
    return replace(cfg, general=fix(cfg.general), safety=fix(cfg.safety))
