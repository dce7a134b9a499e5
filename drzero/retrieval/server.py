"""`drzero serve-retriever`: the Search-R1-compatible retrieval service over the corpus store.

    drzero serve-retriever --db /corpus/chromadb --port 8000

``POST /retrieve`` ``{"queries": [str], "topk": int?, "return_scores": bool?}`` answers
``{"result": [[{"document": {"id", "contents", "title", "source"}, "score": cosine}]]}``, one
list per query, best first (with ``return_scores: false``, the bare documents, as Search-R1
does). ``GET /health`` is 200 only while the collection is open and the embedder answers;
``GET /docs`` is FastAPI's API page. Concurrent requests are coalesced into one encoder batch.
Bad input gets a 4xx whose ``detail`` names the field; the server keeps serving. Limits per request
(queries, characters, body bytes), a read deadline and a connection limit keep one client from
hurting the others (``http_guards``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from drzero.config import option, require
from drzero.corpus.embedder import PRECISIONS, require_device
from drzero.corpus.store import DEFAULT_COLLECTION, StoreError
from drzero.retrieval.batcher import QueryBatcher
from drzero.retrieval.exact_index import INDEXES
from drzero.retrieval.http_guards import error_body, guard_requests, read_deadline_protocol
from drzero.retrieval.worker import WorkerClient, WorkerGone

log = logging.getLogger(__name__)

HEALTH_FRESH_S = 5.0  # a search that succeeded this recently makes a probe unnecessary
HEALTH_STALL_S = 120.0  # a search running longer than this means the encoder is stuck
# A request line and headers larger than this get 431; h11's own default is 16 KiB, httptools has none.
MAX_HEAD_BYTES = 64 * 1024


@dataclass(kw_only=True)
class RetrieverConfig:
    db: str = option(help="directory of the ChromaDB store built by `drzero ingest`", metavar="DIR")
    collection: str = option(DEFAULT_COLLECTION, help="collection name inside the store")
    embedder: str | None = option(None, metavar="MODEL", help=(
        "embedder the collection must have been built with; the server refuses to start on a mismatch. "
        "Default: the embedder recorded in the collection"))
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0 inside a container)")
    port: int = option(8000, help="port to listen on")
    device: str = option("cpu", choices=["cpu", "cuda"], help="device to run the query encoder on")
    topk: int = option(3, help="passages per query when a request gives no topk")
    max_topk: int = option(50, help="largest topk a request may ask for")
    max_query_chars: int = option(2000, help="longest query accepted, in characters")
    max_queries: int = option(512, help="most queries accepted in one request")
    # A tenth of the largest request accepted before the cap (512 x 2,000 characters), which held the
    # encoder, and every other client with it, for ~24 s in a hostile-input test.
    max_request_chars: int = option(100_000, help="most characters accepted in one request, all queries together")
    max_body_bytes: int = option(1 << 20, help="largest request body accepted, in bytes")
    read_timeout_s: float = option(10.0, help=(
        "longest a client may take to send one request (headers and body), in seconds; slower ones are cut off"))
    # verl runs 8 agent-loop workers by default, each pooling up to 256 search connections
    # (drzero/rollout/search.py): 2,048 at most; twice that leaves room for evaluation and health checks.
    max_connections: int = option(4096, help="most open connections; a request beyond them gets 503")
    precision: str = option("auto", choices=list(PRECISIONS), help=(
        "encoder weights and activations: auto = fp16 on cuda, fp32 on cpu"))
    index: str = option("auto", choices=list(INDEXES), help=(
        "vector search: exact = brute force over the stored vectors on the encoder's device, hnsw = Chroma's "
        "index on the CPU; auto = exact on cuda when the vectors fit (--exact-max-gib), else hnsw"))
    exact_max_gib: float = option(8.0, help="largest vector matrix (fp32) --index auto puts on the GPU, in GiB")
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
        require(0 < self.port < 65536, "port", self.port, "an integer from 1 to 65535")
        require(self.max_topk >= 1, "max_topk", self.max_topk, "an integer >= 1")
        require(1 <= self.topk <= self.max_topk, "topk", self.topk, f"an integer from 1 to max_topk={self.max_topk}")
        require(self.max_query_chars >= 1, "max_query_chars", self.max_query_chars, "an integer >= 1")
        require(self.max_queries >= 1, "max_queries", self.max_queries, "an integer >= 1")
        require(self.max_request_chars >= self.max_query_chars, "max_request_chars", self.max_request_chars,
                f"an integer >= max_query_chars={self.max_query_chars}")
        require(self.read_timeout_s > 0, "read_timeout_s", self.read_timeout_s, "a number of seconds > 0")
        require(self.max_connections >= 1, "max_connections", self.max_connections, "an integer >= 1")
        require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes, "an integer >= 1024")
        require(self.max_batch >= 1, "max_batch", self.max_batch, "an integer >= 1")
        require(self.max_wait_ms >= 0, "max_wait_ms", self.max_wait_ms, "a number >= 0")
        require(self.exact_max_gib > 0, "exact_max_gib", self.exact_max_gib, "a number > 0")


class RetrieveRequest(BaseModel):
    """The body of ``POST /retrieve``; server-side limits (max topk, query length) are checked after it."""

    model_config = ConfigDict(extra="forbid")
    queries: list[StrictStr] = Field(min_length=1, description="search queries, one result list each")
    topk: StrictInt | None = Field(None, ge=1, description="passages per query (default: the server's --topk)")
    return_scores: StrictBool = Field(True, description="wrap each document with its cosine score")


def unencodable_at(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (valid in JSON, not in Unicode text), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def create_app(worker, cfg: RetrieverConfig):
    """The FastAPI app over a started ``WorkerClient`` (the worker is ready, so the app is healthy at once)."""
    # fastapi here, not at the top: it takes ~0.25 s to import, and `drzero --help` imports this module
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    batcher = QueryBatcher(worker.submit, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                           coalesce=cfg.batching)

    @asynccontextmanager
    async def lifespan(_app):
        worker.attach(asyncio.get_running_loop())
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="drzero retriever", version="1", lifespan=lifespan,
                  description="Search-R1-compatible dense retrieval over a ChromaDB corpus.")

    def error(status: int, field: str, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content=error_body(field, message))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = loc[0] if loc else "body"
        for part in loc[1:]:
            field += f"[{part}]" if part.isdigit() else f".{part}"
        if first.get("type") == "json_invalid":
            return error(400, "body", f"malformed JSON ({first.get('ctx', {}).get('error', 'cannot parse')})")
        if first.get("type") == "model_attributes_type":
            return error(422, "body", "expected a JSON object with a 'queries' list")
        got = f" (got {first['input']!r:.80})" if "input" in first and field != "body" else ""
        return error(422, field, f"{first.get('msg', 'invalid')}{got}")

    @app.post("/retrieve", summary="Top-k passages for each query")
    async def retrieve(request: RetrieveRequest):
        if len(request.queries) > cfg.max_queries:
            return error(422, "queries", f"{len(request.queries)} queries in one request; the limit is "
                                         f"{cfg.max_queries} (--max-queries); split them over several requests")
        for index, query in enumerate(request.queries):
            if not query.strip():
                return error(422, f"queries[{index}]", "query is empty")
            if len(query) > cfg.max_query_chars:
                return error(422, f"queries[{index}]", f"query is {len(query)} characters; the limit is "
                                                       f"{cfg.max_query_chars} (--max-query-chars); shorten it")
            bad = unencodable_at(query)
            if bad is not None:  # JSON allows "\ud800"; the tokenizer does not, and would fail the whole batch
                return error(422, f"queries[{index}]", f"query holds a lone UTF-16 surrogate "
                                                       f"({query[bad]!r} at character {bad}), which is not text; "
                                                       f"remove it or replace it with U+FFFD")
        chars = sum(len(query) for query in request.queries)
        if chars > cfg.max_request_chars:
            return error(422, "queries", f"the queries hold {chars} characters in all; the limit per request is "
                                         f"{cfg.max_request_chars} (--max-request-chars); split them over "
                                         f"several requests")
        topk = request.topk if request.topk is not None else cfg.topk
        if topk > cfg.max_topk:
            return error(422, "topk", f"{topk} is above the limit of {cfg.max_topk}")
        try:
            hits = await batcher.search(request.queries, topk)
        except WorkerGone as gone:
            return error(503, "retriever", str(gone))
        body = {"result": [[hit.to_json(request.return_scores) for hit in per_query] for per_query in hits]}
        return Response(orjson.dumps(body), media_type="application/json")  # skips FastAPI's slow re-encoding

    @app.get("/health", summary="200 when the collection is open and the search worker answers")
    async def health():
        # A batch that succeeded in the last HEALTH_FRESH_S, or one running for less than HEALTH_STALL_S,
        # shows the worker works: answering from that keeps /health instant behind a long batch (a probe
        # would queue behind it). Only an idle server is probed, with a real search through the worker.
        busy = batcher.busy_for()
        if worker.gone:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "detail": worker.gone})
        if busy is not None and busy > HEALTH_STALL_S:
            return JSONResponse(status_code=503, content={
                "status": "unhealthy", "detail": f"a search has been running for {busy:.0f} s"})
        if busy is None and time.monotonic() - batcher.last_success > HEALTH_FRESH_S:
            try:
                probe = await asyncio.wait_for(batcher.search(["health"], 1), 30)
                assert len(probe) == 1
            except Exception as failure:  # report, never crash the health endpoint
                return JSONResponse(status_code=503, content={"status": "unhealthy", "detail": repr(failure)})
        info = worker.info
        return {"status": "ok", "collection": info["collection"], "passages": info["passages"],
                "embedder": info["embedder"], "dimension": info["dimension"], "precision": info["precision"],
                "index": info["index"], "batching": cfg.batching, "batches_run": batcher.batches_run,
                "queries_run": batcher.queries_run}

    return guard_requests(app, cfg.max_body_bytes)


def serve(cfg: RetrieverConfig) -> None:
    """Start the search worker (or exit with its reason), then serve until interrupted."""
    import uvicorn  # with fastapi (create_app): only a serving process needs it

    require_device(cfg.device)  # before starting anything: one sentence, not a worker's traceback
    worker = WorkerClient(cfg, log_level=cfg.log_level)
    try:
        info = worker.start()
    except RuntimeError as error:
        raise StoreError(str(error)) from None
    log.info("serving %d passages of %r with %s (%s, %s search) on http://%s:%d (batching %s)", info["passages"],
             cfg.collection, info["embedder"], info["precision"], info["index"], cfg.host, cfg.port,
             "on" if cfg.batching else "off")
    try:
        uvicorn.run(create_app(worker, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                    access_log=cfg.log_level == "debug",
                    http=read_deadline_protocol(cfg.read_timeout_s, MAX_HEAD_BYTES),
                    # uvicorn counts the connection asking among the open ones (503 once len >= limit), so +1
                    # lets exactly max_connections be served at once.
                    limit_concurrency=cfg.max_connections + 1)
    finally:
        worker.stop()
