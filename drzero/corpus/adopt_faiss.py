"""`drzero adopt --faiss-index`: take over a FAISS flat index and its corpus, as Search-R1 distributes wiki-18.

    drzero adopt --faiss-index e5_Flat.index --corpus wiki-18.jsonl --embedder e5-base-v2 --db /corpus/chromadb

Row *i* of the index is the vector of line *i* of the corpus (Search-R1 and FlashRAG look documents up by row so).
Before anything is written, adopt refuses, in one sentence: an index that is not IndexFlatIP/IndexFlatL2 (read from
its header, without FAISS), a dimension other than the embedder's, a row count other than the corpus's line count,
and vectors the named embedder did not make (a sample of passages is re-embedded and compared, as for a Chroma
collection: ``drzero.corpus.adopt.match_passage_prefix``).

Then two resumable passes:

1. the vectors are copied, streaming, into the collection's vector side file (``drzero.corpus.vector_file``),
   normalized on the way when the index's rows are not unit vectors (the retriever scores by cosine);
2. the documents go into a new Chroma collection: id, ``contents`` exactly as the corpus has it (the title on its
   first line, as Search-R1 serves it), the title and the record's other fields as metadata.

Chroma's HNSW build over tens of millions of real vectors is what this avoids: each record carries a one-number
placeholder embedding (a small L2 HNSW over scalars costs little), and the collection's metadata says
``drzero:vectors = side-file``. The retriever then always searches exactly from the side file and refuses
``--index hnsw`` with a sentence. A kill at any point is resumed by running the same command again: the rows the
side file's record counts are skipped (documents are upserted, so a batch written twice is one batch).
"""

from __future__ import annotations

import gzip
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drzero.atomic import write_json_atomically
from drzero.corpus.adopt import AdoptConfig, match_passage_prefix
from drzero.corpus.embedder import Embedder, EmbedderSpec, canonical_name, spec_for
from drzero.corpus.faiss_file import FaissFlatFile
from drzero.corpus.readers import record_to_document
from drzero.corpus.store import (INDEX_CHECKED, INDEX_WRITING, CorpusStore, StoreError, record_index_check,
                                 writer_lock)
from drzero.corpus.vector_file import (META_VECTORS, PLACEHOLDER_SETTINGS, SIDE_FILE, VectorFile, VectorFileWriter,
                                       has_side_file, placeholders, vector_dir)

log = logging.getLogger(__name__)

ANCHOR_LINES = 1024        # the line index keeps the byte offset of every 1,024th line (20k numbers for wiki-18)
SCAN_BYTES = 16 << 20      # the line count reads the corpus this much at a time
COPY_BYTES = 64 << 20      # vectors copied per step
CHECKPOINT_EVERY = 16      # steps (1 GiB) between checkpoints of the side file: what a kill can cost to redo


@dataclass
class LineIndex:
    """The corpus's line count and the byte offset of every ANCHOR_LINES-th line, to find line *i* quickly."""

    path: Path
    count: int
    anchors: list[int]

    @classmethod
    def of(cls, path: Path, cache: Path) -> "LineIndex":
        """Scan ``path`` once (counting newlines), or read the scan ``cache`` holds for the same file."""
        stat = path.stat()
        key = {"corpus": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        try:
            cached = json.loads(cache.read_text())
            if {k: cached.get(k) for k in key} == key:
                return cls(path, int(cached["count"]), [int(a) for a in cached["anchors"]])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        index = cls._scan(path, stat.st_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically({**key, "count": index.count, "anchors": index.anchors}, cache)
        return index

    @classmethod
    def _scan(cls, path: Path, size: int) -> "LineIndex":
        anchors, count, position, last = [0], 0, 0, b"\n"
        with open(path, "rb") as handle, tqdm(total=size, desc="counting corpus lines", unit="B", unit_scale=True,
                                              file=sys.stderr, mininterval=1.0) as bar:
            while chunk := handle.read(SCAN_BYTES):
                ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                # line number (count + n + 1) starts after the n-th newline of this chunk
                first = (-(count + 1)) % ANCHOR_LINES
                anchors += (position + ends[first::ANCHOR_LINES] + 1).tolist()
                count, position, last = count + len(ends), position + len(chunk), chunk[-1:]
                bar.update(len(chunk))
        if last != b"\n":
            count += 1  # a last line without its newline
        return cls(path, count, [a for a in anchors if a < size][:(count + ANCHOR_LINES - 1) // ANCHOR_LINES])

    def lines_from(self, start: int):
        """Line ``start`` and every one after it, as bytes without the newline."""
        with open(self.path, "rb") as handle:
            handle.seek(self.anchors[start // ANCHOR_LINES])
            for _ in range(start % ANCHOR_LINES):
                handle.readline()
            for raw in handle:
                yield raw.rstrip(b"\r\n")

    def line(self, number: int) -> bytes:
        return next(self.lines_from(number))


def passage(raw: bytes, row: int, source: str) -> tuple[str, str, dict]:
    """(id, contents, metadata) of one corpus line: ``id`` (the row number when absent), ``contents`` as the corpus
    has it (drzero's ``title\\ntext`` for records with separate fields). A line that is not a readable record is kept
    as its raw text (it still has a vector: skipping it would shift every row after it)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        record = json.loads(text)
        document = record_to_document(record, source)
    except ValueError as error:  # json.JSONDecodeError and the readers' errors
        log.warning("line %d of %s is not a readable record (%s); stored as its raw text", row + 1, source, error)
        return str(row), text, {"title": "", "source": source}
    contents = record["contents"] if isinstance(record.get("contents"), str) else f"{document.title}\n{document.text}"
    metadata = {key: value for key, value in document.metadata.items() if key != "id"}  # the record's id is its id
    metadata.update(title=document.title, source=source)
    return str(record.get("id", row)), contents, metadata


@dataclass
class FaissAdoptResult:
    index: FaissFlatFile
    spec: EmbedderSpec
    collection: str
    directory: Path
    samples: int = 0
    tried: dict[str, float] = field(default_factory=dict)
    normalized: bool = False
    copy_gbps: float | None = None       # None: nothing left to copy (a resumed run)
    documents_per_s: float | None = None
    check: str = ""
    already: bool = False

    def render(self) -> str:
        if self.already:
            return (f"collection {self.collection!r} already holds the {self.index.count:,} passages of "
                    f"{self.index.name} (vectors in {self.directory}); nothing to do")
        tried = ", ".join(f"{prefix!r}: {fraction:.0%}" for prefix, fraction in self.tried.items())
        copied = f" at {self.copy_gbps:.2f} GB/s" if self.copy_gbps is not None else ""
        stored = f" at {self.documents_per_s:,.0f}/s" if self.documents_per_s is not None else ""
        return (f"adopted FAISS index {self.index.name}: {self.index.count:,} vectors of {self.index.dimension} "
                f"dimensions ({self.index.metric}{', normalized' if self.normalized else ''}) copied to "
                f"{self.directory}{copied}; documents stored in collection {self.collection!r}{stored} (Chroma holds "
                f"placeholders, so the retriever searches exactly from the side file); embedder {self.spec.name}, "
                f"query prefix {self.spec.query_prefix!r}, passage prefix {self.spec.passage_prefix!r}; "
                f"{self.samples} samples re-embedded, matching by prefix: {tried}; {self.check}")


def sample_rows(count: int, samples: int) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, num=min(samples, count)).astype(np.int64))


def plain_corpus(corpus: Path) -> Path:
    """The corpus as a plain JSONL file: adopt finds line *i* by position, which a gzip stream cannot do, so a
    ``.jsonl.gz`` (wiki-18 as distributed) is unpacked once beside itself (``wiki-18.jsonl``; a killed unpacking
    leaves only a hidden ``.part``, started again next time)."""
    if corpus.suffix.lower() != ".gz":
        return corpus
    plain = corpus.with_suffix("")
    if plain.is_file():
        log.info("using %s, unpacked from %s before", plain, corpus.name)
        return plain
    partial = plain.with_name(f".{plain.name}.part")
    log.info("unpacking %s to %s (adopt reads the corpus's lines by position)", corpus, plain)
    try:
        with (open(corpus, "rb") as packed, gzip.GzipFile(fileobj=packed) as source, open(partial, "wb") as target,
              tqdm(total=corpus.stat().st_size, desc="unpacking corpus", unit="B", unit_scale=True, file=sys.stderr,
                   mininterval=1.0) as bar):
            while chunk := source.read(SCAN_BYTES):
                target.write(chunk)
                bar.update(packed.tell() - bar.n)
    except (OSError, EOFError) as error:
        partial.unlink(missing_ok=True)
        raise StoreError(f"cannot unpack {corpus}: {error}; download it again or pass the unpacked JSONL as "
                         f"--corpus.") from None
    partial.rename(plain)
    return plain


def run_adopt_faiss(cfg: AdoptConfig) -> FaissAdoptResult:
    index = FaissFlatFile.open(cfg.faiss_index)
    corpus = Path(cfg.corpus)
    if not corpus.is_file():
        raise StoreError(f"the corpus {corpus} is not a file; pass the JSONL whose lines the index's rows embed.")
    corpus = plain_corpus(corpus)
    directory = vector_dir(cfg.db, cfg.collection)
    if directory is None:
        raise StoreError("--faiss-index writes a vector side file beside the store, so --db must be a directory.")
    with writer_lock(cfg.db):
        base = spec_for(canonical_name(cfg.embedder), cfg.query_prefix, None)
        store = CorpusStore.open_for_writing(cfg.db, cfg.collection)
        if store is not None:
            _check_existing(store, cfg, base)
            done = _finished(store, directory, index)
            if done is not None:  # (recorded again: a kill may have come between the finish and this record)
                record_index_check(cfg.db, cfg.collection, INDEX_CHECKED, passages=index.count)
                return FaissAdoptResult(index, done, cfg.collection, directory, already=True)
        lines = LineIndex.of(corpus, directory / "lines.json")
        if lines.count != index.count:
            raise StoreError(f"{index.location} holds {index.count:,} vectors but {corpus} has {lines.count:,} lines; "
                             f"rows pair with lines by position, so the two must come from the same corpus.")
        embedder = Embedder(base, device=cfg.device)
        if embedder.dimension != index.dimension:
            raise StoreError(f"{index.location} holds {index.dimension}-dimensional vectors but {base.name} makes "
                             f"{embedder.dimension}-dimensional ones: it was built with another embedder; pass the "
                             f"one that built it as --embedder.")
        vectors = index.vectors()
        rows = sample_rows(index.count, cfg.samples)
        documents = [passage(lines.line(int(r)), int(r), corpus.name)[1] for r in rows]
        stored = np.array(vectors[rows], dtype=np.float32)
        spec, tried = match_passage_prefix(embedder, base, documents, stored, cfg, f"the vectors of {index.location}")
        norms = np.linalg.norm(stored, axis=1)
        normalize = bool(np.any(np.abs(norms - 1) > 1e-3))
        if store is None:
            store = CorpusStore.create(cfg.db, spec, index.dimension, cfg.collection,
                                       extra_metadata={**PLACEHOLDER_SETTINGS, META_VECTORS: SIDE_FILE})
        store.check_embedder(spec, index.dimension)  # a resumed run must find what the first one recorded
        record_index_check(cfg.db, cfg.collection, INDEX_WRITING)
        writer = VectorFileWriter.open(directory, index.dimension, embedder=spec.name, dtype=cfg.vectors_dtype,
                                       count=index.count)
        copy_gbps = copy_vectors(vectors, writer, normalize)
        documents_per_s = store_documents(store, lines, writer, cfg.document_batch, corpus.name)
        side = writer.finish()
        check = check_copy(side, vectors, normalize, cfg.samples)
        record_index_check(cfg.db, cfg.collection, INDEX_CHECKED, passages=store.count())
        log.info("collection %r in %s adopted from %s", cfg.collection, cfg.db, index.name)
        return FaissAdoptResult(index, spec, cfg.collection, directory, len(rows), tried, normalize, copy_gbps,
                                documents_per_s, check)


def _check_existing(store: CorpusStore, cfg: AdoptConfig, base: EmbedderSpec) -> None:
    if not has_side_file(store):
        raise StoreError(f"collection {cfg.collection!r} in {cfg.db} already exists and was not adopted from a FAISS "
                         f"index; pass another --collection for it.")
    recorded = store.recorded_spec()
    if recorded is not None and recorded.name != base.name:
        raise StoreError(f"collection {cfg.collection!r} in {cfg.db} was adopted with embedder {recorded.name!r}; "
                         f"pass --embedder {recorded.name} to resume it, or another --collection.")


def _finished(store: CorpusStore, directory: Path, index: FaissFlatFile) -> EmbedderSpec | None:
    """The recorded spec when an earlier run finished adopting this index; None when there is work left."""
    try:
        side = VectorFile.open(directory)
    except StoreError:
        return None
    if len(side) == index.count == store.count():
        return store.recorded_spec()
    return None


def copy_vectors(vectors: np.ndarray, writer: VectorFileWriter, normalize: bool) -> float | None:
    """Stream the rows the side file lacks into it; the rate read (GB/s), None when nothing was left."""
    count, dimension = vectors.shape
    start = writer.rows
    if start >= count:
        return None
    step = max(1, COPY_BYTES // (4 * dimension))
    started = time.perf_counter()
    with tqdm(total=(count - start) * dimension * 4, desc="copying vectors", unit="B", unit_scale=True,
              file=sys.stderr, mininterval=1.0) as bar:
        for n, begin in enumerate(range(start, count, step), 1):
            block = vectors[begin:begin + step]  # read by the assignment into the side file: one copy
            if normalize:
                block = np.array(block, dtype=np.float32)
                block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            # durable (and counted) every CHECKPOINT_EVERY steps: a sync per step would wait on the disk each time
            writer.append_vectors(block, checkpoint=n % CHECKPOINT_EVERY == 0 or begin + step >= count)
            bar.update(block.nbytes)
    seconds = time.perf_counter() - started
    gbps = (count - start) * dimension * 4 / 1e9 / max(seconds, 1e-9)
    log.info("copied %d vectors in %.1f s: %.2f GB/s read", count - start, seconds, gbps)
    return gbps


def store_documents(store: CorpusStore, lines: LineIndex, writer: VectorFileWriter, batch: int,
                    source: str) -> float | None:
    """Upsert the documents the side file has no ids for yet, ``batch`` at a time; the next batch is parsed while
    Chroma writes the last. Returns documents per second, None when nothing was left."""
    start = writer.id_rows
    if start >= lines.count:
        return None
    started = time.perf_counter()
    pending = None  # (future, ids) of the batch Chroma is writing

    def settle() -> None:
        future, ids = pending
        future.result()
        writer.append_ids(ids)
        bar.update(len(ids))

    with (ThreadPoolExecutor(1, thread_name_prefix="chroma") as chroma,
          tqdm(total=lines.count - start, desc="storing documents", unit="doc", file=sys.stderr,
               mininterval=1.0) as bar):
        ids, contents, metadatas = [], [], []
        for row, raw in enumerate(lines.lines_from(start), start):
            if row >= lines.count:
                break
            passage_id, text, metadata = passage(raw, row, source)
            ids.append(passage_id)
            contents.append(text)
            metadatas.append(metadata)
            if len(ids) == batch or row == lines.count - 1:
                rows = range(row + 1 - len(ids), row + 1)
                if pending is not None:
                    settle()
                pending = (chroma.submit(store.add, ids, contents, metadatas, placeholders(rows)), ids)
                ids, contents, metadatas = [], [], []
        if pending is not None:
            settle()
    rate = (lines.count - start) / max(time.perf_counter() - started, 1e-9)
    log.info("stored %d documents: %.0f/s", lines.count - start, rate)
    return rate


def check_copy(side: VectorFile, vectors: np.ndarray, normalized: bool, samples: int) -> str:
    """Rows of the side file against the index's, at spread-out rows; StoreError on a difference."""
    rows = sample_rows(len(side), samples)
    theirs = np.array(vectors[rows], dtype=np.float32)
    if normalized:
        theirs /= np.maximum(np.linalg.norm(theirs, axis=1, keepdims=True), 1e-12)
    mine = np.asarray(side.vectors[rows], dtype=np.float32)
    tolerance = 1e-6 if side.meta["dtype"] == "float32" else 1e-2
    worst = float(np.max(np.abs(mine - theirs))) if len(rows) else 0.0
    if worst > tolerance:
        raise StoreError(f"the side file in {side.directory} differs from the index by up to {worst:.3g} at sampled "
                         f"rows; delete {side.directory} and adopt again.")
    return f"side file checked against the index at {len(rows)} rows"
