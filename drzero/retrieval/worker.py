"""The search worker: the encoder, the vector search and the store in a process of their own.

Why a process: the HTTP server's event loop and the encoder would otherwise share one interpreter
lock. A forward pass drops and re-takes that lock at every one of its hundreds of operations, and
each time the busy event loop can keep it for up to the interpreter's switch interval (5 ms), so
under load the encoder ran at a fraction of its speed (on an H200, 345 queries/s from an encoder
that does 1,970 alone). In its own process the encoder only shares the lock with its own lookup
thread.

Inside the worker two threads form a pipeline: the encoder takes batch *n + 1* while the lookup
thread searches batch *n* and fetches its passages. The front (``WorkerClient``) is told when the
encoder has taken a batch, so it forms the next one from everything that arrived meanwhile.

Messages (pickled over a ``multiprocessing`` pipe), front -> worker: ``("batch", n, queries, topk)``,
``("stop",)``; worker -> front: ``("ready", info)``, ``("fatal", sentence)``, ``("encoded", n)``,
``("done", n, hits)``, ``("failed", n, error)``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from typing import Any

from drzero.retrieval.service import RetrievalService, SearchOptions

log = logging.getLogger(__name__)

# Two lookups at a time: fetching a batch's passages from the store waits on SQLite, and the search
# of one batch can run meanwhile; more only adds contention for the interpreter lock.
LOOKUP_THREADS = 2


class WorkerFailed(RuntimeError):
    """The worker could not run a batch (its message says why); other batches are unaffected."""


class WorkerGone(RuntimeError):
    """The worker process has exited; nothing more can be searched until the server restarts."""


# -- the worker process ------------------------------------------------------------------------

def worker_main(conn, options: SearchOptions, log_level: str) -> None:
    """Entry point of the worker process: open everything, say ready (or why not), then serve batches."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        service = RetrievalService.open(options)
    except Exception as error:  # every reason not to start is one sentence for the front to print
        conn.send(("fatal", str(error) or repr(error)))
        conn.close()
        return
    conn.send(("ready", {"passages": service.passages, "embedder": service.embedder.spec.name,
                         "dimension": service.embedder.dimension, "precision": service.embedder.precision,
                         "index": "exact" if service.exact is not None else "hnsw",
                         "collection": service.store.collection.name,
                         "fingerprint": service.store.fingerprint()}))
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    to_encode: queue.Queue = queue.Queue()
    to_lookup: queue.Queue = queue.Queue(maxsize=LOOKUP_THREADS)

    def encoder() -> None:
        while (item := to_encode.get()) is not None:
            number, queries, topk = item
            try:
                vectors = service.encode(queries)
            except Exception as error:
                send(("encoded", number))
                send(("failed", number, f"{type(error).__name__}: {error}"))
                continue
            send(("encoded", number))
            to_lookup.put((number, vectors, topk))
        for _ in range(LOOKUP_THREADS):
            to_lookup.put(None)

    def looker() -> None:
        while (item := to_lookup.get()) is not None:
            number, vectors, topk = item
            try:
                hits = service.lookup(vectors, topk)
            except Exception as error:
                send(("failed", number, f"{type(error).__name__}: {error}"))
                continue
            send(("done", number, hits))  # Hits pickle as they are: no per-hit conversion on either side

    threads = [threading.Thread(target=encoder, name="encode", daemon=True)]
    threads += [threading.Thread(target=looker, name=f"lookup-{n}", daemon=True) for n in range(LOOKUP_THREADS)]
    for thread in threads:
        thread.start()
    try:
        while True:
            message = conn.recv()  # EOFError when the front is gone: then so are we
            if message[0] == "stop":
                break
            to_encode.put(message[1:])
    except (EOFError, OSError):
        pass
    to_encode.put(None)
    for thread in threads:
        thread.join(timeout=10)


# -- the front's handle --------------------------------------------------------------------------

class WorkerClient:
    """Starts the worker and turns its messages into asyncio futures.

    ``submit(queries, topk)`` returns two futures: *encoded* (the worker's encoder has taken the batch:
    time to form the next one) and *done* (the batch's hits, or ``WorkerFailed``).
    """

    def __init__(self, options: SearchOptions, log_level: str = "info"):
        self.options = options  # pickled to the worker: the server's RetrieverConfig
        self.log_level = log_level
        self.info: dict[str, Any] = {}
        self.process = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._numbers = 0
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Future]] = {}
        self.gone: str | None = None  # why the worker is gone, once it is
        self._stopping = False

    def start(self, timeout: float = 1800) -> dict:
        """Spawn the worker and wait until it is ready; raise RuntimeError with its sentence when it is not."""
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self._conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, self.options, self.log_level),
                                       name="drzero-search-worker", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"the search worker did not start within {timeout:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the search worker exited while starting (exit code {self.process.exitcode}); "
                               f"its log is above") from None
        if kind != "ready":
            self.process.join(5)
            raise RuntimeError(payload)
        self.info = payload
        return payload

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the worker's messages into futures of ``loop``."""
        self._loop = loop
        threading.Thread(target=self._read, name="search-worker-reader", daemon=True).start()

    def submit(self, queries: list[str], topk: int) -> tuple[asyncio.Future, asyncio.Future]:
        assert self._loop is not None, "attach() first"
        encoded, done = self._loop.create_future(), self._loop.create_future()
        if self.gone:
            for future in (encoded, done):
                future.set_exception(WorkerGone(self.gone))
            return encoded, done
        self._numbers += 1
        self._pending[self._numbers] = (encoded, done)
        self._conn.send(("batch", self._numbers, queries, topk))
        return encoded, done

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._loop.call_soon_threadsafe(self._deliver, message)
        self.process.join(5)
        self._loop.call_soon_threadsafe(self._lost, f"the search worker exited (exit code {self.process.exitcode})")

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
        if not self._stopping:
            log.error("%s; searches fail until the retriever is restarted", why)
        for encoded, done in self._pending.values():
            for future in (encoded, done):
                if not future.done():
                    future.set_exception(WorkerGone(why))
        self._pending.clear()

    def stop(self) -> None:
        if self.process is None:
            return
        self._stopping = True
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
