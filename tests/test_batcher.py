"""The request coalescer, driven with a search function that records the batches it is given."""

import asyncio
import threading
import time

import pytest

from drzero.retrieval.batcher import QueryBatcher, ThreadedStages


class RecordingSearch:
    def __init__(self, seconds_per_batch: float = 0.02):
        self.batches: list[tuple[list[str], int]] = []
        self.seconds = seconds_per_batch
        self.lock = threading.Lock()

    def __call__(self, queries: list[str], topk: int):
        with self.lock:
            self.batches.append((list(queries), topk))
        time.sleep(self.seconds)  # a forward pass: while it runs, new requests queue up
        return [[f"{q}#{rank}" for rank in range(topk)] for q in queries]


def _run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_batches_and_each_gets_its_own_results():
    search = RecordingSearch()

    async def main():
        batcher = QueryBatcher(ThreadedStages(search).submit, max_batch=16, max_wait_ms=5)
        await batcher.start()
        results = await asyncio.gather(*(batcher.search([f"q{i}"], topk=1 + i % 3) for i in range(64)))
        await batcher.stop()
        return batcher, results

    batcher, results = _run(main())
    for i, result in enumerate(results):
        assert result == [[f"q{i}#{rank}" for rank in range(1 + i % 3)]]
    assert sum(len(queries) for queries, _ in search.batches) == 64
    assert len(search.batches) <= 8  # 64 requests in batches of up to 16, not 64 passes
    assert max(len(queries) for queries, _ in search.batches) <= 16
    for queries, topk in search.batches:  # a batch runs with the largest topk asked for in it
        assert topk == max(1 + int(q[1:]) % 3 for q in queries)
    assert batcher.batches_run == len(search.batches)


def test_a_lone_request_waits_at_most_max_wait():
    search = RecordingSearch(seconds_per_batch=0)

    async def main():
        batcher = QueryBatcher(ThreadedStages(search).submit, max_batch=64, max_wait_ms=50)
        await batcher.start()
        started = time.perf_counter()
        await batcher.search(["alone"], topk=2)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert _run(main()) < 0.5
    assert search.batches == [(["alone"], 2)]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    calls = {"n": 0}

    def flaky(queries, topk):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("encoder fell over")
        return [[q] for q in queries]

    async def main():
        batcher = QueryBatcher(ThreadedStages(flaky).submit, max_batch=4, max_wait_ms=1)
        await batcher.start()
        with pytest.raises(RuntimeError, match="encoder fell over"):
            await batcher.search(["first"], topk=1)
        second = await batcher.search(["second"], topk=1)
        await batcher.stop()
        return second

    assert _run(main()) == [["second"]]
