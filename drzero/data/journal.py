"""Finished items of a long stage, kept on disk in small shards so that a killed run resumes.

    journal = ShardJournal(directory, key={"seeds": sha, "rows": [10, 20], ...})
    done = journal.load()                # {item: record} from an earlier run with the same key
    journal.record("train/3", {...})     # buffered; written as one shard every 64 items or 30 s
    journal.flush()                      # at the end of the work
    journal.remove()                     # once the stage's outputs are committed

Each shard is a JSON-lines file written through ``drzero.atomic.write_atomically``, so a kill
loses at most the items not yet flushed, never a shard half written. Shards from a run with a
different key (other seeds, other settings) are discarded with a warning, never mixed in.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from drzero.atomic import write_json_atomically, write_text_atomically

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
SHARD_ITEMS = 64        # a kill loses at most this many finished items ...
SHARD_SECONDS = 30.0    # ... or this much work, whichever is less


class ShardJournal:
    def __init__(self, directory: Path, key: dict, every: int = SHARD_ITEMS, seconds: float = SHARD_SECONDS):
        self.directory = directory
        self.key = json.loads(json.dumps(key))  # as it will read back from disk
        self.every, self.seconds = every, seconds
        self._buffer: list[tuple[str, dict]] = []
        self._last_flush = time.monotonic()
        self._next_shard = 0

    def _shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.jsonl"))

    def load(self) -> dict[str, dict]:
        """Items an earlier run with the same key finished; starts a fresh journal otherwise."""
        done: dict[str, dict] = {}
        if self.directory.is_dir():
            key_path = self.directory / KEY_FILE
            try:
                recorded = json.loads(key_path.read_text())
            except (OSError, ValueError):
                recorded = None
            if recorded == self.key:
                for leftover in self.directory.glob(".*.tmp"):  # a shard a kill interrupted
                    leftover.unlink(missing_ok=True)
                for shard in self._shards():
                    for line in shard.read_text().splitlines():
                        entry = json.loads(line)
                        done[entry["item"]] = entry["record"]
                self._next_shard = len(self._shards())
            else:
                log.warning("discarding the shards in %s: they were written with other settings or inputs",
                            self.directory)
                shutil.rmtree(self.directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            write_json_atomically(self.key, self.directory / KEY_FILE)
        return done

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
