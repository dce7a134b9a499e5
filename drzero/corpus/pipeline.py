"""Stages on their own threads, joined by bounded channels; the first failure stops every stage and is raised once.

    with Pipeline() as pipe:
        batches = pipe.channel(4)
        pipe.start("reader", read_batches, batches, closes=batches)   # read_batches(batches) puts; closed at its end
        for batch in batches:                                         # the caller's thread is a stage too
            ...

``drzero ingest`` runs three stages at once this way: reading and splitting, encoding (the caller's thread), and
writing to the store. Bounded channels keep memory constant whatever the corpus size: a fast stage waits for
room in front of a slow one.

When a stage's thread raises, every channel is cancelled: each stage waiting on one (or reaching one later)
gets ``Stopped`` and ends, and the caller's ``with`` block raises the stage's exception, once. When the caller's
own block raises (a failed encode, Ctrl-C) or leaves early, the stages feeding it are cancelled, while a stage it
feeds through a channel it has closed still finishes what is in it (what was encoded is written); then the
caller's exception goes on. Leaving the block always waits for every thread: none is left running.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Iterator


class Stopped(Exception):
    """The pipeline stopped (a stage failed, or the caller left): the stage that sees it has nothing more to do."""


class Channel:
    """A bounded FIFO between two stages: ``put`` waits for room, iteration ends after ``close`` once drained,
    and after ``cancel`` every waiting or later ``put`` and ``get`` raises ``Stopped``.

    ``put_wait`` and ``get_wait`` add up the seconds its producer waited for room and its consumer for items:
    which stage held the others back."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a channel holds at least one item, not {size}")
        self.size = size
        self._items: deque = deque()
        self._changed = threading.Condition()
        self.closed = False
        self.cancelled = False
        self.put_wait = self.get_wait = 0.0

    def put(self, item: Any) -> None:
        with self._changed:
            if len(self._items) >= self.size and not self.cancelled:
                started = time.perf_counter()
                while len(self._items) >= self.size and not self.cancelled:
                    self._changed.wait()
                self.put_wait += time.perf_counter() - started
            if self.cancelled:
                raise Stopped
            if self.closed:
                raise RuntimeError("put on a closed channel")
            self._items.append(item)
            self._changed.notify_all()

    def close(self) -> None:
        """No more items: the consumer gets what is queued, then its iteration ends."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def cancel(self) -> None:
        """Drop what is queued; whoever waits on this channel, now or later, gets ``Stopped``."""
        with self._changed:
            self.cancelled = True
            self._items.clear()
            self._changed.notify_all()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._changed:
                if not self._items and not self.closed and not self.cancelled:
                    started = time.perf_counter()
                    while not self._items and not self.closed and not self.cancelled:
                        self._changed.wait()
                    self.get_wait += time.perf_counter() - started
                if self.cancelled:
                    raise Stopped
                if not self._items:
                    return
                item = self._items.popleft()
                self._changed.notify_all()
            yield item


class Pipeline:
    """Threads running stages, the channels between them, and the first exception any of them raised."""

    def __init__(self, name: str = "pipeline"):
        self.name = name
        self.error: BaseException | None = None
        self._channels: list[Channel] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def channel(self, size: int) -> Channel:
        channel = Channel(size)
        self._channels.append(channel)
        return channel

    def start(self, name: str, stage: Callable[..., None], *args: Any, closes: Channel | None = None) -> None:
        """Run ``stage(*args)`` on a thread; ``closes`` is closed when it returns (its consumer then ends)."""
        def run() -> None:
            try:
                stage(*args)
            except Stopped:
                return
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, raised there once
                self.fail(error)
                return
            if closes is not None:
                closes.close()

        # daemon: a second Ctrl-C while the caller waits for the threads still ends the process
        thread = threading.Thread(target=run, name=f"{self.name}-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (the first one wins) and cancel every channel: all stages stop."""
        with self._lock:
            if self.error is None:
                self.error = error
        for channel in self._channels:
            channel.cancel()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, Stopped):
            with self._lock:
                if self.error is None:
                    self.error = error
        for channel in self._channels:
            if not channel.closed:  # the stages feeding the caller stop; the ones it fed finish their input
                channel.cancel()
        for thread in self._threads:
            thread.join()
        if self.error is None or self.error is error:
            return False  # the caller's own exception (or none) goes on as it is
        failure = self.error
        failure.__suppress_context__ = failure.__cause__ is None  # not "during handling of Stopped"
        raise failure
