"""The picture of `drzero report`: four panels drawn with matplotlib's Agg backend, no display needed.

    EM by iteration and hop count      | kept questions by hop, per iteration
    what became of the seeds (shares)  | stage status per iteration

    EM per benchmark set and iteration, the papers' numbers as marks   (only when a run has benchmark results)

The figure is ``FIGURE_INCHES`` at ``DPI`` (1200 x 900 pixels; 1200 x 1350 with the benchmark row) without
tight cropping, so its size depends only on whether there are benchmark results. Missing pieces are drawn as
labels, never left to fail.
"""

from __future__ import annotations

from pathlib import Path

from drzero.atomic import write_atomically
from drzero.data.benchmarks import BENCHMARKS
from drzero.data.published import AVG, PublishedResult
from drzero.data.questions import VERDICTS
from drzero.pipeline import ITERATION_STAGES
from drzero.tools.report_run import NO_GEN_DATA, NOT_EVALUATED, NOT_STARTED, RunView, kept_share

FIGURE_INCHES = (12, 9)
BENCHMARK_ROW_INCHES = 4.5
PUBLISHED_MARKS = (("_", "#e53935"), ("x", "#fb8c00"), ("+", "#1e88e5"), ("1", "#d81b60"), ("2", "#00897b"),
                   ("3", "#6d4c41"))  # (marker, colour) per published result drawn, in the file's order
DPI = 100
STATUS_COLORS = {"done": "#4caf50", "running": "#ff9800", "failed": "#e53935", NOT_STARTED: "#e0e0e0"}
OTHER_STATUS_COLOR = "#9e9e9e"
VERDICT_COLORS = ("#4caf50", "#bdbdbd", "#ffb74d", "#e57373", "#9575cd")  # kept, then the reasons to drop


def _hop_colors(hops: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps  # matplotlib: ~0.2 s to import, only when a picture is drawn

    cmap = colormaps["viridis"]
    return {h: cmap(i / max(1, len(hops) - 1) * 0.85) for i, h in enumerate(hops)}


def _x_axis(ax, iterations: list[int]) -> None:
    ax.set_xticks(iterations, ["base" if i == 0 else str(i) for i in iterations])
    ax.set_xlim(min(iterations) - 0.6, max(iterations) + 0.6)
    ax.set_xlabel("iteration")


def _missing(ax, x: float, text: str) -> None:
    ax.text(x, 0.02, text.replace(" ", "\n", 1), ha="center", va="bottom", fontsize=8, color="grey",
            transform=ax.get_xaxis_transform())


def _em_panel(ax, run: RunView, colors: dict) -> None:
    ax.set_title("solver EM by iteration and hop count")
    evaluated = run.evaluated
    for hops, color in colors.items():
        points = [(v.iteration, v.evaluation["by_hops"][hops]["em"]) for v in evaluated
                  if hops in v.evaluation.get("by_hops", {})]
        if points:
            ax.plot(*zip(*points), marker="o", color=color, label=f"{hops} hop(s)")
    overall = [(v.iteration, v.evaluation["overall"]["em"]) for v in evaluated if "overall" in v.evaluation]
    if overall:
        ax.plot(*zip(*overall), marker="s", color="black", linewidth=2.5, label="all questions")
        ax.legend(fontsize=8, loc="upper left")
    for v in run.iterations:
        if v.evaluation is None:
            _missing(ax, v.iteration, NOT_EVALUATED)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    _x_axis(ax, [v.iteration for v in run.iterations])


def _kept_panel(ax, run: RunView, colors: dict) -> None:
    seed = (run.seed_manifest or {}).get("hop_histogram", {})
    total = sum(seed.values())
    mix = "/".join(f"{100 * n / total:.0f}" for n in seed.values()) + "%" if total else "unknown"
    ax.set_title(f"kept questions by hop (seed mix {mix})")
    iterations = [v.iteration for v in run.trained]
    bottoms = {i: 0 for i in iterations}
    for hops, color in colors.items():
        heights = [(v.gen or {}).get("hop_histogram", {}).get(hops, 0) for v in run.trained]
        ax.bar(iterations, heights, bottom=[bottoms[i] for i in iterations], color=color, label=f"{hops} hop(s)")
        for i, height in zip(iterations, heights):
            bottoms[i] += height
    for v in run.trained:
        if v.gen is None:
            _missing(ax, v.iteration, NO_GEN_DATA)
    ax.set_ylabel("questions")
    ax.legend(fontsize=8, loc="upper left")
    _x_axis(ax, iterations)


def _verdict_panel(ax, run: RunView) -> None:
    ax.set_title("what became of the seeds (share of seeds)")
    iterations = [v.iteration for v in run.trained]
    bottoms = [0.0] * len(iterations)
    for verdict, color in zip(VERDICTS, VERDICT_COLORS):
        shares = [(v.gen[verdict] / v.gen["seeds"]) if v.gen and v.gen.get("seeds") else 0.0 for v in run.trained]
        ax.bar(iterations, shares, bottom=bottoms, color=color, label=verdict.replace("_", " "))
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    for v in run.trained:
        if v.gen is None:
            _missing(ax, v.iteration, NO_GEN_DATA)
        else:
            ax.text(v.iteration, min(kept_share(v.gen), 1.0) / 2, f"{100 * kept_share(v.gen):.0f}% kept",
                    ha="center", va="center", fontsize=8)
    ax.set_ylim(0, 1.3)  # headroom for the legend above the bars
    ax.set_ylabel("share of seeds")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    _x_axis(ax, iterations)


def _stage_panel(ax, run: RunView) -> None:
    from matplotlib.patches import Rectangle  # matplotlib: only when a picture is drawn (see _hop_colors)

    prepare = run.stages.get("prepare-data", {}).get("status", NOT_STARTED) if run.state_found else "no state.json"
    ax.set_title(f"stage status (prepare-data: {prepare})")
    names = list(ITERATION_STAGES)  # "evaluate" is a stage of its own when evolve has --eval-data
    for v in run.trained:
        statuses = {**v.stages, "evaluate": "done" if v.evaluation is not None else NOT_STARTED}
        for row, name in enumerate(names):
            status = statuses.get(name, NOT_STARTED)
            ax.add_patch(Rectangle((v.iteration - 0.45, row - 0.4), 0.9, 0.8, edgecolor="white",
                                   facecolor=STATUS_COLORS.get(status, OTHER_STATUS_COLOR)))
            ax.text(v.iteration, row, status, ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    _x_axis(ax, [v.iteration for v in run.trained])


def _benchmark_panel(ax, run: RunView, published: list[PublishedResult]) -> None:
    """Grouped bars: EM per set (and the average) for each evaluated iteration; the papers' EM as marks."""
    from matplotlib import colormaps  # matplotlib: only when a picture is drawn (see _hop_colors)

    views = [v for v in run.evaluated if (v.evaluation.get("benchmarks") or {}).get("sets")]
    names = [name for name in BENCHMARKS if any(name in v.evaluation["benchmarks"]["sets"] for v in views)]
    columns = names + [AVG]
    ax.set_title("EM per benchmark set and iteration (marks: published EM)")
    width = 0.8 / len(views)
    cmap = colormaps["viridis"]
    for i, view in enumerate(views):
        benchmarks = view.evaluation["benchmarks"]
        heights = [benchmarks["sets"].get(n, {}).get("em", 0.0) for n in names] + [benchmarks["average"]["em"]]
        label = "base" if view.iteration == 0 else f"iteration {view.iteration}"
        ax.bar([c + (i - (len(views) - 1) / 2) * width for c in range(len(columns))], heights, width,
               color=cmap(i / max(1, len(views) - 1) * 0.85), label=label)
    shown = [p for p in published if p.has_numbers]
    for (marker, color), result in zip(PUBLISHED_MARKS, shown):
        points = [(c, result.em[n]) for c, n in enumerate(columns) if result.em.get(n) is not None]
        if points:
            ax.plot(*zip(*points), linestyle="none", marker=marker, markersize=16 if marker == "_" else 8,
                    markeredgewidth=2, color=color, label=result.label)
    ax.set_xticks(range(len(columns)), [BENCHMARKS[n].label for n in names] + ["Avg."])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def write_png(run: RunView, path: Path, published: list[PublishedResult] = ()) -> None:
    """Draw the four panels (and the benchmark row when there are benchmark results) and write them to ``path``
    through a temporary file."""
    # matplotlib: only when a picture is drawn (see _hop_colors)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_benchmarks = any((v.evaluation.get("benchmarks") or {}).get("sets") for v in run.evaluated)
    width, height = FIGURE_INCHES
    figure = Figure(figsize=(width, height + (BENCHMARK_ROW_INCHES if with_benchmarks else 0)), dpi=DPI)
    FigureCanvasAgg(figure)  # Agg: no display, and no pyplot state shared with the caller
    grid = figure.add_gridspec(3 if with_benchmarks else 2, 2)
    em_ax, kept_ax = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    verdict_ax, stage_ax = figure.add_subplot(grid[1, 0]), figure.add_subplot(grid[1, 1])
    colors = _hop_colors(run.hop_labels())
    _em_panel(em_ax, run, colors)
    _kept_panel(kept_ax, run, colors)
    _verdict_panel(verdict_ax, run)
    _stage_panel(stage_ax, run)
    if with_benchmarks:
        _benchmark_panel(figure.add_subplot(grid[2, :]), run, list(published))
    figure.suptitle(f"drzero run {run.checkpoints}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))
