"""Retrieval benchmarks: serving throughput and latency against a simple-design baseline, recall against
exact search, ingest against the bare encoder. Every comparison's baseline runs in the same run.

    .venv/bin/python benchmarks/retrieval.py                      # CPU: MiniLM, the demo world (~20k passages)
    .venv/bin/python benchmarks/retrieval.py --papers 300 --seconds 3 --clients 1,16   # smoke
    python3 benchmarks/retrieval.py --device cuda --embedder e5-large-random --corpus synthetic \\
        --passages 1000000 --ingest-seconds 420 --clients 1,16,64,256,512 --out results.md   # one GPU

Parts (``--only``, repeatable; default all):

1. ``encoder``: the bare encoder (sentence-transformers ``encode``) on the benchmark queries at batch 256,
   fp32 and (on CUDA) fp16: the ceiling the server is measured against.
2. ``ingest``: ``drzero ingest`` passages/s against the bare encoder's passages/s on the same texts.
   With ``--corpus synthetic`` this also builds the corpus (100-200-word passages); ``--ingest-seconds``
   caps it at what the measured encoder rate gets through in that time. Target: >= 70%.
3. ``recall``: recall@3 against exact fp32 search (fp32 encoder, brute force over every stored vector) of
   the server's own search path (its precision and index), of Chroma's HNSW, and of the fp16 encoder alone.
   Target: >= 0.99.
4. ``serving``: closed-loop clients (one query per request, topk 3) against real server processes: the
   simple design (benchmarks/simple_retriever.py: one encode per request, synchronous endpoint), drzero
   with ``--no-batching`` and drzero as shipped. Targets: see ``TARGETS``.

The corpus is cached under --work and reused while its size matches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _env

ROOT = _env.setup("benchmarks", **_env.OFFLINE, TOKENIZERS_PARALLELISM="false")

from drzero.corpus.embedder import TEST_EMBEDDER, Embedder, spec_for  # noqa: E402
from drzero.corpus.ingest import IngestConfig, run_ingest  # noqa: E402
from drzero.corpus.store import CorpusStore  # noqa: E402
from loadgen import run_load  # noqa: E402

TARGETS = {
    "cuda": "at 256 clients >= 2,000 q/s with p99 <= 150 ms and >= 50x the simple server; at 1 client p50 <= the "
            "simple server's; recall@3 >= 0.99; ingest >= 70% of the bare encoder",
    "cpu": ">= 230 q/s at 64 clients; recall@3 >= 0.99; ingest >= 70% of the bare encoder",
}


def table(title: str, header: list[str], rows: list[list]) -> str:
    def cell(c):
        if isinstance(c, float):
            return f"{c:.4f}" if abs(c) <= 1 else f"{c:,.1f}"
        return str(c)
    lines = [f"\n### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- corpus --------------------------------------------------------------------------------------

def resolve_embedder(name: str, work: Path) -> str:
    if name == "e5-large-random":
        from synthetic_corpus import build_e5_large

        return str(build_e5_large(work / "models" / "e5-large-v2"))
    return name


def corpus_records(args, count: int | None = None) -> list[dict]:
    """The first ``count`` records to ingest (all of them by default); the same records every time."""
    if args.corpus == "demo":
        from drzero.corpus.demo import build_demo_world

        return [{"title": d.title, "text": d.text} for d in build_demo_world(papers=args.papers).passages()][:count]
    from synthetic_corpus import PassageWriter

    total = args.passages if count is None else min(count, args.passages)
    writer, records = PassageWriter(seed=0), []
    for first in range(0, total, 20_000):  # the chunking fixes the random stream: keep it for every caller
        records += writer.records(first, min(20_000, args.passages - first))
    return records[:total]


def benchmark_queries(args) -> list[str]:
    """Demo questions, or question-length spans of the synthetic corpus's first 50,000 passages."""
    if args.corpus == "demo":
        from drzero.corpus.demo import build_demo_world

        world = build_demo_world(papers=args.papers)
        per_hop = max(1, args.queries // 4)
        return [q.question for hops in range(1, 5) for q in world.questions(hops, count=per_hop, seed=7)]
    from synthetic_corpus import queries_from

    return queries_from([r["text"] for r in corpus_records(args, 50_000)], args.queries)


def bench_encoder(embedder_name: str, device: str, queries: list[str]) -> tuple[str, dict]:
    rows, numbers = [], {}
    for precision in (["fp32", "fp16"] if device == "cuda" else ["fp32"]):
        embedder = Embedder(spec_for(embedder_name), device=device, precision=precision, batch_size=256)
        embedder.encode_queries(queries[:256])  # warm-up
        started = time.perf_counter()
        embedder.encode_queries(queries)
        rate = len(queries) / (time.perf_counter() - started)
        numbers[precision] = rate
        rows.append([precision, len(queries), rate])
        del embedder
    return table("bare encoder on the queries (batch 256)", ["precision", "queries", "queries/s"], rows), numbers


def bench_ingest(args, embedder_name: str, db: Path, scratch: Path) -> tuple[str, dict]:
    """Bare encoder on a sample, then `drzero ingest` of as many records as --ingest-seconds allows."""
    from drzero.corpus.chunking import split_document
    from drzero.corpus.documents import Document

    records = corpus_records(args)  # only this part needs the whole corpus (1M synthetic records: ~1 GB, ~40 s)

    embedder = Embedder(spec_for(embedder_name), device=args.device)
    sample = [p.contents for r in records[:args.encoder_sample]
              for p in split_document(Document(title=r["title"], text=r["text"], source="bench"))]
    embedder.encode_passages(sample[:256])  # warm-up
    started = time.perf_counter()
    embedder.encode_passages(sample)
    bare_rate = len(sample) / (time.perf_counter() - started)
    del embedder
    count = len(records)
    if args.ingest_seconds:
        count = min(count, int(bare_rate * args.ingest_seconds))
    existing = CorpusStore.open_for_writing(db)
    if existing is not None and existing.count() >= count * 0.98:
        return (f"\ningest: reusing the cached corpus of {existing.count()} passages at {db} "
                f"(bare encoder {bare_rate:,.0f} passages/s)"), {"bare": bare_rate, "passages": existing.count()}
    source = scratch / "corpus.jsonl"
    with source.open("w") as handle:
        for record in records[:count]:
            handle.write(json.dumps(record) + "\n")
    print(f"ingesting {count} passages (bare encoder: {bare_rate:,.0f} passages/s)", flush=True)
    started = time.perf_counter()
    summary = run_ingest(IngestConfig(sources=[str(source)], db=str(db), embedder=embedder_name, device=args.device))
    seconds = time.perf_counter() - started
    rate = summary.added / seconds
    rows = [["bare encoder (Embedder.encode_passages, same texts)", len(sample), "", bare_rate],
            ["drzero ingest (read, split, load model, embed, write, verify)", summary.added, seconds, rate]]
    text = table("ingest", ["path", "passages", "seconds", "passages/s"], rows)
    text += f"\n\ningest / bare encoder: {rate / bare_rate:.0%} (target >= 70%)"
    if summary.seconds:  # the encoder should never wait: waiting for passages or for the writer names the culprit
        text += "\n\nwhere the ingest's seconds went: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.seconds.items())
    return text, {"bare": bare_rate, "ingest": rate, "passages": summary.added, "ratio": rate / bare_rate}


def bench_recall(embedder_name: str, device: str, db: Path, queries: list[str]) -> tuple[str, dict]:
    from drzero.retrieval.exact_index import ExactIndex
    from drzero.retrieval.server import RetrieverConfig
    from drzero.retrieval.service import RetrievalService

    store = CorpusStore.open_existing(db)
    exact = ExactIndex.from_store(store, device)  # brute force over every stored vector, in fp32
    fp32 = Embedder(spec_for(embedder_name), device=device, precision="fp32")
    query32 = fp32.encode_queries_tensor(queries)
    del fp32

    def exact_top3(vectors) -> list[set[str]]:
        out = []
        for start in range(0, len(vectors), 256):
            rows, _ = exact.search(vectors[start:start + 256], 3)
            out += [{exact.ids[j] for j in row} for row in rows]
        return out

    truth = exact_top3(query32)

    def recall(got: list[set[str]]) -> float:
        return float(np.mean([len(g & t) / 3 for g, t in zip(got, truth)]))

    rows, numbers = [], {}
    hnsw = store.query(query32.cpu().numpy(), 3)
    numbers["hnsw"] = recall([{h.id for h in hits} for hits in hnsw])
    rows.append(["Chroma HNSW, fp32 query vectors", numbers["hnsw"]])
    service = RetrievalService.open(RetrieverConfig(db=str(db), device=device))
    if service.embedder.precision != "fp32":
        numbers["encoder"] = recall(exact_top3(service.embedder.encode_queries_tensor(queries)))
        rows.append([f"{service.embedder.precision} encoder, exact fp32 search", numbers["encoder"]])
    served = [service.search(queries[i:i + 256], 3) for i in range(0, len(queries), 256)]
    numbers["served"] = recall([{h.id for h in hits} for batch in served for hits in batch])
    index = "exact" if service.exact is not None else "hnsw"
    rows.append([f"the server's path ({service.embedder.precision} encoder, {index} index)", numbers["served"]])
    passages = len(exact)
    del service, exact
    text = table(f"recall@3 against exact fp32 search ({len(queries)} queries, {passages:,} passages)",
                 ["search", "recall@3"], rows)
    return text, numbers


def start_server(kind: str, db: Path, device: str, port: int, log_dir: Path) -> subprocess.Popen:
    import httpx

    if kind == "simple":
        args = [sys.executable, str(ROOT / "benchmarks" / "simple_retriever.py"), "--db", str(db),
                "--port", str(port), "--device", device]
    else:
        args = [sys.executable, "-m", "drzero.cli", "serve-retriever", "--db", str(db), "--port", str(port),
                "--device", device, "--log-level", "warning"] + (["--no-batching"] if kind == "no-batching" else [])
        args += ["--no-fast-encoder"] if kind == "no-fast-encoder" else []
    log_file = log_dir / f"server-{kind}.log"
    process = subprocess.Popen(args, stdout=log_file.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    started = time.perf_counter()
    while time.perf_counter() - started < 600:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} server exited:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False).status_code == 200:
                print(f"  {kind} server ready in {time.perf_counter() - started:.0f}s", flush=True)
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{kind} server did not become healthy")


def free_port() -> int:
    from socket import socket

    with socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_serving(args, db: Path, queries: list[str], log_dir: Path) -> tuple[str, dict]:
    rows, numbers = [], {}
    for kind in args.servers:
        port = free_port()
        server = start_server(kind, db, args.device, port, log_dir)
        try:
            for clients in args.clients:
                load = run_load(f"http://127.0.0.1:{port}", queries, clients, args.seconds,
                                processes=args.load_processes)
                numbers[f"{kind}@{clients}"] = {"qps": load.qps, "p50": load.p50, "p99": load.p99,
                                                "errors": load.errors}
                rows.append([kind, clients, load.requests, load.qps, load.p50, load.p99, load.errors])
                print(f"  {kind:>11} {clients:>3} clients: {load.qps:8.1f} q/s  p50 {load.p50:7.1f} ms  "
                      f"p99 {load.p99:7.1f} ms  errors {load.errors}", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    text = table(f"serving: one query per request, topk 3, {args.seconds:g} s per level",
                 ["server", "clients", "requests", "queries/s", "p50 ms", "p99 ms", "errors"], rows)
    if "simple" in args.servers and "drzero" in args.servers:
        ratios = [f"{c} clients: {numbers[f'drzero@{c}']['qps'] / max(numbers[f'simple@{c}']['qps'], 1e-9):.1f}x"
                  for c in args.clients]
        text += "\n\ndrzero / simple, queries/s: " + ", ".join(ratios)
    return text, numbers


def main() -> int:
    parser = _env.parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--embedder", default=TEST_EMBEDDER,
                        help="model name or directory; e5-large-random builds e5-large-v2's architecture with "
                             "random weights (default: MiniLM)")
    parser.add_argument("--corpus", choices=["demo", "synthetic"], default="demo")
    parser.add_argument("--papers", type=int, default=13000, help="demo world size (13000 papers: 20,380 passages)")
    parser.add_argument("--passages", type=int, default=100_000, help="synthetic corpus size (upper bound)")
    parser.add_argument("--ingest-seconds", type=float, default=0,
                        help="synthetic corpus: ingest only what the bare encoder embeds in this time")
    parser.add_argument("--encoder-sample", type=int, default=4000, help="passages for the bare-encoder rate")
    parser.add_argument("--queries", type=int, default=1000, help="benchmark queries (recall and load)")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per load level")
    parser.add_argument("--load-processes", type=int, default=None, help="load generator processes")
    parser.add_argument("--servers", default="simple,no-batching,drzero", help="which servers to load")
    parser.add_argument("--work", type=Path, default=ROOT / ".drzero" / "bench", help="cache and scratch directory")
    parser.add_argument("--only", choices=["encoder", "ingest", "recall", "serving"], action="append")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.servers = args.servers.split(",")
    parts = args.only or ["encoder", "ingest", "recall", "serving"]
    args.work.mkdir(parents=True, exist_ok=True)
    embedder_name = resolve_embedder(args.embedder, args.work)
    size = args.papers if args.corpus == "demo" else args.passages
    db = args.work / f"{args.corpus}-{size}-{Path(embedder_name).name}-{args.device}"
    report = [f"# retrieval benchmark, {time.strftime('%Y-%m-%d')}", "", "    " + " ".join(sys.argv),
              "", f"targets ({args.device}): {TARGETS[args.device]}"]
    numbers: dict = {}
    queries = benchmark_queries(args)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        scratch = Path(scratch)
        steps = {
            "encoder": lambda: bench_encoder(embedder_name, args.device, queries),
            "ingest": lambda: bench_ingest(args, embedder_name, db, scratch),
            "recall": lambda: bench_recall(embedder_name, args.device, db, queries),
            "serving": lambda: bench_serving(args, db, queries, scratch),
        }
        for part in ["encoder", "ingest", "recall", "serving"]:
            if part in parts:
                started = time.perf_counter()
                text, numbers[part] = steps[part]()
                text += f"\n\n({part}: {time.perf_counter() - started:.0f} s)"
                print(text, flush=True)
                report.append(text)
                if args.out:
                    args.out.write_text("\n".join(report) + "\n")
    (args.work / "retrieval-results.json").write_text(json.dumps(numbers, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
