"""A closed-loop load generator for `POST /retrieve`: C clients, each sending one query per request
(or ``--per-request`` N) back to back for a fixed time, spread over P processes so that the client does not become the
bottleneck it measures (one aiohttp process tops out at a few thousand requests a second).

    python benchmarks/loadgen.py URL --clients 256 --seconds 15 --queries queries.json
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass

import numpy as np

import _env


@dataclass
class Load:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    per_request: int = 1  # queries in each request

    @property
    def qps(self) -> float:
        """Queries (not requests) answered per second."""
        return (self.requests - self.errors) * self.per_request / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")


async def _drive(url: str, queries: list[str], clients: int, seconds: float, offset: int, topk: int,
                 warmup: float, per_request: int = 1) -> tuple[int, int, list[float]]:
    import aiohttp

    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        warm_until = time.perf_counter() + warmup
        stop_at = warm_until + seconds

        async def worker(number: int):
            i = offset + number * 7919
            while True:
                started = time.perf_counter()
                if started >= stop_at:
                    return
                i += per_request
                batch = [queries[(i + j) % len(queries)] for j in range(per_request)]
                try:
                    async with session.post(f"{url}/retrieve", json={"queries": batch, "topk": topk}) as reply:
                        await reply.read()
                        ok = reply.status == 200
                except Exception:  # a refused or dropped connection is an error of the server under test
                    ok = False
                if started >= warm_until:  # requests begun in the warm-up are not counted
                    latencies.append((time.perf_counter() - started) * 1000)
                    counts["requests"] += 1
                    counts["errors"] += not ok

        await asyncio.gather(*(worker(n) for n in range(clients)))
    return counts["requests"], counts["errors"], latencies


def _process(args) -> tuple[int, int, list[float]]:
    return asyncio.run(_drive(*args))


def run_load(url: str, queries: list[str], clients: int, seconds: float, topk: int = 3, processes: int | None = None,
             warmup: float = 2.0, per_request: int = 1) -> Load:
    """``clients`` closed-loop clients for ``seconds`` (after ``warmup``), over up to ``processes`` processes, each
    request carrying ``per_request`` queries."""
    processes = max(1, min(processes or max(1, multiprocessing.cpu_count() // 4), clients))
    shares = [clients // processes + (p < clients % processes) for p in range(processes)]
    jobs = [(url, queries, share, seconds, p * 104729, topk, warmup, per_request)
            for p, share in enumerate(shares) if share]
    if len(jobs) == 1:
        results = [_process(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_process, jobs)
    requests = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = [x for r in results for x in r[2]]
    # each process counts only the requests it began inside its own ``seconds`` window after the warm-up
    return Load(clients, requests, errors, seconds, latencies, per_request)


def main() -> None:
    parser = _env.parser(__doc__)
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--per-request", type=int, default=1, help="queries in each request")
    parser.add_argument("--queries", required=True, help="a JSON list of query strings")
    args = parser.parse_args()
    load = run_load(args.url, json.load(open(args.queries)), args.clients, args.seconds, processes=args.processes,
                    per_request=args.per_request)
    print(json.dumps({"clients": load.clients, "qps": load.qps, "p50_ms": load.p50, "p99_ms": load.p99,
                      "errors": load.errors, "requests": load.requests}))


if __name__ == "__main__":
    main()
