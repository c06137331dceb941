"""Configuration of `polyalign eval`: frozen dataclasses (the single source of truth; YAML is their serialised
form, loaded strictly by `polyalign.config.load_config(path, overrides, cls=EvalRunConfig)`), and the
checks that make a bad combination an error before anything runs. Imports no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polyalign.config import check
from polyalign.eval.config import JUDGE_KINDS, JudgeConfig
from polyalign.recipes.evaluate.metrics import TIE_POLICIES

METRICS = ("harm", "win_rate", "exact_match")
_HARM_KINDS, _PAIR_KINDS = ("lexicon", "openai", "hf"), ("openai", "hf", "reward_model")


@dataclass(frozen=True)
class SideConfig:
    model: str | None = None
    """A model to generate with: builtin name, local folder or hub id."""
    completions: str | None = None
    """OR a file of completions with `prompt` and `completion` columns."""
    label: str = ""
    """Name in the report; default: the model name or the file name."""
    temperature: float | None = None
    """Overrides generation.temperature for this side (e.g. sampled model vs greedy baseline)."""


@dataclass(frozen=True)
class PromptSetConfig:
    source: str = "xsafety"
    """xsafety | mgsm | a prompt file path | "" (use model.completions, which then needs a language column)."""
    languages: list[str] = field(default_factory=list)
    """BCP-47 codes; empty = every language of the set."""
    categories: list[str] = field(default_factory=list)
    """XSafety categories; empty = the 13 unsafe ones; "commonsense" = the benign set."""
    per_group: int = 5
    """First N prompts per (language, category); 0 = all."""
    layout: str = "long"
    """Prompt files: long (a row per prompt: prompt, language, harm_category, ...) | wide (a column per
    language, MultiJail's id,source,tags,en,zh,...)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Prompt files: {field: column in the file}, e.g. {prompt: question} or, wide, {id: uid, tags: labels}."""


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy (the papers' evaluation setting)."""
    top_p: float = 1.0
    batch_size: int = 16
    chat_template: bool | None = None
    """Wrap prompts as a user message in the tokenizer's chat template; None = when it has one."""
    too_long: str = "skip"
    """Prompts that do not fit the context: skip (counted in the report) | error."""
    device: str = "cpu"


@dataclass(frozen=True)
class EvalRunConfig:
    model: SideConfig = field(default_factory=lambda: SideConfig(model="stories260K"))
    baseline: SideConfig = field(default_factory=SideConfig)
    """Optional: needed for win_rate and for relative harm reduction."""
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    metrics: list[str] = field(default_factory=lambda: ["harm"])
    """Any of harm | win_rate | exact_match."""
    tie_policy: str = "half"
    """Win-rate ties: half | loss | exclude (see metrics.py)."""
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    chunk_size: int = 64
    """Judgements are appended to judgements.jsonl after every chunk of this many items."""
    out_dir: str = "runs/eval"
    threads: int = 0
    """CPU threads (torch.set_num_threads); 0 = the process's setting (the polyalign command's default, see
    docs/threads.md)."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: EvalRunConfig) -> None:
    has = lambda side: (side.model is not None) + (side.completions is not None)
    check(has(cfg.model) == 1, "model: give exactly one of model.model and model.completions")
    check(has(cfg.baseline) <= 1, "baseline: give at most one of baseline.model and baseline.completions")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    check(
        bool(cfg.metrics) and not unknown, f"metrics: {cfg.metrics} must be a non-empty subset of {METRICS}"
    )
    kind = cfg.judge.kind
    check(kind in JUDGE_KINDS, f"judge.kind: {kind!r} not in {JUDGE_KINDS}")
    check(
        "harm" not in cfg.metrics or kind in _HARM_KINDS,
        f"metrics harm: judge.kind {kind!r} cannot judge harm",
    )
    if "win_rate" in cfg.metrics:
        check(has(cfg.baseline) == 1, "metrics win_rate: set baseline.model or baseline.completions")
        check(kind in _PAIR_KINDS, f"metrics win_rate: judge.kind {kind!r} cannot compare; use {_PAIR_KINDS}")
    check(kind == "lexicon" or bool(cfg.judge.model), f"judge.model: name the {kind} judge model")
    check(cfg.tie_policy in TIE_POLICIES, f"tie_policy: {cfg.tie_policy!r} not in {TIE_POLICIES}")
    check(cfg.generation.too_long in ("skip", "error"), "generation.too_long must be skip or error")
    p = cfg.prompts
    check(p.layout in ("long", "wide"), f"prompts.layout: {p.layout!r} must be long or wide")
    builtin = p.source in ("xsafety", "mgsm")
    check(
        not builtin or (p.layout == "long" and not p.columns),
        f"prompts.layout and prompts.columns apply to prompt files, not the builtin {p.source!r}",
    )
    check(
        cfg.prompts.source != "" or cfg.model.completions is not None,
        "prompts.source '' needs model.completions",
    )
    check(
        0 < cfg.confidence < 1 and cfg.bootstrap_resamples >= 1 and cfg.chunk_size >= 1,
        "need 0 < confidence < 1, bootstrap_resamples >= 1, chunk_size >= 1",
    )
