"""Coalesce concurrent search requests into encoder batches, and keep the encoder busy.

During training hundreds of search calls arrive at once. Encoding them one request at a time
leaves the encoder doing many tiny forward passes. The batcher runs a two-stage pipeline:

- **encode**: whatever is queued when the encoder comes free, up to ``max_batch`` queries, is one
  forward pass. Nothing waits for company: an idle encoder takes a lone request at once, a busy one
  lets the queue fill, so batches grow with load by themselves (``max_wait_ms`` adds an optional
  wait for a fuller batch).
- **lookup**: the vector search and the passages' text for batch *n* while the encoder is already
  on batch *n + 1*.

The stages run behind a ``submit`` function: in the server, a worker process of their own
(``drzero.retrieval.worker``); in-process, ``ThreadedStages``.

A request larger than ``max_batch`` is cut into slices; after each slice its rest goes to the back
of the queue, so a 512-query request shares the encoder with the small ones instead of blocking it.
When a batch of several requests fails, each of its slices is run again alone, so one bad request
fails by itself and the others get their results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

Result = TypeVar("Result")


@dataclass(eq=False)
class _Pending(Generic[Result]):
    queries: list[str]
    topk: int
    future: asyncio.Future
    results: list = field(default_factory=list)
    taken: int = 0      # queries handed to batches so far
    finished: int = 0   # queries whose results are in

    def __post_init__(self) -> None:
        self.results = [None] * len(self.queries)

    @property
    def alive(self) -> bool:  # not failed, not cancelled (the client went away)
        return not self.future.done()


@dataclass(frozen=True)
class _Slice:
    request: _Pending
    start: int
    end: int


Submit = Callable[[list[str], int], "tuple[asyncio.Future, asyncio.Future]"]


class ThreadedStages:
    """The two stages in this process, one thread each: ``submit`` for a ``QueryBatcher``.

    ``encode`` is optional: without it ``lookup`` gets the query strings (one stage). The server runs the
    stages in a worker process instead (``drzero.retrieval.worker``); this is the same contract in-process.
    """

    def __init__(self, lookup: Callable[[Any, int], list], encode: Callable[[list[str]], Any] | None = None):
        self._lookup = lookup
        self._encode = encode
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._lookup_pool = ThreadPoolExecutor(1, thread_name_prefix="lookup")
        self._tasks: set[asyncio.Task] = set()

    def submit(self, queries: list[str], topk: int) -> tuple[asyncio.Future, asyncio.Future]:
        loop = asyncio.get_running_loop()
        encoded, done = loop.create_future(), loop.create_future()

        async def run() -> None:
            try:
                vectors = (await loop.run_in_executor(self._encode_pool, self._encode, queries)
                           if self._encode is not None else queries)
            except Exception as error:
                encoded.set_result(None)
                done.set_exception(error)
                return
            encoded.set_result(None)
            try:
                done.set_result(await loop.run_in_executor(self._lookup_pool, self._lookup, vectors, topk))
            except Exception as error:
                done.set_exception(error)

        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return encoded, done

    def close(self) -> None:
        for pool in (self._encode_pool, self._lookup_pool):
            pool.shutdown(wait=False, cancel_futures=True)


class QueryBatcher(Generic[Result]):
    """Coalesces requests into batches for ``submit(queries, topk) -> (encoded, done)`` futures.

    ``encoded`` resolves when the encoder has taken the batch (the next batch is formed then, from
    everything queued meanwhile); ``done`` resolves to one result list per query. A batch uses the
    largest ``topk`` asked for in it; each request gets its own first ``topk``. With ``coalesce=False``
    every batch holds one request only (the ``--no-batching`` baseline). ``on_success`` is told the number of
    queries of each batch that comes back (the server's shared counts).
    """

    def __init__(self, submit: Submit, max_batch: int = 256, max_wait_ms: float = 0.0, coalesce: bool = True,
                 on_success: Callable[[int], None] | None = None):
        self._submit = submit
        self._on_success = on_success
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.coalesce = coalesce
        self._queue: deque[_Pending] = deque()
        self._retry: deque[_Slice] = deque()  # slices of a failed batch, each to run alone
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.batches_run = 0
        self.queries_run = 0
        self.batches_failed = 0
        self.last_success = float("-inf")  # monotonic time the last batch came back
        self._running: dict[int, float] = {}  # batch -> monotonic time it was submitted

    def busy_for(self) -> float | None:
        """Seconds the oldest batch in flight has taken so far; None when none is."""
        started = min(self._running.values(), default=None)
        return None if started is None else time.monotonic() - started

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name="query-batcher")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        for request in self._queue:
            if request.alive:
                request.future.set_exception(RuntimeError("the retriever is shutting down"))
        self._queue.clear()

    @property
    def queued_queries(self) -> int:
        return sum(len(r.queries) - r.taken for r in self._queue) + sum(s.end - s.start for s in self._retry)

    async def search(self, queries: list[str], topk: int) -> list[list[Result]]:
        if self._wake is None:
            raise RuntimeError("QueryBatcher.start() was not awaited")
        if not queries:
            return []
        request = _Pending(list(queries), topk, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._wake.set()
        return await request.future

    # -- forming batches -----------------------------------------------------------------------

    async def _collect(self) -> list[_Slice]:
        assert self._wake is not None
        while True:
            while self._retry:
                piece = self._retry.popleft()
                if piece.request.alive:
                    return [piece]
            if any(r.alive for r in self._queue):
                break
            self._queue.clear()
            self._wake.clear()
            await self._wake.wait()
        if self.max_wait > 0 and self.coalesce and self.queued_queries < self.max_batch:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_wait
            while self.queued_queries < self.max_batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
        batch: list[_Slice] = []
        size = 0
        while self._queue and size < self.max_batch and (self.coalesce or not batch):
            request = self._queue.popleft()
            if not request.alive:
                continue
            take = min(len(request.queries) - request.taken, self.max_batch - size)
            batch.append(_Slice(request, request.taken, request.taken + take))
            request.taken += take
            size += take
            if request.taken < len(request.queries):
                self._queue.append(request)  # the rest waits behind the requests that came after it
        return batch

    # -- running them --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            queries = [q for piece in batch for q in piece.request.queries[piece.start:piece.end]]
            topk = max(piece.request.topk for piece in batch)
            try:
                encoded, done = self._submit(queries, topk)
            except Exception as error:  # the stages refused it outright
                self._failed(batch, error)
                continue
            self._running[id(done)] = time.monotonic()
            task = asyncio.create_task(self._finish(batch, done, len(queries)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            try:
                await encoded  # the encoder is free again: form the next batch from what arrived meanwhile
            except Exception:  # the failure arrives through ``done``
                pass

    async def _finish(self, batch: list[_Slice], done: asyncio.Future, count: int) -> None:
        try:
            results = await done
        except Exception as error:
            self._failed(batch, error)
            return
        finally:
            self._running.pop(id(done), None)
        self.last_success = time.monotonic()
        self.batches_run += 1
        self.queries_run += count
        if self._on_success is not None:
            self._on_success(count)
        offset = 0
        for piece in batch:
            request, size = piece.request, piece.end - piece.start
            mine = results[offset:offset + size]
            offset += size
            if not request.alive:
                continue
            request.results[piece.start:piece.end] = [hits[:request.topk] for hits in mine]
            request.finished += size
            if request.finished == len(request.queries):
                request.future.set_result(request.results)

    def _failed(self, batch: list[_Slice], error: Exception) -> None:
        """A batch of one slice fails its request; a batch of several runs each slice again, alone."""
        self.batches_failed += 1
        if len(batch) == 1:
            request = batch[0].request
            log.warning("a search request of %d queries failed: %s", len(request.queries), error)
            if request.alive:
                request.future.set_exception(error)
            return
        log.warning("a search batch of %d requests failed (%s); running each alone", len(batch), error)
        self._retry.extend(batch)
        assert self._wake is not None
        self._wake.set()
