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

from drzero.corpus.bucketed_encoder import MIN_COSINE, BucketedEncoder, Unsupported
from drzero.corpus.embedder import Embedder, canonical_name, require_device
from drzero.corpus.store import CorpusStore, Hit, StoreError
from drzero.corpus.vector_file import VectorFile
from drzero.retrieval.exact_index import BYTES_PER_VALUE, ExactIndex, choose_index, plan_shards
from drzero.retrieval.local_copy import copy_store_to_local
from drzero.store_location import parse_db

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
    fast_encoder: bool
    exact_precision: str
    exact_rescore: int
    exact_devices: list[str]


class RetrievalService:
    """The open collection, the query encoder that matches it, and the vector search (exact or HNSW)."""

    def __init__(self, store: CorpusStore, embedder: Embedder, exact: ExactIndex | None = None,
                 passages: int | None = None, fast: BucketedEncoder | None = None):
        self.store = store
        self.embedder = embedder
        self.exact = exact
        self.passages = store.count() if passages is None else passages
        self.fast = fast

    @classmethod
    def open(cls, cfg: SearchOptions) -> "RetrievalService":
        """Open the store and the embedder, or raise StoreError/ConfigError with one sentence saying why not."""
        db = parse_db(cfg.db)
        require_device(cfg.device)
        if cfg.copy_to_local and db.is_server:
            log.info("--copy-to-local %s skipped: %s is a Chroma server, which keeps its files on its own disk; the "
                     "retriever queries it there", cfg.copy_to_local, db)
        elif cfg.copy_to_local:
            db = copy_store_to_local(db.path, Path(cfg.copy_to_local))
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
        side = VectorFile.of(store)
        if side is not None and len(side) != passages:
            raise StoreError(f"collection {cfg.collection!r} holds {passages} passages but its vector side file "
                             f"{side.directory} {len(side)} vectors; run the ingest or adopt that wrote them again.")
        choice = choose_index(cfg.index, cfg.device, passages, embedder.dimension, cfg.exact_max_gib,
                              _free_gpu_bytes(cfg.device), side_file=side is not None)
        log.info("vector search: %s; encoder in %s on %s", choice.reason, embedder.precision, cfg.device)
        exact = None
        if side is not None:
            exact = exact_from_side_file(side, cfg)
        elif choice.kind == "exact":
            exact = ExactIndex.from_store(store, cfg.device)
        fast = bucketed_encoder(embedder) if exact is not None and cfg.fast_encoder else None
        return cls(store, embedder, exact, passages, fast)

    def encode(self, queries: list[str]):
        """Query vectors: a tensor on the encoder's device for the exact index, numpy for Chroma."""
        if self.fast is not None:
            return self.fast.encode([self.embedder.spec.query_prefix + q for q in queries])
        return self.embedder.encode_queries_tensor(queries) if self.exact else self.embedder.encode_queries(queries)

    def lookup(self, vectors, topk: int) -> list[list[Hit]]:
        return self.exact.hits(self.store, vectors, topk) if self.exact else self.store.query(vectors, topk)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return self.lookup(self.encode(queries), topk)


def exact_from_side_file(side: VectorFile, cfg: SearchOptions) -> ExactIndex:
    """The side file's exact index: fp16 unless --exact-precision says fp32, on the fewest of --exact-devices
    (default: the encoder's device) that hold it."""
    precision = cfg.exact_precision if cfg.exact_precision != "auto" else (
        "fp16" if cfg.device.startswith("cuda") else "fp32")
    devices = list(cfg.exact_devices) or [cfg.device]
    size = len(side) * side.dimension * BYTES_PER_VALUE[precision]
    used = plan_shards(size, devices, [_free_gpu_bytes(d) for d in devices])
    return ExactIndex.from_vector_file(side, used, precision, cfg.exact_rescore)


# Real queries of several lengths: the fixed-shape encoder must give sentence-transformers' vectors on them.
CHECK_QUERIES = ["who proposed indistinguishability obfuscation from well-founded assumptions",
                 "LWE", "which venue published the first candidate construction of a multilinear map and in what "
                 "year was it presented, and who were the authors of that paper", "iO", "what is a puncturable PRF?"]


def bucketed_encoder(embedder: Embedder) -> BucketedEncoder | None:
    """The fixed-shape CUDA-graph encoder for ``embedder`` on a GPU, when it reproduces the model's vectors (cosine
    >= 0.999 on real queries); None (``Embedder.encode`` serves) otherwise, with the reason in the log."""
    if not embedder.device.startswith("cuda"):
        return None
    try:
        fast = BucketedEncoder.of(embedder)
        fast.warm()
        agreement = fast.check_against(embedder, [embedder.spec.query_prefix + q for q in CHECK_QUERIES])
    except Unsupported as why:
        log.info("query encoder: sentence-transformers' encode (%s)", why)
        return None
    except RuntimeError as error:  # a capture the driver refuses: served without graphs rather than not at all
        log.warning("query encoder: CUDA graphs failed (%s); using sentence-transformers' encode", error)
        return None
    if agreement < MIN_COSINE:
        log.warning("query encoder: the fixed-shape encoder's vectors differ from the model's (cosine %.5f < %g); "
                    "using sentence-transformers' encode", agreement, MIN_COSINE)
        return None
    log.info("query encoder: fixed shapes as CUDA graphs (cosine to sentence-transformers >= %.5f)", agreement)
    return fast


def _free_gpu_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch  # here, not at the top: the HTTP front and the CLI never need it

    return int(torch.cuda.mem_get_info(torch.device(device))[0])
