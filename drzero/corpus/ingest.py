"""`drzero ingest`: read documents, split them into passages, embed them and store them in ChromaDB.

    drzero ingest papers/ notes.jsonl --db /corpus/chromadb
    drzero ingest --demo --db .drzero/demo-db           # the bundled demo research world

    drzero ingest --verify --db /corpus/chromadb         # check (and repair) the vector index only
    drzero ingest papers/ --db http://127.0.0.1:8000 --collection papers   # into a Chroma server
    drzero ingest wiki.jsonl --db /corpus/chromadb --vectors side-file       # millions: drzero.corpus.side_file_ingest

Passage ids are content hashes: a re-run adds nothing twice, and a run that was interrupted,
run again, embeds only what is missing. Three stages run at once (drzero.corpus.pipeline), joined
by bounded queues: reading and splitting (drzero.corpus.passage_batches), encoding (this thread;
on a GPU it hands each batch to the model in a process of its own, drzero.corpus.encoder_process;
on a node of several GPUs one such process per GPU, ``--encoders``, each taking batches in turn),
and writing to the store by one writer (with counting each passage's tokens); so the encoder, the slow stage, is
kept busy and memory stays constant. What was encoded when a run stops is still written. The
summary says where the time went; the encoder should never wait for the other stages.

One ingest writes a store at a time: each holds an exclusive lock beside it (``DB.lock``), and a second one exits
2 at once, naming the first. Every ingest that added passages (and ``--verify``) ends by checking that each stored
passage can be found in the vector index, and re-embeds any that cannot (what two writers at once left behind
before the lock existed); a side-file collection's side file is compared with Chroma's ids instead. The check is
recorded beside the collection only once it passed (drzero.corpus.store.record_index_check), so an ingest killed
after its last write and before its check is checked by the next ingest, even one that adds nothing. A Chroma
server (``--db http://host:port``, token in ``$DRZERO_CHROMA_TOKEN``) writes its own files alone: there is no
lock, and its index is checked only with ``--verify``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from drzero.config import ConfigError, option, require
from drzero.corpus.chunking import Passage
from drzero.corpus.demo import build_demo_world
from drzero.corpus.embedder import (PRODUCTION_EMBEDDER, TEST_EMBEDDER, Embedder, EmbedderSpec, canonical_name,
                                    spec_for)
from drzero.corpus.encoder_process import EncoderProcess, encoder_devices
from drzero.corpus.passage_batches import PassageBatches
from drzero.corpus.pipeline import Channel, Pipeline
from drzero.corpus.readers import HUGE_FILE_BYTES, ReadReport, RecordFields, expand_sources
from drzero.corpus.side_file_ingest import (SIDE_FILE, VECTOR_MODES, SideFileStore, check_side_file,
                                            collection_metadata, refuse_side_file_on_server, vectors_mode)
from drzero.corpus.store import (DEFAULT_COLLECTION, INDEX_CHECKED, INDEX_WRITING, CorpusStore, StoreError,
                                 index_check_path, read_index_check, record_index_check, records_index_checks,
                                 writer_lock)
from drzero.corpus.vector_file import has_side_file
from drzero.records import DamagedRecord, read_record, set_aside
from drzero.store_location import is_server_address

log = logging.getLogger(__name__)

DEMO_FACTS_FILE = "demo_world.json"
DEMO_FACTS = {"seed": int, "papers": [dict]}  # what load_demo_world reads of it
# Batches queued in front of the encoder and behind it: enough to ride out a slow read or write, few enough
# that memory stays small (4 batches of 256 e5 vectors: 4 MB).
QUEUED_BATCHES = 4
# Devices whose encoder runs in a process of its own (drzero.corpus.encoder_process says why); on the CPU the
# encoder's kernels release the GIL and the cores are shared anyway, so it stays on this thread.
ENCODER_PROCESS_DEVICES = ("cuda",)


def load_demo_world(db: str | Path):
    """The demo world ingested into ``db``, rebuilt from the seed and size in its ``demo_world.json``."""
    if is_server_address(db):
        raise ConfigError(f"the demo world's facts ({DEMO_FACTS_FILE}) are kept only in a local store's directory, "
                          f"not on the Chroma server {db}; build a local one with `drzero ingest --demo --db DIR`.")
    facts_path = Path(db).expanduser() / DEMO_FACTS_FILE
    try:
        facts = read_record(facts_path, DEMO_FACTS)
    except DamagedRecord as damage:
        said: list[str] = []
        set_aside(facts_path, str(damage), f"`drzero ingest --demo --db {db}` writes it again", said.append)
        raise ConfigError(said[0]) from None
    if facts is None:
        raise ConfigError(f"{db} holds no {DEMO_FACTS_FILE}; build it with `drzero ingest --demo --db {db}`.")
    return build_demo_world(seed=facts["seed"], papers=len(facts["papers"]))


@dataclass(kw_only=True)
class IngestConfig:
    sources: list[str] = option([], positional=True, metavar="SOURCE",
                                help="files or directories to read: .jsonl (or .jsonl.gz)/.json records, .txt/.md, .pdf")
    db: str = option(metavar="DIR|URL", help=(
        "directory of the ChromaDB persistent store (created if missing), or a Chroma server's address such as "
        "http://127.0.0.1:8000 (token from $DRZERO_CHROMA_TOKEN)"))
    collection: str = option(DEFAULT_COLLECTION, help="collection name inside the store")
    embedder: str | None = option(None, metavar="MODEL", help=(
        f"sentence-transformers model name or local directory; aliases: minilm, e5-large-v2. Default: the "
        f"collection's own embedder when it exists, else {TEST_EMBEDDER} for --demo and {PRODUCTION_EMBEDDER} "
        f"otherwise"))
    text_field: str | None = option(None, metavar="KEY", help=(
        "JSON records: the field holding the text (default: the first of text, contents, abstract, body, content)"))
    title_field: str | None = option(None, metavar="KEY", help=(
        "JSON records: the field holding the title (default: title, else name)"))
    metadata_fields: list[str] = option([], metavar="KEY", help=(
        "JSON records: the fields kept as passage metadata (default: every other field; lists are joined)"))
    prepend_fields: list[str] = option([], metavar="KEY", help=(
        "JSON records: fields written as 'Key: value' lines before the text, so they are embedded and "
        "searchable (e.g. authors topic)"))
    query_prefix: str | None = option(None, help="override the model's query prefix (e5: 'query: ')")
    passage_prefix: str | None = option(None, help="override the model's passage prefix (e5: 'passage: ')")
    device: str = option("cpu", choices=["cpu", "cuda"], help="device to run the embedder on")
    encoders: int = option(0, metavar="N", help=(
        "encoder processes, each with its own copy of the model: default one per visible GPU with --device cuda "
        "(every GPU of the node embeds; one process writes), one on the CPU; more than the GPUs share cards"))
    max_words: int = option(200, help="maximum words per passage; passages end on sentence boundaries")
    overlap_words: int = option(30, help="words of trailing sentences repeated at the start of the next passage")
    batch_size: int = option(256, help="passages embedded and written per batch")
    vectors: str | None = option(None, choices=list(VECTOR_MODES), help=(
        "where a new collection keeps its vectors: chroma (the default: Chroma's HNSW index) or side-file (a NumPy "
        "file beside the store, searched exactly; for millions of passages). Default: an existing collection's own"))
    demo: bool = option(False, help="also ingest the bundled demo research world (no download needed)")
    demo_papers: int = option(400, help="size of the demo world, in papers")
    demo_seed: int = option(0, help="seed of the demo world generator")
    verify: bool = option(False, help=(
        "check that every stored passage is findable in the vector index and re-embed those that are not; "
        "with no SOURCE and no --demo, only that (every ingest that adds passages checks this at its end)"))

    def __post_init__(self) -> None:
        require(bool(self.sources) or self.demo or self.verify, "sources", self.sources,
                "at least one SOURCE, or --demo, or --verify")
        require(self.max_words >= 20, "max_words", self.max_words, "an integer >= 20")
        require(0 <= self.overlap_words < self.max_words // 2, "overlap_words", self.overlap_words,
                f"an integer from 0 to {self.max_words // 2 - 1} (less than half of max_words)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.encoders >= 0, "encoders", self.encoders, "an integer >= 0 (0: one per visible GPU)")
        require(self.demo_papers >= 20, "demo_papers", self.demo_papers, "an integer >= 20")
        refuse_side_file_on_server(self.vectors, self.db)


@dataclass(kw_only=True)
class IngestSummary:
    files_read: int = 0
    records_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    passages: int = 0
    duplicates_in_input: int = 0
    added: int = 0
    already_present: int = 0
    collection_size: int = 0
    wrappers: dict[str, str] = field(default_factory=dict)  # JSON file -> key that held its records
    over_window: int = 0              # passages longer than the embedder's window (truncated when embedded)
    window_tokens: int | None = None  # that window (max_seq_length), when the embedder was loaded
    verified: int | None = None       # passages checked against the vector index (None: not checked)
    unindexed: int = 0                # of them, not findable in the index
    repaired: int = 0                 # re-embedded and findable again
    seconds: dict[str, float] = field(default_factory=dict)  # where the embedding's time went (see _embed_and_write)

    def render(self) -> str:
        lines = [
            "ingest summary",
            f"  files read          {self.files_read}",
            f"  records read        {self.records_read}",
            f"  skipped             {len(self.skipped)}",
            f"  passages            {self.passages}",
            f"  duplicate passages  {self.duplicates_in_input}",
            f"  added               {self.added}",
            f"  already present     {self.already_present}",
            f"  collection size     {self.collection_size}",
        ]
        lines += [f"  records of {path} read from its key {key!r}" for path, key in sorted(self.wrappers.items())]
        if self.window_tokens is not None:
            lines.append(f"  over embedder window {self.over_window} passages longer than {self.window_tokens} "
                         f"tokens (only their start is embedded; lower --max-words to avoid this)")
        if self.seconds:
            lines.append("  seconds             " + ", ".join(f"{what} {s:.1f}" for what, s in self.seconds.items()))
        if self.verified is not None:
            lines.append(f"  index check         {self.verified} passages, {self.unindexed} not in the vector index, "
                         f"{self.repaired} repaired")
        lines += [f"    skipped {where}: {why}" for where, why in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"    ... and {len(self.skipped) - 20} more skipped")
        return "\n".join(lines)


def batches_to_embed(cfg: IngestConfig, store: CorpusStore | None, store_lock: threading.Lock,
                     extra: list = ()) -> PassageBatches:
    """The batches of passages to embed from every source (and the ``extra`` documents), read as they are asked for."""
    report = ReadReport()
    files = expand_sources(cfg.sources, report)
    for path in files:
        size = path.stat().st_size if path.is_file() else 0
        if size > HUGE_FILE_BYTES:
            words = size / 6   # ~6 bytes a word of English, space included
            estimate = int(words / max(1, cfg.max_words - cfg.overlap_words))
            log.warning("%s is %.0f MB: about %d passages to embed; at %d passages/s (%s on %s) that is about %s",
                        path, size / 1e6, estimate, passages_per_second(cfg), cfg.embedder or "the default embedder",
                        cfg.device, _duration(estimate / passages_per_second(cfg)))
    fields = RecordFields(text_field=cfg.text_field, title_field=cfg.title_field,
                          metadata_fields=tuple(cfg.metadata_fields) or None, prepend_fields=tuple(cfg.prepend_fields))
    return PassageBatches(files, extra, report, fields=fields, max_words=cfg.max_words,
                          overlap_words=cfg.overlap_words, batch_size=cfg.batch_size, store=store,
                          store_lock=store_lock)


def passages_per_second(cfg: IngestConfig) -> int:
    """A rough embedding rate for the size warning: CPU vs GPU, small vs large model."""
    # Orders of magnitude, not measurements of this machine: MiniLM-L6 (22M parameters) encodes a few
    # hundred 200-word passages a second on a few CPU cores; e5-large (335M) is ~15x slower; a GPU ~50x faster.
    small = canonical_name(cfg.embedder or "").lower() == TEST_EMBEDDER.lower() or cfg.demo
    rate = 200 if small else 15
    return rate * 50 if cfg.device == "cuda" else rate


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def resolve_embedder_name(cfg: IngestConfig, recorded: EmbedderSpec | None) -> str:
    """--embedder, else the collection's own, else the demo's or the production default."""
    if cfg.embedder is not None:
        return canonical_name(cfg.embedder)
    if recorded is not None:
        return recorded.name
    return TEST_EMBEDDER if cfg.demo else PRODUCTION_EMBEDDER


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    with writer_lock(cfg.db):
        summary = _ingest(cfg) if cfg.sources or cfg.demo else IngestSummary()
        if not records_index_checks(cfg.db):
            if cfg.verify:
                _verify_index(cfg, summary)
            elif summary.added:
                log.info("the vector index of collection %r on the Chroma server %s is not checked after this write: "
                         "the server writes its index alone, and the check repairs what two embedded writers leave; "
                         "`drzero ingest --verify` checks it on demand", cfg.collection, cfg.db)
            return summary
        unchecked = None if cfg.verify or summary.added else _unchecked_since(cfg)
        if unchecked:
            log.warning("checking the vector index of collection %r in %s: %s", cfg.collection, cfg.db, unchecked)
        if cfg.verify or summary.added or unchecked:
            _verify_index(cfg, summary)
    return summary


def _unchecked_since(cfg: IngestConfig) -> str | None:
    """Why the collection's index needs a check although this ingest added nothing; None when its last check
    covers every passage it holds."""
    try:
        recorded = read_index_check(cfg.db, cfg.collection)
    except DamagedRecord as damage:
        set_aside(index_check_path(cfg.db, cfg.collection), str(damage), "the index is checked again", log.warning)
        return "its index-check record was damaged"
    if recorded is None:
        return "no index check is recorded for it (a store written before drzero recorded them)"
    if recorded["state"] != INDEX_CHECKED:
        return "the last ingest into it stopped after writing passages and before checking its index"
    count = CorpusStore.open_existing(cfg.db, cfg.collection).count()
    if recorded.get("passages") != count:
        return f"it holds {count} passages but its last index check saw {recorded.get('passages')}"
    return None


def _verify_index(cfg: IngestConfig, summary: IngestSummary) -> None:
    """Every stored passage findable in the vector index; the ones that are not are re-embedded."""
    store = CorpusStore.open_existing(cfg.db, cfg.collection)
    summary.verified = store.count()
    side_file = has_side_file(store)  # its ids compared with the side file's: Chroma holds placeholders
    missing = [] if side_file else store.unindexed_ids()
    if side_file:
        log.info("vector side file checked: %s", check_side_file(store, whole=cfg.verify))
    summary.unindexed = len(missing)
    if missing:
        record_index_check(cfg.db, cfg.collection, INDEX_WRITING)
        log.warning("%d passages of %s are stored but not in its vector index; re-embedding them", len(missing),
                    cfg.db)
        ids, contents, metadatas = store.records(missing)
        spec = store.recorded_spec()
        # upserted again (Chroma 1.5 puts an id its index lost back in); deleting it first fails in the
        # index writer ("Failed to apply logs to the hnsw segment writer")
        passages = [Passage(id=i, title=c.partition("\n")[0], text=c.partition("\n")[2],
                            source=m.get("source", ""), chunk=int(m.get("chunk", 0)),
                            extra=tuple((k, v) for k, v in m.items() if k not in ("title", "source", "chunk")))
                    for i, c, m in zip(ids, contents, metadatas)]
        batches = [passages[i:i + cfg.batch_size] for i in range(0, len(passages), cfg.batch_size)]

        def checked(encoder: Embedder | EncoderProcess) -> CorpusStore:
            store.check_embedder(spec, encoder.dimension)
            return store

        _embed_and_write(_put_all(batches), lambda: _open_encoders(spec, cfg), checked, threading.Lock(),
                         lambda: len(passages))
        still = set(store.unindexed_ids())
        summary.repaired = len([i for i in ids if i not in still])
        if still:
            raise StoreError(f"{len(still)} passages of collection {cfg.collection!r} in {cfg.db} are still not in "
                             f"the vector index after re-embedding; rebuild the store with a fresh --db.")
    summary.collection_size = store.count()
    record_index_check(cfg.db, cfg.collection, INDEX_CHECKED, summary.collection_size)


def _ingest(cfg: IngestConfig) -> IngestSummary:
    summary = IngestSummary()
    store = CorpusStore.open_for_writing(cfg.db, cfg.collection)
    mode = vectors_mode(cfg.vectors, store, cfg.db, cfg.collection)
    recorded = store.recorded_spec() if store is not None else None
    spec = spec_for(resolve_embedder_name(cfg, recorded), cfg.query_prefix, cfg.passage_prefix)
    if recorded is not None and recorded.name != spec.name:
        # Checked before reading or loading anything: a mixed collection is silently useless.
        raise StoreError(f"collection {cfg.collection!r} in {cfg.db} was built with embedder {recorded.name!r}, "
                         f"not {spec.name!r}; pass --embedder {recorded.name} or use a new --db/--collection.")

    world = None
    if cfg.demo:
        world = build_demo_world(seed=cfg.demo_seed, papers=cfg.demo_papers)
    store_lock = threading.Lock()
    source = batches_to_embed(cfg, store, store_lock, world.passages() if world else ())

    def open_for_writing(encoder: Embedder | EncoderProcess) -> CorpusStore:
        """Called once the encoder is loaded, at the first batch to embed: a run that adds nothing loads no model
        and creates no collection."""
        nonlocal store
        if store is None:
            store = CorpusStore.create(cfg.db, spec, encoder.dimension, cfg.collection, collection_metadata(mode))
        store.check_embedder(spec, encoder.dimension)
        summary.window_tokens = encoder.max_tokens
        record_index_check(cfg.db, cfg.collection, INDEX_WRITING)  # until the check at the end passes
        if mode == SIDE_FILE:
            with store_lock:  # the reader looks ids up in the store meanwhile
                store = SideFileStore.open(store, encoder.dimension, spec.name)
        return store

    summary.added, summary.over_window, summary.seconds = _embed_and_write(
        source.produce, lambda: _open_encoders(spec, cfg), open_for_writing, store_lock, source.estimated_todo)
    if isinstance(store, SideFileStore):
        store.finish()
    report = source.report
    summary.files_read, summary.records_read = report.files_read, report.records_read
    summary.skipped, summary.wrappers = report.skipped, report.wrappers
    summary.passages, summary.duplicates_in_input = source.passages, source.duplicates
    summary.already_present = source.already_present
    if not summary.passages:
        raise ConfigError(f"no passages came out of {len(cfg.sources)} source(s) "
                          f"({len(summary.skipped)} skipped); nothing to ingest.")
    log.info("%d passages, %d already in the collection, %d embedded", summary.passages, summary.already_present,
             summary.added)
    if summary.over_window:
        log.warning("%d of %d passages were longer than %s's %s-token window and were truncated when embedded; "
                    "lower --max-words to keep them whole", summary.over_window, summary.added, spec.name,
                    summary.window_tokens)
    summary.collection_size = store.count()
    if world is not None and is_server_address(cfg.db):
        log.info("the demo world's facts (%s) are not kept for the Chroma server %s: they live in a local store's "
                 "directory, which `drzero eval-set --demo-db` and `drzero smoke` read", DEMO_FACTS_FILE, cfg.db)
    elif world is not None:
        world.save_json(Path(cfg.db) / DEMO_FACTS_FILE)
    return summary


def _open_encoders(spec: EmbedderSpec, cfg: IngestConfig) -> list[Embedder | EncoderProcess]:
    """One encoder, on this thread's interpreter on the CPU; in processes of their own on GPUs or when several
    are asked for, loaded at once (a model load is seconds each)."""
    devices = encoder_devices(cfg.device, cfg.encoders)
    if len(devices) == 1 and cfg.device not in ENCODER_PROCESS_DEVICES:
        return [Embedder(spec, device=cfg.device)]
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        opening = [pool.submit(EncoderProcess, spec, device=device) for device in devices]
        concurrent.futures.wait(opening)
    opened = [f.result() for f in opening if f.exception() is None]
    failed = [f.exception() for f in opening if f.exception() is not None]
    if failed:
        for encoder in opened:
            encoder.close()
        raise failed[0]
    if len(opened) > 1:
        log.info("embedding with %d encoder processes on %s", len(opened), ", ".join(devices))
    return opened


def _embed_and_write(produce: Callable[[Channel], None],
                     open_encoders: Callable[[], list[Embedder | EncoderProcess]],
                     open_for_writing: Callable[[Embedder | EncoderProcess], CorpusStore], store_lock: threading.Lock,
                     estimated_total: Callable[[], int]) -> tuple[int, int, dict]:
    """Encode the batches ``produce`` puts (read on a thread of their own), the first encoder on this thread and
    each other one on a thread of its own (they take batches in turn), and write them on one more thread; the
    encoders and the store are opened at the first batch. Returns the passages written, how many of them were
    longer than the embedder's window, and where the time went: the encoders are the stage that should never
    wait (waiting for passages: reading is too slow; for the writer: writing is)."""
    with contextlib.ExitStack() as after_the_threads, Pipeline("ingest") as pipe:
        todo = pipe.channel(QUEUED_BATCHES)
        pipe.start("read", produce, todo, closes=todo)
        batches = iter(todo)
        first = next(batches, None)
        if first is None:
            return 0, 0, {}
        started = time.perf_counter()
        encoders = open_encoders()
        loaded = time.perf_counter()
        for encoder in encoders:
            if isinstance(encoder, EncoderProcess):
                after_the_threads.callback(encoder.close)
        store = open_for_writing(encoders[0])
        bar = after_the_threads.enter_context(tqdm(total=estimated_total(), desc="embedding", unit="passage",
                                                   file=sys.stderr, mininterval=1.0))
        writer = _Writer(store, store_lock, encoders[0], bar, estimated_total)
        encoded = pipe.channel(QUEUED_BATCHES * len(encoders))
        pipe.start("write", writer.run, encoded)
        reading_wait = todo.get_wait
        tallies = [_EncoderTally(encoder) for encoder in encoders]
        for number, tally in enumerate(tallies[1:], 1):
            pipe.start(f"encode-{number}", tally.run, todo, encoded)
        try:
            tallies[0].run(itertools.chain([first], batches), encoded)
        except BaseException:
            todo.cancel()  # the other encoders stop after their batch in hand, which is still written
            raise
        finally:
            for tally in tallies[1:]:
                tally.done.wait()
            encoded.close()  # the writer finishes what was encoded, also when encoding stopped
            encoded_all = time.perf_counter()
    seconds = {"loading the embedder": loaded - started, "encoding": max(t.seconds for t in tallies),
               "waiting for passages": todo.get_wait - reading_wait, "waiting for the writer": encoded.put_wait,
               "writing": writer.writing, "counting tokens": writer.counting,
               "writing after the last encode": time.perf_counter() - encoded_all}
    if len(tallies) > 1:
        for tally in tallies:
            seconds[f"encoding on {tally.device}"] = tally.seconds
            log.info("encoder on %s: %d passages in %.1f s, %.1f passages/s", tally.device, tally.passages,
                     tally.seconds, tally.passages / tally.seconds if tally.seconds else 0.0)
    return writer.written, writer.over_window, {what: round(s, 2) for what, s in seconds.items()}


class _EncoderTally:
    """One encoder's loop: batches in, (batch, vectors) out, and what it did (passages, seconds encoding)."""

    def __init__(self, encoder: Embedder | EncoderProcess):
        self.encoder, self.device = encoder, encoder.device
        self.passages, self.seconds = 0, 0.0
        self.done = threading.Event()

    def run(self, batches, encoded: Channel) -> None:
        try:
            for batch in batches:
                before = time.perf_counter()
                vectors = self.encoder.encode_passages([p.contents for p in batch])
                self.seconds += time.perf_counter() - before
                self.passages += len(batch)
                encoded.put((batch, vectors))
        finally:
            self.done.set()


def _put_all(batches: list[list[Passage]]) -> Callable[[Channel], None]:
    def produce(out: Channel) -> None:
        for batch in batches:
            out.put(batch)
    return produce


class _Writer:
    """The pipeline's last stage: counts each batch's tokens (for the over-window warning) and writes it."""

    def __init__(self, store: CorpusStore, store_lock: threading.Lock, embedder: Embedder | EncoderProcess, bar: tqdm,
                 estimated_total: Callable[[], int]):
        self.store, self.store_lock, self.bar, self.estimated_total = store, store_lock, bar, estimated_total
        self.window, self.prefix = embedder.max_tokens, embedder.spec.passage_prefix
        self.count_tokens = embedder.token_counter() if self.window is not None else None
        self.written = self.over_window = 0
        self.writing = self.counting = 0.0   # seconds

    def run(self, batches: Channel) -> None:
        for batch, vectors in batches:
            started = time.perf_counter()
            if self.count_tokens is not None:
                counts = self.count_tokens([self.prefix + p.contents for p in batch])
                self.over_window += sum(n > self.window for n in counts)
            counted = time.perf_counter()
            with self.store_lock:
                self.written += _write(self.store, batch, vectors)
            self.counting += counted - started
            self.writing += time.perf_counter() - counted
            self.bar.total = max(self.estimated_total(), self.written)
            self.bar.update(len(batch))


def _write(store: CorpusStore, batch: list[Passage], vectors) -> int:
    store.add([p.id for p in batch], [p.contents for p in batch], [p.metadata for p in batch], vectors)
    return len(batch)
