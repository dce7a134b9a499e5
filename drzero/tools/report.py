"""`drzero report`: one picture and one page of numbers for a run - evaluation, generated questions, stages.

    drzero report --checkpoints /checkpoints --data-dir /corpus/data
    drzero report --checkpoints .drzero/checkpoints --data-dir .drzero/data --wandb

It reads whatever the run has written so far; a piece that is missing (an iteration not
evaluated yet, a gen-data stage still running) is shown as missing, never an error:

    CHECKPOINTS/state.json                   stage status, written by `drzero evolve`
    DATA_DIR/zero_ratio*.manifest.json       the seed data's hop mix (`drzero prepare-data`)
    DATA_DIR/solver_iter{K}.manifest.json    questions kept and rejected in iteration K (`drzero gen-data`)
    CHECKPOINTS/eval/iter{K}/summary.json    iteration K's solver evaluated, written by
                                             `drzero evaluate --out CHECKPOINTS/eval/iter{K}` (iter0: the base model)
    CHECKPOINTS/eval/iter{K}/manifest.json   the setup of that evaluation (model, corpus, retriever, prompt, ...)

Evaluations on the papers' QA sets (`drzero evaluate --benchmark`) get a table per iteration with the
numbers the papers publish in columns beside ours (drzero/data/published.json, each with its source and
whether it was checked). ``--compare DIR`` puts another run (its checkpoint directory, or one evaluation's
directory) beside this one: first where the two setups differ, then the scores.

and writes ``report.png`` (2x2 panels: EM by iteration and hop count; kept questions by hop;
what became of the seeds; stage status; below them EM per benchmark set when there are benchmark
results) and ``report.md`` (the same numbers in tables) to ``--out`` (default CHECKPOINTS/report/). With ``--wandb`` it also logs them, and the image, to a
Weights & Biases run - when ``wandb`` is installed and a key is set (``WANDB_API_KEY`` or
``wandb login``) or ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from drzero.atomic import check_writable, write_text_atomically
from drzero.config import option, require
from drzero.config import env_default
from drzero.data.published import published_results
from drzero.data.questions import VERDICTS
from drzero.records import DamagedRecord
from drzero.tools.report_benchmarks import benchmark_section, comparison_section, comparison_summary
from drzero.tools.report_figure import write_png
from drzero.tools.report_run import (EVAL_DIR, NO_GEN_DATA, NOT_EVALUATED, NOT_STARTED, IterationView, RunView,
                                     kept_share, load_comparison, load_run)
from drzero.tools.report_run import iteration_label as _label
from drzero.tools.report_run import markdown_table as _table
from drzero.tools.report_run import num as _num

log = logging.getLogger(__name__)

PNG_FILE, MARKDOWN_FILE = "report.png", "report.md"


@dataclass(kw_only=True)
class ReportConfig:
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR", help=(
        "the run's checkpoint directory: state.json and eval/iter<K>/summary.json ($DRZERO_CHECKPOINTS)"))
    data_dir: str = option(env_default("DRZERO_DATA_DIR", "/corpus/data"), metavar="DIR", help=(
        "seed and solver data with their manifests ($DRZERO_DATA_DIR)"))
    out: str | None = option(None, metavar="DIR", help="where report.png and report.md go (default: CHECKPOINTS/report/)")
    iterations: int | None = option(None, help="iterations to show (default: every iteration the run has reached)")
    compare: str | None = option(None, metavar="DIR", help=(
        "another run's checkpoint directory, or one evaluation's directory (summary.json, manifest.json): where "
        "the setups differ, then the scores side by side"))
    wandb: bool = option(False, help=(
        "also log the numbers and the image to Weights & Biases (needs WANDB_API_KEY, `wandb login` or "
        "WANDB_MODE=offline)"))
    wandb_project: str = option(env_default("WANDB_PROJECT", "drzero"), help="W&B project ($WANDB_PROJECT)")
    wandb_name: str | None = option(None, help="W&B run name (default: report-<checkpoints directory name>)")

    def __post_init__(self) -> None:
        require(Path(self.checkpoints).expanduser().is_dir(), "checkpoints", self.checkpoints,
                "an existing directory: the run's --checkpoints (it holds state.json)")
        require(self.iterations is None or self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        require(self.compare is None or Path(self.compare).expanduser().is_dir(), "compare", self.compare,
                "an existing directory: another run's --checkpoints, or a `drzero evaluate --out` directory")

    def output_dir(self) -> Path:
        return Path(self.out).expanduser() if self.out else Path(self.checkpoints).expanduser() / "report"


# -- the numbers, once, for the markdown tables and W&B ---------------------------------------------

def flat_metrics(view: IterationView) -> dict[str, float]:
    """One iteration's numbers under stable names (the W&B keys)."""
    metrics: dict[str, float] = {}
    if view.evaluation:
        overall = view.evaluation.get("overall", {})
        metrics.update({f"eval/{m}": overall[m] for m in ("em", "f1", "cover_em", "answered") if m in overall})
        metrics.update({f"eval/em_hop{h}": g["em"] for h, g in view.evaluation.get("by_hops", {}).items()})
        metrics.update({f"eval/em_{s}": g["em"] for s, g in view.evaluation.get("by_data_source", {}).items()})
        benchmarks = view.evaluation.get("benchmarks") or {}
        metrics.update({f"eval/bench_em_{s}": g["em"] for s, g in benchmarks.get("sets", {}).items()})
        if benchmarks.get("average"):
            metrics["eval/bench_em_average"] = benchmarks["average"]["em"]
    if view.gen:
        metrics.update({f"gen/{key}": view.gen[key] for key in ("seeds", *VERDICTS, "mean_proposer_format")
                        if key in view.gen})
        metrics["gen/kept_share"] = kept_share(view.gen)
        metrics.update({f"gen/kept_hop{h}": n for h, n in view.gen.get("hop_histogram", {}).items()})
    return metrics


def render_markdown(run: RunView, other: RunView | None = None, published: list | None = None) -> str:
    hops = run.hop_labels()
    lines = ["# drzero run report", "",
             f"Checkpoints `{run.checkpoints}` · data `{run.data_dir}` · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "## Evaluation", ""]
    rows = []
    for v in run.iterations:
        if v.evaluation is None:
            rows.append([_label(v), NOT_EVALUATED] + [""] * (5 + len(hops)))
            continue
        overall, by_hops = v.evaluation.get("overall", {}), v.evaluation.get("by_hops", {})
        rows.append([_label(v), str(overall.get("questions", "–")), _num(overall.get("em")), _num(overall.get("f1")),
                     _num(overall.get("cover_em"))] + [_num(by_hops.get(h, {}).get("em")) for h in hops]
                    + [_num(overall.get("answered")), str(overall.get("rollout_errors", "–"))])
    lines += _table(["iteration", "questions", "EM", "F1", "cover-EM", *[f"EM {h}-hop" for h in hops], "answered",
                     "rollout errors"], rows)
    sources = sorted({s for v in run.evaluated for s in v.evaluation.get("by_data_source", {})})
    if any(not s.startswith("search_zero_") for s in sources):
        lines += ["", "EM by data source:", ""]
        lines += _table(["iteration", *sources, "macro average"], [
            [_label(v), *[_num(v.evaluation["by_data_source"].get(s, {}).get("em")) for s in sources],
             _num(v.evaluation.get("macro_average", {}).get("em"))] for v in run.evaluated])
    lines += ["", f"From `{run.checkpoints / EVAL_DIR}/iter<K>/summary.json` (`drzero evaluate --out` there)."]
    lines += benchmark_section(run, published_results() if published is None else published)
    if other is not None:
        lines += comparison_section(run, other)
    lines += ["", "## Generated questions (gen-data, train split)", ""]
    rows = []
    for v in run.trained:
        if v.gen is None:
            rows.append([_label(v), NO_GEN_DATA] + [""] * (len(VERDICTS) + 2 + len(hops)))
            continue
        histogram = v.gen.get("hop_histogram", {})
        rows.append([_label(v), str(v.gen.get("seeds", "–")), *[str(v.gen.get(k, 0)) for k in VERDICTS],
                     f"{100 * kept_share(v.gen):.1f}%", _num(v.gen.get("mean_proposer_format")),
                     *[str(histogram.get(h, 0)) for h in hops]])
    lines += _table(["iteration", "seeds", *VERDICTS, "kept share", "mean format", *[f"kept {h}-hop" for h in hops]],
                    rows)
    for v in run.trained:
        reasons = (v.gen or {}).get("invalid_candidate_reasons") or {}
        if reasons:
            lines.append(f"\nIteration {v.iteration}, candidates that failed the format gate: "
                         + ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda r: -r[1])))
    seed = run.seed_manifest
    if seed:
        histogram = seed.get("hop_histogram", {})
        total = sum(histogram.values()) or 1
        mix = " · ".join(f"{h}-hop {100 * n / total:.0f}%" for h, n in histogram.items())
        lines += ["", f"Seed data: {seed.get('rows', total)} rows, hop mix {mix} (`{run.seed_manifest_path}`)."]
    else:
        lines += ["", f"Seed data: no seed manifest in `{run.data_dir}`."]
    lines += ["", "## Stages", ""]
    if not run.state_found:
        lines.append(f"No `state.json` in `{run.checkpoints}` yet.")
    else:
        prepare = run.stages.get("prepare-data", {})
        rows = [["prepare-data", prepare.get("status", NOT_STARTED), prepare.get("updated", "")]]
        rows += [[f"iter{v.iteration}/{name}", status, v.updated.get(name, "")]
                 for v in run.trained for name, status in v.stages.items()]
        lines += _table(["stage", "status", "updated"], rows)
    if run.problems:
        lines += ["", "## Unreadable files", ""] + [f"- {p}" for p in run.problems]
    return "\n".join(lines) + "\n"


# -- W&B -------------------------------------------------------------------------------------------

def _wandb_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:  # where `wandb login` keeps the key
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_status(enabled: bool) -> tuple[bool, str]:
    """(log to W&B?, why not) for ``--wandb``."""
    if not enabled:
        return False, "off (--wandb to log)"
    if importlib.util.find_spec("wandb") is None:
        return False, "skipped: wandb is not installed (pip install wandb)"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False, "skipped: WANDB_MODE=disabled"
    if mode == "offline" or _wandb_key_present():
        return True, ""
    return False, "skipped: no W&B key; set WANDB_API_KEY, run `wandb login`, or set WANDB_MODE=offline"


def log_to_wandb(cfg: ReportConfig, run: RunView, png_path: Path) -> str:
    """Each iteration's numbers at step K, the picture with the last; returns where the run went."""
    import wandb  # optional (wandb_status checked it is installed), and slow to import

    steps = [(v.iteration, flat_metrics(v)) for v in run.iterations]
    wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or f"report-{run.checkpoints.name}",
                           job_type="report", config={"checkpoints": str(run.checkpoints),
                                                      "data_dir": str(run.data_dir)},
                           settings=wandb.Settings(silent=True))
    try:
        for index, (step, metrics) in enumerate(steps):
            if index == len(steps) - 1:
                metrics = {**metrics, "report": wandb.Image(str(png_path))}
            wandb_run.log(metrics, step=step)
        return wandb_run.url or wandb_run.dir
    finally:
        wandb_run.finish()


# -- the command -----------------------------------------------------------------------------------

@dataclass
class ReportResult:
    png_path: Path
    markdown_path: Path
    run: RunView
    missing: list[str] = field(default_factory=list)
    wandb: str = ""                         # where the W&B run went, or why it did not
    other: RunView | None = None            # the run given to --compare


def missing_pieces(run: RunView) -> list[str]:
    missing = [] if run.state_found else ["state.json"]
    missing += [f"iteration {v.iteration}: {NOT_EVALUATED}" for v in run.trained if v.evaluation is None]
    missing += [f"iteration {v.iteration}: {NO_GEN_DATA}" for v in run.trained if v.gen is None]
    return missing + ([] if run.seed_manifest else ["seed manifest"])


def run_report(cfg: ReportConfig) -> ReportResult:
    out = cfg.output_dir()
    check_writable(out)
    run = load_run(cfg.checkpoints, cfg.data_dir, cfg.iterations)
    other = load_comparison(cfg.compare) if cfg.compare else None
    try:
        published = published_results()
    except DamagedRecord as damage:  # an install without its data file still reports the run
        run.problems.append(f"the published numbers are unreadable ({damage}); the report leaves them out")
        published = []
    png_path, markdown_path = out / PNG_FILE, out / MARKDOWN_FILE
    write_png(run, png_path, published)
    write_text_atomically(render_markdown(run, other, published), markdown_path)
    result = ReportResult(png_path, markdown_path, run, missing_pieces(run), other=other)
    enabled, why_not = wandb_status(cfg.wandb)
    result.wandb = log_to_wandb(cfg, run, png_path) if enabled else why_not
    return result


def summary_lines(result: ReportResult) -> str:
    run = result.run
    lines = ["report summary",
             f"  picture        {result.png_path}",
             f"  tables         {result.markdown_path}",
             f"  iterations     {', '.join(_label(v) for v in run.iterations)} "
             f"({len(run.evaluated)} evaluated)"]
    lines += [f"  latest EM      {_label(v)}: {_num(v.evaluation.get('overall', {}).get('em'))}"
              for v in run.evaluated[-1:]]
    benchmarks = [v for v in run.evaluated if (v.evaluation.get("benchmarks") or {}).get("average")]
    lines += [f"  benchmarks     {_label(v)}: EM {_num(v.evaluation['benchmarks']['average']['em'])} averaged over "
              f"{len(v.evaluation['benchmarks']['sets'])} set(s)" for v in benchmarks[-1:]]
    if result.other is not None:
        lines.append(f"  compared with  {result.other.checkpoints}: {comparison_summary(run, result.other)}")
    lines.append(f"  missing        {'; '.join(result.missing) or 'nothing'}")
    lines += [f"  unreadable     {p}" for p in run.problems]
    lines.append(f"  W&B            {result.wandb}")
    return "\n".join(lines)
