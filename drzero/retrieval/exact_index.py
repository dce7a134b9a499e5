"""Exact (brute-force) cosine search over the collection's stored vectors, on the GPU.

Chroma stays the store of record: the vectors are read from it once at start, the passages'
text is fetched from it by id for each batch. On a GPU a matrix product over every stored
vector is both exact and faster than Chroma's HNSW on the CPU: 1M x 1,024 vectors in fp16 are
2 GiB, and scoring a batch of 256 queries against all of them takes a few milliseconds, while
the HNSW walk costs about a millisecond of CPU per query and holds the interpreter.

The vectors stay in fp32, as Chroma stores them, and the products are taken in fp32 (TF32 off):
the ranking is exactly that of a brute-force search over the store. Half precision would halve the
memory but ranks wrongly where neighbours' cosines differ in the fourth digit (measured on the H200:
an fp16 pass with fp32 re-scoring of 64 candidates reached recall@3 of 0.9 on 87k e5-large vectors).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from drzero.corpus.store import CorpusStore, Hit

log = logging.getLogger(__name__)

INDEXES = ("auto", "hnsw", "exact")
ROWS_PER_CHUNK = 1 << 18  # stored vectors scored at once: 256 queries x 256k rows x 4 B = 256 MiB of scores
BYTES_PER_VALUE = 4


@dataclass(frozen=True)
class IndexChoice:
    kind: str    # "hnsw" or "exact"
    reason: str  # one sentence for the log


def choose_index(requested: str, device: str, passages: int, dimension: int, max_gib: float,
                 free_bytes: int | None) -> IndexChoice:
    """``auto``: exact search when the encoder runs on CUDA and the vectors (fp32) fit in ``max_gib`` and in
    half the GPU's free memory; Chroma's HNSW otherwise. An explicit ``exact`` on the CPU is allowed (small
    corpora, tests); ``exact`` that does not fit is refused by the caller's memory check, not silently changed."""
    size = passages * dimension * BYTES_PER_VALUE
    gib = size / 2**30
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


class ExactIndex:
    """Every stored vector in one device matrix; ``search`` returns (row ids, fp32 scores) best first."""

    def __init__(self, ids: list[str], vectors, device: str):
        import torch  # seconds to import: only the exact index needs it, not `drzero --help`

        self.ids = ids
        self.device = device
        self.matrix = vectors.to(device=device, dtype=torch.float32).contiguous()

    @classmethod
    def from_store(cls, store: CorpusStore, device: str, page: int = 20_000) -> "ExactIndex":
        import torch  # see __init__

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
        index = cls(ids, matrix, device)
        log.info("exact index: %d vectors of dimension %d on %s in %.1fs", len(ids), matrix.shape[-1], device,
                 time.perf_counter() - started)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: an (n, d) fp32 tensor (any device). Returns (n, k) row numbers and fp32 cosine scores."""
        import torch  # see __init__

        with torch.inference_mode():
            queries = queries.to(device=self.device, dtype=torch.float32)
            k = min(topk, len(self.ids))
            best_scores, best_rows = None, None
            for start in range(0, len(self.ids), ROWS_PER_CHUNK):
                chunk = self.matrix[start:start + ROWS_PER_CHUNK]
                scores, rows = torch.topk(queries @ chunk.T, min(k, chunk.shape[0]), dim=1)
                rows = rows + start
                if best_scores is not None:
                    scores, rows = torch.cat([best_scores, scores], dim=1), torch.cat([best_rows, rows], dim=1)
                    keep = torch.topk(scores, k, dim=1).indices
                    scores, rows = torch.gather(scores, 1, keep), torch.gather(rows, 1, keep)
                best_scores, best_rows = scores, rows
            rows, scores = best_rows, best_scores
        return rows.cpu().numpy(), scores.cpu().numpy()

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
