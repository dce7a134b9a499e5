"""What a run has written so far, read for `drzero report` (``drzero.tools.report``) and its picture
(``drzero.tools.report_figure``): stage status, seed and gen-data manifests, evaluation summaries.

    run = load_run("/checkpoints", "/corpus/data")
    run.iterations[-1].evaluation, run.trained, run.hop_labels()

Missing pieces stay None (or "not started"); files that exist but cannot be read are listed in
``run.problems``, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from drzero.layout import SEED_STEM
from drzero.pipeline import ITERATION_STAGES, STATE_FILE
from drzero.records import DamagedRecord, Each, Optional, read_record

EVAL_DIR = "eval"  # CHECKPOINTS/eval/iter{K}/summary.json
_ITERATION_KEY = re.compile(r"iter(\d+)/")
_GEN_MANIFEST = re.compile(r"solver_iter(\d+)\.manifest\.json")
_EVAL_DIR = re.compile(r"iter(\d+)")
NOT_EVALUATED, NO_GEN_DATA, NOT_STARTED = "not evaluated", "no gen-data manifest", "not started"
SINGLE_EVALUATION = -1  # the iteration number of an evaluation directory given to --compare on its own


@dataclass
class IterationView:
    """Everything known about one iteration (iteration 0: the base model, only when it was evaluated)."""

    iteration: int
    evaluation: dict | None = None          # the evaluate summary.json
    setup: dict | None = None               # its manifest.json's "setup" (drzero.stages.evaluate_setup)
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
_BENCHMARK = {"em": float, "f1": float, "answered": float, "mean_searches": float, "mean_turns": float,
              "questions": Optional(int), "split": Optional(str)}
EVAL_SUMMARY = {"overall": Optional(_EM), "by_hops": Optional(Each(_EM)), "by_data_source": Optional(Each(_EM)),
                "macro_average": Optional({"em": Optional(float)}),
                "benchmarks": Optional({"sets": Each(_BENCHMARK), "average": _BENCHMARK, "all_seven": bool})}
EVAL_MANIFEST = {"setup": dict}
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


def load_run(checkpoints: str | Path, data_dir: str | Path, iterations: int | None = None) -> RunView:
    """What the run under ``checkpoints`` and ``data_dir`` has written so far, up to ``iterations``
    (default: every iteration it has reached)."""
    checkpoints, data_dir = Path(checkpoints).expanduser(), Path(data_dir).expanduser()
    problems: list[str] = []
    state = _read_json(checkpoints / "state.json", problems, STATE_FILE)
    stages = state.get("stages", {}) if state else {}
    gen_paths = {int(m.group(1)): p for p in (data_dir.glob("solver_iter*.manifest.json") if data_dir.is_dir() else [])
                 if (m := _GEN_MANIFEST.fullmatch(p.name))}
    eval_root = checkpoints / EVAL_DIR
    eval_paths = {int(m.group(1)): p for p in (eval_root.iterdir() if eval_root.is_dir() else [])
                  if (m := _EVAL_DIR.fullmatch(p.name)) and (p / "summary.json").is_file()}
    reached = [int(m.group(1)) for key in stages if (m := _ITERATION_KEY.match(key))]
    last = iterations or max([1, *reached, *gen_paths, *eval_paths])
    views = []
    for iteration in range(0 if 0 in eval_paths else 1, last + 1):
        view = IterationView(iteration)
        if iteration in eval_paths:
            view.evaluation, view.setup = read_evaluation(eval_paths[iteration], problems)
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


def read_evaluation(directory: Path, problems: list[str]) -> tuple[dict | None, dict | None]:
    """(summary.json, manifest.json's setup) of one evaluation directory; None for what is missing or damaged."""
    summary = _read_json(directory / "summary.json", problems, EVAL_SUMMARY)
    manifest = _read_json(directory / "manifest.json", problems, EVAL_MANIFEST)
    return summary, (manifest or {}).get("setup")


def load_comparison(path: str | Path) -> RunView:
    """What `drzero report --compare` reads: another run's checkpoint directory (its eval/iter<K>/), or one
    evaluation's directory (its summary.json and manifest.json, shown as iteration -1)."""
    path = Path(path).expanduser()
    if not (path / "summary.json").is_file():
        return load_run(path, path)
    problems: list[str] = []
    summary, setup = read_evaluation(path, problems)
    views = [IterationView(SINGLE_EVALUATION, summary, setup)] if summary is not None else []
    return RunView(path, path, views, {}, False, None, None, problems)


def kept_share(gen: dict) -> float:
    return gen.get("kept", 0) / gen["seeds"] if gen.get("seeds") else 0.0


# -- cells and tables of the report's Markdown, shared by its sections -----------------------------------------------

def num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def iteration_label(view: IterationView) -> str:
    return "0 (base)" if view.iteration == 0 else str(view.iteration)
