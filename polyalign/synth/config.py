"""Configuration of `polyalign synth`: frozen dataclasses (YAML is their serialised form, loaded strictly by
`polyalign.config.load_config(path, overrides, cls=SynthConfig)`), and the checks that turn a bad setting
(an unknown language code, fewer than two generators, an unknown backend kind) into an error before anything
runs. Imports no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polyalign.config import check
from polyalign.eval.config import EndpointConfig, check_languages

GENERATOR_KINDS = ("local", "hf_chat", "openai", "seq2seq")
JUDGE_KINDS = ("reward_model", "lexicon", "openai", "hf")
TRANSLATE_TEMPLATE = (
    "Translate the following text into {language_name}. Reply with the translation only, nothing else.\n\n"
    "{text}"
)


@dataclass(frozen=True)
class SourceConfig:
    path: str = "builtin:stories"
    """builtin:stories (English story openings) | xsafety (the shipped red-team set) | a JSONL/JSON/CSV/Parquet
    file (a relative path is relative to this config file): long layout = the Aya red-teaming one (prompt,
    language, optional id, harm_category (a label or a list literal), global_or_local); wide layout = one
    column per language (MultiJail: id, source, tags, en, zh, ...)."""
    layout: str = "long"
    """long (one prompt per row) | wide (one column per language; see polyalign/recipes/columns.py)."""
    columns: dict[str, str] = field(default_factory=dict)
    """{field: column in the file}, e.g. {prompt: text, harm_category: category} (long) or {id: row_id,
    tags: labels} (wide); unnamed fields keep their usual column names."""
    language: str = "en"
    """Language of rows that have no `language` value (builtin:stories, files without the column)."""
    languages: list[str] = field(default_factory=list)
    """Keep only these source languages; empty = all."""
    categories: list[str] = field(default_factory=list)
    """xsafety: categories (empty = the 13 unsafe ones); a file: keep prompts with any of these categories."""
    per_group: int = 0
    """First N prompts per (language, category); 0 = all."""
    limit: int = 0
    """First N prompts overall after the filters; 0 = all."""


@dataclass(frozen=True)
class BackendConfig(EndpointConfig):
    name: str = ""
    """Label in ids and provenance; default: kind:model. Must be unique among the generators."""
    kind: str = "local"
    """local (a causal LM through HFEngine, batched, sampled) | hf_chat (a local model behind ChatClient,
    greedy) | openai (any OpenAI-compatible endpoint: polyalign serve, vLLM, a provider) | seq2seq
    (translation only: an NLLB or Marian model through transformers)."""
    model: str = "stories260K"
    """Model name / path / hub id; for openai the endpoint's model name. Marian may use {src} and {tgt}."""
    system: str | None = None
    """A system message (chat kinds) or a preamble put before the prompt (local), e.g. a safety preamble."""
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    use_chat_template: bool | None = None
    """local: wrap the prompt as a user message in the tokenizer's chat template; None = when it has one."""

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}:{self.model}"


@dataclass(frozen=True)
class TranslateConfig:
    languages: list[str] = field(default_factory=list)
    """Target languages (BCP-47); empty = no translation stage."""
    translator: BackendConfig = field(
        default_factory=lambda: BackendConfig(name="translator", temperature=0.0)
    )
    template: str = TRANSLATE_TEMPLATE
    """Chat/local translators: needs {text}; may use {language_name}, {language}, {source_language}."""
    keep_source: bool = True
    """Keep the untranslated source prompts as prompts of their own language too."""


@dataclass(frozen=True)
class JudgeConfig(EndpointConfig):
    kind: str = "reward_model"
    """reward_model (score) | lexicon (offline harm) | openai | hf (LLM judges, see `mode`)."""
    model: str = "stories260K-sentiment-rm"
    mode: str = "score"
    """LLM judges: score (a 1-10 rating) | harm (harmful yes/no; score = 1 for safe, 0 for harmful). The
    lexicon judge is always harm."""
    cache: str | None = "judge_cache.jsonl"


@dataclass(frozen=True)
class PairConfig:
    min_margin: float = 0.0
    """A pair needs best - worst score > min_margin (ties are always dropped)."""


@dataclass(frozen=True)
class FilterConfig:
    language_mismatch: str = "drop"
    """Pairs whose prompt or completions are in the wrong script for their language: drop | keep (counted
    either way)."""
    dedupe: bool = True
    """Keep the first pair per (language, normalised prompt)."""
    max_chars: int = 0
    """Drop pairs with a completion longer than this; 0 = no limit."""


@dataclass(frozen=True)
class SynthConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    generators: list[BackendConfig] = field(
        default_factory=lambda: [
            BackendConfig(name="stories-t0.7", temperature=0.7, seed=1),
            BackendConfig(name="stories-t1.2", temperature=1.2, seed=2),
        ]
    )
    """Two or more generators; every prompt gets one completion from each, in the prompt's language."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    batch_size: int = 8
    """Work items per durable append (and per model batch)."""
    out_dir: str = "runs/synth"
    threads: int = 0
    """CPU threads (torch.set_num_threads); 0 = the process's setting (the polyalign command's default, see
    docs/threads.md)."""
    progress: bool = True
    """Print progress lines (records done/total, rate) for stages that run over a few seconds, on a terminal
    only; false = quiet."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: SynthConfig) -> None:
    check_languages([cfg.source.language, *cfg.source.languages, *cfg.translate.languages], "synth languages")
    check(len(cfg.generators) >= 2, f"generators: need two or more, got {len(cfg.generators)}")
    labels = [g.label for g in cfg.generators]
    check(len(set(labels)) == len(labels), f"generators: names must be unique, got {labels}")
    for g in [*cfg.generators, cfg.translate.translator]:
        check(g.kind in GENERATOR_KINDS, f"generator {g.label}: kind {g.kind!r} not in {GENERATOR_KINDS}")
        check("|" not in g.label, f"generator {g.label}: a name may not contain '|'")
        check(g.max_new_tokens >= 1 and g.temperature >= 0, f"generator {g.label}: bad sampling values")
    for g in cfg.generators:
        check(g.kind != "seq2seq", f"generator {g.label}: seq2seq models only translate")
    check("{text}" in cfg.translate.template, "translate.template must contain {text}")
    j = cfg.judge
    check(j.kind in JUDGE_KINDS, f"judge.kind: {j.kind!r} not in {JUDGE_KINDS}")
    check(j.mode in ("score", "harm"), f"judge.mode: {j.mode!r} not in score|harm")
    check(cfg.pairs.min_margin >= 0, "pairs.min_margin must be >= 0")
    check(cfg.filter.language_mismatch in ("drop", "keep"), "filter.language_mismatch: drop | keep")
    check(cfg.source.layout in ("long", "wide"), f"source.layout: {cfg.source.layout!r} not in long|wide")
    check(cfg.batch_size >= 1 and cfg.source.limit >= 0, "need batch_size >= 1 and source.limit >= 0")
