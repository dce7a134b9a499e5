"""# `python -m backends.modal status`: each stage, its verl step, the cost so far, what to do next

    python -m backends.modal status                        # also: which models are on dr-zero-corpus

Read from the volumes alone, from your machine: state.json (each stage's state, written by
`drzero`), verl's `latest_checkpointed_iteration.txt`, each iteration's evaluation summary, and the
GPU time each container recorded in `runs/`. Nothing is read that could be missing or damaged without
a plain line saying so: a fresh volume has no state.json yet, a model uploaded with `--path` has no
download record, and a damaged file is shown as such, never as a traceback.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import PurePosixPath

from backends.modal_image import HOURS, RUNS_DIR
from backends.modal_ops import MISSING, STARTED, load_stages, parse_time, read_volume_text
from backends.modal_plan import Request
from drzero.models.registry import REGISTRY


# -- per stage: the verl step, the next action -----------------------------------------------------


def step_file(key: str) -> str | None:
    """Where verl records the last step of a training stage's checkpoints (iter2/solver -> solver_iter2/...)."""
    iteration, _, stage = key.partition("/")
    if stage not in ("challenger", "solver") or not iteration.startswith("iter"):
        return None
    return f"{stage}_{iteration}/latest_checkpointed_iteration.txt"


def summary_file(key: str) -> str | None:
    """Where `drzero evolve --eval-data` writes an iteration's evaluation (iter2/evaluate -> eval/iter2/...)."""
    iteration, _, stage = key.partition("/")
    return f"eval/{iteration}/summary.json" if stage == "evaluate" else None


def summary_text(summary: dict) -> str:
    overall = summary.get("overall", {})
    return ", ".join(f"{name} {overall[key]:.3f}" for key, name in (("em", "EM"), ("f1", "F1")) if key in overall)


def stage_status(entry: dict, runs: list[dict]) -> str:
    """done, running, failed (exit N) or stopped: state.json says `running` until the stage ends, so for a stage
    no container is running any more, the last container's exit code tells a crash from a stop."""
    status = entry.get("status", "?")
    if status != "running":
        return status
    if any(run.get("ended") is None for run in runs):
        return "running"
    last = max(runs, key=lambda r: r["started"], default={})
    code = last.get("exit_code")
    return f"failed (exit {code})" if code not in (None, 0, 143) else "stopped"


def stage_lines(stages: dict, runs: list[dict], steps: dict[str, int], metrics: dict[str, str] | None = None,
                now: datetime | None = None) -> list[str]:
    now = now or datetime.now(timezone.utc)
    width = max([len(key) for key in stages] + [5])
    lines = []
    for key, entry in stages.items():
        status = stage_status(entry, runs)
        detail = [f"verl step {steps[key]}"] if key in steps else []
        detail += [metrics[key]] if metrics and metrics.get(key) else []
        if status == "running" and STARTED.match(str(entry.get("updated", ""))):
            detail.append(f"{(now - parse_time(entry['updated'])).total_seconds() / 3600:.1f} h so far")
        updated = str(entry.get("updated") or "")
        lines.append(f"  {key:<{width}}  {status:<16} {updated:<20}  {', '.join(detail)}".rstrip())
    return lines


def next_action(stages: dict, runs: list[dict]) -> str:
    run = "python -m backends.modal"
    statuses = {key: stage_status(entry, runs) for key, entry in stages.items()}
    if not stages:
        return f"{run} train   (after upload-corpus and download-model; `{run} smoke` first checks the stack)"
    if "running" in statuses.values():
        return f"{run} logs --follow   (known failures are flagged with their fix)"
    if any(s.startswith("failed") for s in statuses.values()):
        return f"{run} logs --errors   then fix what it names and `{run} resume`"
    if "stopped" in statuses.values():
        return f"{run} resume   (continues from state.json and the last verl checkpoint)"
    solvers = sorted(int(key[4:].split("/")[0]) for key, s in statuses.items()
                     if key.endswith("/merge-solver") and s == "done" and key[4:].split("/")[0].isdigit())
    if solvers:
        return f"{run} download-checkpoints --iteration {solvers[-1]}   (the merged solver and state.json)"
    return f"{run} resume   (the recorded stages are done; it runs what is left)"


def model_lines(volume, registry: dict) -> list[str]:
    """Which registry models are on the corpus volume under /models, and in what state."""
    try:
        present = {PurePosixPath(e.path).name for e in volume.listdir("models")}
    except MISSING:
        present = set()
    lines = []
    for entry in registry.values():
        if entry.local_dir not in present:
            state = "missing"
        else:
            try:
                marker = json.loads(b"".join(volume.read_file(f"models/{entry.local_dir}/.drzero-download.json")))
                state = "verified" if marker.get("complete") else "incomplete: run download-model again"
            except (*MISSING, ValueError, AttributeError):  # no download record (an upload with --path), or damaged
                state = "present"
        lines.append(f"  {entry.key:<22} /corpus/models/{entry.local_dir:<22} {state}")
    return lines


# -- cost so far -----------------------------------------------------------------------------------
#
# `status` adds up what each GPU container recorded in `runs/` on the checkpoints volume: its GPUs
# (from nvidia-smi), its start and its last heartbeat (refreshed with every volume commit, so a
# running or killed container is counted up to 10 minutes short). That counts retries and
# preemptions as well; state.json could not, it holds only each stage's last change. Image builds,
# cold starts and the CPU Functions are not counted: Modal's billing page is the bill.


def gpu_hours_of(run: dict) -> float:
    end = run.get("ended") or run.get("last_seen") or run["started"]
    seconds = max((parse_time(end) - parse_time(run["started"])).total_seconds(), 0.0)
    return run.get("gpus", 0) * seconds / HOURS


def render_status(state_text: str | None, runs: list[dict], price_per_gpu_hour: float,
                  steps: dict[str, int] | None = None, metrics: dict[str, str] | None = None) -> str:
    lines = []
    stages, problem = load_stages(state_text)
    if state_text is None:
        lines.append("state.json: none yet on dr-zero-checkpoints (no stage has run)")
    if problem:
        lines.append(f"{problem}: shown is what can be read; drzero checks it when the next run starts")
    if state_text is not None:
        lines.append(f"stages (dr-zero-checkpoints/state.json): {sum(s.get('status') == 'done' for s in stages.values())}"
                     f" of {len(stages)} recorded are done")
        lines += stage_lines(stages, runs, steps or {}, metrics)
    total = 0.0
    lines.append(f"GPU time (dr-zero-checkpoints/{RUNS_DIR}/, one record per container):")
    for run in sorted(runs, key=lambda r: r["started"]):
        hours = gpu_hours_of(run)
        total += hours
        if run.get("ended"):
            code = run.get("exit_code")
            state = f"ended {run['ended']}, " + (f"exit {code}" if code is not None else "stopped")
        else:
            state = f"running, last seen {run.get('last_seen')}"
        lines.append(f"  {run['started']}  {run['command']:<12} {run.get('gpus', 0)} x {run.get('gpu_type') or '?'}"
                     f"  {hours:7.1f} GPU-h  ${hours * price_per_gpu_hour:9,.2f}  {state}")
    lines.append(f"cost so far: {total:.1f} GPU-hours ~ ${total * price_per_gpu_hour:,.2f} at "
                 f"${price_per_gpu_hour:.2f}/GPU-hour (GPU time only; Modal's billing page is the bill)")
    lines.append(f"next: {next_action(stages, runs)}")
    return "\n".join(lines)


def _is_run(run) -> bool:
    return (isinstance(run, dict) and isinstance(run.get("command"), str) and STARTED.match(str(run.get("started")))
            and all(run.get(key) is None or STARTED.match(str(run[key])) for key in ("ended", "last_seen"))
            and isinstance(run.get("gpus", 0), int))


def read_runs(volume) -> list[dict]:
    """Every container's GPU time record in runs/; a damaged one is left out with a note."""
    try:
        entries = volume.listdir(RUNS_DIR)
    except MISSING:
        return []
    runs = []
    for entry in (e for e in entries if e.path.endswith(".json")):
        text = read_volume_text(volume, entry.path)
        try:
            run = json.loads(text) if text is not None else None
        except ValueError:
            run = {}
        if run is not None and not _is_run(run):
            print(f"[modal] {entry.path} on dr-zero-checkpoints is not a GPU time record; it is not counted",
                  file=sys.stderr)
        elif run is not None:
            runs.append(run)
    return runs


def read_summary(volume, path: str) -> str:
    try:
        summary = json.loads(read_volume_text(volume, path) or "{}")
        readable = isinstance(summary, dict) and isinstance(summary.get("overall", {}), dict)
        return summary_text(summary) if readable else ""
    except (ValueError, TypeError):
        return ""


def show_status(request: Request, checkpoints_volume, corpus_volume) -> int:
    runs = read_runs(checkpoints_volume)
    state_text = read_volume_text(checkpoints_volume, "state.json")
    steps, metrics = {}, {}
    for key in load_stages(state_text)[0]:
        where = step_file(key)
        text = read_volume_text(checkpoints_volume, where) if where else None
        if text and text.strip().isdigit():
            steps[key] = int(text)
        where = summary_file(key)
        if where:
            metrics[key] = read_summary(checkpoints_volume, where)
    print(render_status(state_text, runs, request.price_per_gpu_hour, steps, metrics))
    print("models on dr-zero-corpus (`python -m backends.modal download-model KEY` fetches one):")
    print("\n".join(model_lines(corpus_volume, REGISTRY)))
    return 0
