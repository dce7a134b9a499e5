"""What a solver step's searches cost, with the retriever on the GPU and on the CPU, and where its time goes.

    python3 benchmarks/search_step.py --device cuda,cpu --embedder e5-large-random --passages 20000 \\
        --out benchmarks/results/search-step-h100.md          # one GPU machine: both devices, one run

Parts:

1. ``step``: a solver step of the seed's setting replayed as verl sends it: 256 prompts x 5 trajectories, all
   at once; each trajectory makes up to 4 tool calls in turn, one ``POST /retrieve`` per call with its
   ``query_list`` (1-3 queries, as the model writes them), topk 3. Reported: seconds of search per step (the
   wall time of the replay: the rollouts' generation in between is not simulated, so this is the search's own
   share) and requests' p50/p99. On the CPU, ``--cpu-trajectories`` of them are replayed and the time scaled to
   the step (the CPU server is the bottleneck: time grows with the queries).
2. ``profile``: closed-loop single-query clients (``--clients``), and on the GPU clients sending 32 queries in
   each request (``--batch-clients``, ``--per-request``), against the same server, and each of its
   processes' CPU use over the measured window (``/proc/PID/stat``): an HTTP front at 100% of a core means the
   fronts are the limit, the search worker's GPU encode the ceiling otherwise. With several fronts (the default
   on a machine of 4 or more cores) each is listed, and the serving process that watches them as "server".

The corpus, model and ingest are benchmarks/retrieval.py's (synthetic passages, e5-large-v2's architecture with
random weights); ``--work`` caches them.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import _env

ROOT = _env.setup("benchmarks", **_env.OFFLINE, TOKENIZERS_PARALLELISM="false")

from loadgen import run_load  # noqa: E402
from retrieval import (benchmark_queries, bench_ingest, free_port, resolve_embedder, start_server,  # noqa: E402
                       table)

PROMPTS, ROLLOUT_N, MAX_SEARCHES = 256, 5, 4  # the seed's setting: verl's train_batch_size, rollout.n, turns - 1


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def _family(pid: int) -> dict[int, str]:
    """The server and its children, each by its role: with ``--fronts N`` every front process (each names itself
    ``drzero-front-K``) is a "front" and the serving process a "server"; with one front the server is the front."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                name = (entry / "comm").read_text().strip()
                command = (entry / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid and b"resource_tracker" not in command:
                found[int(entry.name)] = "front" if name.startswith("drzero-front") else "worker"
    return {pid: "server" if "front" in found.values() else "front", **found}


class CpuSampler:
    """Each process's share of one core between ``start`` and ``stop``."""

    def __init__(self, pid: int):
        self.processes = _family(pid)

    def start(self) -> None:
        self.began, self.first = time.perf_counter(), {p: _ticks(p) for p in self.processes}

    def stop(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.began
        hz = os.sysconf("SC_CLK_TCK")
        return {f"{role} {pid}": (_ticks(pid) - self.first[pid]) / hz / seconds for pid, role in self.processes.items()}


async def _trajectory(session, url: str, queries: list[str], rng: random.Random, latencies: list[float]) -> int:
    searches = rng.randint(1, MAX_SEARCHES)
    sent = 0
    for _ in range(searches):
        query_list = [queries[rng.randrange(len(queries))] for _ in range(rng.randint(1, 3))]
        started = time.perf_counter()
        async with session.post(f"{url}/retrieve", json={"queries": query_list, "topk": 3,
                                                           "return_scores": True}) as reply:
            await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"the retriever answered {reply.status}")
        latencies.append((time.perf_counter() - started) * 1000)
        sent += len(query_list)
    return sent


async def _replay(url: str, queries: list[str], trajectories: int, seed: int) -> tuple[float, int, list[float]]:
    import aiohttp

    rng = random.Random(seed)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=1800)) as session:
        started = time.perf_counter()
        sent = await asyncio.gather(*(_trajectory(session, url, queries, random.Random(rng.random()), latencies)
                                      for _ in range(trajectories)))
    return time.perf_counter() - started, sum(sent), latencies


def bench_step(device: str, port: int, queries: list[str], trajectories: int) -> list:
    seconds, sent, latencies = asyncio.run(_replay(f"http://127.0.0.1:{port}", queries, trajectories, seed=1))
    full = PROMPTS * ROLLOUT_N
    per_step = seconds * full / trajectories
    print(f"  step on {device}: {trajectories} trajectories, {len(latencies)} requests, {sent} queries in "
          f"{seconds:.2f}s -> {per_step:.2f}s per step of {full}", flush=True)
    return [device, trajectories, len(latencies), sent, seconds, per_step, statistics.median(latencies),
            float(np.percentile(latencies, 99))]


def bench_profile(device: str, server, port: int, queries: list[str], clients: list[tuple[int, int]],
                  seconds: float) -> list:
    """``clients``: (closed-loop clients, queries per request) pairs."""
    rows = []
    for count, per_request in clients:
        sampler = CpuSampler(server.pid)
        timer = threading.Timer(2.0, sampler.start)  # after loadgen's warm-up
        timer.start()
        load = run_load(f"http://127.0.0.1:{port}", queries, count, seconds, per_request=per_request)
        cpu = sampler.stop()
        shares = ", ".join(f"{name}: {share:.0%}" for name, share in cpu.items())
        print(f"  {device} {count:>3} clients x {per_request} queries: {load.qps:8.1f} q/s p50 {load.p50:.1f} ms "
              f"p99 {load.p99:.1f} ms; CPU {shares}", flush=True)
        rows.append([device, count, per_request, load.qps, load.p50, load.p99, load.errors, shares])
    return rows


def bench_encoders(embedder_name: str, queries: list[str]) -> list:
    """The encoder alone on the same queries: sentence-transformers' encode and the fixed-shape CUDA-graph encoder,
    one query at a time (latency) and 256 at a time (throughput, tokenization included)."""
    import torch

    from drzero.corpus.bucketed_encoder import BucketedEncoder
    from drzero.corpus.embedder import Embedder, spec_for

    embedder = Embedder(spec_for(embedder_name), device="cuda")
    prefixed = [embedder.spec.query_prefix + q for q in queries]
    fast = BucketedEncoder.of(embedder)
    fast.warm()
    cosine = fast.check_against(embedder, prefixed[:256])
    rows = []
    for name, encode in (("sentence-transformers encode", lambda batch: embedder.encode(batch, "", as_tensor=True)),
                         ("fixed shapes + CUDA graphs", fast.encode)):
        for size in (1, 256):
            batches = [prefixed[i:i + size] for i in range(0, min(len(prefixed), 2048 if size > 1 else 300), size)]
            encode(batches[0])
            torch.cuda.synchronize()
            started = time.perf_counter()
            for batch in batches:
                encode(batch)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            queries_done = sum(map(len, batches))
            rows.append([name, size, queries_done / seconds, seconds / len(batches) * 1000])
            print(f"  {name}, batch {size}: {queries_done / seconds:,.0f} queries/s, "
                  f"{seconds / len(batches) * 1000:.2f} ms per batch", flush=True)
    rows.append(["fixed shapes vs sentence-transformers: lowest cosine", 256, cosine, ""])
    return rows


def main() -> int:
    parser = _env.parser(__doc__)
    parser.add_argument("--device", default="cuda,cpu", help="comma-separated retriever devices")
    parser.add_argument("--embedder", default="e5-large-random")
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clients", default="1,16,256", help="profile: closed-loop single-query clients")
    parser.add_argument("--batch-clients", default="16", help="profile on the GPU: clients sending --per-request "
                                                              "queries in each request (comma-separated)")
    parser.add_argument("--per-request", type=int, default=32, help="queries in each request of --batch-clients")
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--servers", default="drzero", help="comma-separated: drzero, no-fast-encoder (GPU only)")
    parser.add_argument("--cpu-trajectories", type=int, default=32, help="step on the CPU: trajectories replayed")
    parser.add_argument("--work", type=Path, default=ROOT / ".drzero" / "bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.corpus, args.papers, args.ingest_seconds, args.encoder_sample = "synthetic", 0, 0, 2000
    args.work.mkdir(parents=True, exist_ok=True)
    embedder = resolve_embedder(args.embedder, args.work)
    db = args.work / f"synthetic-{args.passages}-{Path(embedder).name}"
    queries = benchmark_queries(args)
    report = [f"# search per solver step, {time.strftime('%Y-%m-%d')}", "", "    " + " ".join(sys.argv)]
    devices = args.device.split(",")
    with_ingest_device = devices[0]
    args.device = with_ingest_device
    text, _ = bench_ingest(args, embedder, db, args.work)
    report.append(text)
    steps, profiles, encoders = [], [], []
    if "cuda" in devices:
        encoders = bench_encoders(embedder, queries)
    runs = [(device, kind) for device in devices for kind in args.servers.split(",")
            if device == "cuda" or kind == "drzero"]
    for device, kind in runs:
        port = free_port()
        server = start_server(kind, db, device, port, args.work)
        label = device if kind == "drzero" else f"{device} {kind}"
        try:
            trajectories = PROMPTS * ROLLOUT_N if device == "cuda" else args.cpu_trajectories
            steps.append(bench_step(label, port, queries, trajectories))
            clients = [(int(c), 1) for c in args.clients.split(",")] if device == "cuda" else [(1, 1), (16, 1)]
            if device == "cuda":
                clients += [(int(c), args.per_request) for c in args.batch_clients.split(",") if c]
            profiles += bench_profile(label, server, port, queries, clients, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=60)
    if encoders:
        report.append(table("the query encoder alone (same queries, same card)",
                            ["encoder", "batch", "queries/s", "ms per batch"], encoders))
    report.append(table("a solver step's searches (256 prompts x 5 trajectories, 1-4 calls each, 1-3 queries "
                        "per call)", ["retriever", "trajectories", "requests", "queries", "seconds",
                                      "seconds per step", "p50 ms", "p99 ms"], steps))
    report.append(table("closed-loop clients, and each retriever process's CPU (one core = 100%)",
                        ["retriever", "clients", "queries per request", "queries/s", "p50 ms", "p99 ms", "errors",
                         "CPU"], profiles))
    print("\n".join(report[3:]))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
