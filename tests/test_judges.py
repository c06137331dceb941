"""Judges: position-swap logic, verdict parsing, templates, the cached client over a scripted backend (retries,
cache hits across clients), the lexicon and reward-model judges. The faults of a real HTTP endpoint (429, 5xx,
400, 401, timeouts, bad bodies, merging) are in test_eval_faults.py."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from polyalign.eval.backends import (
    ChatClient,
    OpenAIChatBackend,
    TransientError,
    request_key,
)
from polyalign.eval.judges import (
    LLMPairwiseJudge,
    LLMPointwiseJudge,
    PairwiseJudge,
    PointwiseJudge,
    RewardModelJudge,
    check_template,
    combine_orders,
    parse_pairwise_verdict,
    parse_score,
    parse_yes_no,
)
from polyalign.recipes.evaluate.lexicon import LexiconHarmJudge


class ScriptedBackend:
    """A fake backend: reply = fn(user message text); raises TransientError for the first `fail` calls."""

    def __init__(self, fn, fail: int = 0) -> None:
        self.fn, self.fail, self.calls = fn, fail, 0
        self.lock = threading.Lock()

    def identity(self):
        return {"backend": "scripted", "model": "fake"}

    def describe(self):
        return "scripted fake"

    def chat(self, messages, params):
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail:
                raise TransientError("HTTP 503 server error")
        return self.fn(messages[-1]["content"])


def _shown_first(text: str) -> str:
    return text.split("[Response A]")[1].split("[Response B]")[0].strip()


def _client(backend, **kw):
    return ChatClient(backend, max_workers=2, max_retries=kw.pop("max_retries", 3), backoff_s=0.0, **kw)


# ------------------------------------------------------------------ position swap


def test_pairwise_consistent_judge_wins_in_both_orders():
    """A judge that always prefers the completion containing 'good' agrees with itself across orders."""
    judge = LLMPairwiseJudge(_client(ScriptedBackend(lambda t: "A" if "good" in _shown_first(t) else "B")))
    out = judge.compare(["p1", "p2"], ["good answer", "meh"], ["meh", "good answer"], ["en", "fr"])
    assert [j.verdict for j in out] == ["A", "B"]
    assert [j.score for j in out] == [1.0, 0.0]
    assert all(len(j.raw) == 2 for j in out)


def test_pairwise_position_biased_judge_gives_ties():
    """A judge that always says 'A' (pure position bias) disagrees with itself once swapped: every pair a tie."""
    backend = ScriptedBackend(lambda t: "A")
    out = LLMPairwiseJudge(_client(backend)).compare(["p"] * 3, ["x", "y", "z"], ["u", "v", "w"])
    assert [j.verdict for j in out] == ["tie"] * 3
    assert all(j.detail.startswith("orders disagree") for j in out)
    assert backend.calls == 6  # both orders asked


def test_combine_orders_cases():
    assert combine_orders("A", "B", parse_pairwise_verdict).verdict == "A"
    assert combine_orders("B", "A", parse_pairwise_verdict).verdict == "B"
    assert combine_orders("tie", "tie", parse_pairwise_verdict).verdict == "tie"
    assert combine_orders("A", "tie", parse_pairwise_verdict).verdict == "tie"  # disagreement = tie
    bad = combine_orders("A", "banana", parse_pairwise_verdict)
    assert bad.verdict is None and bad.status == "unparseable" and "swapped" in bad.detail


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A", "A"),
        ("b", "B"),
        ("Response A", "A"),
        ("(B)", "B"),
        ("[[A]]", "A"),
        ("[[C]]", "tie"),
        ("Tie.", "tie"),
        ("Verdict: B", "B"),
        ("**A** is better", "A"),
        ("  output (b)  ", "B"),
        ("banana", None),
        ("[[A]] ... [[B]]", None),
        ("", None),
        ("A or B, hard to say", None),
    ],
)
def test_parse_pairwise_variants(text, expected):
    assert parse_pairwise_verdict(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Harmful", "yes"),
        ("Not harmful", "no"),
        ("safe", "no"),
        ("Answer: yes", "yes"),
        ("unsafe content", "yes"),
        ("maybe", None),
        ("I think yes", None),
    ],
)
def test_parse_yes_no_variants(text, expected):
    assert parse_yes_no(text) == expected


def test_parse_score():
    assert parse_score("Score: 7/10") == 7.0 and parse_score("8.5") == 8.5
    assert parse_score("eleven") is None and parse_score("42") is None  # out of [1, 10]


def test_template_placeholder_errors_at_construction():
    client = _client(ScriptedBackend(lambda t: "A"))
    with pytest.raises(ValueError, match=r"missing placeholder.*completion_b"):
        LLMPairwiseJudge(client, template="{prompt} {completion_a}")
    with pytest.raises(ValueError, match=r"unknown placeholder.*\{foo\}"):
        LLMPointwiseJudge(client, template="{prompt} {completion} {foo}")
    with pytest.raises(ValueError, match="not a valid format string"):
        check_template("{prompt} {completion} {", ["prompt", "completion"])
    assert check_template(
        '{{"json": 1}} {prompt} {completion}', ["prompt", "completion"]
    )  # escaped braces ok


def test_custom_template_and_parser_are_used():
    seen = []
    backend = ScriptedBackend(lambda t: seen.append(t) or "VERDICT=1")
    judge = LLMPointwiseJudge(
        _client(backend),
        template="Q={prompt} R={completion} L={language}",
        parse=lambda text: "yes" if text.endswith("1") else None,
    )
    out = judge.judge(["q"], ["r"], ["de"])
    assert seen == ["Q=q R=r L=de"] and out[0].verdict == "yes" and out[0].score == 1.0


def test_protocols_are_satisfied():
    client = _client(ScriptedBackend(lambda t: "A"))
    assert isinstance(LLMPairwiseJudge(client), PairwiseJudge)
    assert isinstance(LLMPointwiseJudge(client), PointwiseJudge)
    assert isinstance(LexiconHarmJudge(), PointwiseJudge)
    assert isinstance(RewardModelJudge(lambda p, c: torch.zeros(len(c))), PairwiseJudge)


# ------------------------------------------------------------------ robust client


def test_client_retries_transient_errors_then_succeeds(caplog):
    backend = ScriptedBackend(lambda t: "no", fail=2)
    client = _client(backend, max_retries=3)
    assert client.complete_many([[{"role": "user", "content": "x"}]], {}) == ["no"]
    assert backend.calls == 3 and client.stats["retries"] == 2
    assert "retry 1/3" in caplog.text


def test_cache_key_covers_the_full_request():
    m = [{"role": "user", "content": "x"}]
    base = request_key({"backend": "a", "model": "m"}, m, {"max_tokens": 8})
    assert base != request_key({"backend": "a", "model": "m2"}, m, {"max_tokens": 8})
    assert base != request_key({"backend": "a", "model": "m"}, m, {"max_tokens": 9})
    assert base != request_key(
        {"backend": "a", "model": "m"}, [{"role": "user", "content": "y"}], {"max_tokens": 8}
    )


def test_api_key_env_is_required_for_the_default_endpoint(monkeypatch):
    monkeypatch.delenv("POLYALIGN_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="POLYALIGN_TEST_NO_SUCH_KEY is not set"):
        OpenAIChatBackend("gpt-x", api_key_env="POLYALIGN_TEST_NO_SUCH_KEY")
    monkeypatch.setenv("POLYALIGN_TEST_NO_SUCH_KEY", "sk-secret-value")
    backend = OpenAIChatBackend("gpt-x", api_key_env="POLYALIGN_TEST_NO_SUCH_KEY")
    assert "sk-secret" not in backend.describe() and "sk-secret" not in json.dumps(backend.identity())


# ------------------------------------------------------------------ offline judges


def test_reward_model_judge_pairwise_by_score():
    scores = {"great": 2.0, "ok": 1.0, "ok2": 1.05}
    judge = RewardModelJudge(lambda p, c: torch.tensor([scores[x] for x in c]), "fake-rm", tie_margin=0.1)
    out = judge.compare(["p"] * 3, ["great", "ok", "ok"], ["ok", "great", "ok2"])
    assert [j.verdict for j in out] == ["A", "B", "tie"]
    assert [j.score for j in judge.judge(["p"], ["great"])] == [2.0]
    assert "fake-rm" in judge.describe()


def test_hf_backend_runs_a_local_model_as_judge(stories, tmp_path):
    """A local model as a chat judge (greedy): stories260K cannot say yes/no, so verdicts are unparseable and
    counted; the raw replies are kept and a second call is a cache hit."""
    from polyalign.eval.backends import HFChatBackend

    model, tokenizer = stories
    client = ChatClient(
        HFChatBackend(model, tokenizer, "stories260K"), cache=tmp_path / "c.jsonl", max_workers=2
    )
    first = LLMPointwiseJudge(client, max_tokens=6).judge(["p", "q"], ["a", "b"], ["en", "en"])
    assert all(j.raw and j.status in ("ok", "unparseable") for j in first)
    again = LLMPointwiseJudge(client, max_tokens=6).judge(["p", "q"], ["a", "b"], ["en", "en"])
    assert client.stats["cache_hits"] == 2 and [j.raw for j in again] == [j.raw for j in first]


def test_cache_survives_a_torn_last_line(tmp_path):
    """A crash mid-write leaves half a line: it is cut on open, the whole lines are hits, new answers append."""
    backend = ScriptedBackend(lambda t: "no")
    m = [{"role": "user", "content": "x"}]
    key = request_key(backend.identity(), m, {})
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": key, "response": "yes"}) + '\n{"key": "ab', encoding="utf-8")
    client = _client(backend, cache=path)
    assert client.complete_many([m, [{"role": "user", "content": "y"}]], {}) == ["yes", "no"]
    assert backend.calls == 1 and client.stats["cache_hits"] == 1
    assert [json.loads(line)["response"] for line in path.read_text().splitlines()] == ["yes", "no"]
