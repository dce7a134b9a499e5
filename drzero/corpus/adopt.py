"""`drzero adopt`: take over a ChromaDB collection that `drzero ingest` did not build, or a FAISS flat index.

    drzero adopt --db /corpus/chromadb --collection papers --embedder e5-large-v2
    drzero adopt --faiss-index e5_Flat.index --corpus wiki-18.jsonl --embedder e5-base-v2 --db /corpus/chromadb

(The second form, Search-R1's corpus as distributed, is ``drzero.corpus.adopt_faiss``: the vectors go to a side
file for exact search on the GPU and only the documents into Chroma.)

A store from another system holds vectors but no record of the model that made them, and
searching it with another model returns nonsense without any error. Adopt re-embeds a sample
of the stored documents with the named embedder, each passage prefix candidate in turn (the
model's own, none, ``"passage: "``), and compares with the stored vectors. When nearly all
agree it records the embedder (and the prefixes that matched) in the collection's metadata, so
every stage opens it as its own; otherwise it refuses, saying what it tried and what it saw.
It never rewrites a vector or a document: documents stored without a title line are served as
stored, with the title from their metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from drzero.config import option, require
from drzero.corpus.embedder import Embedder, EmbedderSpec, canonical_name, spec_for
from drzero.corpus.store import (DEFAULT_COLLECTION, META_DIMENSION, META_EMBEDDER, META_PASSAGE_PREFIX,
                                 META_QUERY_PREFIX, CorpusStore, StoreError, writer_lock)
from drzero.corpus.vector_file import DTYPES

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AdoptConfig:
    db: str = option(metavar="DIR|URL", help=(
        "directory of the ChromaDB persistent store holding the collection, or a Chroma server's address such as "
        "http://127.0.0.1:8000 (token from $DRZERO_CHROMA_TOKEN); with --faiss-index, a directory: where the "
        "collection is made, its vectors in a side file beside it"))
    collection: str = option(DEFAULT_COLLECTION, help="the collection to adopt")
    embedder: str = option(metavar="MODEL", help=(
        "the sentence-transformers model (name or local directory) that made the stored vectors; "
        "aliases: minilm, e5-large-v2"))
    query_prefix: str | None = option(None, help=(
        "prefix of queries (default: the model's own; 'query: ' when the stored passages match 'passage: ')"))
    passage_prefix: str | None = option(None, help=(
        "prefix the stored passages were embedded with (default: try the model's own, none and 'passage: ')"))
    device: str = option("cpu", choices=["cpu", "cuda"], help="device to run the embedder on")
    samples: int = option(64, help="stored documents re-embedded and compared")
    min_similarity: float = option(0.99, help="cosine a re-embedded sample must reach to count as a match")
    min_fraction: float = option(0.95, help="fraction of samples that must match")
    faiss_index: list[str] = option([], metavar="FILE", help=(
        "a FAISS flat index (IndexFlatIP or IndexFlatL2, e.g. Search-R1's e5_Flat.index) whose rows are the --corpus "
        "lines' vectors, in order: its vectors are copied to the collection's vector side file (exact search on the "
        "GPU) and the documents into a new collection, without building an HNSW index; several files are the parts "
        "of one index, in order (Search-R1's part_aa part_ab: no need to join them first)"))
    corpus: str | None = option(None, metavar="JSONL", help=(
        "with --faiss-index: the corpus, one JSON record a line in the index's row order (Search-R1/FlashRAG's "
        "wiki-18.jsonl: id, and contents with the title on its first line); a .jsonl.gz is unpacked beside itself once"))
    vectors_dtype: str = option("float32", choices=list(DTYPES), help=(
        "with --faiss-index: how the side file stores the vectors (float16 halves the disk, but the exact index "
        "then has no float32 rows to re-score with)"))
    document_batch: int = option(4096, help="with --faiss-index: documents stored in Chroma per write")

    def __post_init__(self) -> None:
        require((not self.faiss_index) == (self.corpus is None), "corpus", self.corpus,
                "a JSONL file together with --faiss-index, and neither without the other")
        require(self.document_batch >= 1, "document_batch", self.document_batch, "an integer >= 1")
        require(self.samples >= 1, "samples", self.samples, "an integer >= 1")
        require(0 < self.min_similarity <= 1, "min_similarity", self.min_similarity, "a number in (0, 1]")
        require(0 < self.min_fraction <= 1, "min_fraction", self.min_fraction, "a number in (0, 1]")


@dataclass
class AdoptResult:
    spec: EmbedderSpec
    dimension: int
    samples: int
    tried: dict[str, float] = field(default_factory=dict)   # passage prefix -> fraction of samples that matched
    already: bool = False

    def render(self) -> str:
        if self.already:
            return f"collection already records embedder {self.spec.name}; nothing to do"
        tried = ", ".join(f"{prefix!r}: {fraction:.0%}" for prefix, fraction in self.tried.items())
        return (f"adopted: embedder {self.spec.name} ({self.dimension} dimensions), query prefix "
                f"{self.spec.query_prefix!r}, passage prefix {self.spec.passage_prefix!r}; "
                f"{self.samples} samples re-embedded, matching by prefix: {tried}")


def passage_prefix_candidates(spec: EmbedderSpec, given: str | None) -> list[str]:
    if given is not None:
        return [given]
    return list(dict.fromkeys([spec.passage_prefix, "", "passage: "]))


def sample_records(store: CorpusStore, count: int) -> tuple[list[str], np.ndarray]:
    """Documents and stored vectors of ``count`` records spread evenly over the sorted ids."""
    ids = store.all_ids()
    step = max(1, len(ids) // count)
    picked = ids[::step][:count]
    got = store.collection.get(ids=picked, include=["documents", "embeddings"])
    return list(got["documents"]), np.asarray(got["embeddings"], dtype=np.float32)


def match_passage_prefix(embedder: Embedder, base: EmbedderSpec, documents: list[str], stored: np.ndarray,
                         cfg: AdoptConfig, subject: str) -> tuple[EmbedderSpec, dict[str, float]]:
    """The embedder spec (with the passage prefix that reproduces them) under which re-embedding ``documents`` gives
    their ``stored`` vectors, and the share of samples each prefix tried matched; StoreError saying what was tried
    and seen when no prefix does (``subject`` names the vectors: "the stored vectors of collection 'papers'")."""
    stored = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    tried: dict[str, float] = {}
    similarities: dict[str, np.ndarray] = {}
    for prefix in passage_prefix_candidates(base, cfg.passage_prefix):
        fresh = embedder.encode(documents, prefix)
        similarities[prefix] = np.sum(fresh * stored, axis=1)
        tried[prefix] = float(np.mean(similarities[prefix] >= cfg.min_similarity))
        if tried[prefix] >= cfg.min_fraction:
            break
    else:
        seen = "; ".join(f"passage prefix {p!r}: {tried[p]:.0%} matched, median cosine "
                         f"{float(np.median(s)):.3f}, lowest {float(s.min()):.3f}" for p, s in similarities.items())
        raise StoreError(f"{subject} were not made by {base.name}: re-embedding {len(documents)} stored documents "
                         f"gave {seen} (needed {cfg.min_fraction:.0%} at cosine >= {cfg.min_similarity}). Pass the "
                         f"embedder that built them as --embedder, or its passage prefix as --passage-prefix.")
    query_prefix = cfg.query_prefix if cfg.query_prefix is not None else (
        "query: " if prefix == "passage: " else base.query_prefix)
    return EmbedderSpec(name=base.name, query_prefix=query_prefix, passage_prefix=prefix), tried


def _space(store: CorpusStore) -> str:
    space = (store.collection.metadata or {}).get("hnsw:space")
    if space is None:
        config = getattr(store.collection, "configuration_json", None) or {}
        space = (config.get("hnsw") or {}).get("space", "l2")
    return space


def run_adopt(cfg: AdoptConfig) -> AdoptResult:
    with writer_lock(cfg.db):
        store = CorpusStore.open_for_writing(cfg.db, cfg.collection)
        if store is None:
            CorpusStore.open_existing(cfg.db, cfg.collection)   # raises, naming the collections there
        if store.count() == 0:
            raise StoreError(f"collection {cfg.collection!r} in {cfg.db} is empty; there is nothing to adopt.")
        base = spec_for(canonical_name(cfg.embedder), cfg.query_prefix, None)
        recorded = store.recorded_spec()
        if recorded is not None:
            if recorded.name == base.name:
                return AdoptResult(spec=recorded, dimension=store.recorded_dimension() or 0, samples=0, already=True)
            raise StoreError(f"collection {cfg.collection!r} in {cfg.db} already records embedder {recorded.name!r}; "
                             f"adopt does not change it. Serve it with --embedder {recorded.name}.")
        space = _space(store)
        if space != "cosine":
            raise StoreError(f"collection {cfg.collection!r} in {cfg.db} uses the {space!r} distance, not cosine; "
                             f"drzero reads scores as cosine similarities. Re-ingest it with `drzero ingest`.")
        documents, stored = sample_records(store, cfg.samples)
        embedder = Embedder(base, device=cfg.device)
        if stored.shape[1] != embedder.dimension:
            raise StoreError(f"collection {cfg.collection!r} holds {stored.shape[1]}-dimensional vectors but "
                             f"{base.name} makes {embedder.dimension}-dimensional ones: it was built with another "
                             f"embedder. Pass the one that built it as --embedder.")
        spec, tried = match_passage_prefix(embedder, base, documents, stored, cfg,
                                           f"the stored vectors of collection {cfg.collection!r}")
        # Chroma refuses a metadata change that touches hnsw:* (it fixes the distance at creation), and
        # modify replaces the whole metadata: the collection's own keys go back unchanged, ours are added.
        metadata = {k: v for k, v in (store.collection.metadata or {}).items() if not k.startswith("hnsw:")}
        metadata.update({META_EMBEDDER: spec.name, META_DIMENSION: embedder.dimension,
                         META_QUERY_PREFIX: spec.query_prefix, META_PASSAGE_PREFIX: spec.passage_prefix})
        store.collection.modify(metadata=metadata)
        log.info("collection %r in %s adopted with embedder %s", cfg.collection, cfg.db, spec.name)
        return AdoptResult(spec=spec, dimension=embedder.dimension, samples=len(documents), tried=tried)
