"""The seven QA benchmarks of Search-R1 and Dr. Zero, read as FlashRAG distributes them.

    sets = resolve_benchmarks("nq,hotpotqa")          # or "all"
    loaded = load_benchmarks(sets, "/corpus/data/benchmarks", limit=500, seed=0)
    loaded[0].items, loaded[0].record()               # the questions; what the evaluation manifest keeps

FlashRAG (the hub dataset ``RUC-NLPIR/FlashRAG_datasets``) keeps one JSON-lines file per set and split,
``<name>/<split>.jsonl``, one record a line: ``{"id": "test_0", "question": "...", "golden_answers": ["..."],
"metadata": {...}}``. The papers score the test split, or dev where a set has no public test answers
(HotpotQA, 2WikiMultiHopQA, MuSiQue); ``BENCHMARKS`` says which, with FlashRAG's row counts.

A set missing from the directory is fetched from the hub into it (so the next run is offline), unless the
hub is off (``HF_HUB_OFFLINE``) or downloads are refused; then one sentence names the files and where they
go. ``--limit N`` keeps N questions of each set, chosen by a seeded hash of their ids: the same subset on
every machine and every run, and recorded (seed, size, a hash of the chosen ids).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from drzero.atomic import describe_file
from drzero.config import ConfigError
from drzero.data.qa import UNKNOWN_HOPS, QaItem, text_answers

HUB_REPO = "RUC-NLPIR/FlashRAG_datasets"
HUB_URL = f"https://huggingface.co/datasets/{HUB_REPO}"
ALL = "all"


@dataclass(frozen=True)
class Benchmark:
    name: str        # FlashRAG's directory name, and the data_source of its questions
    label: str       # the papers' column title
    split: str       # the split the papers score
    rows: int        # questions in that split, as FlashRAG's README counts them
    kind: str        # "single-hop" or "multi-hop", as the papers group them

    @property
    def file(self) -> str:
        """Its path inside FlashRAG's layout (and the hub repository)."""
        return f"{self.name}/{self.split}.jsonl"


# Search-R1 (arXiv 2503.09516) and Dr. Zero evaluate these seven, with FlashRAG's test splits where they have public
# answers and dev splits otherwise; the row counts are FlashRAG's README table.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("nq", "NQ", "test", 3610, "single-hop"),
    Benchmark("triviaqa", "TriviaQA", "test", 11313, "single-hop"),
    Benchmark("popqa", "PopQA", "test", 14267, "single-hop"),
    Benchmark("hotpotqa", "HotpotQA", "dev", 7405, "multi-hop"),
    Benchmark("2wikimultihopqa", "2Wiki", "dev", 12576, "multi-hop"),
    Benchmark("musique", "MuSiQue", "dev", 2417, "multi-hop"),
    Benchmark("bamboogle", "Bamboogle", "test", 125, "multi-hop"),
)}
_ALIASES = {**{b.label.lower(): b.name for b in BENCHMARKS.values()}, "2wiki": "2wikimultihopqa", "tqa": "triviaqa"}


def benchmark_table() -> str:
    """The sets as a plain-text table (for --help)."""
    lines = [f"    {'name':<16} {'split':<6} {'questions':>9}  kind"]
    lines += [f"    {b.name:<16} {b.split:<6} {b.rows:>9,}  {b.kind}"
              + ("; dev: its test answers are not public" if b.split == "dev" else "") for b in BENCHMARKS.values()]
    return "\n".join(lines)


def resolve_benchmarks(spec: str) -> list[Benchmark]:
    """``"all"`` or comma-separated names (FlashRAG's, or the papers' column titles) -> the sets, in table order."""
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if names == [ALL]:
        return list(BENCHMARKS.values())
    unknown = [n for n in names if n not in BENCHMARKS and n not in _ALIASES]
    if unknown or not names:
        raise ConfigError(f"benchmark={spec!r} is not valid: expected {ALL!r} or comma-separated names from "
                          f"{', '.join(BENCHMARKS)}.")
    chosen = {_ALIASES.get(n, n) for n in names}
    return [b for b in BENCHMARKS.values() if b.name in chosen]


# -- finding the files ---------------------------------------------------------------------------

def hub_offline() -> bool:
    """True when the environment forbids the hub (as huggingface_hub reads it)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def benchmark_path(directory: str | Path, benchmark: Benchmark) -> Path:
    return Path(directory).expanduser() / benchmark.file


def _download(benchmark: Benchmark, directory: Path) -> str | None:
    """Fetch the set's file from the hub into ``directory``; None when it came, else why not (a few words)."""
    if hub_offline():
        return "the hub is off here (HF_HUB_OFFLINE)"
    # lazy: huggingface_hub comes with transformers but not with every install, and only a download needs it
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return "huggingface_hub is not installed"
    try:  # the file as distributed (byte for byte, so its hash means something), kept for the next run
        hf_hub_download(HUB_REPO, benchmark.file, repo_type="dataset", local_dir=str(directory))
    except Exception as error:  # offline, proxy, permissions, a renamed file: all say the same to the user
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        return f"its download from the hub failed ({type(error).__name__}: {first_line})"
    return None if benchmark_path(directory, benchmark).is_file() else "the hub did not deliver it"


def locate_benchmarks(benchmarks: list[Benchmark], directory: str | Path, download: bool = True) -> dict[str, Path]:
    """Each set's file, downloading missing ones when allowed; one ConfigError naming every file still missing."""
    directory = Path(directory).expanduser()
    found, missing, why = {}, [], ""
    for benchmark in benchmarks:
        path = benchmark_path(directory, benchmark)
        if not path.is_file():
            reason = _download(benchmark, directory) if download else "downloads are off (--no-download)"
            if reason is not None:
                missing.append(benchmark)
                why = why or reason
                continue
        found[benchmark.name] = path
    if missing:
        files = ", ".join(str(benchmark_path(directory, b)) for b in missing)
        raise ConfigError(f"benchmark files missing and {why}: put FlashRAG's "
                          f"{', '.join(b.file for b in missing)} from {HUB_URL} at {files} (or pass --benchmark-dir "
                          f"DIR holding <name>/<split>.jsonl).")
    return found


# -- reading -------------------------------------------------------------------------------------

_RECORD = 'one FlashRAG record per line: {"id", "question", "golden_answers": [...]}'


def read_benchmark_file(benchmark: Benchmark, path: Path) -> list[QaItem]:
    """Every question of a FlashRAG file; a ConfigError naming the file and line on the first bad one."""
    items: list[QaItem] = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path} line {number} is not JSON ({error.msg}); expected {_RECORD}.") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number} is not a JSON object; expected {_RECORD}.")
            question = row.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ConfigError(f"{path} line {number} has no question; expected {_RECORD}.")
            answers = text_answers(row.get("golden_answers"))
            if not answers:
                raise ConfigError(f"{path} line {number} ({question.strip()[:60]!r}) has no golden_answers, so it "
                                  f"cannot be scored; use FlashRAG's {benchmark.file}, whose every record has them.")
            row_id = row.get("id")
            items.append(QaItem(len(items), question.strip(), tuple(answers), benchmark.name, UNKNOWN_HOPS,
                                id=str(row_id) if row_id is not None else str(len(items))))
    if not items:
        raise ConfigError(f"{path} holds no questions; expected {_RECORD}.")
    return items


def _rank(seed: int, item: QaItem) -> bytes:
    return hashlib.sha256(f"{seed}:{item.id}".encode()).digest()


def sample(items: list[QaItem], limit: int | None, seed: int) -> list[QaItem]:
    """At most ``limit`` items, the same ones for the same ids and seed wherever it runs, in file order.

    A hash of (seed, id) ranks the items, so the subset does not depend on Python's random module, and a
    record added to the file leaves the rest of the subset as it was.
    """
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(items, key=lambda item: _rank(seed, item))[:limit]
    return sorted(chosen, key=lambda item: item.index)


def ids_hash(items: list[QaItem]) -> str:
    return hashlib.sha256("\n".join(item.id or str(item.index) for item in items).encode()).hexdigest()


@dataclass
class LoadedBenchmark:
    benchmark: Benchmark
    path: Path
    rows: int                 # questions in the file
    sha256: str               # of the file, as read
    items: list[QaItem]       # the questions asked (all, or the seeded subset)
    limit: int | None
    seed: int

    def record(self) -> dict:
        """What the evaluation manifest keeps of this set."""
        return {"name": self.benchmark.name, "split": self.benchmark.split, "file": str(self.path),
                "rows": self.rows, "sha256": self.sha256, "questions": len(self.items),
                "subset": None if len(self.items) == self.rows else {
                    "seed": self.seed, "size": len(self.items), "ids_sha256": ids_hash(self.items)}}


def load_benchmarks(benchmarks: list[Benchmark], directory: str | Path, limit: int | None = None, seed: int = 0,
                    download: bool = True) -> list[LoadedBenchmark]:
    """Locate (or fetch), read and subsample each set."""
    paths = locate_benchmarks(benchmarks, directory, download)
    loaded = []
    for benchmark in benchmarks:
        path = paths[benchmark.name]
        items = read_benchmark_file(benchmark, path)
        loaded.append(LoadedBenchmark(benchmark, path, len(items), describe_file(path)["sha256"],
                                      sample(items, limit, seed), limit, seed))
    return loaded
