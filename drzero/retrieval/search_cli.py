"""`drzero search`: ask the retriever (or the store directly) from the shell.

    drzero search "Which venue published Rethinking Federated Learning?" --url http://127.0.0.1:8000
    drzero search "Which venue published Rethinking Federated Learning?" --db .drzero/demo-db
    drzero search --demo-db .drzero/demo-db --wait 120     # sample demo questions, with their known answers
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass

from drzero.config import ConfigError, option, require
from drzero.corpus.embedder import Embedder
from drzero.corpus.ingest import load_demo_world
from drzero.corpus.store import CorpusStore
from drzero.corpus.vector_file import VectorFile
from drzero.retrieval.exact_index import ExactIndex


@dataclass(kw_only=True)
class SearchConfig:
    queries: list[str] = option([], positional=True, metavar="QUERY", help="one or more queries")
    url: str = option("http://127.0.0.1:8000", help="retriever to ask (ignored with --db)")
    db: str | None = option(None, metavar="DIR|URL", help=(
        "query this ChromaDB store (a directory, or a Chroma server's http://host:port) directly instead of a "
        "retriever"))
    collection: str = option("corpus", help="collection name (with --db)")
    topk: int = option(3, help="passages per query")
    wait: float = option(0.0, help="seconds to wait for the retriever's /health to turn 200 before asking")
    demo_db: str | None = option(None, metavar="DIR", help=(
        "with no QUERY: ask one sample question per hop count (1-4) of the demo world ingested into DIR, "
        "and show its known answer"))
    json: bool = option(False, help="print the raw JSON response")

    def __post_init__(self) -> None:
        require(self.topk >= 1, "topk", self.topk, "an integer >= 1")
        require(self.wait >= 0, "wait", self.wait, "a number of seconds >= 0")
        require(bool(self.queries) or self.demo_db is not None, "queries", self.queries,
                "at least one QUERY, or --demo-db DIR for sample questions")


def wait_until_healthy(url: str, seconds: float) -> None:
    """Poll ``url``/health until it answers 200; raise ConfigError naming the URL after ``seconds``."""
    import httpx  # ~0.1 s to import, and `drzero --help` imports this module

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per poll
    deadline = time.monotonic() + seconds
    while True:
        try:
            status = httpx.get(f"{url.rstrip('/')}/health", timeout=5, trust_env=False).status_code
            if status == 200:
                return
            if status != 503:  # 503: our retriever, still warming up; anything else is another program
                raise ConfigError(
                    f"{url} answers GET /health with {status}: that is not a drzero retriever, so another process "
                    f"holds the port ({httpx.URL(url).port}); stop it, or serve the retriever on another --port "
                    f"and pass its --url.")
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise ConfigError(f"retriever at {url} did not answer /health with 200 within {seconds:.0f}s.")
        time.sleep(0.5)


def _ask_server(cfg: SearchConfig, queries: list[str]) -> list[list[dict]]:
    import httpx  # see wait_until_healthy

    with httpx.Client(trust_env=False, timeout=60) as client:
        response = client.post(f"{cfg.url.rstrip('/')}/retrieve",
                               json={"queries": queries, "topk": cfg.topk, "return_scores": True})
    if response.status_code != 200:
        raise ConfigError(f"retriever at {cfg.url} answered {response.status_code}: {response.text}")
    return response.json()["result"]


def _ask_store(cfg: SearchConfig, queries: list[str]) -> list[list[dict]]:
    store = CorpusStore.open_existing(cfg.db, cfg.collection)
    embedder = Embedder(store.recorded_spec())
    side = VectorFile.of(store)
    if side is not None:  # Chroma holds placeholders: read the side file where it lies (a full pass per search)
        hits = ExactIndex.over_memory_map(side).hits(store, embedder.encode_queries_tensor(queries), cfg.topk)
    else:
        hits = store.query(embedder.encode_queries(queries), cfg.topk)
    return [[hit.to_json() for hit in per_query] for per_query in hits]


def _demo_samples(demo_db: str) -> list[tuple[str, str]]:
    """(question, note) pairs: one demo question per hop count with its known answer and chain."""
    world = load_demo_world(demo_db)
    samples = []
    for hops in range(1, 5):
        question = world.questions(hops, count=1)[0]
        titles = " -> ".join(world.by_id[source.rsplit("/", 1)[1]].name for source in question.chain)
        samples.append((question.question, f"{hops} hop(s); known answer: {question.answer}; chain: {titles}"))
    return samples


def run_search(cfg: SearchConfig) -> None:
    if cfg.wait and not cfg.db:
        wait_until_healthy(cfg.url, cfg.wait)
    samples = [(q, "") for q in cfg.queries] if cfg.queries else _demo_samples(cfg.demo_db)
    queries = [q for q, _ in samples]
    results = _ask_store(cfg, queries) if cfg.db else _ask_server(cfg, queries)
    if cfg.json:
        print(json.dumps({"result": results}, indent=2))
        return
    for (query, note), hits in zip(samples, results):
        print(f"\nQ: {query}")
        if note:
            print(f"   ({note})")
        for rank, hit in enumerate(hits, 1):
            document = hit["document"]
            body = document["contents"].split("\n", 1)[-1]
            print(f"  {rank}. [{hit['score']:.3f}] {document.get('title', '')}  ({document.get('source', '')})")
            print(textwrap.indent(textwrap.fill(body, 96, max_lines=3, placeholder=" ..."), "       "))
    sys.stdout.flush()
