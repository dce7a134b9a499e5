"""Exact (brute-force) cosine search over the collection's vectors, on the GPU, sharded over GPUs when needed.

Chroma stays the store of record for the passages' text, fetched from it by id for each batch. The vectors come
from one of two places: Chroma itself (read once at start through its ``get`` pages, fine up to a few million), or
the collection's vector side file (``drzero.corpus.vector_file``: memory-mapped and copied to the GPU in chunks,
how a 21 M-passage corpus such as wiki-18 loads in minutes). On a GPU a matrix product over every vector is both
exact and faster than Chroma's HNSW on the CPU: scoring a batch of 256 queries against 1M x 1,024 fp16 vectors
takes a few milliseconds, while the HNSW walk costs about a millisecond of CPU per query.

Precision: ``fp32`` keeps the rows as stored and takes the products in fp32 (TF32 off), so the ranking is exactly
that of a brute-force search. ``fp16`` halves the memory (wiki-18 x e5-large-v2: 40 GiB instead of 80): the rows
are rounded to fp16, the products accumulate and come out in fp32 where the GPU's matmul can (``out_dtype``), and
the top ``rescore`` x k candidates of each query are re-scored in fp32 from the side file's float32 rows (read
from its memory map: a few thousand rows per batch). Scores that come out in fp16 round cosines near 0.8 to steps
of 0.0005, which is where e5's neighbours differ: measured earlier on the H200 with fp16 scores, even re-scoring
64 candidates in fp32 reached only recall@3 0.9 on 87k e5-large vectors. ``benchmarks/exact_search.py`` measures
recall@3 of this path (fp32 products of fp16 rows) with and without re-scoring, and says which products it got.

Sharding: the rows are split evenly over the devices given (``--exact-devices``); each shard returns its top
candidates and the shards' lists are merged. One device is one shard, and the CPU runs the same code (tests).
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from drzero.corpus.store import CorpusStore, Hit, StoreError
from drzero.corpus.vector_file import VectorFile

log = logging.getLogger(__name__)

INDEXES = ("auto", "hnsw", "exact")
PRECISIONS = ("auto", "fp32", "fp16")
ROWS_PER_CHUNK = 1 << 18  # rows scored at once: 256 queries x 256k rows x 4 B = 256 MiB of scores
LOAD_BYTES = 256 << 20    # side-file rows read (by a pool of threads, a few ahead) per copy to the device
LOAD_THREADS = 4
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class IndexChoice:
    kind: str    # "hnsw" or "exact"
    reason: str  # one sentence for the log


def choose_index(requested: str, device: str, passages: int, dimension: int, max_gib: float,
                 free_bytes: int | None, side_file: bool = False) -> IndexChoice:
    """``auto``: exact search when the encoder runs on CUDA and the vectors (fp32) fit in ``max_gib`` and in
    half the GPU's free memory; Chroma's HNSW otherwise. An explicit ``exact`` on the CPU is allowed (small
    corpora, tests); ``exact`` that does not fit is refused by the caller's memory check, not silently changed.
    A collection whose vectors live in a side file is always searched exactly (Chroma holds placeholders)."""
    size = passages * dimension * 4
    gib = size / 2**30
    if side_file:
        if requested == "hnsw":
            raise StoreError("this collection's vectors live in its vector side file (Chroma holds placeholders: "
                             "adopt --faiss-index or ingest --vectors side-file), so it has no HNSW index to search; "
                             "serve it with --index exact or auto.")
        return IndexChoice("exact", f"exact search over the {passages} vectors of the collection's side file")
    if requested == "hnsw":
        return IndexChoice("hnsw", "Chroma's HNSW index (--index hnsw)")
    if requested == "exact":
        return IndexChoice("exact", f"exact search over {passages} stored vectors on {device} ({gib:.2f} GiB) "
                                    f"(--index exact)")
    if not device.startswith("cuda"):
        return IndexChoice("hnsw", "Chroma's HNSW index (the encoder runs on the CPU)")
    if gib > max_gib:
        return IndexChoice("hnsw", f"Chroma's HNSW index: the {passages} vectors need {gib:.1f} GiB on the GPU, "
                                   f"over --exact-max-gib {max_gib:g}")
    if free_bytes is not None and size > free_bytes / 2:
        return IndexChoice("hnsw", f"Chroma's HNSW index: the {passages} vectors need {gib:.1f} GiB, over half "
                                   f"of the GPU's free {free_bytes / 2**30:.1f} GiB")
    return IndexChoice("exact", f"exact search over {passages} stored vectors on the GPU ({gib:.2f} GiB)")


def plan_shards(size_bytes: int, devices: list[str], free: list[int | None], share: float = 0.9) -> list[str]:
    """The fewest of ``devices`` (in order) whose equal shards fit ``share`` of each one's free memory (None: the
    CPU, always fits); StoreError when even all of them are too small."""
    for used in range(1, len(devices) + 1):
        if all(f is None or size_bytes / used <= share * f for f in free[:used]):
            return devices[:used]
    said = ", ".join(f"{d}: {f / 2**30:.1f} GiB free" for d, f in zip(devices, free) if f is not None)
    raise StoreError(f"the exact index needs {size_bytes / 2**30:.1f} GiB and the devices given cannot hold it in "
                     f"{len(devices)} shards ({said}); pass more --exact-devices or --exact-precision fp16.")


@dataclass
class Shard:
    start: int     # first row
    matrix: object  # torch tensor (rows, d) on its device, fp32 or fp16


class ExactIndex:
    """Every vector in device matrices (one per shard); ``search`` returns (row numbers, fp32 scores) best first."""

    def __init__(self, ids: Sequence[str], shards: list[Shard], precision: str = "fp32", rescore: int = 0,
                 fp32_rows: np.ndarray | None = None):
        self.ids = ids
        self.shards = shards
        self.precision = precision
        # re-scoring needs float32 rows to read (the side file's memory map)
        self.rescore = rescore if precision == "fp16" and fp32_rows is not None else 0
        self.fp32_rows = fp32_rows

    @classmethod
    def from_matrix(cls, ids: Sequence[str], vectors, device: str) -> "ExactIndex":
        """One fp32 shard on ``device`` from an (n, d) tensor."""
        import torch  # seconds to import: only the exact index needs it, not `drzero --help`

        return cls(ids, [Shard(0, vectors.to(device=device, dtype=torch.float32).contiguous())])

    @classmethod
    def from_store(cls, store: CorpusStore, device: str, page: int = 20_000) -> "ExactIndex":
        """The vectors Chroma holds, read through its pages, in fp32 on ``device``."""
        import torch  # see from_matrix

        started = time.perf_counter()
        total = store.count()
        ids: list[str] = []
        parts = []
        for batch_ids, batch_vectors in store.iter_embeddings(batch=page):
            ids += batch_ids
            parts.append(torch.from_numpy(batch_vectors).to(device=device, dtype=torch.float32))
            if len(ids) % (10 * page) < page and len(ids) < total:
                log.info("exact index: %d of %d vectors loaded (%.0fs)", len(ids), total,
                         time.perf_counter() - started)
        matrix = torch.cat(parts) if parts else torch.zeros((0, 0), dtype=torch.float32, device=device)
        index = cls.from_matrix(ids, matrix, device)
        log.info("exact index: %d vectors of dimension %d on %s in %.1fs", len(ids), matrix.shape[-1], device,
                 time.perf_counter() - started)
        return index

    @classmethod
    def from_vector_file(cls, side: VectorFile, devices: list[str], precision: str = "fp16",
                         rescore: int = 4) -> "ExactIndex":
        """The side file's rows split evenly over ``devices``, read from its memory map in chunks (never whole into
        RAM); ``rescore`` x k fp16 candidates re-scored in fp32 (0: none; needs a float32 file)."""
        import torch  # see from_matrix

        started = time.perf_counter()
        matrix, dimension = side.vectors, side.dimension
        dtype = torch.float16 if precision == "fp16" else torch.float32
        bounds = np.linspace(0, len(side), len(devices) + 1).astype(np.int64)
        step = max(1, LOAD_BYTES // (dimension * matrix.dtype.itemsize))
        shards = []
        with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load") as readers:
            for device, begin, end in zip(devices, bounds[:-1], bounds[1:]):
                shard = torch.empty((int(end - begin), dimension), dtype=dtype, device=device)
                starts = list(range(int(begin), int(end), step))
                ahead = [readers.submit(_read_rows, matrix, a, min(a + step, int(end))) for a in starts[:LOAD_THREADS]]
                for n, a in enumerate(starts):
                    block = ahead.pop(0).result()
                    if n + LOAD_THREADS < len(starts):
                        b = starts[n + LOAD_THREADS]
                        ahead.append(readers.submit(_read_rows, matrix, b, min(b + step, int(end))))
                    shard[a - begin:a - begin + len(block)].copy_(torch.from_numpy(block).to(device))
                shards.append(Shard(int(begin), shard))
                log.info("exact index: shard of rows %d-%d on %s (%.1f GiB %s)", begin, end, device,
                         shard.numel() * shard.element_size() / 2**30, precision)
        seconds = time.perf_counter() - started
        log.info("exact index: %d vectors of dimension %d from %s in %.1f s (%.2f GB/s)", len(side), dimension,
                 side.directory, seconds, matrix.nbytes / 1e9 / max(seconds, 1e-9))
        fp32_rows = matrix if matrix.dtype == np.float32 else None
        if precision == "fp16" and rescore and fp32_rows is None:
            log.info("exact index: no float32 rows to re-score with (the side file is %s)", matrix.dtype)
        return cls(side.ids, shards, precision, rescore, fp32_rows)

    @classmethod
    def over_memory_map(cls, side: VectorFile) -> "ExactIndex":
        """The side file searched where it lies, on the CPU, without copying it (``drzero search --db``)."""
        import torch  # see from_matrix

        with warnings.catch_warnings():  # torch warns that the read-only map is not writable; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.from_numpy(side.vectors)
        return cls(side.ids, [Shard(0, matrix)], "fp32" if side.vectors.dtype == np.float32 else "fp16")

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: an (n, d) fp32 tensor (any device). Returns (n, k) row numbers and fp32 cosine scores."""
        import torch  # see from_matrix

        k = min(topk, len(self.ids))
        wanted = min(len(self.ids), k * self.rescore) if self.rescore else k
        with torch.inference_mode():
            # every shard is started before any is waited for: the GPUs work at once
            found = [_shard_topk(queries, shard, wanted) for shard in self.shards]
            scores = torch.cat([s.float().cpu() for s, _ in found], dim=1)
            rows = torch.cat([r.cpu() for _, r in found], dim=1)
            if len(found) > 1:  # each shard's best, merged
                scores, keep = torch.topk(scores, min(wanted, scores.shape[1]), dim=1)
                rows = torch.gather(rows, 1, keep)
            scores, rows = scores.numpy(), rows.numpy()
        if self.rescore:
            return self._rescore(queries, rows, k)
        return rows, scores

    def _rescore(self, queries, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of each query's candidate ``rows`` by fp32 products with the float32 rows."""
        unique, where = np.unique(rows, return_inverse=True)
        exact = np.asarray(self.fp32_rows[unique], dtype=np.float32)[where.reshape(rows.shape)]
        q = queries.detach().float().cpu().numpy()
        scores = np.einsum("ncd,nd->nc", exact, q)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def hits(self, store: CorpusStore, queries, topk: int) -> list[list[Hit]]:
        """The top ``topk`` passages of each query, their text fetched from the store in one call."""
        rows, scores = self.search(queries, topk)
        wanted = sorted({self.ids[r] for r in rows.ravel()})
        found_ids, contents, metadatas = store.records(wanted) if wanted else ([], [], [])
        records = {i: (c, m) for i, c, m in zip(found_ids, contents, metadatas)}
        result = []
        for row_list, score_list in zip(rows, scores):
            per_query = []
            for row, score in zip(row_list, score_list):
                passage_id = self.ids[row]
                if passage_id not in records:  # deleted from the store since the index was loaded
                    continue
                text, meta = records[passage_id]
                per_query.append(Hit(id=passage_id, contents=text, title=meta.get("title", ""),
                                     source=meta.get("source", ""), score=float(score)))
            result.append(per_query)
        return result


def _read_rows(matrix: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows ``start:end`` of the memory-mapped file as a new array, read with one large ``readinto`` (the disk's
    sequential speed; faulting the map's pages in 4 KiB at a time is slower), or copied from an in-memory array."""
    block = np.empty((end - start,) + matrix.shape[1:], dtype=matrix.dtype)
    filename = getattr(matrix, "filename", None)
    if not isinstance(matrix, np.memmap) or filename is None:
        block[...] = matrix[start:end]
        return block
    with open(filename, "rb", buffering=0) as handle:
        handle.seek(matrix.offset + start * block[0:1].nbytes)
        view, done = memoryview(block).cast("B"), 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise StoreError(f"{filename} ended before row {end}; it is truncated: write it again.")
            done += got
    return block


_OUT_DTYPE_WORKS: dict[str, bool] = {}  # per device type: does matmul take out_dtype (fp32 scores from fp16 rows)?


def _scores(queries, chunk):
    """(n, rows) fp32 scores of fp32 or fp16 ``chunk`` rows; fp16 products come out in fp32 where the device can."""
    import torch  # see ExactIndex.from_matrix

    if chunk.dtype == torch.float32:
        return queries @ chunk.T
    kind = chunk.device.type
    if kind == "cpu":  # no fp16 matmul worth the name: the rounded rows, multiplied in fp32
        return queries.float() @ chunk.float().T
    if _OUT_DTYPE_WORKS.get(kind, True):
        try:
            scores = torch.mm(queries, chunk.T, out_dtype=torch.float32)
            _OUT_DTYPE_WORKS[kind] = True
            return scores
        except (TypeError, RuntimeError, NotImplementedError) as error:
            log.warning("exact index: fp16 products cannot come out in fp32 here (%s); scores are fp16 until "
                        "re-scored", error)
            _OUT_DTYPE_WORKS[kind] = False
    return (queries @ chunk.T).float()


def _shard_topk(queries, shard: Shard, k: int):
    """The shard's best ``k`` rows (as global row numbers) and their scores, left on the shard's device."""
    import torch  # see ExactIndex.from_matrix

    matrix = shard.matrix
    queries = queries.to(device=matrix.device, dtype=matrix.dtype)
    best_scores, best_rows = None, None
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        chunk = matrix[start:start + ROWS_PER_CHUNK]
        scores, rows = torch.topk(_scores(queries, chunk), min(k, chunk.shape[0]), dim=1)
        rows = rows + (shard.start + start)
        if best_scores is not None:
            scores, rows = torch.cat([best_scores, scores], dim=1), torch.cat([best_rows, rows], dim=1)
            keep = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
            scores, rows = torch.gather(scores, 1, keep), torch.gather(rows, 1, keep)
        best_scores, best_rows = scores, rows
    if best_scores is None:  # an empty shard
        empty = torch.zeros((queries.shape[0], 0), device=matrix.device)
        return empty, empty.long()
    return best_scores, best_rows
