"""Chat backends for LLM judges, and `ChatClient`: the robust way every judge request is made.

Backends: `OpenAIChatBackend`, any OpenAI-compatible `/v1/chat/completions` endpoint (the API key is read from
a NAMED environment variable, never logged or written, nor part of a cache key); `HFChatBackend`, a local
Hugging Face causal LM, greedy as a judge and the one local generator of eval, synth and serve.

`ChatClient(backend, cache=...)` adds to every request:
- bounded concurrency (`max_workers` threads); identical requests in flight at once are sent once, and every
  caller gets the answer (counted as "merged");
- retries, each logged on the `polyalign.eval` logger, with backoff `backoff_s * 2**attempt` capped at
  `max_backoff_s` (+ up to 10% jitter), on 429, 5xx, timeouts, connection errors and truncated or malformed
  bodies (the backend raises `TransientError` for those);
- a JSONL cache keyed by the SHA-256 of the full request (backend, model, base_url, messages, params): each
  raw answer is appended (fsynced) as it arrives, so a rerun re-asks nothing it has. Failures are not cached.
A request fails for good on another HTTP error (400, e.g. a prompt over the served model's context; 404) or
when its retries run out. `complete_many(..., keep_errors=True)` (the judges) puts its `JudgeRequestError`
in its place, and the judge records an "error" verdict; without keep_errors it is raised once the pool
drains. The run stops (running requests finish and are cached; the error says how many were answered) on
an auth error (401/403, `JudgeAuthError`) or after `max_consecutive_failures` failures in a row (an outage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from polyalign.data.io import JsonlWriter

log = logging.getLogger("polyalign.eval")

Messages = list[dict[str, str]]


class TransientError(RuntimeError):
    """A failure worth retrying: rate limit (429), server error (5xx), timeout, connection error, bad body."""


class JudgeRequestError(ConnectionError):
    """A judge request that failed for good (a permanent error, or retries exhausted)."""


class JudgeAuthError(JudgeRequestError):
    """The endpoint refused the credentials (HTTP 401 / 403): no request can succeed, so the run stops."""


class ChatBackend(Protocol):
    """What `ChatClient` needs from a backend."""

    def identity(self) -> dict[str, str]:
        """What makes two backends answer differently (name, model, base_url); part of the cache key."""
        ...

    def chat(self, messages: Messages, params: dict[str, Any]) -> str:
        """The reply text; raises TransientError for retryable failures, JudgeRequestError for the others."""
        ...

    def describe(self) -> str: ...


def request_key(identity: dict[str, str], messages: Messages, params: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of the full request."""
    blob = json.dumps({"backend": identity, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JsonlCache:
    """Append-only JSONL of {"key", "response"} lines; each put is flushed and fsynced (`JsonlWriter`, which
    also cuts a torn last line left by a crash)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._lock, self._data = Path(path), threading.Lock(), {}
        self._writer = JsonlWriter(self.path)  # creates the file and its folder, cuts a torn last line
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                self._data[record["key"]] = record["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def put(self, key: str, response: str) -> None:
        with self._lock:
            self._data[key] = response
            self._writer.write([{"key": key, "response": response}])


Reply = str | JudgeRequestError | None  # None: not asked, the run was stopping


class ChatClient:
    """Robust, cached, concurrent chat requests over one backend (see the module docstring)."""

    def __init__(
        self,
        backend: ChatBackend,
        cache: str | os.PathLike | None = None,
        max_workers: int = 4,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_consecutive_failures: int = 5,
    ) -> None:
        if min(max_workers, max_consecutive_failures) < 1 or min(max_retries, backoff_s) < 0:
            raise ValueError("ChatClient: need workers, max_consecutive_failures >= 1, retries, backoff >= 0")
        self.backend = backend
        self.cache = JsonlCache(cache) if cache is not None else None
        self.max_workers, self.max_retries = max_workers, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_consecutive_failures, self._failures_in_a_row = max_consecutive_failures, 0
        self.stats = {"requests": 0, "cache_hits": 0, "merged": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future] = {}

    def describe(self) -> str:
        cache = f"cache {self.cache.path}" if self.cache else "no cache"
        return f"{self.backend.describe()}; {self.max_workers} workers, {self.max_retries} retries, {cache}"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _ask(self, key: str, messages: Messages, params: dict[str, Any], stop: threading.Event) -> Reply:
        """One request with retries; the reply is cached. A failure for good is returned, not raised."""
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                return None
            self._count("requests")
            try:
                reply = self.backend.chat(messages, params)
            except TransientError as err:
                if attempt == self.max_retries:
                    return JudgeRequestError(f"{err} (gave up after {attempt + 1} attempts)")
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                delay += random.uniform(0, 0.1 * delay)
                self._count("retries")
                retry = f"retry {attempt + 1}/{self.max_retries} in {delay:.2f}s"
                log.warning("judge request failed (%s); %s", err, retry)
                time.sleep(delay)
                continue
            except JudgeAuthError:
                raise
            except JudgeRequestError as err:
                return err
            if self.cache is not None:
                self.cache.put(key, reply)
            return reply
        raise AssertionError("unreachable")

    def _call(self, messages: Messages, params: dict[str, Any], stop: threading.Event) -> Reply:
        """A cache hit, the answer of an identical request in flight, or a new request."""
        key = request_key(self.backend.identity(), messages, params)
        with self._lock:
            hit = self.cache.get(key) if self.cache is not None else None
            pending = self._in_flight.get(key) if hit is None else None
            if hit is None and pending is None:
                mine = self._in_flight[key] = Future()
        if hit is not None or pending is not None:
            self._count("cache_hits" if hit is not None else "merged")
            return hit if hit is not None else pending.result()
        try:
            reply = self._ask(key, messages, params, stop)
            mine.set_result(reply)
        except BaseException as err:
            mine.set_exception(err)
            raise
        finally:
            with self._lock:
                del self._in_flight[key]
        if reply is not None:
            failed = isinstance(reply, JudgeRequestError)
            with self._lock:
                self.stats["failures"] += failed
                self._failures_in_a_row = self._failures_in_a_row + 1 if failed else 0
        return reply

    def complete_many(
        self, requests: list[Messages], params: dict[str, Any], keep_errors: bool = False
    ) -> list:
        """Reply texts in request order; with keep_errors a request that failed for good is its
        JudgeRequestError in the list, else it is raised after the pool drains (module docstring)."""
        stop = threading.Event()

        def run(messages: Messages) -> Reply:
            try:
                reply = self._call(messages, params, stop)
            except BaseException:
                stop.set()
                raise
            if isinstance(reply, JudgeRequestError) and (
                not keep_errors or self._failures_in_a_row >= self.max_consecutive_failures
            ):
                stop.set()
            return reply

        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(run, m) for m in requests]
        replies = [f.result() for f in futures]  # raises an auth (or unexpected) error
        if stop.is_set() or None in replies:
            failed = next((r for r in replies if isinstance(r, JudgeRequestError)), "stopped")
            done = sum(isinstance(r, str) for r in replies)
            why = f"{self._failures_in_a_row} requests in a row failed" if keep_errors else "a request failed"
            kept = f"; answered requests are kept in {self.cache.path}" if self.cache else ""
            raise JudgeRequestError(
                f"judge backend {self.backend.describe()}: {done} of {len(requests)} requests answered, "
                f"then {why}: {failed}{kept}"
            )
        return replies


class OpenAIChatBackend:
    """Any OpenAI-compatible chat endpoint via the `openai` client (its own retries are off: ChatClient's
    are the only ones, so they are counted and logged)."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
    ) -> None:
        try:
            import openai
        except ModuleNotFoundError as err:
            raise ImportError("the OpenAI-compatible judge needs `pip install 'polyalign[judges]'`") from err
        if not model:
            raise ValueError("OpenAIChatBackend: give the judge model name")
        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise ValueError(
                    f"OpenAI judge: environment variable {api_key_env} is not set (it must hold the API key); "
                    "for a local endpoint that needs no key, set base_url"
                )
            key = "none"  # local OpenAI-compatible servers (polyalign serve) accept any key
        self.model, self.base_url, self.api_key_env, self.timeout_s = model, base_url, api_key_env, timeout_s
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0)

    def identity(self) -> dict[str, str]:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url or "default"}

    def describe(self) -> str:
        where = self.base_url or "the OpenAI API"
        return f"OpenAI-compatible chat model {self.model!r} at {where} (key from ${self.api_key_env})"

    def chat(self, messages: Messages, params: dict[str, Any]) -> str:
        oa = self._openai
        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, **params)
        except (oa.RateLimitError, oa.InternalServerError) as err:
            raise TransientError(f"HTTP {err.status_code}: {err.message}") from err
        except oa.APITimeoutError as err:
            raise TransientError(f"timed out after {self.timeout_s}s") from err
        except oa.APIConnectionError as err:
            raise TransientError(f"connection error ({err.__cause__ or err})") from err
        except (oa.AuthenticationError, oa.PermissionDeniedError) as err:
            why = f"the judge endpoint refused the key in ${self.api_key_env} ({err.message})"
            raise JudgeAuthError(f"HTTP {err.status_code}: {why}") from err
        except oa.APIStatusError as err:
            raise JudgeRequestError(f"HTTP {err.status_code}: {err.message}") from err
        except json.JSONDecodeError as err:
            raise TransientError(f"truncated or malformed JSON body ({err})") from err
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as err:
            raise TransientError(f"malformed response body: {str(response)[:200]!r}") from err
        return content or ""


class HFChatBackend:
    """The one local generator: chat completions from a Hugging Face causal LM through HFEngine, used by judges
    (as a ChatBackend: greedy, one request at a time), eval and synth generation, and `polyalign serve`.

    `render` builds the text the model sees. A message list goes through the tokenizer's chat template, or the
    plain Human/Assistant layout without one (`polyalign.data.chat.render_prompt`). A bare prompt string, with
    the template, is one user message after the optional system message; without it, the prompt as is
    (completion style), `system` a preamble before it. `use_chat_template` None = when the tokenizer has one.
    `generate` holds a lock: the model is shared, so one generation runs at a time.
    """

    def __init__(
        self, model: Any, tokenizer: Any, name: str = "local", use_chat_template: bool | None = None
    ) -> None:
        from polyalign.rollout.hf import HFEngine

        self.engine, self.tokenizer, self.name = HFEngine(model, tokenizer), tokenizer, name
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.templated = has_template if use_chat_template is None else use_chat_template
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, name_or_path: str, device: str = "cpu", use_chat_template: bool | None = None
    ) -> HFChatBackend:
        from polyalign.models import load_policy

        model, tokenizer = load_policy(name_or_path, device=device)
        return cls(model.eval(), tokenizer, name_or_path, use_chat_template)

    @property
    def context_length(self) -> int:
        return self.engine.model.config.get_text_config().max_position_embeddings

    def fits(self, text: str, max_new_tokens: int) -> bool:
        """Whether a rendered prompt leaves room for max_new_tokens in the model's context."""
        return len(self.tokenizer(text)["input_ids"]) <= self.context_length - max_new_tokens

    def render(self, prompt: str | Messages, system: str | None = None) -> str:
        from polyalign.data.chat import render_prompt

        if isinstance(prompt, list):
            return render_prompt(self.tokenizer, prompt, self.templated)
        if self.templated:
            preamble = [{"role": "system", "content": system}] if system else []
            return render_prompt(self.tokenizer, [*preamble, {"role": "user", "content": prompt}], True)
        return f"{system}\n\n{prompt}" if system else prompt

    def generate(self, texts: list[str], n: int, sampling: Any) -> Any:
        """The Rollout of n completions per rendered text (see `HFEngine.generate`)."""
        with self._lock:
            return self.engine.generate(texts, n, sampling)

    def identity(self) -> dict[str, str]:
        return {"backend": "hf", "model": self.name}

    def describe(self) -> str:
        return f"local Hugging Face model {self.name!r} (greedy)"

    def chat(self, messages: Messages, params: dict[str, Any]) -> str:
        from polyalign.types import Sampling

        sampling = Sampling(max_new_tokens=int(params.get("max_tokens", 16)), temperature=0.0)
        try:
            return self.generate([self.render(messages)], 1, sampling).completions[0]
        except ValueError as err:  # e.g. the judge prompt does not fit the model's context
            raise JudgeRequestError(f"local judge {self.name!r}: {err}") from err
