"""An OpenAI-compatible HTTP server over any loadable causal LM: `polyalign serve --model NAME --port P`.

Endpoints (JSON, the OpenAI wire format, enough for the `openai` client and for our judges):
- GET  /v1/models             -> {"object": "list", "data": [{"id": <model id>, ...}]}
- POST /v1/chat/completions   -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant",
  "content": ...}, "finish_reason": "stop" | "length"}], "usage": {...}}
  Honoured request fields: messages, max_tokens (or max_completion_tokens; default 64), temperature
  (default 1.0; 0 = greedy), top_p, n, seed, stop (a string or a list). `stream: true` is refused (400).
  The messages are rendered by the local generator (`polyalign.eval.backends.HFChatBackend`): the
  tokenizer's chat template when it has one, else the plain "\\n\\nHuman: ...\\n\\nAssistant:" layout.
  The `model` field of a request is echoed back but does not select anything: one server serves one model.
Errors are JSON {"error": {"message", "type"}} with status 400 (bad request), 404 (unknown path) or 500.

Generation runs through that generator's `HFEngine` under its lock (one request generates at a time; the HTTP
threads still accept and parse concurrently). The server binds 127.0.0.1 by default. It is stdlib
`http.server`: good for tests, local judges and demos, not a production inference server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_MAX_BODY = 8 * 1024 * 1024


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400."""


class ModelServer:
    """The model, its tokenizer and the generation lock; turns a request dict into a response dict."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str) -> None:
        from polyalign.eval.backends import HFChatBackend

        self.chat_model, self.model_id = HFChatBackend(model, tokenizer, model_id), model_id
        self.lock = threading.Lock()
        self.requests = 0  # chat completions served (tests count calls with it)

    def models(self) -> dict:
        entry = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "polyalign"}
        return {"object": "list", "data": [entry]}

    def _sampling(self, body: dict) -> tuple[Any, int]:
        from polyalign.types import Sampling

        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
        n = body.get("n") or 1
        try:
            sampling = Sampling(
                max_new_tokens=int(max_tokens),
                temperature=float(
                    body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0
                ),
                top_p=float(body.get("top_p") or 1.0),
                stop_strings=tuple(str(s) for s in stop),
                seed=int(body["seed"]) if body.get("seed") is not None else None,
            )
        except (TypeError, ValueError) as err:
            raise BadRequest(f"bad sampling parameter: {err}") from None
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise BadRequest(f"n must be an integer in 1..16, got {n!r}")
        return sampling, n

    def chat(self, body: dict) -> dict:
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by polyalign serve")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        sampling, n = self._sampling(body)
        try:
            text = self.chat_model.render(messages)
            with self.lock:
                self.requests += 1
            rollout = self.chat_model.generate([text], n, sampling)
        except ValueError as err:  # bad messages, prompt longer than the context, bad sampling values
            raise BadRequest(str(err)) from None
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


def _handler(state: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: no per-request stderr lines
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, state.models())
            else:
                self._error(404, f"unknown path {self.path}", "not_found")

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"unknown path {self.path}", "not_found")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    raise BadRequest(f"request body over {_MAX_BODY} bytes")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("request body must be a JSON object")
                self._send(200, state.chat(body))
            except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as err:
                self._error(400, str(err), "invalid_request_error")
            except Exception as err:  # a crash in generation must not kill the server thread
                self._error(500, f"{type(err).__name__}: {err}", "server_error")

    return Handler


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    tokenizer: Any = None,
    model_id: str | None = None,
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving in a daemon thread; returns (server, thread). `server.server_address[1]` is the port
    (port=0 picks a free one); `server.model_server` holds the ModelServer. Stop with `server.shutdown();
    server.server_close()`.

    `model` is a name or path for `polyalign.models.load_policy`, or a loaded causal LM (then pass its
    `tokenizer`).
    """
    if isinstance(model, str):
        from polyalign.models import load_policy

        model_id = model_id or model
        model, tokenizer = load_policy(model)
    if tokenizer is None:
        raise ValueError("serve: pass the tokenizer of a loaded model (or give a model name / path)")
    state = ModelServer(model.eval(), tokenizer, model_id or getattr(model.config, "_name_or_path", "model"))
    server = ThreadingHTTPServer((host, port), _handler(state))
    server.daemon_threads = True
    server.model_server = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="polyalign-serve", daemon=True)
    thread.start()
    return server, thread


def cli_serve(args: Any) -> int:
    """`polyalign serve --model NAME [--host 127.0.0.1] [--port 8000]`: serve until Ctrl-C."""
    model = getattr(args, "model", None) or "stories260K"
    host = getattr(args, "host", None) or "127.0.0.1"
    port = getattr(args, "port", None)
    server, thread = serve(model, host=host, port=8000 if port is None else int(port))
    bound = server.server_address[1]
    print(
        f"polyalign serve: {model} at http://{host}:{bound}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True
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
