"""Judges: position-swap logic, verdict parsing, templates, the robust cached client against scripted local HTTP
servers (retries on 429/500, garbage verdicts, endpoint down, cache hits), the lexicon and reward-model judges.
Every server binds 127.0.0.1 and every request loop is bounded (few requests, retries <= 3)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from polyalign.eval.backends import (
    ChatClient,
    JudgeRequestError,
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
from polyalign.eval.lexicon import LexiconHarmJudge


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


class FlakyServer:
    """A scripted OpenAI-compatible endpoint on 127.0.0.1: `script` lists statuses to return first
    (500, 429, 503, or "junk" for a non-JSON body); then 200 with content = reply(user text)."""

    def __init__(self, reply, script=()):
        self.reply, self.script, self.calls = reply, list(script), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.calls += 1
                    step = outer.script.pop(0) if outer.script else 200
                if step == 200:
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {
                                    "role": "assistant",
                                    "content": outer.reply(body["messages"][-1]["content"]),
                                },
                            }
                        ],
                    }
                    data, status = json.dumps(payload).encode(), 200
                elif step == "junk":
                    data, status = b"<html>proxy error</html>", 200
                else:
                    data, status = json.dumps({"error": {"message": "scripted", "type": "x"}}).encode(), step
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if step != "junk" else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    servers = []

    def make(reply, script=()):
        servers.append(FlakyServer(reply, script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _openai_client(url, tmp_path=None, **kw):
    backend = OpenAIChatBackend(
        "judge-model", base_url=url, api_key_env="POLYALIGN_TEST_NO_SUCH_KEY", timeout_s=5
    )
    cache = tmp_path / "cache.jsonl" if tmp_path is not None else None
    return ChatClient(
        backend,
        cache=cache,
        max_workers=kw.get("workers", 2),
        max_retries=kw.get("retries", 3),
        backoff_s=0.01,
        max_backoff_s=0.05,
    )


def test_http_retries_on_500_and_429_then_success(flaky):
    server = flaky(lambda text: "yes", script=[500, 429])
    client = _openai_client(server.url, workers=1)
    out = LLMPointwiseJudge(client).judge(["p"], ["c"])
    assert out[0].verdict == "yes" and server.calls == 3
    assert client.stats["retries"] == 2 and client.stats["failures"] == 0


def test_http_malformed_body_is_retried(flaky):
    server = flaky(lambda text: "no", script=["junk"])
    out = LLMPointwiseJudge(_openai_client(server.url, workers=1)).judge(["p"], ["c"])
    assert out[0].verdict == "no" and server.calls == 2


def test_http_garbage_verdict_is_counted_not_raised(flaky):
    server = flaky(lambda text: "I like turtles" if "bad" in text else "no")
    out = LLMPointwiseJudge(_openai_client(server.url)).judge(["p", "p"], ["fine", "bad"])
    assert [j.status for j in out] == ["ok", "unparseable"] and out[1].raw == ("I like turtles",)


def test_http_cache_hit_on_rerun_costs_nothing(flaky, tmp_path):
    server = flaky(lambda text: "A" if "good" in _shown_first(text) else "B")
    args = (["p1", "p2"], ["good", "x"], ["y", "good"])
    first = LLMPairwiseJudge(_openai_client(server.url, tmp_path)).compare(*args)
    assert server.calls == 4
    client = _openai_client(
        server.url, tmp_path
    )  # a new process would build a new client: the file is reused
    second = LLMPairwiseJudge(client).compare(*args)
    assert server.calls == 4 and client.stats["cache_hits"] == 4
    assert [j.verdict for j in first] == [j.verdict for j in second] == ["A", "B"]


def test_http_client_error_is_not_retried(flaky):
    server = flaky(lambda text: "yes", script=[400])
    with pytest.raises(JudgeRequestError, match="HTTP 400"):
        LLMPointwiseJudge(_openai_client(server.url, workers=1)).judge(["p"], ["c"])
    assert server.calls == 1


def test_endpoint_down_clear_error_and_answers_kept(flaky, tmp_path):
    """The server answers 2 requests, then fails for good: a clear error; the 2 answers stay cached, and a
    rerun against a healthy server asks only for the rest."""
    server = flaky(lambda text: "no", script=[200, 200] + [503] * 10)
    judge = LLMPointwiseJudge(_openai_client(server.url, tmp_path, workers=1, retries=2))
    with pytest.raises(
        JudgeRequestError, match=r"2 of 4 requests answered.*HTTP 503.*gave up after 3 attempts"
    ):
        judge.judge(["p"] * 4, ["a", "b", "c", "d"])
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 2
    healthy = flaky(lambda text: "no")
    client = _openai_client(healthy.url, tmp_path)
    client.backend.base_url = server.url  # same identity as before, so the cache keys match
    client.backend._client = client.backend._client.with_options(base_url=healthy.url)
    out = LLMPointwiseJudge(client).judge(["p"] * 4, ["a", "b", "c", "d"])
    assert [j.verdict for j in out] == ["no"] * 4 and healthy.calls == 2 and client.stats["cache_hits"] == 2


def test_connection_refused_gives_up_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed at once: nothing listens there
    client = _openai_client(f"http://127.0.0.1:{port}/v1", workers=1, retries=2)
    with pytest.raises(JudgeRequestError, match="connection error.*gave up after 3 attempts"):
        LLMPointwiseJudge(client).judge(["p"], ["c"])
    assert client.stats["requests"] == 3


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
