"""How `drzero serve-retriever` runs: one process serving HTTP beside its search worker, or N fronts on one port.

    drzero serve-retriever --db /corpus/chromadb --device cuda --fronts 4

With ``--fronts 1`` the serving process starts the search worker (``worker.SearchWorker``) and serves HTTP
itself. One such process tops out near 2,700 queries/s on one core while the GPU encoder could do several times
that (benchmarks/results/search-step-h100-2026-12-07.md), so with ``--fronts N`` it starts N HTTP front processes
(``front_main``, each the app of ``server`` with its own batcher) in front of the ONE worker, which holds the one
encoder and the one index:

- The port. The serving process binds N sockets to it with SO_REUSEPORT, one per front, before anything else
  starts (a taken port is one sentence, not a worker loaded for nothing); each front serves its own through
  uvicorn's ``Server.run(sockets=...)``, the API uvicorn's own ``--workers`` uses. The kernel spreads new
  connections over the fronts evenly by their addresses, so clients that keep their connections open (verl's
  pooled sessions, the benchmarks' closed-loop clients) are spread too. One listening socket shared by every
  front, as uvicorn's ``--workers`` does, lets whichever front wakes first accept a whole burst of connections,
  and they stay on it for as long as they are kept alive. A bind without SO_REUSEPORT first checks that the port
  is free: SO_REUSEPORT alone would silently join another server of this user on the same port.
- The worker. One pipe per front, made before the worker starts. Each front sends the batches it forms; the
  worker's encoder takes what every front sent while it was busy as one pass (``worker``).
- Counts. One shared block (``tally``): any front's ``/health`` reports the whole server, each front and the
  worker, and ``--max-connections`` holds for all fronts together.
- Lifetimes. A dead worker: every front answers 503 naming it, as one process does, and stays up. A dead front:
  its socket closes with it, the kernel gives its share to the other fronts, and the server serves on (the log
  says so); with no front left it exits 1. SIGTERM or SIGINT stops the fronts, then the worker. A killed serving
  process takes both with it: each front asks the kernel for SIGTERM when its parent dies
  (``processes.die_with_parent``), and the worker stops at the end of its pipe to the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import wait

from drzero.config import ConfigError
from drzero.corpus.embedder import require_device
from drzero.corpus.store import StoreError
from drzero.retrieval.http_guards import CutLog
from drzero.retrieval.processes import die_with_parent, name_this_process
from drzero.retrieval.server import RetrieverConfig, create_app, run_http
from drzero.retrieval.tally import Tally
from drzero.retrieval.worker import SearchWorker
from drzero.retrieval.worker_client import WorkerClient

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # a front's graceful shutdown: requests in flight finish, kept-alive connections close


class _Stop(Exception):
    """SIGTERM or SIGINT reached the serving process."""


def serve(cfg: RetrieverConfig) -> int:
    """Start the search worker (or exit with its reason), then serve until SIGTERM/SIGINT; the exit code."""
    require_device(cfg.device)  # before starting anything: one sentence, not a worker's traceback
    return _serve_in_process(cfg) if cfg.fronts == 1 else _serve_with_fronts(cfg)


def _worker(cfg: RetrieverConfig, tally: Tally, fronts: int = 0) -> SearchWorker:
    return SearchWorker(cfg, cfg.log_level, fronts=fronts, max_batch=cfg.max_batch, coalesce=cfg.batching,
                        tally=tally)


def _start(worker: SearchWorker, cfg: RetrieverConfig) -> dict:
    try:
        info = worker.start()
    except RuntimeError as error:
        raise StoreError(str(error)) from None
    log.info("serving %d passages of %r with %s (%s, %s search) on http://%s:%d (batching %s, %s)",
             info["passages"], cfg.collection, info["embedder"], info["precision"], info["index"], cfg.host,
             cfg.port, "on" if cfg.batching else "off",
             "one process" if cfg.fronts == 1 else f"{cfg.fronts} front processes")
    return info


def _serve_in_process(cfg: RetrieverConfig) -> int:
    tally = Tally(1)
    worker = _worker(cfg, tally)
    info = _start(worker, cfg)
    counts = tally.front(1)
    cuts = CutLog(cfg.cut_log_interval_s, on_cut=counts.cut)
    try:
        run_http(create_app(WorkerClient(worker.control, info, owner=worker), cfg, cuts, tally), cfg, cuts, counts)
    finally:
        worker.stop()
    return 0


def _serve_with_fronts(cfg: RetrieverConfig) -> int:
    sockets = bind_shared_port(cfg.host, cfg.port, cfg.fronts)
    tally = Tally(cfg.fronts)
    worker = _worker(cfg, tally, fronts=cfg.fronts)
    fronts: list = []
    previous = _on_stop_signals(_raise_stop)
    try:
        info = _start(worker, cfg)
        context = multiprocessing.get_context("spawn")  # as the worker: nothing of this process is inherited
        for index, (sock, conn) in enumerate(zip(sockets, worker.front_conns), 1):
            fronts.append(context.Process(target=front_main, name=f"drzero-front-{index}", daemon=True,
                                          args=(index, sock, conn, info, cfg, tally, os.getpid())))
            fronts[-1].start()
        for held in [*sockets, *worker.front_conns]:
            held.close()  # each front holds its own now: a front's death closes its socket and its pipe
        return _watch(worker, fronts, tally)
    except _Stop:
        return 0
    finally:
        _on_stop_signals(signal.SIG_IGN)  # a second Ctrl-C must not cut the stopping short
        try:
            _stop_fronts(fronts)
            worker.stop()
            for sock in sockets:
                sock.close()
        finally:
            _on_stop_signals(previous)


def bind_shared_port(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to ``host``:``port`` with SO_REUSEPORT (each front listens on its own), or ConfigError
    naming the port when another process holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn's own bind_socket decides

    def bound(reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}; stop what holds the port "
                              f"(ss -ltnp 'sport = :{port}' names it) or pass another --port") from None
        return sock

    bound(reuse_port=False).close()  # free, not merely shared by another group
    return [bound(reuse_port=True) for _ in range(count)]


def _raise_stop(signum: int, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def _on_stop_signals(handler) -> dict:
    """Set ``handler`` (one, or one per signal) for SIGTERM and SIGINT; the handlers they had."""
    handlers = handler if isinstance(handler, dict) else {sig: handler for sig in (signal.SIGTERM, signal.SIGINT)}
    return {sig: signal.signal(sig, each) for sig, each in handlers.items()}


def _watch(worker: SearchWorker, fronts: list, tally: Tally) -> int:
    """Until a signal: log the worker's death (the fronts answer 503 meanwhile) and serve on without a dead front;
    1 when no front is left."""
    watched = {worker.process.sentinel: 0, **{front.sentinel: index for index, front in enumerate(fronts, 1)}}
    while True:
        for sentinel in wait(list(watched)):
            index = watched.pop(sentinel)
            if index == 0:
                log.error("%s; searches fail until the retriever is restarted", worker.exited())
                continue
            front = fronts[index - 1]
            front.join()
            tally.front(index).here(0)  # its connections closed with it
            left = sum(1 for other in watched.values() if other)
            if not left:
                log.error("front %d exited (exit code %s), the last one; stopping the retriever", index,
                          front.exitcode)
                return 1
            log.error("front %d exited (exit code %s); serving on with %d of %d fronts", index, front.exitcode, left,
                      len(fronts))


def _stop_fronts(fronts: list) -> None:
    for front in fronts:
        if front.is_alive():
            front.terminate()  # uvicorn's graceful shutdown
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for front in fronts:
        front.join(max(0.0, deadline - time.monotonic()))
        if front.is_alive():
            front.kill()
            front.join(5)


def front_main(index: int, sock: socket.socket, conn, info: dict, cfg: RetrieverConfig, tally: Tally,
               parent: int) -> None:
    """Entry point of front ``index``: serve HTTP on ``sock`` until stopped, searching through ``conn``."""
    die_with_parent(parent)
    name_this_process(f"drzero-front-{index}")
    logging.basicConfig(level=cfg.log_level.upper(), datefmt="%H:%M:%S",
                        format=f"%(asctime)s %(levelname)s [front {index}] %(name)s: %(message)s")
    counts = tally.front(index)
    cuts = CutLog(cfg.cut_log_interval_s, on_cut=counts.cut, where=f"front {index}")
    app = create_app(WorkerClient(conn, info), cfg, cuts, tally, front=index)
    run_http(app, cfg, cuts, counts, sockets=[sock])
