"""The report's benchmark pages: the seven QA sets per iteration with the published numbers beside them, and
where two runs' setups differ before their scores are put side by side (`drzero report --compare`).

    lines = benchmark_section(run, published_results())
    lines = comparison_section(run, other_run)

Published columns come from drzero/data/published.json (drzero.data.published): EM only, as the papers
report it; a column whose numbers were not checked shows "n/c". The setup differences come from each
evaluation's manifest.json (drzero.stages.evaluate_setup); a difference in the corpus, the retriever's
top-k, the scoring or the questions asked makes the scores incomparable and is marked so.
"""

from __future__ import annotations

import re

from drzero.data.benchmarks import BENCHMARKS
from drzero.data.published import AVG, PublishedResult
from drzero.stages.evaluate_setup import breaks_comparison, setup_differences
from drzero.tools.report_run import SINGLE_EVALUATION, IterationView, RunView, iteration_label
from drzero.tools.report_run import markdown_table as _table
from drzero.tools.report_run import num as _num

NOT_CHECKED = "n/c"


def benchmarked(run: RunView) -> list[IterationView]:
    return [v for v in run.evaluated if (v.evaluation.get("benchmarks") or {}).get("sets")]


def _published_cell(result: PublishedResult, key: str) -> str:
    value = result.em.get(key)
    return NOT_CHECKED if value is None and result.status == "not checked" else _num(value)


def iteration_table(view: IterationView, published: list[PublishedResult]) -> list[str]:
    """One iteration: a row per set (then the average), our numbers, then each paper's EM."""
    benchmarks = view.evaluation["benchmarks"]
    sets, average = benchmarks["sets"], benchmarks["average"]
    rows = []
    for name, group in sets.items():
        label = BENCHMARKS[name].label if name in BENCHMARKS else name
        rows.append([label, group.get("split", "–"), str(group.get("questions", "–")), _num(group["em"]),
                     _num(group["f1"]), _num(group["answered"]), _num(group["mean_searches"], 2),
                     _num(group["mean_turns"], 2), *[_published_cell(p, name) for p in published]])
    average_label = "Avg." if benchmarks["all_seven"] else f"average of {len(sets)}"
    rows.append([f"**{average_label}**", "", "", _num(average["em"]), _num(average["f1"]), _num(average["answered"]),
                 _num(average["mean_searches"], 2), _num(average["mean_turns"], 2),
                 *[_published_cell(p, AVG) if benchmarks["all_seven"] else "–" for p in published]])
    header = ["set", "split", "questions", "EM", "F1", "answered", "searches", "turns",
              *[f"{p.label} EM" for p in published]]
    return _table(header, rows)


def benchmark_section(run: RunView, published: list[PublishedResult]) -> list[str]:
    """The "Benchmarks" section of report.md; empty when no iteration was evaluated on them."""
    views = benchmarked(run)
    if not views:
        return []
    lines = ["", "## Benchmarks (the papers' QA sets)", "",
             "EM and F1 after SQuAD normalization against any golden answer; answered = share with an `<answer>`; "
             "searches and turns per question. Published columns: EM as each paper reports it (Avg. = the unweighted "
             "mean of the seven; compared only when all seven were asked here)."]
    for view in views:
        lines += ["", f"Iteration {iteration_label(view)}:", ""] + iteration_table(view, published)
    lines += ["", "Published columns (drzero/data/published.json):", ""]
    lines += [f"- {p.label} ({p.model}): {p.citation()}" for p in published]
    if any(p.status == "not checked" for p in published):
        lines.append(f"\n{NOT_CHECKED} = not checked: no figure could be read with its table and page, so none is "
                     f"shown.")
    if views[0].setup is None:
        lines.append("\nThese evaluations wrote no manifest.json (an older drzero): their setup is unknown.")
    return lines


# -- comparing two runs ----------------------------------------------------------------------------

def _shown(value) -> str:
    text = "–" if value is None else str(value)
    if re.fullmatch(r"[0-9a-f]{64}", text):  # a SHA-256: its start tells two apart
        return text[:12] + "…"
    return text if len(text) <= 60 else text[:57] + "..."


def setup_lines(ours: dict | None, theirs: dict | None, our_name: str, their_name: str) -> list[str]:
    """Where two evaluations' setups differ, as a table (or one sentence when they agree or one is unknown)."""
    if ours is None or theirs is None:
        missing = our_name if ours is None else their_name
        return [f"The setup of {missing} is unknown (no manifest.json): the scores below may not be comparable."]
    differences = setup_differences(ours, theirs)
    if not differences:
        return ["The setups agree in every recorded setting."]
    breaking = [key for key, _, _ in differences if breaks_comparison(key)]
    lines = _table(["setting", our_name, their_name, ""], [
        [f"`{key}`", _shown(a), _shown(b), "scores not comparable" if breaks_comparison(key) else ""]
        for key, a, b in differences])
    if breaking:
        lines += ["", f"{len(breaking)} of these change what the scores measure (corpus, retriever, scoring or the "
                      f"questions): the scores below are not a like-for-like comparison."]
    return lines


def _scores(view: IterationView) -> dict[str, float | None]:
    sets = (view.evaluation.get("benchmarks") or {}).get("sets") or view.evaluation.get("by_data_source", {})
    scores = {name: group.get("em") for name, group in sets.items()}
    scores["overall"] = view.evaluation.get("overall", {}).get("em")
    return scores


def comparison_pairs(run: RunView, other: RunView) -> list[tuple[IterationView, IterationView]]:
    """The same iterations of both runs; a single evaluation (one view) pairs with this run's latest."""
    if len(other.evaluated) == 1 and other.evaluated[0].iteration == SINGLE_EVALUATION:
        return [(run.evaluated[-1], other.evaluated[0])] if run.evaluated else []
    theirs = {v.iteration: v for v in other.evaluated}
    return [(v, theirs[v.iteration]) for v in run.evaluated if v.iteration in theirs]


def comparison_section(run: RunView, other: RunView) -> list[str]:
    """`--compare`: for each iteration both runs evaluated, the setup differences first, then EM side by side."""
    lines = ["", f"## Compared with `{other.checkpoints}`", ""]
    pairs = comparison_pairs(run, other)
    if not pairs:
        return lines + ["No iteration was evaluated in both runs."]
    for ours, theirs in pairs:
        their_label = ("the other" if theirs.iteration == SINGLE_EVALUATION
                       else f"the other, iteration {iteration_label(theirs)}")
        lines += [f"### Iteration {iteration_label(ours)}: setup", ""]
        lines += setup_lines(ours.setup, theirs.setup, "this run", their_label)
        a, b = _scores(ours), _scores(theirs)
        names = [n for n in a if n in b]
        lines += ["", f"### Iteration {iteration_label(ours)}: EM", ""]
        lines += _table(["set", "this run", their_label, "difference"], [
            [n, _num(a[n]), _num(b[n]), "–" if a[n] is None or b[n] is None else f"{a[n] - b[n]:+.3f}"]
            for n in names])
        lines.append("")
    return lines


def comparison_summary(run: RunView, other: RunView) -> str:
    """One line for the command's printout: how many settings differ, and whether any breaks the comparison."""
    counts = []
    for ours, theirs in comparison_pairs(run, other):
        if ours.setup is None or theirs.setup is None:
            counts.append(f"iteration {iteration_label(ours)}: setup unknown")
            continue
        differences = setup_differences(ours.setup, theirs.setup)
        breaking = sum(breaks_comparison(key) for key, _, _ in differences)
        counts.append(f"iteration {iteration_label(ours)}: {len(differences)} setting(s) differ"
                      + (f", {breaking} of them change what is measured" if breaking else ""))
    return "; ".join(counts) or "no iteration evaluated in both"
