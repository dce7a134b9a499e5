"""# Operating Dr. Zero on Modal from your machine: status and cost, logs, stop, resume, uploads and downloads

    python -m backends.modal status                        # each stage, its verl step, cost so far, what to do next
    python -m backends.modal logs [APP_ID] [--errors] [--since 2h] [--follow]
    python -m backends.modal stop [APP_ID]
    python -m backends.modal resume [APP_ID]
    python -m backends.modal upload-corpus --path DIR      # upload-model --path DIR, download-checkpoints --iteration K

Every GPU launch writes `launches/<time>-<action>.json` on the checkpoints volume: the app and call
ids and the exact Function call (which Function, its `drzero` arguments, GPUs, preflight). "The
latest run" is the newest record; `resume` makes the same call again, and the command continues
from state.json and verl's last checkpoint. Logs and stop go through Modal's own CLI
(`modal app logs`, `modal app stop`). backends/modal.py passes its volumes in, so that this module
reads whichever volume the caller holds (the tests' fakes) and never imports that one.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import modal
from modal.volume import FileEntryType

from backends.modal_container import now_iso
from backends.modal_image import DAY, HOURS, RETRIES, RUNS_DIR, SEEDS, parse_gpu
from backends.modal_plan import STAGE_OF, Launch, Request, hub_name
from drzero.models.registry import REGISTRY
from drzero.pipeline import ITERATION_STAGES  # evolve's stages and their order
from drzero.tools import log_doctor

LAUNCHES_DIR = "launches"   # on the checkpoints volume


# -- before a launch: what runs where, and what it may cost ----------------------------------------
#
# The estimate comes from rough hours per action (the stage registry's; `--hours` to change them)
# and the price per GPU-hour; what the run really used is `status`'s, below.

SMOKE_HOURS = 0.5  # smoke is no stage of the loop; its Function stops at 30 minutes
EXPECTED_HOURS = {**{action: stage.hours for action, stage in STAGE_OF.items()}, "smoke": SMOKE_HOURS}


@dataclass
class Estimate:
    gpu_type: str
    gpus: int
    hours: float
    price_per_gpu_hour: float
    attempts: int = RETRIES.max_retries + 1
    hours_per_attempt: float = DAY / HOURS
    nodes: int = 1                  # each with ``gpus`` GPUs

    @property
    def gpu_hours(self) -> float:
        return self.nodes * self.gpus * self.hours

    @property
    def dollars(self) -> float:
        return self.gpu_hours * self.price_per_gpu_hour

    @property
    def dollars_per_attempt_cap(self) -> float:
        return self.nodes * self.gpus * self.hours_per_attempt * self.price_per_gpu_hour

    def lines(self) -> list[str]:
        where = f"{self.gpus} x {self.gpu_type}" + (f" on each of {self.nodes} nodes" if self.nodes > 1 else "")
        return [f"  estimate  ~{self.hours:g} h on {where} = {self.gpu_hours:g} GPU-hours "
                f"~ ${self.dollars:,.0f} at ${self.price_per_gpu_hour:.2f}/GPU-hour (--hours, "
                f"--price-per-gpu-hour; CPU and memory are billed on top)",
                f"  limit     {self.hours_per_attempt:g} h per attempt (${self.dollars_per_attempt_cap:,.0f}), up to "
                f"{self.attempts} attempts; stop it any time with `modal app stop`"]


def estimate(launch: Launch, request: Request) -> Estimate | None:
    if launch.gpu is None:
        return None
    gpu_type, gpus = parse_gpu(launch.gpu)
    hours = request.hours or EXPECTED_HOURS.get(launch.action, 1.0)
    attempts = 1 if launch.action == "smoke" else RETRIES.max_retries + 1
    per_attempt = 0.5 if launch.action == "smoke" else DAY / HOURS
    return Estimate(gpu_type, gpus, hours, request.price_per_gpu_hour, attempts, per_attempt, launch.nodes)


# What each Function runs, for the launch summary (ingest and prepare-data add --db and --out themselves).
WHAT_RUNS = {"train": "drzero evolve", "upload-model": "download into /corpus/models:",
             "download-model": "download (resumable, verified) into /corpus/models:", "ingest": "drzero ingest "
        "[/corpus/sources] --db <local copy>", "prepare-data": f"drzero prepare-data --db <local copy> --out {SEEDS}"}


def describe(launch: Launch, request: Request) -> str:
    """The launch summary: what runs, on which GPUs, what it may cost, what is checked first."""
    # a cluster's arguments start with the drzero command itself
    runs = "drzero" if launch.nodes > 1 else WHAT_RUNS.get(launch.action, f"drzero {launch.action}")
    lines = [f"{launch.action} on Modal: {runs} {shlex.join(launch.argv)}".rstrip()]
    if launch.gpu:
        pin = "; Modal may serve H100 as H200, write H100! to pin it" if parse_gpu(launch.gpu)[0] == "H100" else ""
        lines.append(f"  GPUs      {launch.gpu} (--gpu or $DRZERO_MODAL_GPU{pin})"
                     + (f" on each of {launch.nodes} nodes: a Modal cluster (a feature Modal enables per workspace)"
                        if launch.nodes > 1 else ""))
        lines += estimate(launch, request).lines()
    if launch.checked:
        lines.append(f"  preflight on a CPU first: {len(launch.required)} input(s) on the volumes"
                     + (f", then drzero {shlex.join(launch.preflight)}" if launch.preflight else ""))
    return "\n".join(lines)


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
    stages = json.loads(state_text).get("stages", {}) if state_text is not None else {}
    if state_text is None:
        lines.append("state.json: none yet on dr-zero-checkpoints (no stage has run)")
    else:
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


def read_volume_text(volume, path: str) -> str | None:
    try:
        return b"".join(volume.read_file(path)).decode()
    except modal.exception.NotFoundError:
        return None


def show_status(request: Request, checkpoints_volume, corpus_volume) -> int:
    try:
        entries = checkpoints_volume.listdir(RUNS_DIR)
    except modal.exception.NotFoundError:
        entries = []
    runs = [json.loads(text) for entry in entries if entry.path.endswith(".json")
            if (text := read_volume_text(checkpoints_volume, entry.path)) is not None]
    state_text = read_volume_text(checkpoints_volume, "state.json")
    steps, metrics = {}, {}
    for key in (json.loads(state_text).get("stages", {}) if state_text else {}):
        where = step_file(key)
        text = read_volume_text(checkpoints_volume, where) if where else None
        if text and text.strip().isdigit():
            steps[key] = int(text)
        where = summary_file(key)
        text = read_volume_text(checkpoints_volume, where) if where else None
        if text:
            metrics[key] = summary_text(json.loads(text))
    print(render_status(state_text, runs, request.price_per_gpu_hour, steps, metrics))
    print("models on dr-zero-corpus (`python -m backends.modal download-model KEY` fetches one):")
    print("\n".join(model_lines(corpus_volume, REGISTRY)))
    return 0


# -- uploads and downloads, from your machine ------------------------------------------------------


def upload_corpus(request: Request, corpus_volume) -> int:
    """A Chroma store goes to /corpus/chromadb; documents go to /corpus/sources for `ingest`."""
    local = Path(request.path or "").expanduser()
    if not request.path or not local.exists():
        print(f"upload-corpus: --path {request.path!r} does not exist; give a Chroma store directory (from "
              f"`drzero ingest`) or a file or directory of documents", file=sys.stderr)
        return 2
    is_store = (local / "chroma.sqlite3").is_file()
    remote = "/chromadb" if is_store else f"/sources/{local.name}"
    print(f"uploading {local} to dr-zero-corpus:{remote} (files of the same name are replaced)")
    with corpus_volume.batch_upload(force=True) as batch:
        if local.is_dir():
            batch.put_directory(str(local), remote)
        else:
            batch.put_file(str(local), remote)
    print("done; next: " + ("python -m backends.modal prepare-data" if is_store else
                            "python -m backends.modal ingest   (embeds /corpus/sources into /corpus/chromadb)"))
    return 0


def upload_model_from_disk(request: Request, corpus_volume) -> int:
    name = PurePosixPath(hub_name(request.model or Path(request.path).name)).name
    remote = f"/models/{name}"
    print(f"uploading {request.path} to dr-zero-corpus:{remote}")
    with corpus_volume.batch_upload(force=True) as batch:
        batch.put_directory(str(Path(request.path).expanduser()), remote)
    return 0


def download_checkpoints(request: Request, checkpoints_volume) -> int:
    """The merged model `<stage>_iter<K>_hf` and state.json into --path (default ./checkpoints)."""
    target = Path(request.path or "checkpoints")
    remote = f"{request.stage}_iter{request.iteration}_hf"
    try:
        entries = checkpoints_volume.listdir(remote, recursive=True)
    except modal.exception.NotFoundError:
        print(f"download-checkpoints: {remote} is not on dr-zero-checkpoints yet; run `python -m backends.modal "
              f"merge --stage {request.stage} --iteration {request.iteration}` first", file=sys.stderr)
        return 1
    print(f"downloading dr-zero-checkpoints:{remote} and state.json to {target}/")
    for path in [e.path for e in entries if e.type == FileEntryType.FILE] + ["state.json"]:
        local = target / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with local.open("wb") as handle:
                checkpoints_volume.read_file_into_fileobj(path, handle)
        except modal.exception.NotFoundError:
            local.unlink()
            continue
        print(f"  {local}")
    return 0
