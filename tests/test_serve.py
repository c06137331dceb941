"""The OpenAI-compatible server over stories260K, exercised with the real `openai` client on 127.0.0.1, and
used as the endpoint of the OpenAI-compatible judge."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from polyalign.eval.backends import ChatClient, OpenAIChatBackend
from polyalign.eval.judges import LLMPairwiseJudge, LLMPointwiseJudge
from polyalign.recipes.serve import serve
from polyalign.rollout.hf import HFEngine
from polyalign.types import Sampling


@pytest.fixture(scope="module")
def server(stories):
    model, tokenizer = stories
    srv, thread = serve(model, tokenizer=tokenizer, model_id="stories260K")
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=_url(srv), api_key="unused", max_retries=0, timeout=30)


def test_models_endpoint(server):
    assert server.server_address[0] == "127.0.0.1"
    assert [m.id for m in _client(server).models.list().data] == ["stories260K"]


def test_chat_completion_matches_the_engine(server, stories):
    """Greedy through HTTP gives exactly what HFEngine gives for the rendered prompt."""
    model, tokenizer = stories
    r = _client(server).chat.completions.create(
        model="stories260K",
        messages=[{"role": "user", "content": "Once upon a time"}],
        max_tokens=12,
        temperature=0,
    )
    direct = HFEngine(model, tokenizer).generate(
        ["\n\nHuman: Once upon a time\n\nAssistant:"], 1, Sampling(max_new_tokens=12, temperature=0.0)
    )
    assert r.choices[0].message.content == direct.completions[0]
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"


def test_n_and_seed(server):
    c = _client(server)
    kw = dict(
        model="m", messages=[{"role": "user", "content": "Tom"}], max_tokens=8, temperature=1.0, n=3, seed=5
    )
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert len(a.choices) == 3
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_bad_requests_get_json_errors(server):
    c = _client(server)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="m", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="stream"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(_url(server) + "/nope", timeout=10)
    assert err.value.code == 404 and "unknown path" in json.loads(err.value.read())["error"]["message"]
    req = urllib.request.Request(_url(server) + "/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400


def test_served_model_as_judge_with_cache(server, tmp_path):
    """The OpenAI-compatible judge against the real local server: stories260K cannot answer A/B/tie, so the
    verdicts are counted as unparseable (no crash); a rerun is served from the cache (server count unchanged)."""

    def judge():
        backend = OpenAIChatBackend("stories260K", base_url=_url(server), api_key_env="POLYALIGN_NO_KEY_HERE")
        return LLMPairwiseJudge(
            ChatClient(backend, cache=tmp_path / "c.jsonl", max_workers=2, backoff_s=0.0), max_tokens=6
        )

    before = server.model_server.requests
    out = judge().compare(["The cat", "A dog"], ["sat.", "ran."], ["slept.", "barked."], ["en", "en"])
    assert server.model_server.requests - before == 4  # 2 pairs x 2 orders
    assert all(j.status in ("ok", "unparseable") for j in out) and all(len(j.raw) == 2 for j in out)
    again = judge().compare(["The cat", "A dog"], ["sat.", "ran."], ["slept.", "barked."], ["en", "en"])
    assert server.model_server.requests - before == 4 and [j.raw for j in again] == [j.raw for j in out]
    harm = LLMPointwiseJudge(judge().client, max_tokens=4).judge(["p"], ["c"])
    assert harm[0].raw and server.model_server.requests - before == 5
