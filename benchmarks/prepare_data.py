"""prepare-data benchmark: rows/s for 100k rows from a >= 20k-passage collection, and the hop mix.

    .venv/bin/python benchmarks/prepare_data.py                 # 100k rows (builds the 20k corpus once, ~5 min)
    .venv/bin/python benchmarks/prepare_data.py --rows 5000     # quick

Baseline, measured in the same run: the obvious implementation that renders and tokenizes every
prompt with ``apply_chat_template(..., tools=..., tokenize=True)`` (what verl's overlong filter
does), timed on a sample of the same rows. Targets: >= 2,000 rows/s on 2 cores; hop shares within
1.5 points of the ratio at 100k rows. The tokenizer is the offline ChatML one from
`drzero tiny-model` (a model hub tokenizer cannot be fetched here).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _env

ROOT = _env.setup("benchmarks", **_env.OFFLINE, TOKENIZERS_PARALLELISM="true")

from retrieval import build_corpus, table  # noqa: E402

from drzero.data.budget import PromptBudget  # noqa: E402
from drzero.stages.prepare_data import PrepareDataConfig
from drzero.data.seed import run_prepare_data  # noqa: E402
from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model  # noqa: E402


def main() -> int:
    parser = _env.parser(__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="train rows to prepare (default: 100000)")
    parser.add_argument("--papers", type=int, default=13000, help="demo world size of the collection (20,380 passages)")
    parser.add_argument("--baseline-rows", type=int, default=2000, help="rows the per-row baseline renders")
    parser.add_argument("--work", type=Path, default=ROOT / ".drzero" / "bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    db = args.work / f"corpus-{args.papers}"
    store = build_corpus(db, args.papers)
    tokenizer_dir = args.work / "tiny-tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        run_tiny_model(TinyModelConfig(out=str(tokenizer_dir), db=str(db), no_weights=True))

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        cfg = PrepareDataConfig(db=str(db), out=str(Path(scratch) / "zero_ratio4321.parquet"), rows=args.rows,
                                tokenizer=str(tokenizer_dir))
        started = time.perf_counter()
        result = run_prepare_data(cfg)
        ours = time.perf_counter() - started

        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        sample = pq.read_table(result.train_path).slice(0, args.baseline_rows).to_pylist()
        budget = PromptBudget(AutoTokenizer.from_pretrained(tokenizer_dir))
        started = time.perf_counter()
        for row in sample:
            budget.rendered_length(row["prompt"])
        baseline_rate = len(sample) / (time.perf_counter() - started)

    rate = args.rows / ours
    rows = [["drzero prepare-data (whole command: sample, cut, budget, write)", args.rows, ours, rate],
            ["per-row render + tokenize (budget check alone)", len(sample), len(sample) / baseline_rate,
             baseline_rate]]
    print(table(f"prepare-data from {store.count()} passages", ["path", "rows", "seconds", "rows/s"], rows))
    print(f"speed-up over per-row rendering: {rate / baseline_rate:.1f}x; "
          f"target >= 2,000 rows/s -> {'MET' if rate >= 2000 else 'NOT MET'}")
    manifest = result.manifest
    weights = cfg.hop_weights
    hop_rows = []
    worst = 0.0
    for hops, count in manifest["hop_histogram"].items():
        share = 100 * count / args.rows
        expected = 100 * weights[int(hops) - 1]
        worst = max(worst, abs(share - expected))
        hop_rows.append([hops, count, share, expected, share - expected])
    print(table("hop histogram", ["hops", "rows", "share %", "ratio %", "diff (points)"], hop_rows))
    print(f"largest deviation {worst:.2f} points; target within 1.5 -> {'MET' if worst <= 1.5 else 'NOT MET'}")
    print(f"prompt tokens: max {manifest['prompt_tokens']['max']}, p99 {manifest['prompt_tokens']['p99']:.0f} "
          f"(budget {manifest['prompt_tokens']['budget']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
