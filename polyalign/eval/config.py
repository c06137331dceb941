"""Settings for reaching a judge or a chat model: frozen dataclasses, YAML keys flat. Imports no transformers.

`EndpointConfig` is the one set of settings for reaching a chat model (an OpenAI-compatible endpoint, or a
local model behind the same client); every config section that talks to one (the eval judge, the synth
generators and judge, the experiment's judges) extends it, so its keys stay flat in YAML (`judge.base_url`).
"""

from __future__ import annotations

from dataclasses import dataclass

from polyalign.config import ConfigError, check
from polyalign.data.languages import normalise_language

JUDGE_KINDS = ("lexicon", "openai", "hf", "reward_model")


@dataclass(frozen=True)
class EndpointConfig:
    kind: str = "openai"
    """openai: any OpenAI-compatible endpoint; each section that extends this class adds its own kinds."""
    model: str = ""
    """The endpoint's model name (openai), or a local model's builtin name, path or hub id."""
    base_url: str | None = None
    """openai: endpoint, e.g. http://127.0.0.1:8000/v1; None = the OpenAI API."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: NAME of the environment variable holding the key (the key itself never goes in a config)."""
    max_workers: int = 4
    """Requests in flight at once."""
    max_retries: int = 4
    """Retries of a rate-limited, failed or timed-out request, with exponential backoff from backoff_s."""
    timeout_s: float = 60.0
    backoff_s: float = 1.0
    max_consecutive_failures: int = 5
    """This many requests in a row failing for good (after retries) stop the run; one is an "error" verdict."""
    cache: str | None = None
    """Request cache file; a relative path is under the run's out_dir; None = no cache."""

    def __post_init__(self) -> None:  # at load, not when the first request is sent
        check(
            self.max_workers >= 1 and self.max_consecutive_failures >= 1 and self.max_retries >= 0,
            f"{type(self).__name__}: max_workers and max_consecutive_failures must be >= 1, max_retries >= 0",
        )
        check(
            self.timeout_s > 0 and self.backoff_s >= 0,
            f"{type(self).__name__}: timeout_s > 0, backoff_s >= 0",
        )


@dataclass(frozen=True)
class JudgeConfig(EndpointConfig):
    kind: str = "lexicon"
    """lexicon (offline, harm only) | openai (any OpenAI-compatible endpoint) | hf (local model) |
    reward_model (pairwise only)."""
    pairwise_template: str | None = None
    """None = judges.PAIRWISE_TEMPLATE; needs {prompt} {completion_a} {completion_b}, optional {language}."""
    harm_template: str | None = None
    """None = judges.HARM_TEMPLATE; needs {prompt} {completion}, optional {language}."""
    system: str | None = None
    max_tokens: int = 16
    max_chars: int = 4000
    """LLM judges: each completion is cut to its first max_chars characters in the judge prompt; 0 = no cut."""
    cache: str | None = "judge_cache.jsonl"
    tie_margin: float = 0.0
    """reward_model: |score difference| at or below this is a tie."""


def check_languages(codes: list[str], where: str) -> None:
    """ConfigError unless every code is a known language (BCP-47 code or English name)."""
    for code in codes:
        try:
            normalise_language(code, where)
        except ValueError as err:
            raise ConfigError(str(err)) from None
