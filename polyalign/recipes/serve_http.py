"""The bounded HTTP transport of `polyalign serve` (stdlib `http.server`, one thread per connection).

Every read has a deadline, every buffer a size and every pool a cap (the numbers are `ServeLimits`):
- a connection's request line, headers and body share one deadline (`read_timeout_s`): a client that drips a
  byte every few seconds (slowloris) or sends less body than it declared is cut off when the deadline passes;
- request line + headers may take `max_header_bytes`; the body is read only after a valid Content-Length
  (missing or chunked -> 411, not a non-negative integer -> 400, over `max_body_bytes` -> 413), never more;
- at most `max_connections` connections hold a thread; the next one gets a 503 from the accepting thread
  without a thread of its own;
- an error answered before the body was read closes the connection after draining what the client is still
  sending for at most `_LINGER_S` (so the client reads the answer instead of a reset), into a fixed buffer.
It knows requests and status codes, not models: the app is a `route(method, path, body) -> dict` that raises
`ApiError` for anything but 200. No import of polyalign modules (serve.py imports this one).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("polyalign.serve")

_LINGER_S = 2.0  # longest drain of an unread body after an early error answer
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error", 503: "server_busy"}


@dataclass(frozen=True)
class ServeLimits:
    """What one client can make the server hold (see the module docstring of polyalign.recipes.serve)."""

    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 32 << 10
    read_timeout_s: float = 10.0
    max_connections: int = 32
    max_queue: int = 8
    """Chat requests that may wait for the model behind the one generating; more get 503 at once."""
    max_tokens: int = 1024
    """Largest `max_tokens` a request may ask for."""
    max_n: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "max_queue" else 1e-3 if f.name == "read_timeout_s" else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
                raise ValueError(f"ServeLimits.{f.name} must be a finite number >= {low}, got {value!r}")


class ApiError(Exception):
    """An answer other than 200: status, message, the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def payload(self) -> dict:
        kind = _ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline (a byte now and then cannot extend it) and an optional budget."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.deadline, self.budget = sock, 0.0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("read deadline passed")
        if self.budget is not None:
            if self.budget <= 0:
                raise ApiError(431, "request line and headers over the server's size limit")
            buffer = memoryview(buffer)[: self.budget]
        self.sock.settimeout(left)
        n = self.sock.recv_into(buffer)
        if self.budget is not None:
            self.budget -= n
        return n


def _content_length(headers: Any, limit: int) -> int:
    """The body size a request declares, or the ApiError that refuses it before any body byte is read."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raise ApiError(411, "chunked request bodies are not accepted: send a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise ApiError(411, "Content-Length required")
    value = values[0].strip()
    if len(values) > 1 or not (value.isascii() and value.isdigit()):
        raise ApiError(400, f"Content-Length must be one non-negative integer, got {', '.join(values)!r:.60}")
    length = int(value) if len(value) <= 18 else limit + 1
    if length > limit:
        raise ApiError(413, f"request body of {value:.20} bytes is over the server's limit of {limit} bytes")
    return length


class _Handler(BaseHTTPRequestHandler):
    """Framing, limits, the API key, JSON in and out; `route` (set by make_handler) does the rest."""

    protocol_version = "HTTP/1.1"
    route: Callable[[str, str, dict | None], dict]
    limits: ServeLimits
    api_key: str | None

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no per-request stderr lines
        pass

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader with a deadline and a byte budget
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, 8192)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + self.limits.read_timeout_s
        self.reader.budget = self.limits.max_header_bytes + 8192  # + one read-ahead buffer of body
        self.body_unread = True
        try:
            super().handle_one_request()  # closes the connection on a timeout (no answer to give)
        except ApiError as err:  # headers over the byte budget
            self._fail(err)
        except OSError:  # reset by the client, or a write that timed out
            self.close_connection = True

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.connection.settimeout(self.limits.read_timeout_s)  # a client that does not read is dropped too
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, err: ApiError) -> None:
        self.close_connection = self.close_connection or self.body_unread
        self._send(err.status, err.payload(), err.headers)
        if self.body_unread:
            self._linger()

    def _linger(self) -> None:
        """Half-close, then drain what the client still sends (fixed buffer, bounded time)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            end, sink = time.monotonic() + _LINGER_S, bytearray(65536)
            while (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv_into(sink):
                    break
        except OSError:
            pass

    def _read_json(self) -> dict:
        length = _content_length(self.headers, self.limits.max_body_bytes)
        self.reader.budget = None
        data = self.rfile.read(length)
        self.body_unread = False
        if len(data) < length:
            self.close_connection = True
            raise ApiError(400, f"body ended after {len(data)} of the {length} bytes of its Content-Length")
        try:
            body = json.loads(data or b"{}")
        except (
            ValueError,
            RecursionError,
        ) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"request body is not JSON: {str(err):.200}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _authorize(self) -> None:
        if self.api_key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (
            given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())
        ):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    def _serve(self, method: str) -> None:
        try:
            self._authorize()
            body = self._read_json() if method == "POST" else None
            self._send(200, self.route(method, self.path.split("?")[0].rstrip("/"), body))
        except ApiError as err:
            self._fail(err)
        except TimeoutError:  # a body shorter than declared: answer, close, do not linger
            self.close_connection, self.body_unread = True, False
            self._fail(ApiError(408, f"request not received within {self.limits.read_timeout_s} s"))
        except Exception as err:  # a crash in generation must not kill the server thread
            log.error("polyalign serve: %s %s failed: %s: %s", method, self.path, type(err).__name__, err)
            self._fail(ApiError(500, f"{type(err).__name__}: {err}"))

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")


def make_handler(
    route: Callable[[str, str, dict | None], dict], limits: ServeLimits, api_key: str | None
) -> type[BaseHTTPRequestHandler]:
    """The request handler class for BoundedHTTPServer over `route(method, path, body) -> dict`."""
    return type("Handler", (_Handler,), {"route": staticmethod(route), "limits": limits, "api_key": api_key})


_BUSY = json.dumps(ApiError(503, "server busy: too many open connections; retry later").payload()).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` handler threads; beyond them, a 503 from the
    accepting thread. Refused sockets linger half-closed for about a second before they are closed."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        super().__init__(address, handler)
        self.connections = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections answered 503 for want of a thread
        self._lingering: list[tuple[float, socket.socket]] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.connections.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.connections.release()
                raise
            return
        self.refused += 1
        try:
            request.setblocking(False)
            request.send(_BUSY_RESPONSE)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._lingering.append((time.monotonic() + 1.0, request))
        if len(self._lingering) > 1024:  # a flood of refusals: stop being polite
            self._close_lingering(math.inf)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def service_actions(self) -> None:  # called by serve_forever about every poll interval
        self._close_lingering(time.monotonic())

    def _close_lingering(self, now: float) -> None:
        keep = []
        for due, sock in self._lingering:
            if due > now:
                keep.append((due, sock))
                continue
            try:
                sock.recv(1 << 20)  # drop what the client sent, so the close is a FIN and not a reset
            except OSError:
                pass
            sock.close()
        self._lingering = keep

    def server_close(self) -> None:
        self._close_lingering(math.inf)
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:  # one line, not a traceback
        err = sys.exc_info()[1]
        log.warning(
            "polyalign serve: connection from %s dropped: %s: %s", client_address, type(err).__name__, err
        )
