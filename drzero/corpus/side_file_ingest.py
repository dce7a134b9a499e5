"""`drzero ingest --vectors side-file`: the passages' vectors go to the collection's vector side file, not Chroma.

    drzero ingest wiki.jsonl --db /corpus/chromadb --vectors side-file

For corpora of millions of passages: there Chroma's HNSW build over the real vectors is what takes hours, and the
retriever searches such a corpus exactly on the GPU anyway. The collection is created as ``drzero adopt
--faiss-index`` creates one (its metadata says ``drzero:vectors = side-file``, each record holds a one-number
placeholder embedding) and each batch's vectors and ids are appended to the side file (drzero.corpus.vector_file,
which grows: the count is not known beforehand). A collection keeps the mode it was created in: an ingest into a
side-file collection uses its side file without the flag, and the other mode asked for is refused.

Resuming after a kill -9 gives the store an uninterrupted run gives. Each batch is written in this order: its rows
and ids to the side file, the checkpoint that counts them (meta.json), then its documents to Chroma. So the side
file can hold rows Chroma never received (the batch or few in flight at the kill), never the other way round. When
the next ingest opens the writer, ``reconcile`` drops those rows before anything is written; the ingest then
embeds what Chroma lacks, as any resumed ingest does. Each ingest that wrote the file finishes it (marks it
complete, so the retriever serves it) and the next one reopens it to append.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from drzero.config import ConfigError
from drzero.corpus.store import CorpusStore, StoreError
from drzero.corpus.vector_file import (META_VECTORS, PLACEHOLDER_SETTINGS, SIDE_FILE, VectorFile, VectorFileWriter,
                                       has_side_file, placeholders, read_meta, vector_dir)
from drzero.store_location import is_server_address

log = logging.getLogger(__name__)

CHROMA = "chroma"
VECTOR_MODES = (CHROMA, SIDE_FILE)


def refuse_side_file_on_server(asked: str | None, db: str) -> None:
    """ConfigError for --vectors side-file into a Chroma server, which has no directory beside it for the file."""
    if asked == SIDE_FILE and is_server_address(db):
        raise ConfigError(f"--vectors side-file writes the vectors to a file beside the store, which the Chroma "
                          f"server {db} has no place for; pass a directory as --db, or leave --vectors out.")


def vectors_mode(asked: str | None, store: CorpusStore | None, db: str, collection: str) -> str:
    """Where this ingest writes the vectors: an existing collection's own place (refusing ``--vectors`` asking for
    the other), ``asked`` (default chroma) for a new one."""
    if store is None:
        return asked or CHROMA
    own = SIDE_FILE if has_side_file(store) else CHROMA
    if asked is not None and asked != own:
        where = "its vector side file" if own == SIDE_FILE else "Chroma"
        raise StoreError(f"collection {collection!r} in {db} keeps its vectors in {where}, so --vectors {asked} "
                         f"cannot add to it; leave --vectors out, or pass another --collection.")
    return own


def collection_metadata(mode: str) -> dict | None:
    """The metadata a new collection of this mode is created with, over the embedder's (as adopt_faiss creates)."""
    return {**PLACEHOLDER_SETTINGS, META_VECTORS: SIDE_FILE} if mode == SIDE_FILE else None


class SideFileStore(CorpusStore):
    """The collection, writing each batch's vectors to its side file and placeholders to Chroma."""

    def __init__(self, store: CorpusStore, writer: VectorFileWriter):
        super().__init__(store.collection, store.path)
        self.writer = writer

    @classmethod
    def open(cls, store: CorpusStore, dimension: int, embedder: str) -> "SideFileStore":
        """The collection's side file opened to append (started when there is none), cut back to what Chroma holds."""
        directory = vector_dir(store.path, store.collection.name)
        record = read_meta(directory)
        if record is not None and record["count"] is not None:
            raise StoreError(f"collection {store.collection.name!r} in {store.path} was adopted from a FAISS index: "
                             f"its side file holds the index's {record['count']} rows and takes no more; ingest into "
                             f"another --collection.")
        writer = VectorFileWriter.open(directory, dimension, embedder=embedder)
        writer.reopen()
        dropped = reconcile(writer, store)
        if dropped:
            log.info("dropped the last %d rows of the vector side file %s: their passages never reached the "
                     "collection (an ingest stopped between the two writes); they are embedded again", dropped,
                     writer.directory)
        return cls(store, writer)

    def add(self, ids: list[str], contents: list[str], metadatas: list[dict], embeddings: np.ndarray) -> None:
        """Rows and ids into the side file and counted there (durable) first, then the documents into Chroma."""
        start = self.writer.rows
        self.writer.append(np.asarray(embeddings, dtype=np.float32), list(ids))
        super().add(ids, contents, metadatas, placeholders(range(start, start + len(ids))))

    def finish(self) -> VectorFile:
        """The side file marked complete: the retriever serves it; the next ingest reopens it."""
        return self.writer.finish()


def reconcile(writer: VectorFileWriter, store: CorpusStore) -> int:
    """Drop the side file's rows whose passages the collection does not hold; returns how many.

    By the write order they are the last rows (the fast path looks at those only); anything else is found by
    comparing every id. Passages the collection holds that the side file lacks are refused: the write order never
    leaves them, and their vectors are nowhere."""
    if writer.rows != writer.id_rows:  # vectors whose ids were never written
        writer.truncate(min(writer.rows, writer.id_rows))
    held, rows = store.count(), writer.id_rows
    if held <= rows:
        ids = writer.ids_from(max(held - 1, 0))
        last, tail = (ids[:1], ids[1:]) if held else ([], ids)
        if not store.existing_ids(tail) and len(store.existing_ids(last)) == len(last):
            writer.truncate(held)
            return len(tail)
    side_ids = writer.ids_from(0)
    in_chroma = set(store.all_ids())
    lacking = in_chroma.difference(side_ids)
    if lacking:
        raise StoreError(f"collection {store.collection.name!r} in {store.path} holds {len(lacking)} passages that "
                         f"its vector side file {writer.directory} lacks (such as {min(lacking)!r}), which an ingest "
                         f"never leaves; ingest into a fresh --db.")
    writer.retain(_first_held(side_ids, in_chroma))
    return rows - writer.id_rows


def _first_held(ids: Sequence[str], held: set[str]) -> list[int]:
    """The rows whose id ``held`` has, each id's first row only."""
    seen: set[str] = set()
    keep = []
    for row, passage_id in enumerate(ids):
        if passage_id in held and passage_id not in seen:
            seen.add(passage_id)
            keep.append(row)
    return keep


def check_side_file(store: CorpusStore, whole: bool) -> str:
    """The index check of a side-file collection: its side file finished (an unfinished one, what a killed ingest
    leaves, reconciled first) and holding the collection's ids: every one when ``whole``, a sample otherwise."""
    directory = vector_dir(store.path, store.collection.name)
    if directory is None:
        raise StoreError(f"collection {store.collection.name!r} keeps its vectors in a side file, which a store "
                         f"behind a URL cannot reach.")
    record = read_meta(directory)
    if record is not None and not record["complete"] and record["count"] is None:  # an ingest's (adopt's has one)
        log.warning("the vector side file %s of collection %r was left unfinished by a stopped ingest; finishing it",
                    directory, store.collection.name)
        SideFileStore.open(store, record["dimension"], record["embedder"]).finish()
    return VectorFile.open(directory).verify_ids(store, None if whole else 64)
