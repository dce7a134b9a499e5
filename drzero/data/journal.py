"""Finished items of a long stage, kept on disk in small shards so that a killed run resumes.

    journal = ShardJournal(directory, key={"seeds": sha, "rows": [10, 20], ...})
    done = journal.load()                # {item: record} from an earlier run with the same key
    journal.record("train/3", {...})     # buffered; written as one shard every 64 items or 30 s
    journal.flush()                      # at the end of the work
    journal.remove()                     # once the stage's outputs are committed

Each shard is a JSON-lines file written through ``drzero.atomic.write_atomically``, so a kill
loses at most the items not yet flushed, never a shard half written. Shards from a run with a
different key (other seeds, other settings) are discarded with a warning, never mixed in. A shard
whose lines are not ``{"item", "record"}`` of the record's shape (drzero.records), or a key file
that cannot be read, is moved aside with one sentence, and the items it held are done again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from drzero.atomic import write_json_atomically, write_text_atomically
from drzero.records import DamagedRecord, parse_record, read_record, set_aside

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
SHARD_ITEMS = 64        # a kill loses at most this many finished items ...
SHARD_SECONDS = 30.0    # ... or this much work, whichever is less


class ShardJournal:
    def __init__(self, directory: Path, key: dict, every: int = SHARD_ITEMS, seconds: float = SHARD_SECONDS,
                 record_shape: object = dict, warn=log.warning):
        self.directory = directory
        self.key = json.loads(json.dumps(key))  # as it will read back from disk
        self.every, self.seconds = every, seconds
        self.entry_shape = {"item": str, "record": record_shape}  # one line of a shard (drzero.records)
        self.warn = warn
        self._buffer: list[tuple[str, dict]] = []
        self._last_flush = time.monotonic()
        self._next_shard = 0

    def _shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.jsonl"))

    def load(self) -> dict[str, dict]:
        """Items an earlier run with the same key finished; starts a fresh journal otherwise."""
        done: dict[str, dict] = {}
        if self.directory.is_dir() and self._recorded_key() == self.key:
            for leftover in self.directory.glob(".*.tmp"):  # a shard a kill interrupted
                leftover.unlink(missing_ok=True)
            for shard in self._shards():
                done.update(self._read_shard(shard))
            self._next_shard = len(self._shards())
        elif self.directory.is_dir():
            log.warning("discarding the shards in %s: they were written with other settings or inputs",
                        self.directory)
            shutil.rmtree(self.directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            write_json_atomically(self.key, self.directory / KEY_FILE)
        return done

    def _recorded_key(self) -> dict | None:
        """The key the shards were written under; a damaged key file moves the whole journal aside (shards of
        unknown settings can be trusted no more than none)."""
        try:
            return read_record(self.directory / KEY_FILE, dict)
        except DamagedRecord as damage:
            set_aside(self.directory, f"its {KEY_FILE} is damaged ({damage})", "every item is done again", self.warn)
            return None

    def _read_shard(self, shard: Path) -> dict[str, dict]:
        """The items of one shard; none when any line is damaged (the shard is moved aside, its items redone)."""
        items: dict[str, dict] = {}
        try:
            lines = shard.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    entry = parse_record(line, self.entry_shape)
                except DamagedRecord as damage:
                    raise DamagedRecord(f"line {number}: {damage}") from None
                items[entry["item"]] = entry["record"]
        except (DamagedRecord, OSError, UnicodeDecodeError) as damage:
            set_aside(shard, str(damage), "the items it held are done again", self.warn)
            return {}
        return items

    def record(self, item: str, record: dict) -> None:
        self._buffer.append((item, record))
        if len(self._buffer) >= self.every or time.monotonic() - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        text = "".join(json.dumps({"item": item, "record": record}, ensure_ascii=False) + "\n"
                       for item, record in self._buffer)
        while (self.directory / f"shard-{self._next_shard:06d}.jsonl").exists():
            self._next_shard += 1
        write_text_atomically(text, self.directory / f"shard-{self._next_shard:06d}.jsonl")
        self._next_shard += 1
        self._buffer = []

    def remove(self) -> None:
        self._buffer = []
        shutil.rmtree(self.directory, ignore_errors=True)
