"""The corpus store: one ChromaDB collection in cosine space, in a local directory or on a Chroma server.

Each record is one passage: id = content hash, document = ``"title\\ntext"``, metadata
title/source/chunk. The collection's own metadata records which embedder wrote it (name,
dimension, query and passage prefixes) so that the retriever can refuse to query it with
another model — a mismatch returns nonsense silently, it never crashes.

Beside the collection, ``drzero-index-check.<collection>.json`` records whether its vector index
was checked after the last write: ``writing`` from before an ingest's first write until its index
check passes, then ``checked`` with the passage count. A kill in between leaves ``writing``, so the
next ingest checks the index again and preflight refuses to train on it unchecked.

``--db`` may also name a Chroma server (``http://host:port``, drzero.store_location). The server is the one
process that writes its files, so the local-only guards have nothing to guard there: no writer's lock, and
no index-check record (the lost-index damage they catch comes from two embedded writers); each says so in the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from drzero.atomic import write_json_atomically
from drzero.corpus.embedder import EmbedderSpec, canonical_name
from drzero.corpus.chroma_server import ServerUnavailable, server_client
from drzero.records import OneOf, Optional, read_record
from drzero.store_location import StoreLocation, parse_db

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "corpus"

# HNSW settings. ef_search=128 and M=32 keep recall@3 against exact cosine search at >= 0.99 on a
# 20k-passage corpus (benchmarks/retrieval.py measures the shipped settings' recall); Chroma's defaults (ef_search=100,
# M=16) sit slightly lower on dense MiniLM/e5 embeddings.
HNSW_SETTINGS = {"hnsw:space": "cosine", "hnsw:construction_ef": 200, "hnsw:M": 32, "hnsw:search_ef": 128}

FINGERPRINT_SAMPLE = 1000  # ids read for CorpusStore.fingerprint

META_EMBEDDER = "drzero:embedder"
META_DIMENSION = "drzero:dimension"
META_QUERY_PREFIX = "drzero:query_prefix"
META_PASSAGE_PREFIX = "drzero:passage_prefix"


class StoreError(RuntimeError):
    """The collection cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Hit:
    id: str
    contents: str
    title: str
    source: str
    score: float  # cosine similarity, 1.0 = same direction

    def to_json(self, with_score: bool = True) -> dict:
        """The Search-R1 wire form: ``{"document": {...}, "score": s}``, or the bare document."""
        document = {"id": self.id, "contents": self.contents, "title": self.title, "source": self.source}
        return {"document": document, "score": round(self.score, 6)} if with_score else document


def _client(location: StoreLocation):
    """The Chroma client of the store: embedded on a local directory, over HTTP on a server."""
    # Telemetry off: it phones home, and this must run with no network.
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    if location.is_server:
        try:
            return server_client(location)
        except ServerUnavailable as error:
            raise StoreError(str(error)) from None
    import chromadb  # seconds to import: only opening a store needs it, not `drzero --help`

    return chromadb.PersistentClient(path=str(location.path), settings=chromadb.Settings(anonymized_telemetry=False))


def _collection_names(client) -> list[str]:
    return [c if isinstance(c, str) else c.name for c in client.list_collections()]


def _missing(location: StoreLocation) -> bool:
    """A local store whose directory does not exist (a server is asked instead)."""
    return not location.is_server and not location.path.is_dir()


class CorpusStore:
    """A passage collection plus the embedder spec it was built with."""

    def __init__(self, collection: Any, path: Path | StoreLocation):
        self.collection = collection
        self.path = path  # a local store's directory, or the server's StoreLocation (both print as --db takes them)

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open_existing(cls, path: Path | str, name: str = DEFAULT_COLLECTION) -> "CorpusStore":
        """Open a collection that must exist and hold passages (the retriever's path)."""
        location = parse_db(path)
        path = location.path or location
        if _missing(location):
            raise StoreError(f"no corpus at {path}: the directory does not exist; build one with "
                             f"`drzero ingest SOURCE... --db {path}` or `drzero ingest --demo --db {path}`.")
        client = _client(location)
        names = _collection_names(client)
        if name not in names:
            found = ", ".join(sorted(names)) or "none"
            raise StoreError(f"collection {name!r} not found in {path} (collections there: {found}); "
                             f"pass --collection or run `drzero ingest ... --db {path}` first.")
        store = cls(client.get_collection(name, embedding_function=None), path)
        if store.count() == 0:
            raise StoreError(f"collection {name!r} in {path} is empty; run `drzero ingest SOURCE... --db {path}` first.")
        if store.recorded_spec() is None:
            raise StoreError(f"collection {name!r} in {path} records no embedder in its metadata, so it was not "
                             f"built by `drzero ingest`; if another system built it, run `drzero adopt --db {path} "
                             f"--collection {name} --embedder MODEL` with the model that made its vectors, or "
                             f"rebuild it with `drzero ingest`.")
        return store

    @classmethod
    def open_for_writing(cls, path: Path | str, name: str = DEFAULT_COLLECTION) -> "CorpusStore | None":
        """The collection if it exists (any size), else None."""
        location = parse_db(path)
        if _missing(location):
            return None
        client = _client(location)
        if name not in _collection_names(client):
            return None
        return cls(client.get_collection(name, embedding_function=None), location.path or location)

    @classmethod
    def create(cls, path: Path | str, spec: EmbedderSpec, dimension: int,
               name: str = DEFAULT_COLLECTION, extra_metadata: dict | None = None) -> "CorpusStore":
        """A new collection that records the embedder's spec in its metadata (``extra_metadata`` added over it:
        ``drzero adopt --faiss-index`` and ``drzero ingest --vectors side-file`` mark a collection whose vectors
        live in a side file)."""
        location = parse_db(path)
        if not location.is_server:
            location.path.mkdir(parents=True, exist_ok=True)
        metadata = {**HNSW_SETTINGS, META_EMBEDDER: spec.name, META_DIMENSION: dimension,
                    META_QUERY_PREFIX: spec.query_prefix, META_PASSAGE_PREFIX: spec.passage_prefix,
                    **(extra_metadata or {})}
        # get-or-create: a collection another writer made a moment ago is used, not a traceback;
        # check_embedder then refuses it if it was made for another embedder.
        collection = _client(location).get_or_create_collection(name, embedding_function=None, metadata=metadata)
        return cls(collection, location.path or location)

    @classmethod
    def peek_spec(cls, path: Path | str, name: str = DEFAULT_COLLECTION) -> EmbedderSpec | None:
        """The embedder an existing collection was built with, or None when there is none yet."""
        store = cls.open_for_writing(path, name)
        return store.recorded_spec() if store is not None else None

    # -- metadata ----------------------------------------------------------------------------

    def recorded_spec(self) -> EmbedderSpec | None:
        return spec_from_metadata(self.collection.metadata or {})

    def recorded_dimension(self) -> int | None:
        value = (self.collection.metadata or {}).get(META_DIMENSION)
        return int(value) if value is not None else None

    def check_embedder(self, spec: EmbedderSpec, dimension: int | None = None) -> None:
        """Refuse an embedder other than the one that built the collection."""
        recorded = self.recorded_spec()
        if recorded is None:
            raise StoreError(f"collection {self.collection.name!r} in {self.path} records no embedder; if another "
                             f"system built it, run `drzero adopt --db {self.path} --collection "
                             f"{self.collection.name} --embedder MODEL` first, or ingest into a new --collection.")
        if canonical_name(spec.name) != recorded.name:
            raise StoreError(
                f"collection {self.collection.name!r} in {self.path} was built with embedder {recorded.name!r} "
                f"but {spec.name!r} is configured; pass --embedder {recorded.name} or rebuild the collection.")
        if (spec.query_prefix, spec.passage_prefix) != (recorded.query_prefix, recorded.passage_prefix):
            raise StoreError(
                f"collection {self.collection.name!r} was built with prefixes query={recorded.query_prefix!r} "
                f"passage={recorded.passage_prefix!r} but query={spec.query_prefix!r} "
                f"passage={spec.passage_prefix!r} are configured; use the recorded prefixes.")
        recorded_dim = self.recorded_dimension()
        if dimension is not None and recorded_dim is not None and dimension != recorded_dim:
            raise StoreError(f"collection {self.collection.name!r} holds {recorded_dim}-dimensional vectors but "
                             f"embedder {spec.name!r} makes {dimension}-dimensional ones.")

    # -- reading and writing -----------------------------------------------------------------

    def count(self) -> int:
        return self.collection.count()

    def all_ids(self, page: int = 10_000) -> list[str]:
        """Every record id, sorted, so that seeded sampling does not depend on insertion order."""
        ids: list[str] = []
        for offset in range(0, self.count(), page):
            ids.extend(self.collection.get(include=[], limit=page, offset=offset)["ids"])
        return sorted(ids)

    def fingerprint(self, sample: int = FINGERPRINT_SAMPLE) -> str:
        """A short hash of what the collection holds: its embedder metadata, its passage count and the ids (content
        hashes) of its first ``sample`` records. It changes when the store is rebuilt from other passages or grows;
        copies of a store, and stores ingested from the same files in the same order, agree. Cheap at 21 M
        passages (reading every id would take minutes)."""
        first = self.collection.get(include=[], limit=sample)["ids"]
        described = json.dumps({"metadata": {k: v for k, v in sorted((self.collection.metadata or {}).items())},
                                "passages": self.count(), "first_ids": first}, sort_keys=True, default=str)
        return hashlib.sha256(described.encode()).hexdigest()[:16]

    def existing_ids(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), 1000):
            found.update(self.collection.get(ids=ids[start:start + 1000], include=[])["ids"])
        return found

    def add(self, ids: list[str], contents: list[str], metadatas: list[dict], embeddings: np.ndarray) -> None:
        # upsert, not add: an id already present (a re-run racing an interrupted one) is not an error.
        self.collection.upsert(ids=ids, documents=contents, metadatas=metadatas, embeddings=embeddings)

    def query(self, embeddings: np.ndarray, topk: int) -> list[list[Hit]]:
        topk = min(topk, self.count())
        result = self.collection.query(query_embeddings=embeddings, n_results=topk,
                                       include=["documents", "metadatas", "distances"])
        hits = []
        for ids, docs, metas, dists in zip(result["ids"], result["documents"], result["metadatas"],
                                           result["distances"]):
            hits.append([Hit(id=i, contents=d, title=(m or {}).get("title", ""), source=(m or {}).get("source", ""),
                             score=1.0 - float(dist)) for i, d, m, dist in zip(ids, docs, metas, dists)])
        return hits

    def unindexed_ids(self, page: int = 1000) -> list[str]:
        """Ids that are stored but that the vector index cannot find (they never come back in search).

        Two writers at once can leave a batch recorded in the metadata store but not in the HNSW
        index; fetching such an id's vector then fails, which is how they are found, a page at a
        time and halving a failing page down to the single ids.
        """
        ids = self.all_ids()
        missing: list[str] = []
        for start in range(0, len(ids), page):
            missing += self._unfindable(ids[start:start + page])
        return missing

    def _unfindable(self, ids: list[str]) -> list[str]:
        try:
            got = self.collection.get(ids=ids, include=["embeddings"])
        except Exception:  # chromadb raises InternalError("Error finding id") for such an id
            if len(ids) == 1:
                return ids
            half = len(ids) // 2
            return self._unfindable(ids[:half]) + self._unfindable(ids[half:])
        return sorted(set(ids) - set(got["ids"]))

    def records(self, ids: list[str]) -> tuple[list[str], list[str], list[dict]]:
        """(ids, contents, metadatas) of stored records, without their vectors."""
        got = self.collection.get(ids=ids, include=["documents", "metadatas"])
        return got["ids"], got["documents"], [m or {} for m in got["metadatas"]]

    def iter_embeddings(self, batch: int = 5000) -> Iterable[tuple[list[str], np.ndarray]]:
        """All ids and stored vectors, for exact-search comparisons."""
        total = self.count()
        for offset in range(0, total, batch):
            got = self.collection.get(include=["embeddings"], limit=batch, offset=offset)
            yield got["ids"], np.asarray(got["embeddings"], dtype=np.float32)


def spec_from_metadata(metadata: dict) -> EmbedderSpec | None:
    name = metadata.get(META_EMBEDDER)
    if not name:
        return None
    return EmbedderSpec(name=name, query_prefix=metadata.get(META_QUERY_PREFIX, ""),
                        passage_prefix=metadata.get(META_PASSAGE_PREFIX, ""))


INDEX_WRITING, INDEX_CHECKED = "writing", "checked"
INDEX_CHECK_RECORD = {"collection": str, "state": OneOf(INDEX_WRITING, INDEX_CHECKED), "passages": Optional(int)}


def index_check_path(path: Path | str, collection: str) -> Path:
    """Where the index check of ``collection`` is recorded: in the store's directory, so it travels with a copy."""
    return Path(path).expanduser() / f"drzero-index-check.{collection}.json"


def records_index_checks(path: Path | str | StoreLocation) -> bool:
    """Whether the store keeps index-check records: a local store does; a Chroma server writes its own index
    alone, so the two-writer damage the record tracks cannot happen there."""
    return not parse_db(path).is_server


def read_index_check(path: Path | str, collection: str) -> dict | None:
    """The recorded state of the collection's index check; None when none is recorded (a store from an older
    drzero or another system, or a Chroma server); drzero.records.DamagedRecord when the record is damaged."""
    if not records_index_checks(path):
        return None
    return read_record(index_check_path(path, collection), INDEX_CHECK_RECORD)


def record_index_check(path: Path | str, collection: str, state: str, passages: int | None = None) -> None:
    """Record ``writing`` before a write to the collection, ``checked`` (with its passage count) after its check;
    nothing on a Chroma server (records_index_checks)."""
    if not records_index_checks(path):
        return
    write_json_atomically({"collection": collection, "state": state, "passages": passages},
                          index_check_path(path, collection))


def lock_path(path: Path | str) -> Path:
    """The writer's lock of a store: a file beside its directory (``/corpus/chromadb.lock``)."""
    path = Path(path).resolve()
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def writer_lock(path: Path | str) -> Iterator[None]:
    """Hold the store's one writer's lock for the ``with`` block, or raise StoreError at once.

    ChromaDB's persistent client assumes one writer: two concurrent ingests both exit 0 and leave
    passages in the metadata store that the vector index never finds. ``flock`` is released by
    the kernel when the holder dies, so a killed ingest never leaves a stale lock. A Chroma server
    is that one writer itself and orders its clients' writes, so no lock is taken for one.
    """
    location = parse_db(path)
    if location.is_server:
        log.info("no writer's lock for %s: a Chroma server orders its clients' writes itself", location)
        yield
        return
    where = lock_path(path)
    where.parent.mkdir(parents=True, exist_ok=True)
    handle = open(where, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StoreError(f"another `drzero ingest` ({holder}) is writing to {path} (lock {where}); wait for "
                             f"it to finish, or ingest into another --db.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock
