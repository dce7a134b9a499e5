"""What keeps one client from hurting the others, below the retrieval endpoint itself.

- ``guard_requests``: ASGI middleware that refuses a body that is not JSON (415) or is larger
  than the limit (413), before FastAPI parses any of it.
- ``read_deadline_protocol``: uvicorn's httptools protocol with a read deadline and a cap on the
  request head. uvicorn 0.54 times out only idle kept-alive connections (``timeout_keep_alive``,
  armed after a response): a client that connects and sends nothing, or trickles its headers or
  body a byte at a time, holds its connection and file descriptor for as long as it likes, and
  httptools buffers a request head of any size (20 MB of headers were accepted in a test). Here
  every request must arrive whole within ``read_timeout_s`` of its first byte (or of the
  connection), and its head within ``max_head_bytes``.
- ``CutLog``: counts the connections those guards cut and logs them as one line per interval, not one
  each: a slow-sender attack cuts ~1,500 connections a minute, which would bury every other log line.

The connection limit itself is uvicorn's ``limit_concurrency``: past it, each new request gets a
503 and its connection is closed. With several front processes on one port (``--fronts``) the limit holds for
all of them together: each front publishes how many connections it has open (``SharedConnections``, backed by
``drzero.retrieval.tally``) and lowers its own limit by the others' count.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Callable, Protocol

log = logging.getLogger(__name__)

BODY_METHODS = {"POST", "PUT", "PATCH"}

# Why a connection was cut: every reason ``CutLog.cut`` is given (``/health`` counts each).
MALFORMED, HEAD_TOO_LARGE, HEAD_LATE, BODY_LATE, OVER_LIMIT = (
    "malformed HTTP", "head too large", "head not received in time", "body not received in time",
    "over --max-connections")
CUT_REASONS = (MALFORMED, HEAD_TOO_LARGE, HEAD_LATE, BODY_LATE, OVER_LIMIT)


def error_body(field: str, message: str) -> dict:
    """The service's error shape: ``detail`` starts with the field it is about."""
    return {"detail": f"{field}: {message}", "field": field}


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def guard_requests(app, max_body_bytes: int):
    """ASGI middleware: 415 for a body sent as anything but JSON, 413 for one over ``max_body_bytes``.

    The body is read here (small by construction) and replayed to the app, so an oversized upload
    is refused before FastAPI parses any of it. A body without a Content-Type is refused too: FastAPI
    reads it as JSON or not depending on its version, and would answer with a misleading error.
    """

    async def middleware(scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            return await app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type")
        if content_type is None or not _is_json(content_type):
            got = "no Content-Type" if content_type is None else repr(content_type.decode("latin-1")[:80])
            return await send_json(send, 415, error_body(
                "content-type", f"the body must be sent as application/json, not {got}; send the header "
                                f"'Content-Type: application/json' (curl: -H 'Content-Type: application/json')"))
        too_large = error_body("body", f"request body is larger than the limit of {max_body_bytes} bytes "
                                       f"(--max-body-bytes); split the queries over several requests")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return await send_json(send, 413, too_large)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > max_body_bytes:
                return await send_json(send, 413, too_large)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return middleware


async def send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class CutLog:
    """How many connections the guards cut, logged once per ``interval_s`` instead of once each.

    The first cut after a quiet interval is logged at once, with its client and reason; the ones that
    follow within ``interval_s`` are counted and summarized in one line at its end (and so on while they
    keep coming). ``total`` and ``by_reason`` count since ``where`` (this process) started; ``on_cut`` is told
    each reason as well (the server's shared counts, which ``/health`` shows).
    """

    def __init__(self, interval_s: float = 60.0, on_cut: Callable[[str], None] | None = None,
                 where: str = "the server"):
        self.interval_s = interval_s
        self.on_cut = on_cut
        self.where = where
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()  # cut since the last line
        self._summary: asyncio.TimerHandle | None = None

    def cut(self, client, reason: str, detail: str) -> None:
        """Count one connection closed for ``reason``; called on the event loop (a protocol or log callback)."""
        self.total += 1
        self.by_reason[reason] += 1
        if self.on_cut is not None:
            self.on_cut(reason)
        if self._summary is None:
            log.warning("closing %s: %s (connections cut in the next %gs are counted and summarized)",
                        client, detail, self.interval_s)
            loop = asyncio.get_running_loop()
            self._summary = loop.call_later(self.interval_s, self._summarize, loop)
        else:
            self._unlogged[reason] += 1

    def _summarize(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._unlogged:
            self._summary = None  # quiet: the next cut is logged at once again
            return
        reasons = ", ".join(f"{count} {reason}" for reason, count in self._unlogged.most_common())
        log.warning("cut %d more connections in the last %gs (%s); %d since %s started",
                    sum(self._unlogged.values()), self.interval_s, reasons, self.total, self.where)
        self._unlogged.clear()
        self._summary = loop.call_later(self.interval_s, self._summarize, loop)


# uvicorn's own line for each request it refuses (uvicorn/protocols/http/httptools_impl.py), as many as requests
_UVICORN_REFUSALS = {"Invalid HTTP request received.": None,  # counted by the protocol's send_400_response
                     "Exceeded concurrency limit.": OVER_LIMIT}


class CountUvicornRefusals(logging.Filter):
    """On uvicorn's error logger: its one WARNING per refused request becomes a count in ``cuts`` instead."""

    def __init__(self, cuts: CutLog):
        super().__init__()
        self.cuts = cuts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in _UVICORN_REFUSALS:
            return True
        reason = _UVICORN_REFUSALS[message]
        if reason is not None:
            self.cuts.cut("a client", reason, f"503: {message[:-1].lower()} (--max-connections)")
        return False


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _raw_response(status: int, payload: dict) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for answers given below ASGI."""
    body = json.dumps(payload).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))) + body


class SharedConnections(Protocol):
    """The open connections of every front on the port (``drzero.retrieval.tally.FrontCounts``)."""

    def here(self, count: int) -> None:
        """This front has ``count`` connections open now."""

    def elsewhere(self) -> int:
        """How many the other fronts have open."""


def read_deadline_protocol(read_timeout_s: float, max_head_bytes: int, cuts: CutLog,
                           connections: SharedConnections | None = None) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection whose request is not read in time or whose head is too big.

    Pass the class as ``uvicorn.Config(..., http=...)``; uvicorn builds one per connection. Each cut is counted
    (and logged) by ``cuts``. With ``connections``, uvicorn's ``limit_concurrency`` counts the connections of
    every front sharing the port, not only this process's.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # ~0.15 s: only a serving process needs it

    class ReadDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _head_done = False  # the current request's headers are all in
        _head_bytes = 0  # bytes received while they were not

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # uvicorn arms nothing until the first response: a silent client would stay forever
            if connections is not None:
                connections.here(len(self.connections))

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            if connections is not None:
                connections.here(len(self.connections))

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Counted after parsing, so a chunk that completes the head (and carries body bytes) is not.
            if not self._head_done and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self._refuse(431, HEAD_TOO_LARGE, error_body(
                        "headers", f"the request line and headers exceed {max_head_bytes} bytes; send a shorter "
                                   f"request"))

        # httptools parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_done, self._head_bytes = False, 0
            self._arm()  # the deadline runs from the request's first byte (or from the connection)

        def on_headers_complete(self) -> None:
            self._head_done = True
            if connections is not None and self.config.limit_concurrency is not None:
                # uvicorn refuses once this process's connections reach its limit: lowered by the other
                # fronts' count, that is once the server's reach it.
                self.limit_concurrency = self.config.limit_concurrency - connections.elsewhere()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()  # the request is read; answering it may take as long as it takes
            super().on_message_complete()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            message = error_body("request", f"the request was not received within {read_timeout_s:g} s "
                                            f"(--read-timeout-s); send it whole, without pauses")
            if not self._head_done:  # no app has the request yet: answer here
                self._refuse(408, HEAD_LATE, message)
            else:  # the app is waiting for the body: closing hands it an http.disconnect
                cuts.cut(self.client, BODY_LATE,
                         f"request body not received within {read_timeout_s:g}s")
                self.transport.close()

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to bytes that are not HTTP/1.1
            self._refuse(400, MALFORMED, error_body("request", f"{msg.rstrip('.')} (not HTTP/1.1); send "
                                                                      f"POST /retrieve with a JSON body"))

        def _refuse(self, status: int, reason: str, payload: dict) -> None:
            cuts.cut(self.client, reason, payload["detail"])
            self._disarm()
            self.transport.write(_raw_response(status, payload))
            self.transport.close()

    return ReadDeadlineProtocol
