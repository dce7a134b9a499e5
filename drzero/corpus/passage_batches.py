"""The passages an ingest has to embed, in batches, produced while the ones before them are encoded.

Every document of every source is read (drzero.corpus.readers) and split (drzero.corpus.chunking) as it
comes; a passage whose content hash was seen before in this run is a duplicate, one the store already holds
is skipped (that is how an interrupted ingest resumes), and the rest are cut into batches for the encoder.
``drzero ingest`` runs ``produce`` as the first stage of its pipeline (drzero.corpus.pipeline); the channel it
fills is bounded, so only a few batches are ever held, whatever the corpus size. What grows with the corpus
is the set of ids seen (~100 bytes a passage), which finding duplicates needs.

Batches are of similar length: the encoder pads each batch to its longest passage, and sentence-transformers
sorts the texts of one call by length, so a large call is padded little and one call per batch much more.
``SORT_WINDOW`` batches of passages are sorted together the same way (by characters, longest first) before
they are cut, which gives each batch the padding of a large call.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

from drzero.corpus.chunking import Passage, split_document
from drzero.corpus.documents import Document
from drzero.corpus.pipeline import Channel
from drzero.corpus.readers import ReadReport, RecordFields, read_documents
from drzero.corpus.store import CorpusStore

SORT_WINDOW = 8   # batches sorted together by length: 2,048 passages at the default --batch-size of 256
LOOKUP = 1000     # passage ids looked up in the store at a time


class PassageBatches:
    """Reads, splits and filters the sources into batches of passages to embed; counts what it saw."""

    def __init__(self, files: list[Path], extra: Sequence[Document], report: ReadReport, *, fields: RecordFields,
                 max_words: int, overlap_words: int, batch_size: int, store: CorpusStore | None,
                 store_lock: threading.Lock):
        self.files, self.extra, self.report, self.fields = files, extra, report, fields
        self.max_words, self.overlap_words, self.batch_size = max_words, overlap_words, batch_size
        self.store, self.store_lock = store, store_lock
        self.passages = 0          # distinct passages read
        self.duplicates = 0        # passages whose content hash came up before in this run
        self.already_present = 0   # passages the store held before this run
        self.todo = 0              # passages to embed, so far
        self.done = False          # every source read
        self._extra_read = 0       # characters of the extra documents split so far
        self.total_bytes = sum(_size(path) for path in files) + sum(len(d.text) for d in extra)

    def fraction_read(self) -> float:
        if self.done:
            return 1.0
        return (self.report.bytes_read + self._extra_read) / max(1, self.total_bytes)

    def estimated_todo(self) -> int:
        """Passages to embed in all: exact once every source is read, extrapolated from the bytes read before."""
        fraction = self.fraction_read()
        if self.done or fraction <= 0:
            return self.todo
        return max(self.todo, round(self.todo / fraction))

    def produce(self, out: Channel) -> None:
        """Put every batch of passages to embed into ``out``: full batches of ``batch_size``, but the last."""
        seen: set[str] = set()
        candidates: list[Passage] = []
        pending: list[Passage] = []
        window = SORT_WINDOW * self.batch_size
        for passage in self._passages():
            if passage.id in seen:
                self.duplicates += 1
                continue
            seen.add(passage.id)
            self.passages += 1
            candidates.append(passage)
            if len(candidates) >= LOOKUP:
                pending += self._not_stored(candidates)
                candidates = []
                if len(pending) >= window:
                    pending = self._put_sorted(pending, out, last=False)
        pending += self._not_stored(candidates)
        self.done = True
        self._put_sorted(pending, out, last=True)

    def _passages(self) -> Iterator[Passage]:
        for document in read_documents(self.files, self.report, self.fields):
            yield from split_document(document, self.max_words, self.overlap_words)
        for document in self.extra:
            yield from split_document(document, self.max_words, self.overlap_words)
            self._extra_read += len(document.text)

    def _not_stored(self, passages: list[Passage]) -> list[Passage]:
        if self.store is not None and passages:
            with self.store_lock:  # one Chroma call at a time in this process: the writer's upserts go through it too
                present = self.store.existing_ids([p.id for p in passages])
            self.already_present += len(present)
            passages = [p for p in passages if p.id not in present]
        self.todo += len(passages)
        return passages

    def _put_sorted(self, passages: list[Passage], out: Channel, last: bool) -> list[Passage]:
        """Sort by length, longest first (sentence-transformers' order), put the full batches; the rest is returned
        (all of it is put when ``last``)."""
        passages.sort(key=lambda p: len(p.contents), reverse=True)
        cut = len(passages) if last else len(passages) - len(passages) % self.batch_size
        for start in range(0, cut, self.batch_size):
            out.put(passages[start:start + self.batch_size])
        return passages[cut:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
