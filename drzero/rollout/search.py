"""The search tool's one job: ask the retriever and turn its hits into the text the model reads.

Shared by verl's tool (``drzero.rollout.search_tool``) and our own agent loop
(``drzero.rollout.client``), so the trained model and its reward probes see identical results.
A failure never raises into a rollout: it comes back as text the model can read and as a
``SearchOutcome`` whose ``error`` says what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

from drzero.rollout.http import RetriesExhausted, post_with_retries

log = logging.getLogger(__name__)

DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000/retrieve"
RETRIEVER_URL_ENV = "DRZERO_RETRIEVER_URL"  # compose and Modal point the tool at the retriever with this


@dataclass(frozen=True)
class SearchSettings:
    url: str = DEFAULT_RETRIEVER_URL
    topk: int = 3
    timeout: float = 30.0
    retries: int = 3          # extra attempts after the first, on connection errors, timeouts and 5xx
    backoff: float = 0.5      # seconds before the first retry, doubled each time
    max_connections: int = 256
    max_chars: int | None = None  # shorten each result to fit this many characters, JSON included

    @classmethod
    def from_config(cls, config: dict | None) -> "SearchSettings":
        config = dict(config or {})
        url = os.environ.get(RETRIEVER_URL_ENV) or config.get("retrieval_service_url") or DEFAULT_RETRIEVER_URL
        return cls(url=url, topk=int(config.get("topk", 3)), timeout=float(config.get("timeout", 30.0)),
                   retries=int(config.get("retries", 3)), backoff=float(config.get("backoff", 0.5)),
                   max_connections=int(config.get("max_connections", 256)),
                   max_chars=int(config["max_result_chars"]) if config.get("max_result_chars") else None)


@dataclass
class SearchOutcome:
    text: str                 # what the model reads: {"result": "Doc 1 (Title: …) …"}
    ok: bool
    hits: int = 0
    error: str | None = None
    seconds: float = 0.0


def format_hits(results: list[list[dict]], body_chars: int | None = None, refused: dict | None = None) -> str:
    """Search-R1's layout: ``Doc i (Title: t) body`` per hit, queries separated by ``---``.

    ``body_chars`` shortens every body to that many characters, at a word boundary, marked ``…``.
    ``refused`` maps a query's index to why the retriever did not search it (its ``errors``).
    """
    blocks = []
    for index, hits in enumerate(results):
        lines = []
        for rank, hit in enumerate(hits, 1):
            document = hit.get("document", hit)
            title, _, body = document.get("contents", "").partition("\n")
            body = body.strip()
            if body_chars is not None and len(body) > body_chars:
                body = body[:body_chars].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
            lines.append(f"Doc {rank} (Title: {document.get('title') or title}) {body}")
        if not lines and refused and index in refused:
            lines.append(f"Search refused: {refused[index]}")
        blocks.append("\n".join(lines) if lines else "No search results found.")
    return "\n---\n".join(blocks)


def _as_model_text(result: str) -> str:
    return json.dumps({"result": result}, ensure_ascii=False)


def fitted_text(results: list[list[dict]], max_chars: int | None, refused: dict | None = None) -> str:
    """The model's text for ``results``, each passage shortened by the same amount until it fits ``max_chars``.

    verl cuts an overlong tool result in the middle (``max_tool_response_length``), which would
    drop the end of one passage and the start of the next; shortening every passage alike keeps
    each one readable.
    """
    text = _as_model_text(format_hits(results, refused=refused))
    if max_chars is None or len(text) <= max_chars:
        return text
    hits = max(1, sum(len(h) for h in results))
    body_chars = max(1, (max_chars - len(_as_model_text(format_hits(results, 0, refused)))) // hits)
    while body_chars > 1:
        text = _as_model_text(format_hits(results, body_chars, refused))
        if len(text) <= max_chars:
            return text
        body_chars = int(body_chars * 0.9)  # JSON escapes made it longer than the raw count
    return text


# One pooled session per (event loop, settings): verl builds a tool object per trajectory, and an
# HTTP session must not be shared across event loops. aiohttp rather than httpx: with hundreds of
# searches in flight, httpx's connection pool costs more client CPU than the retriever takes to
# answer (benchmarks/reward_probes.py).
_SESSIONS: dict[tuple[int, SearchSettings], "aiohttp.ClientSession"] = {}  # noqa: F821
_KEEPERS: dict[tuple[int, SearchSettings], object] = {}


async def _keeper(key, session):
    """Closes ``session`` when its loop shuts down: asyncio.run (and verl's loops) finalize every live
    async generator before closing, so a loop that never calls close_sessions leaves no open connector."""
    try:
        yield
    finally:
        if _SESSIONS.get(key) is session:
            del _SESSIONS[key]
        _KEEPERS.pop(key, None)
        await session.close()


async def _session(settings: SearchSettings):
    import aiohttp  # ~0.15 s to import: on first use, not when `drzero --help` imports this module

    key = (id(asyncio.get_running_loop()), settings)
    session = _SESSIONS.get(key)
    if session is None or session.closed:
        # trust_env=False (aiohttp's default): an HTTP(S)_PROXY must never capture calls to localhost.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.max_connections),
                                        timeout=aiohttp.ClientTimeout(total=settings.timeout), trust_env=False)
        _SESSIONS[key] = session
        keeper = _keeper(key, session)
        await keeper.__anext__()  # now the loop tracks it, and finalizes it at shutdown
        _KEEPERS[key] = keeper
    return session


async def close_sessions() -> None:
    """Close this event loop's pooled sessions (a short-lived loop calls it before it ends)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [key for key in _SESSIONS if key[0] == loop_id]:
        keeper = _KEEPERS.pop(key, None)
        session = _SESSIONS.pop(key)
        await session.close()
        if keeper is not None:
            await keeper.aclose()


async def search(queries: list[str], settings: SearchSettings) -> SearchOutcome:
    """POST the queries to the retriever with retries; always returns an outcome, never raises."""
    started = time.perf_counter()
    payload = {"queries": queries, "topk": settings.topk, "return_scores": True}
    try:
        status, body = await post_with_retries(await _session(settings), settings.url, payload, retries=settings.retries,
                                               backoff=settings.backoff, timeout=settings.timeout, what="retriever")
    except RetriesExhausted as failure:
        status, body, error = None, "", str(failure)
    if status is not None:
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if status != 200:  # a 4xx: post_with_retries did not ask again
            detail = decoded.get("detail") if isinstance(decoded, dict) else None
            error = f"retriever rejected the request: {detail}" if detail else f"retriever answered {status}"
        elif not isinstance(decoded, dict) or not isinstance(decoded.get("result"), list):
            error = "retriever sent a response without a 'result' list"
        else:
            results = decoded["result"]
            refused = {error.get("index"): error.get("detail") for error in decoded.get("errors") or []
                       if isinstance(error, dict)}  # a bad query's entry is empty; errors says why
            return SearchOutcome(text=fitted_text(results, settings.max_chars, refused), ok=True,
                                 hits=sum(len(h) for h in results), seconds=time.perf_counter() - started)
    log.warning("search for %r failed: %s", queries[:3], error)
    return SearchOutcome(text=_as_model_text(f"Search failed: {error}. Try again later or answer with what "
                                             f"you have."), ok=False, error=error,
                         seconds=time.perf_counter() - started)
