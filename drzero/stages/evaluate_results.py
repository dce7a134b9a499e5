"""What `drzero evaluate` makes of its trajectories: per-question scores, the summary, the printed table.

    records = [score(item, trajectory) for item, trajectory in zip(items, trajectories)]
    summary = build_summary(cfg, records, rows_in_file, timings)     # summary.json
    print(summary_lines(result))

Metrics (drzero.rewards.qa_scores) are averaged overall, per ``data_source``, per hop count and per
benchmark set; the benchmarks' "average" is the unweighted mean over the sets, the papers' "Avg." when
all seven were asked.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from drzero import __version__
from drzero.data.benchmarks import BENCHMARKS, Benchmark
from drzero.data.qa import QaItem
from drzero.rewards.qa_scores import cover_em, em, f1
from drzero.rollout.client import Trajectory

CSV_COLUMNS = ("index", "id", "question", "golden_answers", "prediction", "em", "f1", "cover_em", "hops", "data_source",
               "turns", "searches", "stop_reason", "error")


# -- results -------------------------------------------------------------------------------------

@dataclass
class QuestionResult:
    index: int
    question: str
    golden_answers: list[str]
    prediction: str | None
    em: float
    f1: float
    cover_em: float
    hops: str
    data_source: str
    turns: int
    searches: int
    stop_reason: str
    error: str | None
    search_failures: int = 0
    seconds: float = 0.0
    id: str | None = None             # the row's own id (FlashRAG's "test_0"), when it has one


@dataclass
class EvaluationResult:
    out_dir: Path
    summary_path: Path
    per_question_path: Path
    summary: dict = field(default_factory=dict)
    records: list[QuestionResult] = field(default_factory=list)
    manifest_path: Path | None = None
    manifest: dict = field(default_factory=dict)


def score(item: QaItem, trajectory: Trajectory) -> QuestionResult:
    golds, prediction = list(item.golden_answers), trajectory.final_answer
    return QuestionResult(
        index=item.index, question=item.question, golden_answers=golds, prediction=prediction,
        em=em(prediction, golds), f1=f1(prediction, golds), cover_em=cover_em(prediction, golds),
        hops=item.hops, data_source=item.data_source, turns=len(trajectory.assistant_turns),
        searches=trajectory.valid_tool_calls, stop_reason=trajectory.stop_reason, error=trajectory.error,
        search_failures=trajectory.search_failures, seconds=round(trajectory.seconds, 3), id=item.id)


def aggregate(records: Sequence[QuestionResult]) -> dict:
    """The metrics of a group of questions (means; 0.0 for an empty group)."""
    n = len(records)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return {"questions": n, "em": mean(r.em for r in records), "f1": mean(r.f1 for r in records),
            "cover_em": mean(r.cover_em for r in records),
            "answered": mean(float(r.prediction is not None) for r in records),
            "mean_turns": mean(r.turns for r in records), "mean_searches": mean(r.searches for r in records),
            "rollout_errors": sum(r.stop_reason == "error" for r in records)}


def hop_sort_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _grouped(records: Sequence[QuestionResult], key, order=None) -> dict[str, dict]:
    groups: dict[str, list[QuestionResult]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return {name: aggregate(groups[name]) for name in sorted(groups, key=order)}


AVERAGED = ("em", "f1", "cover_em", "answered", "mean_turns", "mean_searches")


def benchmark_scores(benchmarks: list[Benchmark], records: Sequence[QuestionResult]) -> dict | None:
    """Per benchmark set, and their unweighted average (the papers' "Avg." when all seven are there)."""
    if not benchmarks:
        return None
    sets = {b.name: {"label": b.label, "split": b.split, "kind": b.kind,
                     **aggregate([r for r in records if r.data_source == b.name])} for b in benchmarks}
    average = {m: sum(g[m] for g in sets.values()) / len(sets) for m in AVERAGED}
    return {"sets": sets, "average": {**average, "sets": len(sets)}, "all_seven": len(sets) == len(BENCHMARKS)}


def build_summary(cfg, records: list[QuestionResult], rows_in_file: int, timings: dict) -> dict:
    by_source = _grouped(records, lambda r: r.data_source)
    errors = [r.error for r in records if r.error]
    return {
        "drzero_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(Path(cfg.data).expanduser().resolve()) if cfg.data else None,
        "benchmarks": benchmark_scores(cfg.benchmark_sets(), records),
        "model": cfg.model,
        "served_model_name": cfg.served_model_name,
        "overall": aggregate(records),
        # Search-R1 reports the unweighted mean over its benchmarks ("Avg")
        "macro_average": {m: sum(g[m] for g in by_source.values()) / max(1, len(by_source))
                          for m in ("em", "f1", "cover_em")},
        "by_data_source": by_source,
        "by_hops": _grouped(records, lambda r: r.hops, hop_sort_key),
        "counts": {
            "rows_in_file": rows_in_file,         # in every file read: --data and the benchmark sets
            "questions": len(records),
            "answered": sum(r.prediction is not None for r in records),
            "rollout_errors": len([r for r in records if r.stop_reason == "error"]),
            "search_failures": sum(r.search_failures for r in records),
            "stop_reasons": dict(Counter(r.stop_reason for r in records)),
        },
        "first_error": errors[0] if errors else None,
        "config": asdict(cfg),
        "timings": timings,
    }


def csv_text(records: Sequence[QuestionResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([r.index, r.id or "", r.question, json.dumps(r.golden_answers, ensure_ascii=False),
                         "" if r.prediction is None else r.prediction, int(r.em), round(r.f1, 4), int(r.cover_em),
                         r.hops, r.data_source, r.turns, r.searches, r.stop_reason, r.error or ""])
    return buffer.getvalue()


def _metrics(group: dict) -> str:
    return f"EM {group['em']:.3f}  F1 {group['f1']:.3f}  cover-EM {group['cover_em']:.3f}  ({group['questions']} questions)"


def benchmark_lines(benchmarks: dict | None) -> list[str]:
    """The benchmark table of the summary: EM, F1, answered, searches and turns per set, then their average."""
    if not benchmarks:
        return []
    rows = [(f"{g['label']} ({g['split']})", g) for g in benchmarks["sets"].values()]
    average = benchmarks["average"]
    rows.append(("Avg." if benchmarks["all_seven"] else f"average of {average['sets']}", average))
    lines = [f"  {'benchmarks':<14} {'set':<22} {'EM':>6} {'F1':>6} {'answered':>8} {'searches':>8} {'turns':>6}"]
    lines += [f"  {'':<14} {name:<22} {g['em']:>6.3f} {g['f1']:>6.3f} {g['answered']:>8.3f} {g['mean_searches']:>8.2f} "
              f"{g['mean_turns']:>6.2f}" for name, g in rows]
    return lines


def summary_lines(result: EvaluationResult) -> str:
    s = result.summary
    overall, counts = s["overall"], s["counts"]
    asked = [Path(s["data"]).name] if s.get("data") else []
    asked += list((s.get("benchmarks") or {}).get("sets", {}))
    lines = [
        f"evaluate summary ({', '.join(asked)}: {counts['questions']} of {counts['rows_in_file']} questions)",
        f"  model          {s['model']}  (served as {s['served_model_name']!r})",
        f"  overall        {_metrics(overall)}, answered {100 * overall['answered']:.1f}%",
    ]
    lines += [f"  {'by hops' if i == 0 else '':<14} {hops} hop(s): {_metrics(g)}"
              for i, (hops, g) in enumerate(s["by_hops"].items())]
    # our own sets name their sources search_zero_{hops}: the hop lines above already say it all
    benchmarks = any(not source.startswith("search_zero_") for source in s["by_data_source"])
    lines += [f"  {'by source' if i == 0 else '':<14} {source}: {_metrics(g)}"
              for i, (source, g) in enumerate(s["by_data_source"].items()) if benchmarks]
    lines += benchmark_lines(s.get("benchmarks"))
    if benchmarks and len(s["by_data_source"]) > 1 and not s.get("benchmarks"):
        macro = s["macro_average"]
        lines.append(f"  {'macro average':<14} EM {macro['em']:.3f}  F1 {macro['f1']:.3f}  "
                     f"cover-EM {macro['cover_em']:.3f}")
    lines.append(f"  agent          {overall['mean_turns']:.2f} turns and {overall['mean_searches']:.2f} searches "
                 f"per question; {counts['rollout_errors']} rollout errors, {counts['search_failures']} failed "
                 f"searches")
    if counts["rollout_errors"]:
        lines.append(f"  first error    {s['first_error']}")
    lines += [f"  wrote          {result.summary_path}", f"                 {result.per_question_path}",
              f"                 {result.manifest_path} (the setup)",
              f"  took           {s['timings']['total_seconds']}s"]
    return "\n".join(lines)
