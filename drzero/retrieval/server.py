"""`drzero serve-retriever`: the Search-R1-compatible retrieval service over the corpus store.

    drzero serve-retriever --db /corpus/chromadb --port 8000
    drzero serve-retriever --db http://chroma:8000 --collection papers   # a Chroma server ($DRZERO_CHROMA_TOKEN)

``POST /retrieve`` ``{"queries": [str], "topk": int?, "return_scores": bool?}`` answers
``{"result": [[{"document": {"id", "contents", "title", "source"}, "score": cosine}]]}``, one
list per query, best first (with ``return_scores: false``, the bare documents, as Search-R1
does). ``GET /health`` is 200 only while the collection is open and the embedder answers;
``GET /docs`` is FastAPI's API page. Concurrent requests are coalesced into one encoder batch.
Requests are read liberally, and a bad query gets an empty list and an entry in ``errors`` instead
of failing its request (``contract``). A body that cannot be read as a request gets a 4xx; that and
every error the framework would answer itself (404, 405, 500) is ``{"detail", "field"}`` with
``detail`` naming the field, and the server keeps serving. Limits per request (queries, characters,
body bytes), a read deadline and a connection limit keep one client from hurting the others
(``http_guards``). ``--fronts N`` runs N such HTTP processes on the port in front of the one search worker
(``serving``); ``/health`` then shows the whole server's counts, each front's, and which front answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from starlette.requests import Request  # at the top: FastAPI reads the endpoint's annotation by name

from drzero.config import CorpusOptions, option, require
from drzero.corpus.embedder import PRECISIONS
from drzero.retrieval.batcher import QueryBatcher
from drzero.retrieval.contract import REQUEST_SCHEMA, RequestRefused, read_request
from drzero.retrieval.exact_index import INDEXES
from drzero.retrieval.exact_index import PRECISIONS as EXACT_PRECISIONS
from drzero.retrieval.http_guards import (CountUvicornRefusals, CutLog, SharedConnections, error_body,
                                         guard_requests, read_deadline_protocol)
from drzero.retrieval.tally import Tally
from drzero.retrieval.worker_client import WorkerFailed, WorkerGone

log = logging.getLogger(__name__)

HEALTH_FRESH_S = 5.0  # a search that succeeded this recently makes a probe unnecessary
HEALTH_STALL_S = 120.0  # a search running longer than this means the encoder is stuck
# A request line and headers larger than this get 431; h11's own default is 16 KiB, httptools has none.
MAX_HEAD_BYTES = 64 * 1024
MAX_LOGGED_UNKNOWN_KEYS = 100  # unknown request keys are logged once each, up to this many names
# One front process tops out near 2,700 queries/s on one core (H100: the front at 93 % of a core, the worker at
# 69 %; benchmarks/results/search-step-h100-2026-12-07.md), against a target of 8,000 and an encoder that does
# 15,000 at batch 256; four fronts have room above the target and leave most cores to the trainer beside them.
MAX_DEFAULT_FRONTS = 4


def default_fronts() -> int:
    """``--fronts`` when not given: half the CPUs this process may run on, at most MAX_DEFAULT_FRONTS, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_FRONTS, cpus // 2))


@dataclass(kw_only=True)
class RetrieverConfig(CorpusOptions):
    embedder: str | None = option(None, metavar="MODEL", help=(
        "embedder the collection must have been built with; the server refuses to start on a mismatch. "
        "Default: the embedder recorded in the collection"))
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0 inside a container)")
    port: int = option(8000, help="port to listen on")
    fronts: int | None = option(None, metavar="N", help=(
        "HTTP front processes accepting on the port, each batching its own requests, in front of the one search "
        "worker (which coalesces their batches into one encoder pass); default: half the CPUs, at most "
        f"{MAX_DEFAULT_FRONTS}, at least 1. 1: one process serves HTTP itself"))
    device: str = option("cpu", choices=["cpu", "cuda"], help="device to run the query encoder on")
    topk: int = option(3, help="passages per query when a request gives no topk (or 0)")
    max_topk: int = option(50, help="largest topk a request may ask for")
    max_query_chars: int = option(2000, help="longest query accepted, in characters")
    max_queries: int = option(512, help="most queries accepted in one request")
    # A tenth of the largest request accepted before the cap (512 x 2,000 characters), which held the
    # encoder, and every other client with it, for ~24 s in a hostile-input test.
    max_request_chars: int = option(100_000, help="most characters accepted in one request, all queries together")
    max_body_bytes: int = option(1 << 20, help="largest request body accepted, in bytes")
    read_timeout_s: float = option(10.0, help=(
        "longest a client may take to send one request (headers and body), in seconds; slower ones are cut off"))
    cut_log_interval_s: float = option(60.0, help=(
        "connections cut off (slow senders, oversized heads, bytes that are not HTTP, over --max-connections) "
        "are logged as one summary line per this many seconds, not one line each; /health counts them"))
    # verl runs 8 agent-loop workers by default, each pooling up to 256 search connections
    # (drzero/rollout/search.py): 2,048 at most; twice that leaves room for evaluation and health checks.
    max_connections: int = option(4096, help="most open connections; a request beyond them gets 503")
    precision: str = option("auto", choices=list(PRECISIONS), help=(
        "encoder weights and activations: auto = fp16 on cuda, fp32 on cpu"))
    index: str = option("auto", choices=list(INDEXES), help=(
        "vector search: exact = brute force over the stored vectors on the encoder's device, hnsw = Chroma's "
        "index on the CPU; auto = exact on cuda when the vectors fit (--exact-max-gib), else hnsw"))
    exact_max_gib: float = option(8.0, help="largest vector matrix (fp32) --index auto puts on the GPU, in GiB")
    exact_precision: str = option("auto", choices=list(EXACT_PRECISIONS), help=(
        "rows of the exact index: fp32 = as stored, exact ranking; fp16 = half the memory, the top candidates "
        "re-scored in fp32 (--exact-rescore); auto = fp16 for a collection whose vectors live in a side file "
        "(drzero adopt --faiss-index) on cuda, fp32 otherwise"))
    exact_rescore: int = option(4, metavar="N", help=(
        "with fp16 rows: the best N x topk candidates of each query are re-scored with the side file's float32 "
        "rows (0: ranked by the fp16 rows alone)"))
    exact_devices: list[str] = option([], metavar="DEVICE", help=(
        "devices the side file's exact index may shard over (e.g. cuda:0 cuda:1 ...); the fewest that hold it "
        "are used, with equal shards. Default: --device"))
    fast_encoder: bool = option(True, help=(
        "on a GPU, encode queries in fixed padded shapes replayed as CUDA graphs (checked against the model's own "
        "vectors at start: cosine >= 0.999); --no-fast-encoder: sentence-transformers' encode"))
    batching: bool = option(True, help="coalesce concurrent requests into one encoder batch (--no-batching: "
                                       "one encode per request)")
    max_batch: int = option(256, help="most queries in one coalesced encoder batch")
    max_wait_ms: float = option(0.0, help=(
        "wait up to this long for a fuller batch when the encoder is idle, in ms (default 0: batches form "
        "while the encoder is busy, so a lone request is never held back)"))
    copy_to_local: str | None = option(None, metavar="DIR", help=(
        "copy the store to this local directory before opening it (SQLite on network volumes is unreliable); "
        "DIR must be new, empty, or an earlier copy, and outside --db"))
    log_level: str = option("info", choices=["debug", "info", "warning", "error"], help="log level")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.port < 65536, "port", self.port, "an integer from 1 to 65535")
        if self.fronts is None:
            self.fronts = default_fronts()
        require(self.fronts >= 1, "fronts", self.fronts, "an integer >= 1")
        require(self.max_topk >= 1, "max_topk", self.max_topk, "an integer >= 1")
        require(1 <= self.topk <= self.max_topk, "topk", self.topk, f"an integer from 1 to max_topk={self.max_topk}")
        require(self.max_query_chars >= 1, "max_query_chars", self.max_query_chars, "an integer >= 1")
        require(self.max_queries >= 1, "max_queries", self.max_queries, "an integer >= 1")
        require(self.max_request_chars >= self.max_query_chars, "max_request_chars", self.max_request_chars,
                f"an integer >= max_query_chars={self.max_query_chars}")
        require(self.read_timeout_s > 0, "read_timeout_s", self.read_timeout_s, "a number of seconds > 0")
        require(self.cut_log_interval_s > 0, "cut_log_interval_s", self.cut_log_interval_s, "a number of seconds > 0")
        require(self.max_connections >= 1, "max_connections", self.max_connections, "an integer >= 1")
        require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes, "an integer >= 1024")
        require(self.max_batch >= 1, "max_batch", self.max_batch, "an integer >= 1")
        require(self.max_wait_ms >= 0, "max_wait_ms", self.max_wait_ms, "a number >= 0")
        require(self.exact_max_gib > 0, "exact_max_gib", self.exact_max_gib, "a number > 0")
        require(self.exact_rescore >= 0, "exact_rescore", self.exact_rescore, "an integer >= 0")
        require(all(d == "cpu" or d.startswith("cuda") for d in self.exact_devices), "exact_devices",
                self.exact_devices, "devices such as cuda:0 cuda:1 (or cpu)")


def create_app(worker, cfg: RetrieverConfig, cuts: CutLog | None = None, tally: Tally | None = None,
               front: int = 1):
    """The FastAPI app of front ``front`` over a ``WorkerClient`` whose worker is ready (so it is healthy at once).

    ``cuts`` counts the connections the HTTP protocol cut (``run_http`` shares it with ``read_deadline_protocol``);
    ``tally`` holds the counts of the whole server, shared with the worker and the other fronts.
    """
    # fastapi here, not at the top: it takes ~0.25 s to import, and `drzero --help` imports this module
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    tally = tally if tally is not None else Tally(1)
    counts = tally.front(front)
    counts["pid"] = os.getpid()
    batcher = QueryBatcher(worker.submit, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                           coalesce=cfg.batching, on_success=counts.batch_done)
    cuts = cuts if cuts is not None else CutLog(cfg.cut_log_interval_s, on_cut=counts.cut)
    unknown_keys: set[str] = set()
    answering = {"front": front, "fronts": tally.fronts}

    @asynccontextmanager
    async def lifespan(_app):
        worker.attach(asyncio.get_running_loop())
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="drzero retriever", version="1", lifespan=lifespan,
                  description="Search-R1-compatible dense retrieval over a ChromaDB corpus.")

    def error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content=error_body(field, message), headers=headers)

    # Starlette answers these itself, as {"detail": "Not Found"}: give them the service's shape too.
    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return error(404, "path", f"no endpoint at {request.url.path[:200]}; the service answers "
                                      f"POST /retrieve, GET /health and GET /docs")
        if exc.status_code == 405:
            allowed = next((value for name, value in (exc.headers or {}).items() if name.lower() == "allow"),
                           "another method")
            return error(405, "method", f"{request.method} is not allowed on {request.url.path[:200]}; use "
                                        f"{allowed}", headers=exc.headers)
        return error(exc.status_code, "request", str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception):  # logged with its traceback by Starlette as well
        return error(500, "retriever", f"internal error ({type(exc).__name__}); the server keeps serving")

    def note_unknown_keys(keys: list[str]) -> None:
        for key in keys:  # once per name: a typo (top_k) shows in the log without a line per request
            if key not in unknown_keys and len(unknown_keys) < MAX_LOGGED_UNKNOWN_KEYS:
                unknown_keys.add(key)
                log.info("ignoring the key %r in /retrieve requests (read: queries, topk, return_scores)", key[:80])

    # The body is read here, not by FastAPI: its parser answers a non-UTF-8 body, JSON nested too deep or a
    # number too long with a bare 400 of its own, and its validation would fail a whole request for one query.
    @app.post("/retrieve", summary="Top-k passages for each query",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": REQUEST_SCHEMA}}}})
    async def retrieve(http: Request):
        try:
            request = read_request(await http.body(), cfg)
        except RequestRefused as refused:
            return error(refused.status, refused.field, refused.message)
        counts.add("queries_refused", len(request.errors))
        note_unknown_keys(request.ignored_keys)
        hits: list = []
        if request.searchable:
            try:
                hits = await batcher.search(request.search_queries, request.topk)
            except WorkerGone as gone:
                return error(503, "retriever", str(gone))
            except WorkerFailed as failed:
                return error(500, "retriever", f"the search failed: {failed}")
        return Response(orjson.dumps(request.answer(hits)), media_type="application/json")  # skips FastAPI's encoder

    def unhealthy(detail: str) -> JSONResponse:
        return JSONResponse(status_code=503, content={"status": "unhealthy", "detail": detail, **answering})

    @app.get("/health", summary="200 when the collection is open and the search worker answers")
    async def health():
        # A pass that succeeded in the last HEALTH_FRESH_S, or one running for less than HEALTH_STALL_S,
        # shows the worker works: answering from that keeps /health instant behind a long batch (a probe
        # would queue behind it). The worker's own times count too: another front's long batch keeps it
        # busy as much as this one's. Only an idle server is probed, with a real search through the worker.
        busy = max((s for s in (batcher.busy_for(), tally.worker_busy_for()) if s is not None), default=None)
        if worker.gone:
            return unhealthy(worker.gone)
        if busy is not None and busy > HEALTH_STALL_S:
            return unhealthy(f"a search has been running for {busy:.0f} s")
        last_success = max(batcher.last_success, tally.worker_last_done())
        if busy is None and time.monotonic() - last_success > HEALTH_FRESH_S:
            try:
                probe = await asyncio.wait_for(batcher.search(["health"], 1), 30)
                assert len(probe) == 1
            except Exception as failure:  # report, never crash the health endpoint
                return unhealthy(repr(failure))
        info = worker.info
        return {"status": "ok", "collection": info["collection"], "passages": info["passages"],
                "fingerprint": info.get("fingerprint"),
                "embedder": info["embedder"], "dimension": info["dimension"], "precision": info["precision"],
                "index": info["index"], "index_precision": info.get("index_precision"),
                "shards": info.get("shards", 0), "batching": cfg.batching, **answering, **tally.summary()}

    return guard_requests(app, cfg.max_body_bytes)


def run_http(app, cfg: RetrieverConfig, cuts: CutLog, connections: SharedConnections, sockets=None) -> None:
    """Serve ``app`` with the guards until SIGTERM/SIGINT: on ``cfg.host``:``cfg.port``, or on ``sockets`` bound
    already (a front of several)."""
    import uvicorn  # lazy: with fastapi (create_app), only a serving process needs it

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            access_log=cfg.log_level == "debug",
                            http=read_deadline_protocol(cfg.read_timeout_s, MAX_HEAD_BYTES, cuts, connections),
                            # uvicorn counts the connection asking among the open ones (503 once len >= limit), so
                            # +1 lets exactly max_connections be served at once.
                            limit_concurrency=cfg.max_connections + 1)
    # after Config, which sets up uvicorn's logging: its one WARNING per refused request becomes a count
    logging.getLogger("uvicorn.error").addFilter(CountUvicornRefusals(cuts))
    try:
        uvicorn.Server(config).run(sockets=sockets)  # exits 3 by itself when it cannot listen (its log says why)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for; uvicorn.run swallows it too
        pass
