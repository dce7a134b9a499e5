"""Operating a launched run on Modal: its launch record, its logs read by the doctor, stop, resume, per-stage status.

    python -m backends.modal logs [APP_ID] [--errors] [--since 2h] [--follow]
    python -m backends.modal stop [APP_ID]
    python -m backends.modal resume [APP_ID]

Every GPU launch writes `launches/<time>-<action>.json` on the checkpoints volume: the app and call
ids and the exact Function call (which Function, its `drzero` arguments, GPUs, preflight). "The
latest run" is the newest record; `resume` makes the same call again, and the command continues
from state.json and verl's last checkpoint. Logs and stop go through Modal's own CLI
(`modal app logs`, `modal app stop`). backends/modal.py passes its volume in, so this module
never imports that one (run as `python -m backends.modal`, it is `__main__`).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Callable, Iterable, Sequence

import modal

from drzero.tools import log_doctor

LAUNCHES_DIR = "launches"   # on the checkpoints volume


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- launch records --------------------------------------------------------------------------------


def launch_record(launch: dict, app_id: str, call_id: str, started: str | None = None) -> dict:
    return {"app_id": app_id, "call_id": call_id, "started": started or now_iso(), "launch": launch}


def save_launch(volume, record: dict) -> str:
    """Write the record onto the checkpoints volume; return its path there."""
    path = f"/{LAUNCHES_DIR}/{record['started'].replace(':', '')}-{record['launch']['action']}.json"
    with volume.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(json.dumps(record, indent=2).encode()), path)
    return path


def launches(volume) -> list[dict]:
    """Every launch record on the volume, oldest first."""
    try:
        entries = volume.listdir(LAUNCHES_DIR)
    except modal.exception.NotFoundError:
        return []
    records = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.path.endswith(".json"):
            try:
                records.append(json.loads(b"".join(volume.read_file(entry.path))))
            except (modal.exception.NotFoundError, ValueError):
                continue
    return sorted(records, key=lambda r: r.get("started", ""))


def find_launch(volume, app_id: str | None = None) -> dict | None:
    """The newest launch record (of ``app_id`` when given)."""
    matching = [r for r in launches(volume) if app_id is None or r.get("app_id") == app_id]
    return matching[-1] if matching else None


# -- what a resume skips and runs ------------------------------------------------------------------


def _option(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
    argv = list(argv[:argv.index("--")] if "--" in argv else argv)
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            continue
        default = value  # the last one wins, as with argparse
    return default


def stage_keys(action: str, argv: Sequence[str]) -> list[str]:
    """The state.json keys a launch runs, in order (drzero.pipeline's names)."""
    from drzero.pipeline import ITERATION_STAGES  # evolve's stages and their order

    k = _option(argv, "--iteration", "1")
    if action == "train":
        iterations = int(_option(argv, "--iterations", "3"))
        names = [n for n in ITERATION_STAGES if n != "evaluate" or _option(argv, "--eval-data")]
        return ["prepare-data"] + [f"iter{i}/{n}" for i in range(1, iterations + 1) for n in names]
    if action == "merge":
        return [f"iter{k}/merge-{_option(argv, '--stage', 'solver')}"]
    if action in ("challenger", "gen-data", "solver", "evaluate"):
        return [f"iter{k}/{action}"]
    return []


def resume_lines(record: dict, state_text: str | None) -> list[str]:
    """What a resume of ``record`` will skip (done in state.json) and run, one line per stage."""
    stages = (json.loads(state_text).get("stages", {}) if state_text else {})
    launch = record["launch"]
    lines = []
    for key in stage_keys(launch["action"], launch["argv"]):
        status = stages.get(key, {}).get("status")
        if status == "done":
            lines.append(f"  skip    {key}  (done {stages[key].get('updated', '')})".rstrip())
        elif status == "running":
            lines.append(f"  resume  {key}  (was running; verl continues from its last checkpoint)")
        else:
            lines.append(f"  run     {key}")
    return lines or [f"  run     {launch['action']} (no state.json stages: it runs from its start)"]


# -- logs and stop, through Modal's CLI ------------------------------------------------------------


def modal_cli(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "modal", *args]


def log_lines(command: Sequence[str]) -> Iterable[str]:
    """The lines `modal app logs` prints, as they come."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace")
    try:
        yield from process.stdout
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()


SINCE = re.compile(r"^(\d+[smhd]|\d{4}-\d{2}-\d{2}([T ][\d:.]+Z?)?)$")  # what `modal app logs --since` takes


def check_since(since: str | None) -> None:
    if since is not None and not SINCE.match(since):
        raise ValueError(f"--since {since!r} is not valid: expected a number and a unit (30m, 2h, 1d) or an ISO date")


def logs_command(app_id: str, since: str | None, follow: bool) -> list[str]:
    check_since(since)
    return modal_cli(["app", "logs", app_id, *(["--since", since] if since else []), *(["-f"] if follow else [])])


def show_logs(app_id: str, *, errors: bool, since: str | None, follow: bool,
              read: Callable[[Sequence[str]], Iterable[str]] | None = None, out=print) -> int:
    """The app's log with the service prefixes kept and a `>>> fix` line after each known failure;
    with ``errors`` only the failures, each with a few lines of context."""
    lines = (read or log_lines)(logs_command(app_id, since, follow))
    if errors:
        out(log_doctor.excerpts(list(lines)))
        return 0
    for line in log_doctor.annotate(lines):
        out(line)
    return 0


def stop(app_id: str, run: Callable[[Sequence[str]], int] = lambda cmd: subprocess.call(list(cmd)), out=print) -> int:
    out(f"stopping app {app_id}: each drzero command gets SIGTERM, stops its services and verl, and the volumes "
        f"are committed on the way out")
    code = run(modal_cli(["app", "stop", app_id, "--yes"]))
    if code == 0:
        out("stopped; continue it with: python -m backends.modal resume")
    return code


# -- status: per stage, the verl step, the next action, the models on the volume -------------------


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


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
        if status == "running" and entry.get("updated"):
            detail.append(f"{(now - parse_time(entry['updated'])).total_seconds() / 3600:.1f} h so far")
        lines.append(f"  {key:<{width}}  {status:<16} {entry.get('updated', ''):<20}  {', '.join(detail)}".rstrip())
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
                     if key.endswith("/merge-solver") and s == "done")
    if solvers:
        return f"{run} download-checkpoints --iteration {solvers[-1]}   (the merged solver and state.json)"
    return f"{run} resume   (the recorded stages are done; it runs what is left)"


def model_lines(volume, registry: dict) -> list[str]:
    """Which registry models are on the corpus volume under /models, and in what state."""
    try:
        present = {PurePosixPath(e.path).name for e in volume.listdir("models")}
    except modal.exception.NotFoundError:
        present = set()
    lines = []
    for entry in registry.values():
        if entry.local_dir not in present:
            state = "missing"
        else:
            try:
                marker = json.loads(b"".join(volume.read_file(f"models/{entry.local_dir}/.drzero-download.json")))
                state = "verified" if marker.get("complete") else "incomplete: run download-model again"
            except (modal.exception.NotFoundError, ValueError):
                state = "present"
        lines.append(f"  {entry.key:<22} /corpus/models/{entry.local_dir:<22} {state}")
    return lines
