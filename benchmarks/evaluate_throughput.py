"""`drzero evaluate --benchmark` throughput: is drzero the bottleneck, or the model server?

    .venv/bin/python benchmarks/evaluate_throughput.py                  # 1,000 questions, one search each
    .venv/bin/python benchmarks/evaluate_throughput.py --questions 300 2000

The whole evaluation path runs as `drzero evaluate` runs it: a FlashRAG-format set read from a
benchmark directory, the real agent loop (drzero.rollout.client) at its default concurrency, and the
real retriever (`drzero serve-retriever` over the demo corpus, MiniLM on the CPU, in its own process).
Only the model is a stand-in: tests/fake_sglang.py answering at once (search, then answer), so the
measured rate is drzero's ceiling, not a model's. Target (issue 27): >= 50 questions/s on 2 CPU cores.
Reported: questions/s over the rollout phase (load, startup and writing excluded) and the total.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import _env

ROOT = _env.setup("tests", "benchmarks", **_env.OFFLINE, TOKENIZERS_PARALLELISM="false")

from conftest import start_retriever, stop  # noqa: E402
from fake_sglang import FakeSGLang, SearchThenAnswer  # noqa: E402

from drzero.corpus.ingest import IngestConfig, run_ingest  # noqa: E402
from drzero.stages.evaluate import EvaluateConfig, run_evaluate  # noqa: E402

TARGET = 50.0


def write_set(directory: Path, questions: int) -> dict[str, list[str]]:
    path = directory / "nq" / "test.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"id": f"test_{i}", "question": f"Which venue published the paper number {i}?",
             "golden_answers": [f"Venue {i % 7}"], "metadata": {}} for i in range(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["question"]: [r["golden_answers"][0]] for r in rows}


def main() -> None:
    parser = _env.parser(__doc__)
    parser.add_argument("--questions", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run_ingest(IngestConfig(db=str(scratch / "db"), demo=True, demo_papers=120))
        retriever = start_retriever(scratch / "db", scratch / "retriever.log")
        try:
            print(f"{'questions':>9} {'rollout s':>9} {'q/s':>7} {'total s':>8}  target >= {TARGET:g} q/s")
            for n in args.questions:
                bench = scratch / f"bench{n}"
                answers = write_set(bench, n)
                with FakeSGLang(SearchThenAnswer(answers)).serve() as base_url:
                    started = time.perf_counter()
                    result = run_evaluate(EvaluateConfig(
                        model=base_url, benchmark="nq", benchmark_dir=str(bench), out=str(scratch / f"out{n}"),
                        retriever_url=f"{retriever.url}/retrieve", api="chat"))
                    total = time.perf_counter() - started
                rollout = result.summary["timings"]["rollout_seconds"]
                assert result.summary["benchmarks"]["sets"]["nq"]["em"] == 1.0
                print(f"{n:>9} {rollout:>9.2f} {n / rollout:>7.1f} {total:>8.2f}  "
                      f"{'ok' if n / rollout >= TARGET else 'BELOW TARGET'}")
        finally:
            stop(retriever)


if __name__ == "__main__":
    main()
