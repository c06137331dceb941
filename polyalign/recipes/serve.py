"""An OpenAI-compatible HTTP server over any loadable causal LM: `polyalign serve --model NAME --port P`.

Endpoints (JSON, the OpenAI wire format, enough for the `openai` client and for our judges):
- GET  /v1/models             -> {"object": "list", "data": [{"id": <model id>, ...}]}
- POST /v1/chat/completions   -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant",
  "content": ...}, "finish_reason": "stop" | "length"}], "usage": {...}}
  Request fields, each checked (a bad one is a 400 whose message and `param` name it; NaN and inf are bad):
  messages (a non-empty list of {role, content: str}), max_tokens or max_completion_tokens (an integer in
  [1, --max-tokens-limit]; default 64), temperature (a finite number >= 0; default 1.0; 0 = greedy), top_p
  (in (0, 1]; default 1), n (an integer in [1, 16]), seed (an integer >= 0), stop (a non-empty string or a
  list of up to 4), model (a string, echoed back: one server serves one model). `stream: true` is a 400;
  other fields are ignored. The messages are rendered by the local generator
  (`polyalign.eval.backends.HFChatBackend`): the tokenizer's chat template when it has one, else the plain
  "\\n\\nHuman: ...\\n\\nAssistant:" layout.
Errors are JSON {"error": {"message", "type", "param"}}: 400 bad field or body, 401 missing/wrong API key,
404 unknown path, 408 body not received in time, 411 no Content-Length, 413 body too large, 431 headers too
large, 503 busy (with Retry-After), 500 only for a failure of the server itself.

Limits (flags of `polyalign serve`; `ServeLimits` in Python), so that no client can exhaust the process:
  --max-body-bytes 1048576   a body is read only after a valid Content-Length at most this (else 411/400/413)
  --read-timeout 10          seconds for a request's line, headers and body together (slowloris, short body)
  --max-connections 32       connections holding a thread; the next is answered 503 at once
  --max-queue 8              chat requests waiting behind the one generating; the next is answered 503 at once
  --max-tokens-limit 1024    the largest max_tokens a request may ask for
Headers are capped at 32 KiB. The model generates under a lock, one request at a time; the queue bound is what
keeps a burst from piling up threads behind it.

Access: the server binds 127.0.0.1 by default. `--host` beyond loopback (e.g. 0.0.0.0) logs a warning, since
anyone who reaches the port can use the model; `--api-key KEY` (or the POLYALIGN_SERVE_API_KEY environment
variable, which keeps the key out of `ps`) makes every request need `Authorization: Bearer KEY` (401 without).
Plain HTTP, no TLS: put a proxy in front for anything beyond a trusted network. The transport is the standard
library (`serve_http.py`); docs/serve.md has the measurements that chose it over uvicorn and aiohttp.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import threading
import time
import uuid
from typing import Any

from polyalign.recipes.serve_http import ApiError, BoundedHTTPServer, ServeLimits, log, make_handler
from polyalign.threads import apply_threads

__all__ = ["ApiError", "ModelServer", "ServeLimits", "add_serve_arguments", "cli_serve", "serve"]

_API_KEY_ENV = "POLYALIGN_SERVE_API_KEY"


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer in [{low}, {high}], got {value!r:.40}", name)
    return value


def _number(body: dict, name: str, default: float, ok: Any, expected: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ApiError(400, f"'{name}' must be {expected}, got {value!r:.40}", name)
    return float(value)


def parse_chat_request(body: dict, limits: ServeLimits) -> tuple[list[dict], Any, int]:
    """(messages, Sampling, n) of a chat request, or the ApiError (400) naming the first bad field."""
    from polyalign.data.messages import normalize_messages
    from polyalign.types import Sampling

    if body.get("stream"):
        raise ApiError(
            400, "'stream': streaming is not supported by polyalign serve; send stream=false", "stream"
        )
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, f"'model' must be a string, got {body['model']!r:.40}", "model")
    try:
        messages = normalize_messages(body.get("messages"), "'messages'")
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, min(64, limits.max_tokens), 1, limits.max_tokens)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(
            400, f"'stop' must be a non-empty string or a list of up to 4, got {stop!r:.60}", "stop"
        )
    sampling = Sampling(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a finite number >= 0"),
        top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        stop_strings=tuple(stops),
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
    )
    return messages, sampling, _integer(body, "n", 1, 1, limits.max_n)


class ModelServer:
    """The model, its tokenizer, the generation lock and the queue bound; turns requests into responses."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, limits: ServeLimits | None = None) -> None:
        from polyalign.eval.backends import HFChatBackend

        self.chat_model, self.model_id = HFChatBackend(model, tokenizer, model_id), model_id
        self.limits = limits or ServeLimits()
        self.lock = threading.Lock()  # held while generating: one request at a time
        self.in_flight, self._count_lock = 0, threading.Lock()  # chat requests generating or queued
        self.requests = 0  # chat completions served (tests count calls with it)

    def route(self, method: str, path: str, body: dict | None) -> dict:
        if method == "GET" and path in ("/v1/models", "/models"):
            return self.models()
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            return self.chat(body or {})
        raise ApiError(404, f"unknown path {method} {path}")

    def models(self) -> dict:
        entry = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "polyalign"}
        return {"object": "list", "data": [entry]}

    def chat(self, body: dict) -> dict:
        messages, sampling, n = parse_chat_request(body, self.limits)
        try:
            text = self.chat_model.render(messages)
        except ValueError as err:  # e.g. a role the chat template refuses
            raise ApiError(400, str(err), "messages") from None
        with self._count_lock:
            if self.in_flight > self.limits.max_queue:
                busy = (
                    f"server busy: {self.limits.max_queue} requests already wait for the model; retry later"
                )
                raise ApiError(503, busy, headers={"Retry-After": "1"})
            self.in_flight += 1
        try:
            with self.lock:
                self.requests += 1
                rollout = self.chat_model.generate([text], n, sampling)
        except ValueError as err:  # the prompt plus max_tokens do not fit the model's context
            raise ApiError(400, str(err), "messages") from None
        finally:
            with self._count_lock:
                self.in_flight -= 1
        return self._response(body, rollout)

    def _response(self, body: dict, rollout: Any) -> dict:
        lengths = rollout.completion_lengths.tolist()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": completion},
                "finish_reason": "stop" if bool(rollout.finished[i]) else "length",
            }
            for i, completion in enumerate(rollout.completions)
        ]
        prompt_tokens = int(rollout.prompt_mask[0].sum())
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_id,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": int(sum(lengths)),
                "total_tokens": prompt_tokens + int(sum(lengths)),
            },
        }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a bind address beyond loopback (None for loopback)."""
    if is_loopback(host):
        return None
    access = "requests need the API key" if api_key else "no API key: anyone who reaches it can use the model"
    advice = "" if api_key else f"; set --api-key or {_API_KEY_ENV}"
    return (
        f"polyalign serve: binding {host} makes the server reachable beyond this machine ({access}; plain HTTP, "
        f"no TLS). Bind 127.0.0.1 unless that is intended{advice}."
    )


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    tokenizer: Any = None,
    model_id: str | None = None,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
) -> tuple[BoundedHTTPServer, threading.Thread]:
    """Start serving in a daemon thread; returns (server, thread). `server.server_address[1]` is the port
    (port=0 picks a free one); `server.model_server` holds the ModelServer. Stop with `server.shutdown();
    server.server_close()`.

    `model` is a name or path for `polyalign.models.load_policy`, or a loaded causal LM (then pass its
    `tokenizer`). `api_key` (non-empty) makes every request need `Authorization: Bearer <api_key>`.
    """
    limits = limits or ServeLimits()
    if api_key is not None and not api_key.strip():
        raise ValueError("serve: the API key is empty; give a non-empty key or none")
    if isinstance(model, str):
        from polyalign.models import load_policy

        model_id = model_id or model
        model, tokenizer = load_policy(model)
    if tokenizer is None:
        raise ValueError("serve: pass the tokenizer of a loaded model (or give a model name / path)")
    if (warning := exposure_warning(host, api_key)) is not None:
        log.warning(warning)
    state = ModelServer(
        model.eval(), tokenizer, model_id or getattr(model.config, "_name_or_path", "model"), limits
    )
    server = BoundedHTTPServer(
        (host, port), make_handler(state.route, limits, api_key), limits.max_connections
    )
    server.model_server = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="polyalign-serve", daemon=True)
    thread.start()
    return server, thread


_FLAGS = {  # flag -> (ServeLimits field, type, help)
    "--max-body-bytes": ("max_body_bytes", int, "largest request body read (bytes)"),
    "--read-timeout": ("read_timeout_s", float, "seconds for a request's line, headers and body together"),
    "--max-connections": ("max_connections", int, "open connections holding a thread; beyond: 503"),
    "--max-queue": ("max_queue", int, "chat requests waiting for the model; beyond: 503"),
    "--max-tokens-limit": ("max_tokens", int, "largest max_tokens a request may ask for"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `polyalign serve` (the CLI's subparser calls this)."""
    parser.add_argument("--model", default="stories260K", help="built-in name, local directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="beyond loopback: a warning; use --api-key")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or {_API_KEY_ENV})"
    )
    for flag, (name, kind, text) in _FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=getattr(ServeLimits(), name), help=text)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads; 0 = the default (docs/threads.md)"
    )


def limits_from_args(args: Any) -> ServeLimits:
    """ServeLimits from parsed flags; a flag the namespace lacks keeps its default."""
    given = {name: getattr(args, name, None) for name, _, _ in _FLAGS.values()}
    return ServeLimits(**{name: value for name, value in given.items() if value is not None})


def cli_serve(args: Any) -> int:
    """`polyalign serve --model NAME [--host 127.0.0.1] [--port 8000] [--api-key KEY] [limits]`: until Ctrl-C."""
    model = getattr(args, "model", None) or "stories260K"
    host = getattr(args, "host", None) or "127.0.0.1"
    port = getattr(args, "port", None)
    api_key = getattr(args, "api_key", None) or os.environ.get(_API_KEY_ENV) or None
    apply_threads(getattr(args, "threads", 0) or 0)
    server, thread = serve(
        model,
        host=host,
        port=8000 if port is None else int(port),
        limits=limits_from_args(args),
        api_key=api_key,
    )
    bound = server.server_address[1]
    auth = "API key required" if api_key else "no API key"
    print(
        f"polyalign serve: {model} at http://{host}:{bound}/v1 (OpenAI-compatible; {auth}; Ctrl-C stops)",
        flush=True,
    )
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
