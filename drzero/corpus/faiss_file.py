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
so Search-R1's and FlashRAG's ``e5_Flat.index`` read the same.) FAISS is not a dependency: the tests build indexes
with faiss-cpu to check this reader against the real writer.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

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
    """An IndexFlatIP / IndexFlatL2 file: its metric, shape and where its float32 rows start."""

    path: Path
    metric: str      # "inner product" or "L2"
    dimension: int
    count: int
    offset: int      # byte offset of row 0

    @classmethod
    def open(cls, path: Path | str) -> "FaissFlatFile":
        """Parse the header; StoreError (one sentence) for anything but a complete flat index."""
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                head = handle.read(_HEADER.size + 12)
            size = path.stat().st_size
        except OSError as error:
            raise StoreError(f"cannot read the FAISS index {path}: {error.strerror or error}.") from None
        if len(head) < _HEADER.size + 8:
            raise StoreError(f"{path} is {size} bytes, too short for a FAISS index header.")
        fourcc, dimension, count, _, _, _, metric_type = _HEADER.unpack_from(head)
        if fourcc not in FLAT:
            kind = OTHER_KINDS.get(fourcc, f"not a FAISS flat index (it starts with {fourcc!r})")
            raise StoreError(f"{path} is {kind}, not IndexFlatIP or IndexFlatL2: adopt copies exact vectors, which "
                             f"only a flat index holds; export a flat index (faiss.IndexFlatIP) of the same corpus.")
        at = _HEADER.size + (4 if metric_type > 1 else 0)
        (floats,) = struct.unpack_from("<Q", head, at)
        at += 8
        if dimension <= 0 or count < 0 or floats != count * dimension:
            raise StoreError(f"{path} is a damaged FAISS flat index: its header says {count} vectors of dimension "
                             f"{dimension} but {floats} floats follow.")
        if size != at + 4 * floats:
            raise StoreError(f"{path} is {size:,} bytes but a flat index of {count:,} x {dimension} float32 vectors "
                             f"is {at + 4 * floats:,}; the file is truncated or damaged (download it again).")
        return cls(path, FLAT[fourcc], dimension, count, at)

    @property
    def nbytes(self) -> int:
        return self.count * self.dimension * 4

    def vectors(self) -> np.ndarray:
        """All rows, memory-mapped read-only, read ahead sequentially (rows start unaligned: copy before math)."""
        matrix = np.memmap(self.path, dtype="<f4", mode="r", offset=self.offset, shape=(self.count, self.dimension))
        raw = getattr(matrix, "_mmap", None)
        if raw is not None and hasattr(raw, "madvise"):
            raw.madvise(mmap.MADV_SEQUENTIAL)
        return matrix
