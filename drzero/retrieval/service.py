"""The retriever's search: the open collection, the query encoder that matches it, and the vector search
(exact on the GPU, or Chroma's HNSW index).

    service = RetrievalService.open(RetrieverConfig(db="/corpus/chromadb", device="cuda"))
    hits = service.search(["who proposed iO from LWE?"], topk=3)

``drzero serve-retriever`` (``drzero.retrieval.server``, whose ``RetrieverConfig`` carries the options)
runs it in its search worker process (``drzero.retrieval.worker``); ``benchmarks/retrieval.py`` runs it
in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from drzero.corpus.embedder import Embedder, canonical_name, require_device
from drzero.corpus.store import CorpusStore, Hit, StoreError
from drzero.retrieval.exact_index import ExactIndex, choose_index
from drzero.retrieval.local_copy import copy_store_to_local

log = logging.getLogger(__name__)


class SearchOptions(Protocol):
    """What opening the search reads; ``RetrieverConfig`` (``drzero serve-retriever``'s settings) has these fields."""

    db: str
    collection: str
    embedder: str | None
    device: str
    precision: str
    index: str
    exact_max_gib: float
    copy_to_local: str | None


class RetrievalService:
    """The open collection, the query encoder that matches it, and the vector search (exact or HNSW)."""

    def __init__(self, store: CorpusStore, embedder: Embedder, exact: ExactIndex | None = None,
                 passages: int | None = None):
        self.store = store
        self.embedder = embedder
        self.exact = exact
        self.passages = store.count() if passages is None else passages

    @classmethod
    def open(cls, cfg: SearchOptions) -> "RetrievalService":
        """Open the store and the embedder, or raise StoreError/ConfigError with one sentence saying why not."""
        db = Path(cfg.db)
        require_device(cfg.device)
        if cfg.copy_to_local:
            db = copy_store_to_local(db, Path(cfg.copy_to_local))
        store = CorpusStore.open_existing(db, cfg.collection)
        recorded = store.recorded_spec()
        assert recorded is not None  # open_existing refuses collections without one
        if cfg.embedder is not None and canonical_name(cfg.embedder) != recorded.name:
            raise StoreError(
                f"collection {cfg.collection!r} in {db} was built with embedder {recorded.name!r} but the retriever "
                f"is configured with {canonical_name(cfg.embedder)!r}; serve it with --embedder {recorded.name} or "
                f"re-ingest the corpus with {canonical_name(cfg.embedder)}.")
        embedder = Embedder(recorded, device=cfg.device, precision=cfg.precision)  # prefixes from the collection
        store.check_embedder(recorded, embedder.dimension)
        passages = store.count()
        choice = choose_index(cfg.index, cfg.device, passages, embedder.dimension, cfg.exact_max_gib,
                              _free_gpu_bytes(cfg.device))
        log.info("vector search: %s; encoder in %s on %s", choice.reason, embedder.precision, cfg.device)
        exact = ExactIndex.from_store(store, cfg.device) if choice.kind == "exact" else None
        return cls(store, embedder, exact, passages)

    def encode(self, queries: list[str]):
        """Query vectors: a tensor on the encoder's device for the exact index, numpy for Chroma."""
        return self.embedder.encode_queries_tensor(queries) if self.exact else self.embedder.encode_queries(queries)

    def lookup(self, vectors, topk: int) -> list[list[Hit]]:
        return self.exact.hits(self.store, vectors, topk) if self.exact else self.store.query(vectors, topk)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return self.lookup(self.encode(queries), topk)


def _free_gpu_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch  # here, not at the top: the HTTP front and the CLI never need it

    return int(torch.cuda.mem_get_info()[0])
