"""The search worker: the encoder, the vector search and the store in a process of their own.

Why a process: the HTTP server's event loop and the encoder would otherwise share one interpreter
lock. A forward pass drops and re-takes that lock at every one of its hundreds of operations, and
each time the busy event loop can keep it for up to the interpreter's switch interval (5 ms), so
under load the encoder ran at a fraction of its speed (on an H200, 345 queries/s from an encoder
that does 1,970 alone). In its own process the encoder only shares the lock with its own lookup
thread.

Inside the worker two threads form a pipeline: the encoder takes pass *n + 1* while a lookup thread
searches pass *n* and fetches its passages. A front (``worker_client.WorkerClient``) is told when the encoder
has taken its batch, so it forms the next one from everything that arrived meanwhile.

One worker serves every HTTP front (``--fronts``, ``drzero.retrieval.serving``), each over a pipe of its own.
The encoder takes whatever batches the fronts sent while it was busy as one forward pass, up to ``--max-batch``
queries (a batch is never split: one larger than what is left waits for the next pass), and the lookup splits
the hits back to each front's batch. So N fronts still give the GPU one large batch, not N small ones. When a
pass of several batches fails, each batch is run again alone, so only the bad batch's requests fail.

Messages (pickled over ``multiprocessing`` pipes). The control pipe, to the process that started the worker:
worker -> server ``("ready", info)`` or ``("fatal", sentence)``, server -> worker ``("stop",)``; its end of file
stops the worker (the server died). Batches come over the fronts' pipes, or over the control pipe when the
server is its own only front: front -> worker ``("batch", n, queries, topk)``; worker -> front
``("encoded", n)``, ``("done", n, hits)``, ``("failed", n, error)``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from drzero.retrieval.processes import name_this_process
from drzero.retrieval.service import RetrievalService, SearchOptions
from drzero.retrieval.tally import Tally

log = logging.getLogger(__name__)

# Two lookups at a time: fetching a batch's passages from the store waits on SQLite, and the search
# of one batch can run meanwhile; more only adds contention for the interpreter lock.
LOOKUP_THREADS = 2
_NOTHING = object()  # no batch held back (None is the encoder's stop sign)


# -- the worker process ------------------------------------------------------------------------

class _Reply:
    """The worker's end of one front's pipe: the encoder and the lookup threads send on it, one message at a time."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except OSError:  # the front is gone: its answers have no one to go to
                pass


@dataclass(eq=False)
class _Batch:
    reply: _Reply
    number: int
    queries: list[str]
    topk: int


def _passes(batches: queue.Queue, max_batch: int, coalesce: bool):
    """Forward passes: the next batch and, with ``coalesce``, those queued behind it (sent by other fronts while
    the encoder was busy) as long as the pass stays within ``max_batch`` queries."""
    held: Any = _NOTHING
    while True:
        first = batches.get() if held is _NOTHING else held
        held = _NOTHING
        if first is None:
            return
        group, size = [first], len(first.queries)
        while coalesce and size < max_batch:
            try:
                following = batches.get_nowait()
            except queue.Empty:
                break
            if following is None or size + len(following.queries) > max_batch:
                held = following
                break
            group.append(following)
            size += len(following.queries)
        yield group


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


class _Pipeline:
    """The encoder thread and the lookup threads, over the batches of every front."""

    def __init__(self, service: RetrievalService, max_batch: int, coalesce: bool, tally: Tally):
        self.service = service
        self.max_batch, self.coalesce = max_batch, coalesce
        self.counts = tally.worker
        self.batches: queue.Queue = queue.Queue()
        self._to_lookup: queue.Queue = queue.Queue(maxsize=LOOKUP_THREADS)
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # pass -> time.monotonic_ns() it was taken
        self._passes = 0
        self._threads = [threading.Thread(target=self._encode_all, name="encode", daemon=True)]
        self._threads += [threading.Thread(target=self._look_up_all, name=f"lookup-{n}", daemon=True)
                          for n in range(LOOKUP_THREADS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.batches.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    # /health reads these through the tally: how long the oldest pass has run, when the last one came back
    def _begin(self) -> int:
        with self._lock:
            self._passes += 1
            self._in_flight[self._passes] = time.monotonic_ns()
            self.counts["busy_since_ns"] = min(self._in_flight.values())
            return self._passes

    def _end(self, key: int, succeeded: bool) -> None:
        with self._lock:
            self._in_flight.pop(key, None)
            self.counts["busy_since_ns"] = min(self._in_flight.values(), default=0)
            if succeeded:
                self.counts["last_done_ns"] = time.monotonic_ns()

    def _encode_all(self) -> None:
        for group in _passes(self.batches, self.max_batch, self.coalesce):
            self.counts.add("encoder_passes")
            self.counts.add("front_batches", len(group))
            if len({id(batch.reply) for batch in group}) > 1:
                self.counts.add("passes_with_several_fronts")
            self._encode(group)
        for _ in range(LOOKUP_THREADS):
            self._to_lookup.put(None)

    def _encode(self, group: list[_Batch]) -> None:
        key = self._begin()
        try:
            vectors = self.service.encode([query for batch in group for query in batch.queries])
        except Exception as error:
            self._end(key, succeeded=False)
            if len(group) > 1:
                log.warning("a forward pass of %d batches failed (%s); encoding each alone", len(group), error)
                for batch in group:
                    self._encode([batch])
                return
            (batch,) = group
            batch.reply.send(("encoded", batch.number))
            batch.reply.send(("failed", batch.number, _describe(error)))
            return
        for batch in group:
            batch.reply.send(("encoded", batch.number))
        self._to_lookup.put((key, group, vectors))

    def _look_up_all(self) -> None:
        while (item := self._to_lookup.get()) is not None:
            key, group, vectors = item
            self._end(key, succeeded=self._look_up(group, vectors))

    def _look_up(self, group: list[_Batch], vectors) -> bool:
        topk = max(batch.topk for batch in group)
        try:
            hits = self.service.lookup(vectors, topk)
        except Exception as error:
            if len(group) == 1:
                group[0].reply.send(("failed", group[0].number, _describe(error)))
                return False
            log.warning("a lookup of %d batches failed (%s); looking each up alone", len(group), error)
            start, succeeded = 0, False
            for batch in group:
                end = start + len(batch.queries)
                succeeded |= self._look_up([batch], vectors[start:end])
                start = end
            return succeeded
        start = 0
        for batch in group:  # Hits pickle as they are: no per-hit conversion on either side
            end = start + len(batch.queries)
            mine = hits[start:end] if batch.topk == topk else [per_query[:batch.topk] for per_query in hits[start:end]]
            batch.reply.send(("done", batch.number, mine))
            start = end
        return True


def worker_main(control, fronts: list, options: SearchOptions, log_level: str, max_batch: int = 256,
                coalesce: bool = True, tally: Tally | None = None) -> None:
    """Entry point of the worker process: open everything, say ready (or why not), then serve batches."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s [worker] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    name_this_process("drzero-worker")
    # Ctrl-C reaches the whole process group; the server stops the worker itself, after its fronts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tally = tally if tally is not None else Tally(1)
    try:
        service = RetrievalService.open(options)
    except Exception as error:  # every reason not to start is one sentence for the server to print
        control.send(("fatal", str(error) or repr(error)))
        control.close()
        return
    tally.worker["pid"] = os.getpid()
    control.send(("ready", {"passages": service.passages, "embedder": service.embedder.spec.name,
                            "dimension": service.embedder.dimension, "precision": service.embedder.precision,
                            "index": "exact" if service.exact is not None else "hnsw",
                            "index_precision": service.exact.precision if service.exact is not None else None,
                            "shards": len(service.exact.shards) if service.exact is not None else 0,
                            "collection": service.store.collection.name,
                            "fingerprint": service.store.fingerprint()}))
    pipeline = _Pipeline(service, max_batch, coalesce, tally)
    pipeline.start()
    _receive(control, {conn: _Reply(conn) for conn in [control, *fronts]}, pipeline)
    pipeline.stop()


def _receive(control, replies: dict, pipeline: _Pipeline) -> None:
    """Hand every batch that arrives to the pipeline, until the server says stop or is gone."""
    live = list(replies)
    while True:
        for conn in wait(live):
            try:
                message = conn.recv()
            except (EOFError, OSError):  # a front is gone (its batches were answered to no one), or the server
                if conn is control:
                    return
                live.remove(conn)
                continue
            if message[0] == "stop":
                return
            pipeline.batches.put(_Batch(replies[conn], *message[1:]))


# -- the server's handle on the process -----------------------------------------------------------

class SearchWorker:
    """Starts the worker process (with ``fronts`` pipes for fronts of their own, 0: the control pipe carries the
    batches), waits until it is ready, and stops it."""

    def __init__(self, options: SearchOptions, log_level: str = "info", *, fronts: int = 0, max_batch: int = 256,
                 coalesce: bool = True, tally: Tally | None = None):
        self.options = options  # pickled to the worker: the server's RetrieverConfig
        self.log_level = log_level
        self.fronts, self.max_batch, self.coalesce = fronts, max_batch, coalesce
        self.tally = tally if tally is not None else Tally(1)
        self.process = None
        self.control = None
        self.front_conns: list = []  # each front's end of its pipe, to hand to the front
        self.stopping = False

    def start(self, timeout: float = 1800) -> dict:
        """Spawn the worker and wait until it is ready; raise RuntimeError with its sentence when it is not."""
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self.control, child = context.Pipe()
        pipes = [context.Pipe() for _ in range(self.fronts)]
        self.front_conns = [mine for mine, _ in pipes]
        self.process = context.Process(
            target=worker_main, name="drzero-search-worker", daemon=True,
            args=(child, [theirs for _, theirs in pipes], self.options, self.log_level, self.max_batch,
                  self.coalesce, self.tally))
        self.process.start()
        for theirs in [child, *(theirs for _, theirs in pipes)]:
            theirs.close()  # only the worker holds them now: its death is the end of each pipe
        if not self.control.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"the search worker did not start within {timeout:.0f} s")
        try:
            kind, payload = self.control.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the search worker exited while starting (exit code {self.process.exitcode}); "
                               f"its log is above") from None
        if kind != "ready":
            self.process.join(5)
            raise RuntimeError(payload)
        return payload

    def exited(self) -> str:
        """Why searches fail now that the process is gone (after it has gone)."""
        self.process.join(5)
        return f"the search worker exited (exit code {self.process.exitcode})"

    def stop(self) -> None:
        if self.process is None:
            return
        self.stopping = True
        try:
            self.control.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
