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

and writes ``report.png`` (2x2 panels: EM by iteration and hop count; kept questions by hop;
what became of the seeds; stage status) and ``report.md`` (the same numbers in tables) to
``--out`` (default CHECKPOINTS/report/). With ``--wandb`` it also logs them, and the image, to a
Weights & Biases run - when ``wandb`` is installed and a key is set (``WANDB_API_KEY`` or
``wandb login``) or ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from drzero.config import option, require
from drzero.config import env_default
from drzero.layout import SEED_STEM
from drzero.records import DamagedRecord, Each, Optional, read_record

log = logging.getLogger(__name__)

EVAL_DIR = "eval"  # CHECKPOINTS/eval/iter{K}/summary.json
PNG_FILE, MARKDOWN_FILE = "report.png", "report.md"
_ITERATION_KEY = re.compile(r"iter(\d+)/")
_GEN_MANIFEST = re.compile(r"solver_iter(\d+)\.manifest\.json")
_EVAL_DIR = re.compile(r"iter(\d+)")
NOT_EVALUATED, NO_GEN_DATA, NOT_STARTED = "not evaluated", "no gen-data manifest", "not started"


@dataclass(kw_only=True)
class ReportConfig:
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR", help=(
        "the run's checkpoint directory: state.json and eval/iter<K>/summary.json ($DRZERO_CHECKPOINTS)"))
    data_dir: str = option(env_default("DRZERO_DATA_DIR", "/corpus/data"), metavar="DIR", help=(
        "seed and solver data with their manifests ($DRZERO_DATA_DIR)"))
    out: str | None = option(None, metavar="DIR", help="where report.png and report.md go (default: CHECKPOINTS/report/)")
    iterations: int | None = option(None, help="iterations to show (default: every iteration the run has reached)")
    wandb: bool = option(False, help=(
        "also log the numbers and the image to Weights & Biases (needs WANDB_API_KEY, `wandb login` or "
        "WANDB_MODE=offline)"))
    wandb_project: str = option(env_default("WANDB_PROJECT", "drzero"), help="W&B project ($WANDB_PROJECT)")
    wandb_name: str | None = option(None, help="W&B run name (default: report-<checkpoints directory name>)")

    def __post_init__(self) -> None:
        require(Path(self.checkpoints).expanduser().is_dir(), "checkpoints", self.checkpoints,
                "an existing directory: the run's --checkpoints (it holds state.json)")
        require(self.iterations is None or self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")

    def output_dir(self) -> Path:
        return Path(self.out).expanduser() if self.out else Path(self.checkpoints).expanduser() / "report"


# -- what the run has written --------------------------------------------------------------------

@dataclass
class IterationView:
    """Everything known about one iteration (iteration 0: the base model, only when it was evaluated)."""

    iteration: int
    evaluation: dict | None = None          # the evaluate summary.json
    gen: dict | None = None                 # the gen-data manifest's "train" counts
    stages: dict[str, str] = field(default_factory=dict)  # stage -> status
    updated: dict[str, str] = field(default_factory=dict)


@dataclass
class RunView:
    checkpoints: Path
    data_dir: Path
    iterations: list[IterationView]
    stages: dict[str, dict]                 # state.json "stages" ({} without one)
    state_found: bool
    seed_manifest: dict | None
    seed_manifest_path: Path | None
    problems: list[str] = field(default_factory=list)  # files that exist but could not be read

    @property
    def evaluated(self) -> list[IterationView]:
        return [v for v in self.iterations if v.evaluation is not None]

    @property
    def trained(self) -> list[IterationView]:
        return [v for v in self.iterations if v.iteration >= 1]

    def hop_labels(self) -> list[str]:
        """Numeric hop counts seen in evaluations or gen-data, sorted; 1-4 when there are none."""
        seen = {h for v in self.evaluated for h in v.evaluation.get("by_hops", {}) if h.isdigit()}
        seen |= {h for v in self.iterations if v.gen for h in v.gen.get("hop_histogram", {})}
        return sorted(seen, key=int) or ["1", "2", "3", "4"]


# What the report reads of each file (drzero.records): a file of another shape is listed as damaged, not drawn.
_EM = {"em": float}
EVAL_SUMMARY = {"overall": Optional(_EM), "by_hops": Optional(Each(_EM)), "by_data_source": Optional(Each(_EM)),
                "macro_average": Optional({"em": Optional(float)})}
GEN_MANIFEST = {"train": Optional({"seeds": Optional(int), "kept": Optional(int),
                                   "mean_proposer_format": Optional(float), "hop_histogram": Optional(Each(int)),
                                   "invalid_candidate_reasons": Optional(Each(int))})}
SEED_COUNTS = {"rows": Optional(int), "hop_histogram": Optional(Each(int))}


def _read_json(path: Path, problems: list[str], shape=dict) -> dict | None:
    """The file when it has ``shape``; None (with the damage in ``problems``) when it is damaged or absent."""
    try:
        return read_record(path, shape)
    except DamagedRecord as damage:
        problems.append(f"{path} is damaged: {damage}; the report leaves it out")
        return None


def _seed_manifest_path(data_dir: Path) -> Path | None:
    preferred = data_dir / f"{SEED_STEM}.manifest.json"
    if preferred.is_file():
        return preferred
    others = sorted(data_dir.glob("zero_ratio*.manifest.json")) if data_dir.is_dir() else []
    return others[0] if others else None


def load_run(cfg: ReportConfig) -> RunView:
    from drzero.pipeline import ITERATION_STAGES, STATE_FILE

    checkpoints, data_dir = Path(cfg.checkpoints).expanduser(), Path(cfg.data_dir).expanduser()
    problems: list[str] = []
    state = _read_json(checkpoints / "state.json", problems, STATE_FILE)
    stages = state.get("stages", {}) if state else {}
    gen_paths = {int(m.group(1)): p for p in (data_dir.glob("solver_iter*.manifest.json") if data_dir.is_dir() else [])
                 if (m := _GEN_MANIFEST.fullmatch(p.name))}
    eval_root = checkpoints / EVAL_DIR
    eval_paths = {int(m.group(1)): p / "summary.json" for p in (eval_root.iterdir() if eval_root.is_dir() else [])
                  if (m := _EVAL_DIR.fullmatch(p.name)) and (p / "summary.json").is_file()}
    reached = [int(m.group(1)) for key in stages if (m := _ITERATION_KEY.match(key))]
    last = cfg.iterations or max([1, *reached, *gen_paths, *eval_paths])
    views = []
    for iteration in range(0 if 0 in eval_paths else 1, last + 1):
        view = IterationView(iteration)
        if iteration in eval_paths:
            view.evaluation = _read_json(eval_paths[iteration], problems, EVAL_SUMMARY)
        if iteration in gen_paths:
            manifest = _read_json(gen_paths[iteration], problems, GEN_MANIFEST)
            view.gen = manifest.get("train") if manifest else None
        for name in ITERATION_STAGES if iteration >= 1 else ():
            entry = stages.get(f"iter{iteration}/{name}", {})
            view.stages[name] = entry.get("status", NOT_STARTED)
            view.updated[name] = entry.get("updated", "")
        views.append(view)
    seed_path = _seed_manifest_path(data_dir)
    seed_manifest = _read_json(seed_path, problems, SEED_COUNTS) if seed_path else None
    return RunView(checkpoints, data_dir, views, stages, state is not None, seed_manifest, seed_path, problems)


# -- the numbers, once, for the markdown tables and W&B ---------------------------------------------

def kept_share(gen: dict) -> float:
    return gen.get("kept", 0) / gen["seeds"] if gen.get("seeds") else 0.0


def flat_metrics(view: IterationView) -> dict[str, float]:
    """One iteration's numbers under stable names (the W&B keys)."""
    from drzero.data.questions import VERDICTS

    metrics: dict[str, float] = {}
    if view.evaluation:
        overall = view.evaluation.get("overall", {})
        metrics.update({f"eval/{m}": overall[m] for m in ("em", "f1", "cover_em", "answered") if m in overall})
        metrics.update({f"eval/em_hop{h}": g["em"] for h, g in view.evaluation.get("by_hops", {}).items()})
        metrics.update({f"eval/em_{s}": g["em"] for s, g in view.evaluation.get("by_data_source", {}).items()})
    if view.gen:
        metrics.update({f"gen/{key}": view.gen[key] for key in ("seeds", *VERDICTS, "mean_proposer_format")
                        if key in view.gen})
        metrics["gen/kept_share"] = kept_share(view.gen)
        metrics.update({f"gen/kept_hop{h}": n for h, n in view.gen.get("hop_histogram", {}).items()})
    return metrics


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _label(view: IterationView) -> str:
    return "0 (base)" if view.iteration == 0 else str(view.iteration)


def render_markdown(run: RunView) -> str:
    from drzero.data.questions import VERDICTS

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
    lines += ["", f"From `{run.checkpoints / EVAL_DIR}/iter<K>/summary.json` (`drzero evaluate --out` there).",
              "", "## Generated questions (gen-data, train split)", ""]
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
    import netrc
    from urllib.parse import urlparse

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
    import wandb

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


def missing_pieces(run: RunView) -> list[str]:
    missing = [] if run.state_found else ["state.json"]
    missing += [f"iteration {v.iteration}: {NOT_EVALUATED}" for v in run.trained if v.evaluation is None]
    missing += [f"iteration {v.iteration}: {NO_GEN_DATA}" for v in run.trained if v.gen is None]
    return missing + ([] if run.seed_manifest else ["seed manifest"])


def run_report(cfg: ReportConfig) -> ReportResult:
    from drzero.atomic import check_writable, write_text_atomically
    from drzero.tools.report_figure import write_png

    out = cfg.output_dir()
    check_writable(out)
    run = load_run(cfg)
    png_path, markdown_path = out / PNG_FILE, out / MARKDOWN_FILE
    write_png(run, png_path)
    write_text_atomically(render_markdown(run), markdown_path)
    result = ReportResult(png_path, markdown_path, run, missing_pieces(run))
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
    lines.append(f"  missing        {'; '.join(result.missing) or 'nothing'}")
    lines += [f"  unreadable     {p}" for p in run.problems]
    lines.append(f"  W&B            {result.wandb}")
    return "\n".join(lines)
