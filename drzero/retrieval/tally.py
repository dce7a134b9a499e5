"""The counts ``GET /health`` shows, kept in one block of memory that every process of the retriever shares.

With several HTTP fronts (``--fronts``) a request for ``/health`` is answered by whichever front the kernel gave
the connection to, yet what it reports must be the server's: the batches and queries every front ran, the
connections every front cut, how busy the one search worker is. So each front, and the worker, keeps its counts in
a row of its own in this block (one writer per row: no locks), and any front reads all the rows. The open
connections of all fronts together also enforce ``--max-connections`` for the whole server
(``http_guards.read_deadline_protocol``).

The serving process creates the block and hands it to the worker and to each front as it starts them; with one
front it is the serving process's own (and the worker's).
"""

from __future__ import annotations

import ctypes
import time
from multiprocessing.sharedctypes import RawArray

from drzero.retrieval.http_guards import CUT_REASONS

FRONT_FIELDS = ("pid", "batches_run", "queries_run", "queries_refused", "connections_open", "connections_cut",
                *CUT_REASONS)
WORKER_FIELDS = ("pid", "encoder_passes", "front_batches", "passes_with_several_fronts",
                 "busy_since_ns", "last_done_ns")  # time.monotonic_ns(): one clock for every process of the host
# What /health shows of each row (busy_since_ns and last_done_ns only serve its freshness check).
FRONT_SHOWN = ("pid", "batches_run", "queries_run", "queries_refused", "connections_open", "connections_cut")
WORKER_SHOWN = ("pid", "encoder_passes", "front_batches", "passes_with_several_fronts")


class Row:
    """One process's counts: written by that process only (one thread per field), read by every front."""

    def __init__(self, cells, start: int, fields: tuple[str, ...]):
        self._cells = cells
        self._at = {name: start + offset for offset, name in enumerate(fields)}

    def __getitem__(self, name: str) -> int:
        return self._cells[self._at[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self._cells[self._at[name]] = value

    def add(self, name: str, count: int = 1) -> None:
        self._cells[self._at[name]] += count

    def shown(self, names: tuple[str, ...]) -> dict[str, int]:
        return {name: self[name] for name in names}


class FrontCounts(Row):
    """A front's row; also the ``SharedConnections`` its HTTP protocol counts open connections with."""

    def __init__(self, tally: "Tally", index: int):
        super().__init__(tally.cells, tally.front_start(index), FRONT_FIELDS)
        self.index = index
        open_at = FRONT_FIELDS.index("connections_open")
        self._others_open = [tally.front_start(other) + open_at for other in range(1, tally.fronts + 1)
                             if other != index]

    def batch_done(self, queries: int) -> None:
        self.add("batches_run")
        self.add("queries_run", queries)

    def cut(self, reason: str) -> None:
        self.add("connections_cut")
        self.add(reason)

    def here(self, count: int) -> None:
        """This front has ``count`` connections open now."""
        self["connections_open"] = count

    def elsewhere(self) -> int:
        """Connections open in the other fronts (read on every request: kept to a few cell reads)."""
        return sum(self._cells[at] for at in self._others_open)


class Tally:
    """The block: the worker's row, then one row per front (fronts are numbered from 1)."""

    def __init__(self, fronts: int = 1):
        self.fronts = fronts
        self.cells = RawArray(ctypes.c_int64, len(WORKER_FIELDS) + fronts * len(FRONT_FIELDS))  # zeroed

    def front_start(self, index: int) -> int:
        if not 1 <= index <= self.fronts:
            raise IndexError(f"front {index} of {self.fronts}")
        return len(WORKER_FIELDS) + (index - 1) * len(FRONT_FIELDS)

    def front(self, index: int) -> FrontCounts:
        return FrontCounts(self, index)

    @property
    def worker(self) -> Row:
        return Row(self.cells, 0, WORKER_FIELDS)

    def worker_busy_for(self) -> float | None:
        """Seconds the worker's oldest forward pass in flight has taken so far; None when it has none."""
        since = self.worker["busy_since_ns"]
        return None if since == 0 else (time.monotonic_ns() - since) / 1e9

    def worker_last_done(self) -> float:
        """``time.monotonic()`` when the worker last finished a pass; -inf before its first."""
        done = self.worker["last_done_ns"]
        return float("-inf") if done == 0 else done / 1e9

    def summary(self) -> dict:
        """The server's counts for /health: totals over the fronts, each front's own, and the worker's."""
        fronts = [self.front(index) for index in range(1, self.fronts + 1)]

        def total(name: str) -> int:
            return sum(front[name] for front in fronts)

        return {"batches_run": total("batches_run"), "queries_run": total("queries_run"),
                "queries_refused": total("queries_refused"), "connections_cut": total("connections_cut"),
                "connections_cut_by_reason": {reason: total(reason) for reason in CUT_REASONS if total(reason)},
                "per_front": [{"front": front.index, **front.shown(FRONT_SHOWN)} for front in fronts],
                "worker": self.worker.shown(WORKER_SHOWN)}
