"""A front's end of its pipe to the search worker (``worker``): batches out, their hits back as asyncio futures.

The front's ``QueryBatcher`` submits through ``WorkerClient.submit``; a reader thread turns the worker's messages
into the futures' results. When the pipe ends, the worker is gone: every search in flight, and every one after,
fails with ``WorkerGone``, which the front answers with 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """The worker could not run a batch (its message says why); other batches are unaffected."""


class WorkerGone(RuntimeError):
    """The worker process has exited; nothing more can be searched until the server restarts."""


class WorkerOwner(Protocol):
    """The handle of the process that started the worker (``worker.SearchWorker``)."""

    stopping: bool

    def exited(self) -> str:
        """Why searches fail now that the worker is gone."""


class WorkerClient:
    """A front's pipe to the worker, its messages turned into asyncio futures.

    ``submit(queries, topk)`` returns two futures: *encoded* (the worker's encoder has taken the batch:
    time to form the next one) and *done* (the batch's hits, or ``WorkerFailed``). ``owner`` is the
    ``SearchWorker`` when this process started the worker (then this client logs its death, with its exit code;
    otherwise the serving process does).
    """

    def __init__(self, conn, info: dict[str, Any], owner: WorkerOwner | None = None):
        self.info = info
        self._conn = conn
        self._owner = owner
        self._loop: asyncio.AbstractEventLoop | None = None
        self._numbers = 0
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Future]] = {}
        self.gone: str | None = None  # why the worker is gone, once it is

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the worker's messages into futures of ``loop``."""
        self._loop = loop
        threading.Thread(target=self._read, name="search-worker-reader", daemon=True).start()

    def submit(self, queries: list[str], topk: int) -> tuple[asyncio.Future, asyncio.Future]:
        assert self._loop is not None, "attach() first"
        encoded, done = self._loop.create_future(), self._loop.create_future()
        if not self.gone:
            self._numbers += 1
            try:
                self._conn.send(("batch", self._numbers, queries, topk))
                self._pending[self._numbers] = (encoded, done)
                return encoded, done
            except OSError:  # it died just now; the reader has not seen the end of the pipe yet
                self._lost("the search worker exited")
        for future in (encoded, done):
            future.set_exception(WorkerGone(self.gone))
        return encoded, done

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._loop.call_soon_threadsafe(self._deliver, message)
        why = self._owner.exited() if self._owner is not None else "the search worker exited"
        self._loop.call_soon_threadsafe(self._lost, why)

    def _deliver(self, message) -> None:
        kind, number = message[0], message[1]
        futures = self._pending.get(number)
        if futures is None:
            return
        encoded, done = futures
        if kind == "encoded":
            if not encoded.done():
                encoded.set_result(None)
            return
        self._pending.pop(number, None)
        if not encoded.done():
            encoded.set_result(None)
        if done.done():
            return
        if kind == "done":
            done.set_result(message[2])
        else:
            done.set_exception(WorkerFailed(message[2]))

    def _lost(self, why: str) -> None:
        if self.gone:
            return
        self.gone = why
        stopping = self._owner is not None and self._owner.stopping
        if self._owner is not None and not stopping:
            log.error("%s; searches fail until the retriever is restarted", why)
        for encoded, done in self._pending.values():
            for future in (encoded, done):
                if not future.done():
                    future.set_exception(WorkerGone(why))
        self._pending.clear()
