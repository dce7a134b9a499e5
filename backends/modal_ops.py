"""# Operating Dr. Zero on Modal from your machine: estimates, logs, stop, resume, uploads and downloads

    python -m backends.modal logs [APP_ID] [--errors] [--since 2h | --follow]
    python -m backends.modal stop [APP_ID]
    python -m backends.modal resume [APP_ID]
    python -m backends.modal upload-corpus --path DIR      # upload-model --path DIR, download-checkpoints --iteration K

Every GPU launch writes `launches/<time>-<action>.json` on the checkpoints volume: the app and call
ids and the exact Function call (which Function, its `drzero` arguments, GPUs, preflight). "The
latest run" is the newest record; `resume` makes the same call again, and the command continues
from state.json and verl's last checkpoint. Logs and stop go through Modal's own CLI
(`modal app logs`, `modal app stop`). backends/modal.py passes its volumes in, so that this module
reads whichever volume the caller holds (the tests' fakes) and never imports that one; `status` is
backends/modal_status.py's.

What modal 1.6.4 raises is what is caught here: a missing file on a volume is `FileNotFoundError`
(`Volume.read_file`, `read_file_into_fileobj`), a missing directory `modal.exception.NotFoundError`
(`listdir`, the server's NOT_FOUND); tests/test_modal_fakes.py calls modal's own methods to hold the
tests' fakes to that.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import modal
from modal.volume import FileEntryType

from backends.modal_container import now_iso
from backends.modal_image import DAY, FILES_DIR, HOURS, RETRIES, SEEDS, parse_gpu
from backends.modal_plan import STAGE_OF, Launch, Request, hub_name, option
from drzero.pipeline import ITERATION_STAGES  # evolve's stages and their order
from drzero.tools import log_doctor

LAUNCHES_DIR = "launches"   # on the checkpoints volume
MISSING = (FileNotFoundError, modal.exception.NotFoundError)  # a file / a directory not on a volume (modal 1.6.4)


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
    gpu_type = gpu_type.rstrip("!")  # "H100!" pins the type for Modal; the estimate names the GPU
    hours = request.hours or EXPECTED_HOURS.get(launch.action, 1.0)
    attempts = 1 if launch.action == "smoke" else RETRIES.max_retries + 1
    per_attempt = 0.5 if launch.action == "smoke" else DAY / HOURS
    return Estimate(gpu_type, gpus, hours, request.price_per_gpu_hour, attempts, per_attempt, launch.nodes)


# What each Function runs, for the launch summary (ingest and prepare-data add --db and --out themselves).
WHAT_RUNS = {"train": "drzero evolve", "upload-model": "download into /corpus/models:",
             "download-corpus": f"download (resumable, checked) into {FILES_DIR}/<to>:",
             "adopt": "drzero adopt --db <local copy>",
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
    if launch.action == "download-corpus":
        where = f"{FILES_DIR}/{launch.argv[1]}".rstrip("/")
        lines.append(f"  then      python -m backends.modal ingest --stage-args='{where} ...'   (or `adopt "
                     f"--stage-args='...'` for a collection or index built elsewhere)")
    if launch.checked:
        lines.append(f"  preflight on a CPU first: {len(launch.required)} input(s) on the volumes"
                     + (f", then drzero {shlex.join(launch.preflight)}" if launch.preflight else ""))
    return "\n".join(lines)


def failure(action: str, error: BaseException) -> str:
    """One sentence for a launch Modal stopped, saying what modal raised as modal said it."""
    first = (str(error).strip().splitlines() or [""])[0]
    log = "; the image build's log is above" if isinstance(error, modal.exception.ImageBuildError) else ""
    return f"{action}: Modal stopped the launch ({type(error).__name__}: {first}){log}"


# -- launch records --------------------------------------------------------------------------------


def launch_record(launch: dict, app_id: str, call_id: str, started: str | None = None) -> dict:
    return {"app_id": app_id, "call_id": call_id, "started": started or now_iso(), "launch": launch}


def save_launch(volume, record: dict) -> str:
    """Write the record onto the checkpoints volume; return its path there."""
    path = f"/{LAUNCHES_DIR}/{record['started'].replace(':', '')}-{record['launch']['action']}.json"
    with volume.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(json.dumps(record, indent=2).encode()), path)
    return path


def _is_record(record) -> bool:
    launch = record.get("launch") if isinstance(record, dict) else None
    return (isinstance(launch, dict) and isinstance(launch.get("action"), str) and isinstance(launch.get("argv"), list)
            and isinstance(record.get("app_id"), str) and isinstance(record.get("started"), str))


def launches(volume) -> list[dict]:
    """Every launch record on the volume, oldest first; a damaged one is left out with a note."""
    try:
        entries = volume.listdir(LAUNCHES_DIR)
    except MISSING:
        return []
    records = []
    for entry in sorted(entries, key=lambda e: e.path):
        if not entry.path.endswith(".json"):
            continue
        text = read_volume_text(volume, entry.path)
        try:
            record = json.loads(text) if text is not None else None
        except ValueError:
            record = {}
        if record is not None and not _is_record(record):
            print(f"[modal] {entry.path} on dr-zero-checkpoints is not a launch record; left out", file=sys.stderr)
        elif record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r["started"])


def find_launch(volume, app_id: str | None = None) -> dict | None:
    """The newest launch record (of ``app_id`` when given)."""
    matching = [r for r in launches(volume) if app_id is None or r.get("app_id") == app_id]
    return matching[-1] if matching else None


# -- what a resume skips and runs ------------------------------------------------------------------


def stage_keys(action: str, argv: Sequence[str]) -> list[str]:
    """The state.json keys a launch runs, in order (drzero.pipeline's names)."""
    k = option(argv, "--iteration", "1")
    if action == "train":
        iterations = int(option(argv, "--iterations", "3"))
        names = [n for n in ITERATION_STAGES if n != "evaluate" or option(argv, "--eval-data")]
        return ["prepare-data"] + [f"iter{i}/{n}" for i in range(1, iterations + 1) for n in names]
    if action == "merge":
        return [f"iter{k}/merge-{option(argv, '--stage', 'solver')}"]
    if action in ("challenger", "gen-data", "solver", "evaluate"):
        return [f"iter{k}/{action}"]
    return []


def load_stages(text: str | None) -> tuple[dict[str, dict], str | None]:
    """state.json's stages, and what is wrong with it if it is damaged (then only its sound entries)."""
    if text is None:
        return {}, None
    try:
        state = json.loads(text)
    except ValueError as error:
        return {}, f"state.json is not valid JSON ({error})"
    stages = state.get("stages") if isinstance(state, dict) else None
    if not isinstance(stages, dict):
        return {}, "state.json has no `stages` object"
    sound = {key: entry for key, entry in stages.items()
             if isinstance(entry, dict) and isinstance(entry.get("status"), str)}
    damaged = sorted(set(stages) - set(sound))
    return sound, (f"state.json's entries for {', '.join(damaged)} are damaged" if damaged else None)


def resume_lines(record: dict, state_text: str | None) -> list[str]:
    """What a resume of ``record`` will skip (done in state.json) and run, one line per stage."""
    stages, problem = load_stages(state_text)
    launch = record["launch"]
    lines = [f"  note    {problem}: drzero checks it when the run starts"] if problem else []
    for key in stage_keys(launch["action"], launch["argv"]):
        status = stages.get(key, {}).get("status")
        if status == "done":
            lines.append(f"  skip    {key}  (done {stages[key].get('updated', '')})".rstrip())
        elif status == "running":
            lines.append(f"  resume  {key}  (was running; verl continues from its last checkpoint)")
        else:
            lines.append(f"  run     {key}")
    return lines or [f"  run     {launch['action']} (no state.json stages: it runs from its start)"]


def read_volume_text(volume, path: str) -> str | None:
    """A file on a volume as text, or None when it is not there."""
    try:
        return b"".join(volume.read_file(path)).decode(errors="replace")
    except MISSING:
        return None


# -- logs and stop, through Modal's CLI ------------------------------------------------------------


def modal_cli(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "modal", *args]


class ModalCliFailed(Exception):
    """Modal's CLI exited with an error; its own message is the last line it printed."""

    def __init__(self, command: Sequence[str], code: int, last: str):
        self.code = code
        super().__init__(f"`modal {' '.join(command[3:5])}` failed (exit {code})" + (f": {last}" if last else ""))


def log_lines(command: Sequence[str]) -> Iterator[str]:
    """The lines `modal app logs` prints, as they come; `ModalCliFailed` at the end when it failed."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace")
    last = ""
    try:
        for line in process.stdout:
            last = line.strip() or last
            yield line
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()
    if process.returncode:
        raise ModalCliFailed(command, process.returncode, last)


# What `modal app logs` accepts (modal 1.6.4, modal/cli/_logs.py and modal/_logs.py): --since is a whole number of
# s/m/h/d or an ISO 8601 time, in whole seconds (the fetch ranges refuse fractions), at most 35 days back; --follow
# cannot be combined with --since, --until or --tail; without either it reads only the last 100 entries, and
# --tail goes up to 20,000.
SINCE = re.compile(r"^(?P<n>\d+)(?P<unit>[smhd])$")
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SINCE = timedelta(days=35)
MAX_TAIL = 20_000
STARTED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")  # a launch record's time (now_iso)


def since_time(since: str, now: datetime | None = None) -> datetime:
    """When ``since`` starts, as `modal app logs` reads it; ValueError, in one sentence, for what modal refuses."""
    now = now or datetime.now(timezone.utc)
    if match := SINCE.match(since):
        start = now - timedelta(seconds=int(match["n"]) * SINCE_UNITS[match["unit"]])
    else:
        try:
            start = datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(f"--since {since!r} is not valid: expected a number and a unit (30m, 2h, 1d) or an "
                             f"ISO date (2026-11-26 or 2026-11-26T10:00:00Z)") from None
        start = start if start.tzinfo else start.astimezone()  # naive: local time, as modal reads it
        if start.microsecond:
            raise ValueError(f"--since {since!r} has fractions of a second, which modal refuses: give whole seconds")
    if start >= now:
        raise ValueError(f"--since {since!r} is not in the past")
    if now - start > MAX_SINCE:
        raise ValueError(f"--since {since!r} is more than {MAX_SINCE.days} days ago, further back than modal reads")
    return start


def check_logs_options(since: str | None, follow: bool) -> None:
    if since is not None and follow:
        raise ValueError("--follow streams the log from now on and modal cannot combine it with --since: drop one "
                         "(`logs --since 2h` reads the past, `logs --follow` what comes)")
    if since is not None:
        since_time(since)


def logs_command(app_id: str, since: str | None, follow: bool, started: str | None = None) -> list[str]:
    """`modal app logs` for the whole run: from ``since``, else from the launch's start (``started``), else as far
    back as modal's tail goes; with ``follow``, live."""
    check_logs_options(since, follow)
    if follow:
        window = ["-f"]
    elif since is not None:
        window = ["--since", since]
    elif started is not None and STARTED.match(started):
        begin = max(parse_time(started) - timedelta(minutes=5), datetime.now(timezone.utc) - MAX_SINCE
                    + timedelta(minutes=1))  # a few minutes before the launch record; modal reads 35 days at most
        window = ["--since", begin.strftime("%Y-%m-%dT%H:%M:%SZ")]
    else:
        window = ["--tail", str(MAX_TAIL)]
    return modal_cli(["app", "logs", app_id, *window])


def show_logs(app_id: str, *, errors: bool, since: str | None, follow: bool, started: str | None = None,
              read: Callable[[Sequence[str]], Iterable[str]] | None = None, out=print) -> int:
    """The app's log with the service prefixes kept and a `>>> fix` line after each known failure;
    with ``errors`` only the failures, each with a few lines of context. Not 0 when modal's CLI failed."""
    command = logs_command(app_id, since, follow, started)
    if "--tail" in command:
        print(f"[modal] no launch record of {app_id}: reading its last {MAX_TAIL:,} log entries (give --since to "
              f"read further back)", file=sys.stderr)
    try:
        lines = (read or log_lines)(command)
        if errors:
            out(log_doctor.excerpts(list(lines)))
        else:
            for line in log_doctor.annotate(lines):
                out(line)
    except ModalCliFailed as error:
        print(f"logs: {error}", file=sys.stderr)
        return error.code
    return 0


def stop(app_id: str, run: Callable[[Sequence[str]], int] = lambda cmd: subprocess.call(list(cmd)), out=print) -> int:
    out(f"stopping app {app_id}: each drzero command gets SIGTERM, stops its services and verl, and the volumes "
        f"are committed on the way out")
    code = run(modal_cli(["app", "stop", app_id, "--yes"]))
    if code == 0:
        out("stopped; continue it with: python -m backends.modal resume")
    return code


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


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
    local = Path(request.path).expanduser()
    if not local.is_dir():
        print(f"upload-model: --path {request.path!r} is not a directory of weights", file=sys.stderr)
        return 2
    name = PurePosixPath(hub_name(request.model or local.name)).name
    remote = f"/models/{name}"
    print(f"uploading {request.path} to dr-zero-corpus:{remote}")
    with corpus_volume.batch_upload(force=True) as batch:
        batch.put_directory(str(local), remote)
    return 0


def download_file(volume, path: str, local: Path) -> bool:
    """``path`` from the volume into ``local``, whole or not at all: False (and no file left) when it is missing."""
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".part")
    try:
        with partial.open("wb") as handle:
            volume.read_file_into_fileobj(path, handle)
        os.replace(partial, local)
        return True
    except MISSING:
        return False
    finally:
        partial.unlink(missing_ok=True)  # after a failure, whatever part of it was written


def download_checkpoints(request: Request, checkpoints_volume) -> int:
    """The merged model `<stage>_iter<K>_hf` and state.json into --path (default ./checkpoints)."""
    target = Path(request.path or "checkpoints")
    remote = f"{request.stage}_iter{request.iteration}_hf"
    try:
        files = [e.path for e in checkpoints_volume.listdir(remote, recursive=True) if e.type == FileEntryType.FILE]
    except MISSING:
        files = []
    if not files:
        print(f"download-checkpoints: {remote} is not on dr-zero-checkpoints yet; run `python -m backends.modal "
              f"merge --stage {request.stage} --iteration {request.iteration}` first", file=sys.stderr)
        return 1
    print(f"downloading dr-zero-checkpoints:{remote} and state.json to {target}/")
    missing = []
    for path in files + ["state.json"]:
        local = target / path.lstrip("/")
        if download_file(checkpoints_volume, path, local):
            print(f"  {local}")
        else:
            missing.append(path)
    for path in missing:
        print(f"  {path}: not on dr-zero-checkpoints (any more); nothing written for it", file=sys.stderr)
    return 1 if set(missing) - {"state.json"} else 0
