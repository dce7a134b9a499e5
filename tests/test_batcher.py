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


def test_a_large_request_is_sliced_and_small_ones_are_served_between_its_slices():
    search = RecordingSearch(seconds_per_batch=0.02)

    def encode(queries):  # the encoder is the stage that takes time; the lookup then answers
        time.sleep(0.02)
        return queries

    async def main():
        batcher = QueryBatcher(ThreadedStages(search, encode=encode).submit, max_batch=8)
        await batcher.start()
        big = asyncio.create_task(batcher.search([f"big{i}" for i in range(40)], topk=2))
        await asyncio.sleep(0.005)  # the first slice of the big request is in the encoder
        small = await asyncio.gather(*(batcher.search([f"small{i}"], topk=1) for i in range(5)))
        result = await big
        await batcher.stop()
        return result, small

    big, small = _run(main())
    assert big == [[f"big{i}#0", f"big{i}#1"] for i in range(40)]  # in order, each query its own results
    assert small == [[[f"small{i}#0"]] for i in range(5)]
    assert max(len(queries) for queries, _ in search.batches) <= 8
    small_batch = next(n for n, (queries, _) in enumerate(search.batches) if "small0" in queries)
    last_big = max(n for n, (queries, _) in enumerate(search.batches) if any(q.startswith("big") for q in queries))
    assert small_batch < last_big, "the small requests waited for the whole large request"


def test_a_failing_batch_is_rerun_request_by_request_so_only_the_bad_one_fails():
    batches = []

    def search(queries, topk):
        batches.append(list(queries))
        time.sleep(0.01)
        if "poison" in queries:
            raise ValueError("cannot tokenize 'poison'")
        return [[q] for q in queries]

    async def main():
        batcher = QueryBatcher(ThreadedStages(search).submit, max_batch=64)
        await batcher.start()
        await batcher.search(["warm"], topk=1)  # the next ones queue up behind a busy encoder
        blocker = asyncio.create_task(batcher.search(["blocker"], topk=1))
        await asyncio.sleep(0.001)
        outcomes = await asyncio.gather(*(batcher.search([q], topk=1) for q in ["a", "poison", "b", "c"]),
                                        return_exceptions=True)
        await blocker
        await batcher.stop()
        return outcomes

    outcomes = _run(main())
    assert outcomes[0] == [["a"]] and outcomes[2] == [["b"]] and outcomes[3] == [["c"]]
    assert isinstance(outcomes[1], ValueError) and "poison" in str(outcomes[1])
    assert ["a", "poison", "b", "c"] in batches  # they were coalesced first, then re-run alone
    assert ["poison"] in batches and ["a"] in batches


def test_batches_form_while_the_encoder_is_busy_and_a_lone_request_is_not_held_back():
    search = RecordingSearch(seconds_per_batch=0.2)

    async def main():
        batcher = QueryBatcher(ThreadedStages(search).submit, max_batch=64)  # no max_wait: the default
        await batcher.start()
        started = time.perf_counter()
        first = asyncio.create_task(batcher.search(["first"], topk=1))
        await asyncio.sleep(0.05)
        rest = await asyncio.gather(*(batcher.search([f"q{i}"], topk=1) for i in range(10)))
        await first
        lone_started = time.perf_counter()
        await batcher.search(["lone"], topk=1)
        lone = time.perf_counter() - lone_started
        assert batcher.busy_for() is None and batcher.last_success > started
        await batcher.stop()
        return rest, lone

    rest, lone = _run(main())
    assert rest == [[[f"q{i}#0"]] for i in range(10)]
    assert search.batches[0] == (["first"], 1)  # taken at once, no waiting for company
    assert search.batches[1] == ([f"q{i}" for i in range(10)], 1)  # the ten that arrived meanwhile: one batch
    assert lone < 0.2 + 0.15  # one forward pass and the hops, nothing added


def test_without_coalescing_every_batch_is_one_request():
    search = RecordingSearch(seconds_per_batch=0.01)

    async def main():
        batcher = QueryBatcher(ThreadedStages(search).submit, max_batch=64, coalesce=False)
        await batcher.start()
        await asyncio.gather(*(batcher.search([f"q{i}", f"r{i}"], topk=1) for i in range(6)))
        await batcher.stop()

    _run(main())
    assert sorted(queries for queries, _ in search.batches) == sorted([f"q{i}", f"r{i}"] for i in range(6))
