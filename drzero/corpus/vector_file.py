"""The vector side file: a collection's vectors in a NumPy ``.npy`` beside the store, for exact search on the GPU.

    <db>/vectors/<collection>/vectors.npy   rows in collection order, float32 (or float16), (count, dimension)
    <db>/vectors/<collection>/ids.txt       row -> passage id, one a line; absent when the ids are "0".."N-1"
    <db>/vectors/<collection>/meta.json     count, dimension, dtype, embedder, rows written, complete

Why: at the paper's scale (wiki-18, 21 M passages) Chroma's HNSW build and its ``get`` pages are what take hours;
a flat file is written at disk speed, memory-mapped (never read whole into RAM) and copied to the GPU in chunks.
Chroma keeps the documents and their metadata; a collection whose vectors live here says so in its metadata
(``drzero:vectors = side-file``) and holds a one-number placeholder per record (``drzero adopt --faiss-index``).

Writing resumes after a kill -9: the rows go into the memory-mapped file first, the ids after them, and only then
does ``meta.json`` (written atomically) count them; a rerun opens the writer again and carries on from the counted
rows. ``drzero ingest --vectors side-file`` writes one too (drzero.corpus.side_file_ingest): its count is unknown,
so the file grows; a finished one is reopened for the rows of the next ingest, and ``truncate``/``retain`` drop
the rows a kill left that the collection never received. Ids equal to their row number (wiki-18's
``"0"``..``"21015323"``) are recorded as ``"sequential"`` instead of 21 M strings.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from drzero.atomic import write_json_atomically
from drzero.corpus.store import CorpusStore, StoreError
from drzero.records import DamagedRecord, OneOf, Optional, read_record
from drzero.store_location import parse_db

log = logging.getLogger(__name__)

META_VECTORS = "drzero:vectors"  # collection metadata: where its vectors are
SIDE_FILE = "side-file"          # ... in the vector side file; Chroma's own are placeholders
DTYPES = ("float32", "float16")
MIN_CAPACITY = 1 << 16           # rows a file of unknown length grows by at least (it doubles)
# One-number placeholder per record; an L2 HNSW over scalars with few links is quick to build and never searched.
PLACEHOLDER_SETTINGS = {"hnsw:space": "l2", "hnsw:construction_ef": 16, "hnsw:M": 4, "hnsw:search_ef": 16}

META_SHAPE = {"format": int, "count": Optional(int), "dimension": int, "dtype": OneOf(*DTYPES), "embedder": str,
              "complete": bool, "rows": int, "id_rows": int, "ids": OneOf("sequential", "file"),
              "ids_bytes": int}


def vector_dir(db: Path | str, collection: str) -> Path | None:
    """Where ``collection``'s side file lives: ``<db>/vectors/<collection>``; None for a store behind a URL."""
    location = parse_db(db)
    if location.is_server:
        return None
    return location.path.expanduser() / "vectors" / collection


def has_side_file(store: CorpusStore) -> bool:
    """Whether the collection's metadata says that its vectors live in the side file."""
    return (store.collection.metadata or {}).get(META_VECTORS) == SIDE_FILE


def placeholders(rows: range) -> np.ndarray:
    """The one-number embeddings Chroma holds for the side file's ``rows`` (its real vectors are in the file)."""
    return ((np.arange(rows.start, rows.stop) % 1000 + 1) / 1000).astype(np.float32)[:, None]


class SequentialIds(Sequence[str]):
    """Row ``r``'s id is ``str(r)``: the ids of wiki-18 without 21 M strings in memory."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [str(r) for r in range(*row.indices(self.count))]
        row = int(row)
        if not -self.count <= row < self.count:
            raise IndexError(row)
        return str(row % self.count)


def read_meta(directory: Path) -> dict | None:
    """The side file's record (meta.json) in ``directory``; None when none was begun there."""
    try:
        return read_record(directory / "meta.json", META_SHAPE)
    except DamagedRecord as damage:
        raise StoreError(f"the vector side file's record {directory / 'meta.json'} is damaged ({damage}); delete "
                         f"{directory} and write the vectors again.") from None


def _header(path: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
    """Rewrite the ``.npy`` header for ``shape``; numpy leaves room in the header for the first axis to grow."""
    before = _data_offset(path)
    with open(path, "r+b") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": dtype.str, "fortran_order": False, "shape": shape})
        if handle.tell() != before:
            raise StoreError(f"could not resize the header of {path}; delete its directory and write it again.")


def _data_offset(path: Path) -> int:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(handle)
        return handle.tell()


class VectorFileWriter:
    """Append rows (and their ids) to a side file, resumable; ``finish`` marks it complete.

    ``count`` when known (adopt) sizes the file at once; unknown (ingest), it grows by doubling and is cut to the
    rows written at ``finish``."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta
        self.path = directory / "vectors.npy"
        self.dtype = np.dtype(meta["dtype"])
        self._matrix = np.lib.format.open_memmap(self.path, mode="r+")
        ids_path = directory / "ids.txt"
        if meta["ids"] == "file":  # drop ids a kill left past the counted ones
            with open(ids_path, "r+b") as handle:
                handle.truncate(meta["ids_bytes"])
        self._ids = open(ids_path, "ab") if meta["ids"] == "file" else None

    @classmethod
    def open(cls, directory: Path | str, dimension: int, *, embedder: str, dtype: str = "float32",
             count: int | None = None) -> "VectorFileWriter":
        """A writer that resumes the file in ``directory`` when it was begun with the same settings, or starts it."""
        directory = Path(directory)
        meta = read_meta(directory)
        wanted = {"dimension": dimension, "dtype": dtype, "embedder": embedder, "count": count}
        if meta is not None and (directory / "vectors.npy").is_file():
            differs = {k: (meta[k], v) for k, v in wanted.items() if meta[k] != v}
            if differs:
                said = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differs.items())
                raise StoreError(f"the vector side file in {directory} was begun with {said}; delete {directory} "
                                 f"to write it again with the new settings.")
            return cls(directory, meta)
        directory.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(directory / "vectors.npy", mode="w+", dtype=np.dtype(dtype),
                                  shape=(count if count is not None else MIN_CAPACITY, dimension)).flush()
        meta = {"format": 1, **wanted, "complete": False, "rows": 0, "id_rows": 0, "ids": "sequential",
                "ids_bytes": 0}
        write_json_atomically(meta, directory / "meta.json")
        return cls(directory, meta)

    def reopen(self) -> None:
        """Take more rows after a ``finish`` (an ingest adding to its collection); a file of fixed count cannot."""
        if self.complete:
            if self.meta["count"] is not None:
                raise StoreError(f"the vector side file in {self.directory} holds the {self.meta['count']} rows it "
                                 f"was begun for; it takes no more.")
            self.meta["complete"] = False
            self.checkpoint()

    @property
    def rows(self) -> int:
        """Vectors written (and counted in meta.json)."""
        return self.meta["rows"]

    @property
    def id_rows(self) -> int:
        """Ids written (and counted in meta.json)."""
        return self.meta["id_rows"]

    @property
    def complete(self) -> bool:
        return self.meta["complete"]

    def append(self, vectors: np.ndarray, ids: list[str]) -> None:
        """Rows and their ids together (ingest's path)."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.append_vectors(vectors, checkpoint=False)
        self.append_ids(ids)

    def append_vectors(self, vectors: np.ndarray, checkpoint: bool = True) -> None:
        """The next rows, in collection order (adopt copies every vector before the ids)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.meta["dimension"]:
            raise ValueError(f"rows of shape {vectors.shape} do not fit a {self.meta['dimension']}-dimensional file")
        self._require_open()
        start, end = self.rows, self.rows + len(vectors)
        if end > self._matrix.shape[0]:
            self._grow(end)
        self._matrix[start:end] = vectors
        self.meta["rows"] = end
        if checkpoint:
            self.checkpoint()

    def append_ids(self, ids: list[str]) -> None:
        """The next rows' ids; stays "sequential" while every id is its row number."""
        self._require_open()
        start = self.id_rows
        if self._ids is None and any(i != str(start + n) for n, i in enumerate(ids)):
            self._ids = open(self.directory / "ids.txt", "wb")
            self._write_ids([str(r) for r in range(start)])
            self.meta["ids"] = "file"
        if self._ids is not None:
            self._write_ids(ids)
        self.meta["id_rows"] = start + len(ids)
        self.checkpoint()

    def _write_ids(self, ids: list[str]) -> None:
        if any("\n" in i for i in ids):
            raise ValueError("a passage id holds a newline; ids.txt keeps one id a line")
        data = "".join(i + "\n" for i in ids).encode()
        self._ids.write(data)
        self.meta["ids_bytes"] += len(data)

    def ids_from(self, row: int) -> list[str]:
        """The ids of rows ``row`` to the last counted one, read from the end of ids.txt (a resume needs the last
        few of millions)."""
        return self._id_tail(self.id_rows - row)[1]

    def _id_tail(self, count: int) -> tuple[int, list[str]]:
        """(where the last ``count`` ids begin in ids.txt, those ids)."""
        end = self.meta["ids_bytes"]
        if count <= 0:
            return end, []
        if self.meta["ids"] == "sequential":
            return 0, [str(r) for r in range(self.id_rows - count, self.id_rows)]
        if self._ids is not None:
            self._ids.flush()
        start, block, data = end, 1 << 16, b""
        with open(self.directory / "ids.txt", "rb") as handle:
            # count + 1 newlines make the last count lines whole (the line before them ends in the data read)
            while start > 0 and data.count(b"\n") <= count:
                start = max(0, start - block)
                block *= 2
                handle.seek(start)
                data = handle.read(end - start)
        lines = data.split(b"\n")[:-1][-count:]
        return end - sum(len(line) + 1 for line in lines), [line.decode() for line in lines]

    def truncate(self, rows: int) -> None:
        """Forget every row from ``rows`` on, and its id (durably, like an append)."""
        if not 0 <= rows <= min(self.rows, self.id_rows):
            raise ValueError(f"cannot cut {self.rows} rows with {self.id_rows} ids to {rows}")
        self._require_open()
        if self.meta["ids"] == "file":
            offset, _ = self._id_tail(self.id_rows - rows)
            self._ids.truncate(offset)
            self._ids.seek(offset)  # a file begun here was opened "wb": its next ids are written where it points
            self.meta["ids_bytes"] = offset
        self.meta["rows"] = self.meta["id_rows"] = rows
        self.checkpoint()

    def retain(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending), moving the later ones down in order: a resume's repair when the rows a
        kill left unreceived are not all at the end. The moved rows are read into memory (a few batches)."""
        keep = np.asarray(rows, dtype=np.int64)
        shifted = np.flatnonzero(keep != np.arange(len(keep)))
        first = int(shifted[0]) if len(shifted) else len(keep)   # rows before it stay where they are
        moved = keep[first:]
        if not len(moved):
            self.truncate(first)
            return
        vectors = np.array(self._matrix[moved])
        later = self.ids_from(first)
        ids = [later[r - first] for r in moved.tolist()]
        self.truncate(first)
        self.append(vectors, ids)

    def _require_open(self) -> None:
        if self.complete:
            raise StoreError(f"the vector side file in {self.directory} is complete; delete it to write it again.")

    def _grow(self, rows: int) -> None:
        if self.meta["count"] is not None:
            raise StoreError(f"{rows} rows do not fit the {self.meta['count']} the side file in {self.directory} "
                             f"was begun for.")
        self._resize(max(rows, 2 * self._matrix.shape[0], MIN_CAPACITY))

    def _resize(self, capacity: int) -> None:
        self._matrix.flush()
        del self._matrix
        shape = (capacity, self.meta["dimension"])
        _header(self.path, shape, self.dtype)
        os.truncate(self.path, _data_offset(self.path) + capacity * shape[1] * self.dtype.itemsize)
        self._matrix = np.lib.format.open_memmap(self.path, mode="r+")

    def checkpoint(self) -> None:
        """Make what was appended durable, then count it in meta.json (the order a resume relies on)."""
        self._matrix.flush()
        if self._ids is not None:
            self._ids.flush()
            os.fsync(self._ids.fileno())
        write_json_atomically(self.meta, self.directory / "meta.json")

    def finish(self) -> "VectorFile":
        """Mark the file complete once every row has its id; cut a grown file to its rows."""
        rows = self.rows
        if self.id_rows != rows or (self.meta["count"] is not None and rows != self.meta["count"]):
            raise StoreError(f"the vector side file in {self.directory} holds {rows} vectors and {self.id_rows} ids "
                             f"of {self.meta['count'] or rows}; write the rest before finishing it.")
        if not self.complete:
            if self._matrix.shape[0] != rows:
                self._resize(rows)
            self.meta["complete"] = True
            self.checkpoint()
        self.close()
        return VectorFile.open(self.directory)

    def close(self) -> None:
        if self._ids is not None:
            self._ids.close()
            self._ids = None


@dataclass
class VectorFile:
    """A complete side file: ``vectors`` memory-mapped read-only (pages are read as they are touched)."""

    directory: Path
    meta: dict
    vectors: np.ndarray
    ids: Sequence[str]

    @classmethod
    def open(cls, directory: Path | str) -> "VectorFile":
        directory = Path(directory)
        meta = read_meta(directory)
        if meta is None:
            raise StoreError(f"no vector side file in {directory}.")
        if not meta["complete"]:
            raise StoreError(f"the vector side file in {directory} is incomplete ({meta['rows']} vectors and "
                             f"{meta['id_rows']} ids written); run the command that wrote it again to finish it.")
        vectors = np.lib.format.open_memmap(directory / "vectors.npy", mode="r")
        if vectors.shape != (meta["rows"], meta["dimension"]):
            raise StoreError(f"{directory / 'vectors.npy'} holds {vectors.shape} but its record says "
                             f"{(meta['rows'], meta['dimension'])}; delete {directory} and write it again.")
        if meta["ids"] == "sequential":
            ids: Sequence[str] = SequentialIds(meta["rows"])
        else:
            ids = (directory / "ids.txt").read_bytes()[:meta["ids_bytes"]].decode().split("\n")[:-1]
        return cls(directory, meta, vectors, ids)

    @classmethod
    def of(cls, store: CorpusStore) -> "VectorFile | None":
        """The store's side file when its collection says its vectors live there; None otherwise."""
        if not has_side_file(store):
            return None
        directory = vector_dir(store.path, store.collection.name)
        if directory is None:
            raise StoreError(f"collection {store.collection.name!r} keeps its vectors in a side file, which a store "
                             f"behind a URL cannot reach.")
        return cls.open(directory)

    @property
    def dimension(self) -> int:
        return self.meta["dimension"]

    def __len__(self) -> int:
        return self.meta["rows"]

    def verify(self, store: CorpusStore, samples: int | None = 64, min_cosine: float = 0.999) -> str:
        """Compare ``samples`` rows, spread over the file, with the vectors Chroma holds for their ids; StoreError
        naming the first disagreement. Returns what was checked. A collection that holds placeholders is checked by
        its ids instead (``verify_ids``)."""
        if has_side_file(store):
            return self.verify_ids(store, samples)
        rows = self._sample(samples)
        wanted = [self.ids[r] for r in rows]
        got = store.collection.get(ids=wanted, include=["embeddings"])
        stored = dict(zip(got["ids"], np.asarray(got["embeddings"], dtype=np.float32)))
        for row, passage_id in zip(rows, wanted):
            if passage_id not in stored:
                raise StoreError(f"row {row} of the side file is passage {passage_id!r}, which the collection lacks.")
            mine, theirs = self.vectors[row].astype(np.float32), stored[passage_id]
            if mine.shape != theirs.shape:
                raise StoreError(f"the side file holds {mine.shape[0]}-dimensional vectors but the collection "
                                 f"{theirs.shape[0]}-dimensional ones.")
            cosine = float(mine @ theirs / max(np.linalg.norm(mine) * np.linalg.norm(theirs), 1e-12))
            if cosine < min_cosine:
                raise StoreError(f"row {row} of the side file (passage {passage_id!r}) differs from the collection's "
                                 f"vector (cosine {cosine:.4f} < {min_cosine}); write the side file again.")
        return f"{len(rows)} rows agree with the collection's vectors (cosine >= {min_cosine})"

    def verify_ids(self, store: CorpusStore, samples: int | None = 64) -> str:
        """The side file of a collection that holds placeholders: one row per passage, and the ids of ``samples``
        rows spread over the file (every id, None) in the collection; StoreError naming the first disagreement."""
        name, held = store.collection.name, store.count()
        if held != len(self):
            raise StoreError(f"collection {name!r} holds {held} passages but its vector side file {self.directory} "
                             f"{len(self)} vectors; run the ingest (or adopt) that wrote them again.")
        if samples is None:
            stray = sorted(set(store.all_ids()).symmetric_difference(self.ids))[:1]
            if stray or len(set(self.ids)) != held:
                example = f"passage {stray[0]!r} is in one only" if stray else "it repeats ids"
                raise StoreError(f"the ids of the vector side file {self.directory} differ from collection {name!r}'s "
                                 f"({example}); ingest into a fresh --db.")
            return f"the {held} ids of the side file are the collection's"
        rows = self._sample(samples)
        wanted = [self.ids[r] for r in rows]
        found = store.existing_ids(wanted)
        for row, passage_id in zip(rows, wanted):
            if passage_id not in found:
                raise StoreError(f"row {row} of the vector side file {self.directory} is passage {passage_id!r}, "
                                 f"which collection {name!r} lacks; ingest into a fresh --db.")
        return f"{held} passages and side-file rows; the ids of {len(rows)} rows found in the collection"

    def _sample(self, samples: int | None) -> np.ndarray:
        """``samples`` rows spread evenly over the file (every row, None)."""
        count = len(self) if samples is None else min(samples, len(self))
        return np.unique(np.linspace(0, len(self) - 1, num=count).astype(np.int64))
