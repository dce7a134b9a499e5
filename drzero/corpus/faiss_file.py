"""A FAISS flat index file read without FAISS: its header parsed, its vectors memory-mapped.

``faiss.write_index`` writes an ``IndexFlatIP`` / ``IndexFlatL2`` as (little-endian, no padding):

    fourcc      4 bytes   b"IxFI" (inner product) or b"IxF2" (L2); b"IxFl" for the other metrics
    d           int32     dimension
    ntotal      int64     vectors
    dummy       int64 x 2 (1 << 20 each; unused)
    is_trained  uint8
    metric_type int32     0 inner product, 1 L2; > 1 is followed by metric_arg (float32)
    size        uint64    floats that follow = ntotal x d
    codes       float32 x size, row after row

(faiss/impl/index_write.cpp: ``write_index_header`` and the ``IndexFlat`` branch, unchanged from faiss 1.7 to 1.15,
so Search-R1's and FlashRAG's ``e5_Flat.index`` read the same.) An index published in parts (Search-R1's
``part_aa`` and ``part_ab``, which ``cat`` joins into ``e5_Flat.index``) is read as their concatenation, in the order
given, without writing the joined file: rows that straddle two parts are read from both. FAISS is not a dependency: the tests build indexes
with faiss-cpu to check this reader against the real writer.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from drzero.corpus.store import StoreError

FLAT = {b"IxFI": "inner product", b"IxF2": "L2"}
# What other common fourccs hold, for the refusal's sentence.
OTHER_KINDS = {b"IxFl": "a flat index with a metric other than inner product or L2",
               b"IHNf": "an HNSW index (IndexHNSWFlat)", b"IHNp": "an HNSW index over PQ codes",
               b"IHNs": "an HNSW index over scalar-quantized codes", b"IwFl": "an IVF index (IndexIVFFlat)",
               b"IwPQ": "an IVF-PQ index", b"IwSq": "an IVF scalar-quantizer index", b"IxPQ": "a PQ index",
               b"IxSQ": "a scalar-quantizer index", b"IxMp": "an IndexIDMap", b"IxM2": "an IndexIDMap2",
               b"IxPT": "an index behind a PCA/OPQ transform (IndexPreTransform)", b"IxHe": "a binary index"}
_HEADER = struct.Struct("<4siqqqBi")  # fourcc, d, ntotal, dummy, dummy, is_trained, metric_type


@dataclass(frozen=True)
class FaissFlatFile:
    """An IndexFlatIP / IndexFlatL2 file (or the parts of one): its metric, shape and where its float32 rows start."""

    path: Path
    metric: str      # "inner product" or "L2"
    dimension: int
    count: int
    offset: int      # byte offset of row 0 (in the concatenation of the parts)
    parts: tuple[Path, ...] = field(default=())  # the files, in order; () for one file

    @classmethod
    def open(cls, paths: Path | str | Sequence[Path | str]) -> "FaissFlatFile":
        """Parse the header; StoreError (one sentence) for anything but a complete flat index."""
        files = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        if not files:
            raise StoreError("no FAISS index file given.")
        path = files[0]
        named = path if len(files) == 1 else f"{path} (+ {len(files) - 1} more parts)"
        try:
            with open(path, "rb") as handle:
                head = handle.read(_HEADER.size + 12)
            size = sum(p.stat().st_size for p in files)
        except OSError as error:
            raise StoreError(f"cannot read the FAISS index {error.filename or path}: "
                             f"{error.strerror or error}.") from None
        if len(head) < _HEADER.size + 8:
            raise StoreError(f"{path} is {size} bytes, too short for a FAISS index header.")
        fourcc, dimension, count, _, _, _, metric_type = _HEADER.unpack_from(head)
        if fourcc not in FLAT:
            kind = OTHER_KINDS.get(fourcc, f"not a FAISS flat index (it starts with {fourcc!r})")
            later = " (the parts of a split index go in order: the first one holds the header)" if len(files) > 1 else ""
            raise StoreError(f"{path} is {kind}, not IndexFlatIP or IndexFlatL2{later}: adopt copies exact vectors, "
                             f"which only a flat index holds; export a flat index (faiss.IndexFlatIP) of the same "
                             f"corpus.")
        at = _HEADER.size + (4 if metric_type > 1 else 0)
        (floats,) = struct.unpack_from("<Q", head, at)
        at += 8
        if dimension <= 0 or count < 0 or floats != count * dimension:
            raise StoreError(f"{named} is a damaged FAISS flat index: its header says {count} vectors of dimension "
                             f"{dimension} but {floats} floats follow.")
        if size != at + 4 * floats:
            missing = " or a part is missing" if len(files) > 1 else ""
            raise StoreError(f"{named} is {size:,} bytes but a flat index of {count:,} x {dimension} float32 vectors "
                             f"is {at + 4 * floats:,}; the file is truncated or damaged{missing} (download it again).")
        return cls(path, FLAT[fourcc], dimension, count, at, tuple(files) if len(files) > 1 else ())

    @property
    def name(self) -> str:
        """The file's name, or its parts' joined with '+'."""
        return "+".join(p.name for p in self.parts) if self.parts else self.path.name

    @property
    def location(self) -> str:
        """The file's path, or its parts' paths joined with ' + ' (for sentences about it)."""
        return " + ".join(map(str, self.parts)) if self.parts else str(self.path)

    @property
    def nbytes(self) -> int:
        return self.count * self.dimension * 4

    def vectors(self) -> "np.ndarray | PartedRows":
        """All rows, memory-mapped read-only, read ahead sequentially (rows start unaligned: copy before math); the
        parts of a split index as ``PartedRows``, which reads the rows asked for."""
        if self.parts:
            return PartedRows(self.parts, self.offset, self.count, self.dimension)
        matrix = np.memmap(self.path, dtype="<f4", mode="r", offset=self.offset, shape=(self.count, self.dimension))
        raw = getattr(matrix, "_mmap", None)
        if raw is not None and hasattr(raw, "madvise"):
            raw.madvise(mmap.MADV_SEQUENTIAL)
        return matrix


class PartedRows:
    """The float32 rows of an index split over several files, indexed as a (count, dimension) array: a slice or a
    list of row numbers reads those rows (with ``os.pread``, across a part boundary when a row straddles one)."""

    def __init__(self, parts: Sequence[Path], offset: int, count: int, dimension: int):
        self.parts = list(parts)
        self.sizes = [p.stat().st_size for p in self.parts]
        self.starts = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.offset, self.shape, self.row_bytes = offset, (count, dimension), 4 * dimension

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, begin: int, length: int) -> bytes:
        """``length`` bytes at ``begin`` of the concatenated parts."""
        out = bytearray()
        for path, start, size in zip(self.parts, self.starts, self.sizes):
            if begin + len(out) >= start + size or len(out) == length:
                continue
            at = begin + len(out) - start
            with open(path, "rb") as handle:
                out += os.pread(handle.fileno(), min(length - len(out), size - at), at)
        return bytes(out)

    def __getitem__(self, rows) -> np.ndarray:
        count, dimension = self.shape
        if isinstance(rows, slice):
            begin, end, step = rows.indices(count)
            if step != 1:
                raise IndexError("PartedRows reads contiguous slices only")
            data = self._read(self.offset + begin * self.row_bytes, max(0, end - begin) * self.row_bytes)
            return np.frombuffer(data, dtype="<f4").reshape(-1, dimension)
        picked = [self[int(r):int(r) + 1] for r in np.atleast_1d(rows)]
        return np.concatenate(picked) if picked else np.zeros((0, dimension), dtype="<f4")
