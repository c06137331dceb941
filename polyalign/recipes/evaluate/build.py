"""Chat clients and judges built from config: the one builder that eval, synth and the experiment use.

- `build_chat_client(cfg, out_dir)`: the `ChatClient` of any `EndpointConfig` section (an OpenAI-compatible
  endpoint, or a local model behind the same client);
- `build_judge(cfg, role, out_dir)`: the judge that `cfg.kind` names (lexicon, reward_model, or an LLM judge
  over a chat client) for one role: harm | score (pointwise) | pairwise.
The judges of one `polyalign eval` run are built by `polyalign.recipes.evaluate.judging.build_judges`.
"""

from __future__ import annotations

from pathlib import Path

from polyalign.eval import judges as J
from polyalign.eval.backends import ChatClient, HFChatBackend, OpenAIChatBackend
from polyalign.eval.config import EndpointConfig


def build_chat_client(cfg: EndpointConfig, out_dir: str | Path) -> ChatClient:
    """kind openai: the OpenAI-compatible endpoint; any other kind that reaches here (hf, hf_chat): the local
    model `cfg.model` behind the same client (retries, concurrency, cache). A relative cache path is under
    out_dir."""
    if cfg.kind == "openai":
        backend = OpenAIChatBackend(cfg.model, cfg.base_url, cfg.api_key_env, cfg.timeout_s)
    else:
        backend = HFChatBackend.load(cfg.model)
    cache = None if cfg.cache is None else Path(out_dir) / cfg.cache  # an absolute cache path stays as is
    return ChatClient(
        backend, cache, cfg.max_workers, cfg.max_retries, cfg.backoff_s,
        max_consecutive_failures=cfg.max_consecutive_failures,
    )  # fmt: skip


def build_judge(
    cfg: EndpointConfig,
    role: str,
    out_dir: str | Path,
    client: ChatClient | None = None,
    template: str | None = None,
    system: str | None = None,
    max_tokens: int = 8,
    tie_margin: float = 0.0,
    max_chars: int = 4000,
):
    """The judge of `cfg.kind` for `role` ("harm" | "score" pointwise, or "pairwise").

    lexicon judges harm whatever the role; reward_model scores each completion (pointwise kind "score", or
    pairwise by score difference, a tie within `tie_margin`); any other kind is an LLM judge over `client`
    (built from cfg when None; pass one to share its cache and call counts). template None = the judge's
    default template; max_tokens is the reply budget of LLM judges (8 = LLMPointwiseJudge's default); each
    completion is cut to its first max_chars characters in an LLM judge's prompt (0 = no cut).
    """
    if cfg.kind == "lexicon":
        from polyalign.recipes.evaluate.lexicon import LexiconHarmJudge

        return LexiconHarmJudge()
    if cfg.kind == "reward_model":
        from polyalign.rewards.model import RewardModelScorer

        return J.RewardModelJudge(RewardModelScorer(cfg.model), cfg.model, tie_margin)
    client = client or build_chat_client(cfg, out_dir)
    if role == "pairwise":
        template = template or J.PAIRWISE_TEMPLATE
        return J.LLMPairwiseJudge(client, template, system, max_tokens=max_tokens, max_chars=max_chars)
    return J.LLMPointwiseJudge(client, role, template, system, max_tokens=max_tokens, max_chars=max_chars)
