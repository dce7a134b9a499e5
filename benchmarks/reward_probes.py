"""Proposer-reward probes: how close the rollout client gets to the server's ideal throughput.

    .venv/bin/python benchmarks/reward_probes.py                    # 256 questions, latency 0.2 s, concurrency 64
    .venv/bin/python benchmarks/reward_probes.py --questions 64 256 1024

Each question is scored by ``drzero.rewards.proposer.compute_score`` as verl's reward loop does
(all samples gathered at once): 5 solver probes, each up to 3 turns (search, search, answer),
against the stand-in SGLang server from ``tests/fake_sglang.py`` with a fixed per-request
latency, and a stand-in retriever that answers at once (run in a separate process, so the
client's own CPU is what is measured). The baseline is the ideal, computed in the same run:
total server latency / concurrency = requests x latency / 64. Target: wall <= 1.15 x ideal;
peak memory (RSS of a fresh client process per size) flat as the question count grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time

import _env

ROOT = _env.setup("tests", "benchmarks")

PROBES, TURNS = 5, 3


def question(i: int) -> str:
    return f"Which institution employs the first author of paper number {i}?"


def serve(latency: float) -> None:
    """Child process: the stand-in SGLang server and a stand-in retriever, until killed."""
    import socket
    import threading

    import uvicorn
    from fastapi import FastAPI

    from fake_sglang import FakeSGLang, Faults, SearchThenAnswer

    retriever = FastAPI()

    @retriever.post("/retrieve")
    async def retrieve(body: dict):
        hit = {"document": {"id": "d1", "contents": "Tessaly Institute\nA research institute in Ravenport.",
                            "title": "Tessaly Institute"}, "score": 0.9}
        return {"result": [[hit] * body.get("topk", 3) for _ in body["queries"]]}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    retriever_url = f"http://127.0.0.1:{sock.getsockname()[1]}/retrieve"
    server = uvicorn.Server(uvicorn.Config(retriever, log_level="warning", access_log=False, lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    # answers cycle: of 5 probes, 2 match the proposer's answer
    fake = FakeSGLang(SearchThenAnswer({}, default=["Tessaly Institute", "x", "Tessaly Institute", "y", "z"],
                                       searches=TURNS - 1), faults=Faults(latency_s=latency))
    with fake.serve() as base_url:
        print(json.dumps({"sglang": base_url, "retriever": retriever_url}), flush=True)
        while True:
            time.sleep(3600)


def proposal(i: int) -> str:
    return (f"<think>plan</think><question>{question(i)}</question><answer>Tessaly Institute</answer>")


def client(questions: int, urls: dict, concurrency: int) -> None:
    """Child process: score ``questions`` proposals at once; print wall time, results and peak RSS."""
    from drzero.rewards import proposer

    async def run():
        started = time.perf_counter()
        results = await asyncio.gather(*(proposer.compute_score(
            "search_zero_1", proposal(i), None, {"hops": 1, "seed_document": "Tessaly Institute"},
            base_url=urls["sglang"], model_name="solver", n=PROBES, retriever_url=urls["retriever"],
            concurrency=concurrency, max_turns=TURNS,
            api="chat",  # measures the HTTP fan-out; the chat wire needs no tokenizer in the stand-in
        ) for i in range(questions)))
        return time.perf_counter() - started, results

    wall, results = asyncio.run(run())
    print(json.dumps({"wall": wall, "k": sorted({r["k"] for r in results}),
                      "errors": sum(r["probe_errors"] for r in results),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    parser = _env.parser(__doc__)
    parser.add_argument("--questions", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per generate request (default 0.2)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.latency)
        return 0
    if args.client:
        client(args.questions[0], json.loads(args.client), args.concurrency)
        return 0

    from retrieval import table

    servers = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(args.latency)],
                               stdout=subprocess.PIPE, text=True)
    try:
        urls = json.loads(servers.stdout.readline())
        rows = []
        for count in args.questions:
            out = subprocess.run([sys.executable, __file__, "--client", json.dumps(urls), "--questions", str(count),
                                  "--concurrency", str(args.concurrency)], capture_output=True, text=True,
                                 check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            requests = count * PROBES * TURNS
            ideal = requests * args.latency / args.concurrency
            rows.append([count, requests, ideal, result["wall"], result["wall"] / ideal, result["peak_rss_mb"],
                         result["errors"], ",".join(str(int(k)) for k in result["k"])])
            print(f"  {count} questions: {result['wall']:.2f}s (ideal {ideal:.2f}s)", flush=True)
    finally:
        servers.kill()
    print(table(f"proposer reward probes: {PROBES} probes x {TURNS} turns, latency {args.latency}s, "
                f"concurrency {args.concurrency}",
                ["questions", "requests", "ideal s", "wall s", "wall/ideal", "peak RSS MB", "errors", "k seen"], rows))
    headline = next((r for r in rows if r[0] == 256), rows[0])
    print(f"wall/ideal at {headline[0]} questions: {headline[4]:.3f} -> target <= 1.15 "
          f"{'MET' if headline[4] <= 1.15 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
