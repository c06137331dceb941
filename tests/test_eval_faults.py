"""Faults and abuse at the judge: a scripted OpenAI-compatible endpoint on 127.0.0.1 that answers 429, 5xx,
400, 401, timeouts, truncated and malformed bodies and garbage verdicts. Transient faults are retried
(and logged), a request that fails for good is an "error" verdict counted in the summary and the report,
and the eval finishes; an auth error stops it with one line; a run of failures in a row stops it as an
outage; identical requests in flight are sent once. Every server binds 127.0.0.1, retries <= 3, backoff
10 ms, so every test takes well under 5 s."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from polyalign.cli import main
from polyalign.config import from_dict
from polyalign.eval.backends import ChatClient, JudgeAuthError, JudgeRequestError, OpenAIChatBackend
from polyalign.eval.judges import LLMPairwiseJudge, LLMPointwiseJudge
from polyalign.recipes.evaluate.run import EvalRunConfig, run_eval


def _payload(model: str, content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "finish_reason": "stop", "message": message}
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": [choice]}
    return json.dumps(body).encode()


class FlakyServer:
    """A scripted OpenAI-compatible endpoint on 127.0.0.1. Each request takes the next `script` step, then
    `reply(user text)`. A step is a reply text, an HTTP status (int), or one of: "junk" (an HTML body),
    "truncated" (the JSON body cut in half), "slow" (answers after `delay_s`, past the client's timeout).
    `texts` records the user text of every request; `hold_s` delays every answer (requests overlap)."""

    def __init__(self, reply, script=(), delay_s: float = 1.0, hold_s: float = 0.0):
        self.reply, self.script, self.calls, self.texts = reply, list(script), 0, []
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with lock:
                    outer.calls += 1
                    outer.texts.append(text)
                    step = outer.script.pop(0) if outer.script else outer.reply(text)
                time.sleep(hold_s)
                if step == "slow":
                    time.sleep(delay_s)
                    step = outer.reply(text)
                status, kind, data = 200, "application/json", None
                if isinstance(step, int):
                    status, data = step, json.dumps({"error": {"message": "scripted", "type": "x"}}).encode()
                elif step == "junk":
                    kind, data = "text/html", b"<html>proxy error</html>"
                elif step == "truncated":
                    data = _payload(body["model"], "no")[:40]
                else:
                    data = _payload(body["model"], step)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    servers = []

    def make(reply, script=(), **kw):
        servers.append(FlakyServer(reply, script, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _client(url, cache=None, workers=2, retries=3, timeout_s=5.0, **kw):
    backend = OpenAIChatBackend(
        "judge-model", base_url=url, api_key_env="POLYALIGN_TEST_NO_KEY", timeout_s=timeout_s
    )
    return ChatClient(backend, cache, workers, retries, backoff_s=0.01, max_backoff_s=0.05, **kw)


# ------------------------------------------------------------------ transient faults are retried


@pytest.mark.parametrize("script", [[429], [500], [503, 429], ["junk"], ["truncated"]])
def test_transient_fault_is_retried_and_logged(flaky, caplog, script):
    server = flaky(lambda text: "yes", script=script)
    client = _client(server.url, workers=1)
    out = LLMPointwiseJudge(client).judge(["p"], ["c"])
    assert out[0].verdict == "yes" and server.calls == len(script) + 1
    assert client.stats["retries"] == len(script) and client.stats["failures"] == 0
    assert f"retry {len(script)}/3" in caplog.text


def test_timeout_is_retried(flaky, caplog):
    server = flaky(lambda text: "no", script=["slow"], delay_s=1.0)
    client = _client(server.url, workers=1, timeout_s=0.2)
    assert LLMPointwiseJudge(client).judge(["p"], ["c"])[0].verdict == "no"
    assert server.calls == 2 and "timed out" in caplog.text


# ------------------------------------------------------------------ failures for good are error verdicts


def test_http_400_is_an_error_verdict_not_retried(flaky):
    server = flaky(lambda text: 400 if "long" in text else "no")
    out = LLMPointwiseJudge(_client(server.url)).judge(["p", "p"], ["fine", "long"])
    assert [j.status for j in out] == ["ok", "error"] and out[1].verdict is None
    assert "HTTP 400" in out[1].detail and server.calls == 2


def test_retries_exhausted_is_an_error_verdict(flaky):
    server = flaky(lambda text: 503 if "bad" in text else "no")
    client = _client(server.url, workers=1, retries=2)
    out = LLMPointwiseJudge(client).judge(["p", "p"], ["bad", "ok"])
    assert [j.status for j in out] == ["error", "ok"] and "gave up after 3 attempts" in out[0].detail
    assert client.stats["failures"] == 1 and server.calls == 4


def test_error_in_either_order_makes_the_pair_an_error(flaky):
    server = flaky(lambda text: 400 if "[Response A]\nlong" in text else "A")
    out = LLMPairwiseJudge(_client(server.url)).compare(["p", "p"], ["x", "long"], ["y", "z"])
    assert [j.status for j in out] == ["ok", "error"] and out[0].verdict == "tie"  # "A" both orders: disagree


def test_unparseable_verdict_is_counted_not_raised(flaky):
    server = flaky(lambda text: "I like turtles" if "bad" in text else "no")
    out = LLMPointwiseJudge(_client(server.url)).judge(["p", "p"], ["fine", "bad"])
    assert [j.status for j in out] == ["ok", "unparseable"] and out[1].raw == ("I like turtles",)


def test_failures_in_a_row_stop_the_run_as_an_outage_answers_kept(flaky, tmp_path):
    """Two answers, then the endpoint fails for good: after max_consecutive_failures failures in a row the
    client stops with a clear error; the answers stay cached and a rerun asks only for the rest."""
    server = flaky(lambda text: 503, script=["no", "no"])
    client = _client(server.url, tmp_path / "cache.jsonl", workers=1, retries=1, max_consecutive_failures=2)
    with pytest.raises(JudgeRequestError, match=r"2 of 5 requests answered, then 2 requests in a row failed"):
        LLMPointwiseJudge(client).judge(["p"] * 5, list("abcde"))
    assert server.calls == 2 + 2 * 2  # the fifth request was never sent
    healthy = flaky(lambda text: "no")
    client = _client(healthy.url, tmp_path / "cache.jsonl")
    client.backend.base_url = server.url  # same identity as before, so the cache keys match
    client.backend._client = client.backend._client.with_options(base_url=healthy.url)
    out = LLMPointwiseJudge(client).judge(["p"] * 5, list("abcde"))
    assert [j.verdict for j in out] == ["no"] * 5 and healthy.calls == 3 and client.stats["cache_hits"] == 2


def test_connection_refused_is_an_error_verdict_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed at once: nothing listens there
    client = _client(f"http://127.0.0.1:{port}/v1", workers=1, retries=2)
    [out] = LLMPointwiseJudge(client).judge(["p"], ["c"])
    assert out.status == "error" and "connection error" in out.detail and client.stats["requests"] == 3


def test_generators_still_raise_on_a_failed_request(flaky):
    server = flaky(lambda text: 400)
    with pytest.raises(JudgeRequestError, match="0 of 1 requests answered, then a request failed: HTTP 400"):
        _client(server.url).complete_many([[{"role": "user", "content": "x"}]], {})


def test_auth_error_stops_at_once(flaky):
    server = flaky(lambda text: 401)
    with pytest.raises(JudgeAuthError, match=r"HTTP 401: the judge endpoint refused the key in \$POLYALIGN"):
        LLMPointwiseJudge(_client(server.url, workers=1)).judge(["p"] * 3, ["a", "b", "c"])
    assert server.calls == 1


# ------------------------------------------------------------------ merging and cutting


def test_identical_requests_in_flight_are_sent_once(flaky):
    server = flaky(lambda text: "yes", hold_s=0.3)
    client = _client(server.url, workers=4)  # no cache: the merge alone saves the calls
    out = LLMPointwiseJudge(client).judge(["p", "p", "q"], ["same", "same", "same"])
    assert [j.verdict for j in out] == ["yes"] * 3
    assert server.calls == 2 and client.stats["merged"] == 1


def test_merged_request_shares_the_failure(flaky):
    server = flaky(lambda text: 400, hold_s=0.3)
    client = _client(server.url, workers=2)
    out = LLMPointwiseJudge(client).judge(["p", "p"], ["same", "same"])
    assert [j.status for j in out] == ["error", "error"] and server.calls == 1


def test_long_completion_is_cut_in_the_judge_prompt(flaky):
    server = flaky(lambda text: "no")
    LLMPointwiseJudge(_client(server.url), max_chars=50).judge(["p"], ["x" * 60 + "TAIL"])
    assert "x" * 50 in server.texts[0] and "x" * 51 not in server.texts[0] and "TAIL" not in server.texts[0]
    LLMPointwiseJudge(_client(server.url), max_chars=0).judge(["p"], ["x" * 60 + "TAIL"])
    assert "TAIL" in server.texts[1]


# ------------------------------------------------------------------ the eval finishes and counts


def _eval_cfg(tmp_path, url, **judge):
    rows = [
        {"prompt": f"p{i}", "language": lang, "completion": c}
        for i, (lang, c) in enumerate(
            [("en", "bad"), ("en", "fine"), ("en", "turtles"), ("fr", "long" + "z" * 300), ("fr", "fine")]
        )
    ]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = {
        "kind": "openai", "model": "judge-model", "base_url": url, "api_key_env": "POLYALIGN_TEST_NO_KEY",
        "max_retries": 1, "backoff_s": 0.01, "max_workers": 2, "max_chars": 200, **judge,
    }  # fmt: skip
    return from_dict(
        EvalRunConfig,
        {
            "model": {"completions": str(path)},
            "prompts": {"source": ""},
            "judge": judge,
            "bootstrap_resamples": 50,
            "out_dir": str(tmp_path / "out"),
        },
    )


def _route(text: str):
    """400 for the over-long completion (as a served model over its context would), yes/no otherwise."""
    if "long" in text:
        return 400
    return "I like turtles" if "turtles" in text else ("yes" if "bad" in text else "no")


def test_eval_finishes_with_error_verdicts_counted_in_summary_and_report(flaky, tmp_path, capsys):
    server = flaky(_route)
    summary = run_eval(_eval_cfg(tmp_path, server.url))
    model = summary["harm"]["sides"]["model"]
    assert (model["n"], model["total"], model["unparseable"], model["errors"]) == (3, 5, 1, 1)
    assert model["overall"]["value"] == pytest.approx(1 / 3)
    assert model["by_language"]["fr"]["n"] == 1 and model["by_language"]["fr"]["total"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    [error] = [r for r in records if r["status"] == "error"]
    assert error["language"] == "fr" and "HTTP 400" in error["detail"] and error["harmful"] is None
    assert summary["judge_prompts"] == {"max_chars": 200, "completions_cut": 1}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "model: harm 33.3% (n=3/5; 1 unparseable, 1 errors) [caution: rests on 3 of 5 verdicts]" in report
    assert "| fr | 0.0% [0.0%, 0.0%] | 1/2 |" in report
    assert "cut to their first 200" in report and "1 cut" in report
    assert "Judge cache: " + str(tmp_path / "out" / "judge_cache.jsonl") in report
    assert "Judge cache" in (tmp_path / "out" / "report.html").read_text()
    again = run_eval(_eval_cfg(tmp_path, server.url))  # answers are cached; the failed request is asked again
    assert again["judge_calls"]["cache_hits"] == 4 and server.calls == 6
    assert "4 answers reused from it" in (tmp_path / "out" / "report.md").read_text()


def test_eval_auth_error_is_one_line_from_the_cli(flaky, tmp_path, capsys):
    server = flaky(lambda text: 403)
    cfg = _eval_cfg(tmp_path, server.url)
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps({"model": {"completions": cfg.model.completions}, "prompts": {"source": ""}}))
    judge = [f"--judge.{k}={v}" for k, v in (("kind", "openai"), ("model", "j"), ("base_url", server.url))]
    rc = main(
        [
            "eval",
            str(path),
            *judge,
            "--judge.api_key_env=POLYALIGN_TEST_NO_KEY",
            "--judge.max_workers=1",
            f"--out_dir={tmp_path}/o",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and server.calls == 1
    assert err[0].startswith(
        "polyalign eval: HTTP 403: the judge endpoint refused the key in $POLYALIGN_TEST_NO_KEY"
    )
