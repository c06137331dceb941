"""`polyalign serve` under hostile clients: bad framing, slow or short uploads, floods, bad fields, no key.

Every server binds 127.0.0.1 (the 0.0.0.0 test binds with an API key and closes at once, sending nothing);
every probe has a bounded count and a socket timeout, and asserts the time (and, for the big body, the memory)
it took. The read timeout is 1 s here so that the slow-client tests stay fast."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from polyalign.recipes.serve import (
    ServeLimits,
    add_serve_arguments,
    exposure_warning,
    is_loopback,
    limits_from_args,
    serve,
)

LIMITS = ServeLimits(
    read_timeout_s=1.0, max_connections=8, max_queue=2, max_tokens=64, max_body_bytes=1 << 20
)
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
OK_BODY = {"messages": [{"role": "user", "content": "Tom"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def bounded(stories):
    model, tokenizer = stories
    srv, thread = serve(model, tokenizer=tokenizer, model_id="stories260K", limits=LIMITS)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _port(srv) -> int:
    return srv.server_address[1]


def _read_response(sock: socket.socket) -> tuple[int | None, dict]:
    """(status, JSON payload) of one response, or (None, {}) when the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, {}
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _exchange(srv, data: bytes, timeout: float = 5.0) -> tuple[int | None, dict, float]:
    """Send raw bytes on a fresh connection; (status, payload, seconds to the answer)."""
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(data)
        status, payload = _read_response(sock)
        return status, payload, time.monotonic() - start


def _post(srv, body: dict, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{_port(srv)}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, {**json.loads(err.read()), "retry_after": err.headers.get("Retry-After")}


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS from /proc")
def test_negative_content_length_with_20mb_body_is_refused_unread(bounded):
    """Content-Length -1 used to read to EOF (a 20 MB body grew the process by 3.7 GB for 20+ s)."""
    body = json.dumps({"messages": [{"role": "user", "content": "a" * (20 << 20)}]}).encode()
    with open("/proc/self/clear_refs", "w") as f:  # reset this process's peak RSS (VmHWM)
        f.write("5")
    before = _peak_rss_kb()
    with socket.create_connection(("127.0.0.1", _port(bounded)), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(HEAD + b"Content-Length: -1\r\n\r\n")

        def push() -> None:
            try:
                sock.sendall(body)
            except OSError:  # the server may close before taking it all: that is the point
                pass

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        status, payload = _read_response(sock)
        elapsed = time.monotonic() - start
        pusher.join(5)
    assert status == 400 and "Content-Length" in payload["error"]["message"]
    assert elapsed < 2.0
    assert (_peak_rss_kb() - before) / 1024 < 100


@pytest.mark.parametrize(
    "headers, status, words",
    [
        (b"Content-Length: abc\r\n", 400, "Content-Length"),
        (b"Content-Length: 1e3\r\n", 400, "Content-Length"),
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400, "Content-Length"),
        (b"", 411, "Content-Length required"),
        (b"Transfer-Encoding: chunked\r\n", 411, "chunked"),
        (b"Content-Length: 99999999999999999999999\r\n", 413, "over the server's limit"),
        (b"Content-Length: %d\r\n" % ((1 << 20) + 1), 413, "over the server's limit"),
    ],
)
def test_bad_framing_is_a_4xx_before_the_body(bounded, headers, status, words):
    """No body is sent: each answer must come from the headers alone, fast."""
    got, payload, elapsed = _exchange(bounded, HEAD + headers + b"\r\n")
    assert got == status and words in payload["error"]["message"] and elapsed < 1.0


def test_body_shorter_than_declared_is_cut_at_the_read_timeout(bounded):
    with socket.create_connection(("127.0.0.1", _port(bounded)), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"messages":')
        status, payload = _read_response(sock)
        assert status == 408 and "1.0 s" in payload["error"]["message"]
        assert sock.recv(10) == b""  # closed
        assert time.monotonic() - start < LIMITS.read_timeout_s + 1.0


def test_oversized_headers_and_bad_json_are_4xx(bounded):
    status, payload, _ = _exchange(bounded, HEAD + b"X-Pad: " + b"a" * 60000 + b"\r\n" * 2)
    assert status == 431
    for raw in (b"[" * 100000, b"\xff\xfe{", b'{"a": 1', b"[1, 2]"):
        status, payload, _ = _exchange(bounded, HEAD + b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        assert status == 400 and "JSON" in payload["error"]["message"], raw[:10]


def test_slowloris_keeps_threads_bounded_and_is_cut_at_the_read_timeout(bounded):
    """30 sockets with partial headers against max_connections=8: at most 8 handler threads, the rest are
    answered 503 at once; a normal request is served or answered 503 fast; after the read timeout every
    slow socket is closed and normal requests are served again."""
    threads_before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", _port(bounded)), timeout=5) for _ in range(30)]
    try:
        for sock in socks:
            sock.sendall(HEAD + b"X-Slow: ")
        time.sleep(0.3)
        assert threading.active_count() - threads_before <= LIMITS.max_connections
        start = time.monotonic()
        status, _, _ = _exchange(
            bounded,
            HEAD + b"Content-Length: %d\r\n\r\n" % len(json.dumps(OK_BODY)) + json.dumps(OK_BODY).encode(),
        )
        assert status in (200, 503) and time.monotonic() - start < 1.0
        assert bounded.refused >= 30 - LIMITS.max_connections
        end = time.monotonic() + LIMITS.read_timeout_s + 2.0
        for sock in socks:  # the server closes every one of them (after a 503 or at the deadline)
            sock.settimeout(max(0.1, end - time.monotonic()))
            while sock.recv(4096):
                pass
        assert time.monotonic() < end
    finally:
        for sock in socks:
            sock.close()
    assert _post(bounded, OK_BODY)[0] == 200


def test_requests_beyond_the_queue_get_a_fast_503(bounded):
    """With the model busy (its lock held), 1 generating + max_queue waiting requests are admitted; the next
    is answered 503 with Retry-After at once; the admitted ones finish once the model is free."""
    state, results = bounded.model_server, []
    admitted = [threading.Thread(target=lambda: results.append(_post(bounded, OK_BODY))) for _ in range(3)]
    with state.lock:
        for t in admitted:
            t.start()
        deadline = time.monotonic() + 5
        while state.in_flight < LIMITS.max_queue + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        status, payload = _post(bounded, OK_BODY, timeout=5)
        assert status == 503 and time.monotonic() - start < 1.0
        assert payload["retry_after"] == "1" and "busy" in payload["error"]["message"]
    for t in admitted:
        t.join(30)
    assert sorted(code for code, _ in results) == [200, 200, 200] and state.in_flight == 0


BAD_FIELDS = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 65),  # over the server's --max-tokens-limit (64 here)
    ("max_tokens", "5"),
    ("max_tokens", True),
    ("max_tokens", 2.5),
    ("max_completion_tokens", 0),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("n", 0),
    ("n", 17),
    ("n", "2"),
    ("seed", -1),
    ("seed", 2**64),
    ("stop", 5),
    ("stop", ""),
    ("stop", [1]),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("messages", []),
    ("messages", "hi"),
    ("messages", [{"role": "user"}]),
    ("messages", [{"role": "wizard", "content": "x"}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("model", 5),
    ("stream", True),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_each_bad_field_is_a_400_naming_it(bounded, field, value):
    before = bounded.model_server.requests
    status, payload = _post(bounded, {**OK_BODY, field: value}, timeout=5)
    assert status == 400, payload
    assert payload["error"]["param"] == field and f"'{field}'" in payload["error"]["message"]
    assert bounded.model_server.requests == before  # refused before generating


def test_edge_values_are_accepted(bounded):
    body = {**OK_BODY, "temperature": 0.0, "top_p": 1, "n": 2, "stop": ["\n"], "seed": 2**63 - 1}
    status, payload = _post(bounded, {**body, "max_tokens": LIMITS.max_tokens})
    assert status == 200 and len(payload["choices"]) == 2


def test_api_key_is_required_when_set(stories):
    model, tokenizer = stories
    srv, thread = serve(model, tokenizer=tokenizer, model_id="m", limits=LIMITS, api_key="sekrit")
    try:
        url = f"http://127.0.0.1:{_port(srv)}/v1"
        for key in ("wrong", "sekrit-and-more"):
            with pytest.raises(openai.AuthenticationError, match="API key"):
                openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=10).models.list()
        assert _post(srv, OK_BODY)[0] == 401  # no Authorization header; the body is drained, not read
        good = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0, timeout=30)
        assert [m.id for m in good.models.list().data] == ["m"]
        r = good.chat.completions.create(model="m", messages=OK_BODY["messages"], max_tokens=2)
        assert r.choices[0].message.role == "assistant"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
    with pytest.raises(ValueError, match="API key is empty"):
        serve(model, tokenizer=tokenizer, api_key=" ")


def test_binding_beyond_loopback_warns(stories, caplog):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))
    assert exposure_warning("127.0.0.1", None) is None
    assert "no API key" in exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("::", None)
    model, tokenizer = stories
    with caplog.at_level(logging.WARNING, logger="polyalign.serve"):
        srv, thread = serve(model, tokenizer=tokenizer, host="0.0.0.0", api_key="k", limits=LIMITS)
        srv.shutdown()
        srv.server_close()
        thread.join(5)
    assert any(
        "binding 0.0.0.0" in r.getMessage() and "need the API key" in r.getMessage() for r in caplog.records
    )


def test_flags_map_to_limits():
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--api-key", "k", "--read-timeout", "2.5", "--max-queue", "0", "--max-tokens-limit", "8"]
    )
    limits = limits_from_args(args)
    assert (limits.read_timeout_s, limits.max_queue, limits.max_tokens, limits.max_connections) == (
        2.5,
        0,
        8,
        32,
    )
    assert args.api_key == "k" and limits_from_args(argparse.Namespace()) == ServeLimits()
    with pytest.raises(ValueError, match="max_connections"):
        ServeLimits(max_connections=0)
    with pytest.raises(ValueError, match="read_timeout_s"):
        ServeLimits(read_timeout_s=float("nan"))
