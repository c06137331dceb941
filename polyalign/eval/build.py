"""Chat clients and judges built from config: the one builder that eval, synth and the experiment use.

- `build_chat_client(cfg, out_dir)`: the `ChatClient` of any `EndpointConfig` section (an OpenAI-compatible
  endpoint, or a local model behind the same client);
- `build_judge(cfg, role, out_dir)`: the judge that `cfg.kind` names (lexicon, reward_model, or an LLM judge
  over a chat client) for one role: harm | score (pointwise) | pairwise;
- `build_judges(cfg, out_dir, metrics)`: the harm and pairwise judges of one `polyalign eval` run.
Relative cache paths are resolved under the run's out_dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polyalign.eval import judges as J
from polyalign.eval.backends import ChatClient, HFChatBackend, OpenAIChatBackend
from polyalign.eval.config import EndpointConfig, JudgeConfig


def resolve_path(path: str | None, out_dir: str | Path) -> Path | None:
    """A config path: absolute as given, relative under the run's out_dir; None stays None."""
    return None if path is None else (Path(path) if Path(path).is_absolute() else Path(out_dir) / path)


def build_chat_client(cfg: EndpointConfig, out_dir: str | Path) -> ChatClient:
    """kind openai: the OpenAI-compatible endpoint; any other kind that reaches here (hf, hf_chat): the local
    model `cfg.model` behind the same client (retries, concurrency, cache)."""
    if cfg.kind == "openai":
        backend = OpenAIChatBackend(cfg.model, cfg.base_url, cfg.api_key_env, cfg.timeout_s)
    else:
        backend = HFChatBackend.load(cfg.model)
    cache = resolve_path(cfg.cache, out_dir)
    return ChatClient(backend, cache, cfg.max_workers, cfg.max_retries, cfg.backoff_s)


def build_judge(
    cfg: EndpointConfig,
    role: str,
    out_dir: str | Path,
    client: ChatClient | None = None,
    template: str | None = None,
    system: str | None = None,
    max_tokens: int = 8,
    tie_margin: float = 0.0,
):
    """The judge of `cfg.kind` for `role` ("harm" | "score" pointwise, or "pairwise").

    lexicon judges harm whatever the role; reward_model scores each completion (pointwise kind "score", or
    pairwise by score difference, a tie within `tie_margin`); any other kind is an LLM judge over `client`
    (built from cfg when None; pass one to share its cache and call counts). template None = the judge's
    default template; max_tokens is the reply budget of LLM judges (8 = LLMPointwiseJudge's default).
    """
    if cfg.kind == "lexicon":
        from polyalign.eval.lexicon import LexiconHarmJudge

        return LexiconHarmJudge()
    if cfg.kind == "reward_model":
        from polyalign.rewards.model import RewardModelScorer

        return J.RewardModelJudge(RewardModelScorer(cfg.model), cfg.model, tie_margin)
    client = client or build_chat_client(cfg, out_dir)
    if role == "pairwise":
        return J.LLMPairwiseJudge(client, template or J.PAIRWISE_TEMPLATE, system, max_tokens=max_tokens)
    return J.LLMPointwiseJudge(client, role, template, system, max_tokens=max_tokens)


@dataclass(frozen=True)
class Judges:
    """The judges of one eval run; `client` is the ChatClient of LLM judges (for its call counts)."""

    harm: J.PointwiseJudge | None = None
    pairwise: J.PairwiseJudge | None = None
    client: ChatClient | None = None

    def describe(self) -> str:
        parts = {j.describe() for j in (self.harm, self.pairwise) if j is not None}
        return " | ".join(sorted(parts)) or "none (exact match only)"

    def notes(self, languages: set[str]) -> list[str]:
        """What the reader must know about the judge for these languages (lexicon coverage)."""
        if not hasattr(self.harm, "english_only"):
            return []
        english_only = self.harm.english_only(sorted(languages))
        own = [lang for lang in sorted(languages) if lang not in english_only]
        return [
            "the lexicon judge is a crude proxy (a listed offensive word = harmful): it misses harm in clean "
            f"words and flags innocent uses. Languages with their own word list (plus English): {own or 'none'}"
            + (
                f"; judged with the English list only: {sorted(english_only)} (no word list of their own)"
                if english_only
                else ""
            )
            + "."
        ]


def build_judges(cfg: JudgeConfig, out_dir: str | Path, metrics: set[str]) -> Judges:
    """The judges the metrics need: the lexicon judges harm only, a reward model compares only, an LLM judge
    does both over one shared client."""
    if not metrics & {"harm", "win_rate"}:
        return Judges()
    client = build_chat_client(cfg, out_dir) if cfg.kind in ("openai", "hf") else None

    def make(role: str, template: str | None):
        return build_judge(cfg, role, out_dir, client, template, cfg.system, cfg.max_tokens, cfg.tie_margin)

    return Judges(
        harm=make("harm", cfg.harm_template) if cfg.kind != "reward_model" else None,
        pairwise=make("pairwise", cfg.pairwise_template) if cfg.kind != "lexicon" else None,
        client=client,
    )
