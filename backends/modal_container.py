"""# A `drzero` command in a Modal container: streamed, the volumes committed, its GPU time recorded

    python -m backends.modal solver --iteration 1   # the `solver` Function runs `drzero solver ...` through run_drzero

Each Function of backends/modal.py and backends/modal_cluster.py starts its `drzero` command as a child
process with what is here. The Function's own process prints the command's output line by line,
commits both volumes every few minutes from a background thread (child processes have no Modal
client) and once more on the way out, and records its GPU time.

Stopping: Modal stops a Function with SIGINT (preemption, `modal app stop`, `modal container stop`) or
SIGUSR1 (a cancelled call, raised in a sync Function as `InputCancellation`), and kills the container
when its grace period is over (`GRACE_PERIOD`). The command gets SIGTERM and `CHILD_STOP_WAIT` seconds to
stop its services and verl (state.json and verl's last complete checkpoint are on the volume by then),
then SIGKILL; the last commit follows, with every further signal held off until it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from backends.modal_image import (CHECKPOINTS_DIR, CODE_DIR, CORPUS_DB, CORPUS_DIR, LOCAL_DB, MINUTES, RUNS_DIR,
                                  SOURCES_DIR, checkpoints_volume, corpus_volume)

COMMIT_EVERY = 10 * MINUTES
USAGE_ERROR = 2  # drzero's exit code for a wrong option or config: a retry cannot fix it
# Modal's docs (guide/lifecycle-functions), for a container that is stopped or preempted: "The exit handler is
# given a grace period of 30 seconds to finish, and it will be killed if it takes longer than that to complete"
# (modal 1.6.4 keeps an HTTP server's own `exit_grace_period` under it, at most 25 s: modal/_server.py). The
# command's share leaves the rest, 13 s or more, to the last commit of both volumes.
GRACE_PERIOD = 30
CHILD_STOP_WAIT = 15      # seconds the command has to stop after SIGTERM, before SIGKILL
COMMIT_THREAD_WAIT = 2    # seconds the background committer gets to notice the end (a commit in flight is awaited)
_committing = threading.Lock()  # one commit at a time: the last one waits for the background one, then runs


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def visible_gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuTimeRecord:
    """One container's GPU time in `runs/<start>-<command>-<task>.json` on the checkpoints volume."""

    def __init__(self, command: str, argv: Sequence[str]):
        gpus = visible_gpus()
        task = os.environ.get("MODAL_TASK_ID") or uuid.uuid4().hex[:12]
        started = now_iso()
        self.path = Path(CHECKPOINTS_DIR) / RUNS_DIR / f"{started.replace(':', '')}-{command}-{task}.json"
        self.data = {"command": command, "argv": list(argv), "gpu_type": gpus[0] if gpus else "",
                     "gpus": len(gpus), "started": started, "last_seen": started, "ended": None,
                     "exit_code": None, "task_id": task}
        self._lock = threading.Lock()  # the commit thread saves too
        self.save()

    def save(self, **updates) -> None:
        with self._lock:
            self.data.update(updates, last_seen=now_iso())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=2))
            os.replace(temporary, self.path)


def commit_volumes() -> None:
    with _committing:
        _commit_each()


def _commit_each() -> None:
    for volume in (checkpoints_volume, corpus_volume):  # checkpoints first: state.json and the last checkpoint
        try:
            volume.commit()
        except Exception as error:  # the next commit tries again; a failed commit must not end the run
            print(f"[modal] volume commit failed ({error}); trying again at the next one", flush=True)


def reload_volumes() -> None:
    for volume in (checkpoints_volume, corpus_volume):
        try:
            volume.reload()
        except Exception:  # files open on the volume (a server reading weights): the next round tries again
            pass


@contextlib.contextmanager
def committing_volumes(record: GpuTimeRecord | None = None, every: float = COMMIT_EVERY, reload: bool = False):
    """Commit both volumes every ``every`` seconds and on the way out; with ``reload``, also take in what other
    containers committed (the nodes of a cluster, backends/modal_cluster.py)."""
    stop = threading.Event()

    def commit_now_and_then() -> None:
        while not stop.wait(every):
            if record:
                record.save()
            commit_volumes()
            if reload:
                reload_volumes()

    thread = threading.Thread(target=commit_now_and_then, name="volume-commit", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with signals_held():
            stop.set()
            thread.join(timeout=COMMIT_THREAD_WAIT)
            if record:
                record.save(ended=now_iso())
            commit_volumes()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # what Modal (or a person) stops a container with


def _already_stopping(signum, frame):
    print(f"[modal] {signal.Signals(signum).name} while stopping: the command is being stopped and the volumes "
          f"committed already", flush=True)


@contextlib.contextmanager
def signals_held():
    """Hold off a second stop signal (a repeated SIGINT, SIGUSR1 then SIGINT) while the command is stopped and the
    volumes are committed: raised there, it would skip the last commit. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _already_stopping) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_child(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after `CHILD_STOP_WAIT` seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=CHILD_STOP_WAIT)
    except subprocess.TimeoutExpired:
        print(f"[modal] the command did not stop within {CHILD_STOP_WAIT} s of SIGTERM; killed, so that the volumes "
              f"are committed within Modal's {GRACE_PERIOD} s grace period", flush=True)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _print_output(process: subprocess.Popen, prefix: str) -> None:
    for raw in iter(process.stdout.readline, b""):
        print(prefix + raw.decode(errors="replace").rstrip(), flush=True)


def stream(command: Sequence[str], prefix: str, env: dict[str, str] | None = None) -> int:
    """Run ``command``, print its output live with ``prefix``; stop its whole process group if we are stopped."""
    print(f"[modal] running {shlex.join(command)}", flush=True)
    process = subprocess.Popen(list(command), env=env, cwd=CODE_DIR if Path(CODE_DIR).is_dir() else None,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        _print_output(process, prefix)
        return process.wait()
    finally:
        with signals_held():
            if process.poll() is None:  # we were stopped: drzero stops its services and verl on SIGTERM
                # its last lines still reach the log, and a full pipe cannot hold its shutdown up
                threading.Thread(target=_print_output, args=(process, prefix), daemon=True).start()
                stop_child(process)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def copy_tree(source: str, target: str) -> bool:
    if not Path(source).is_dir():
        return False
    started = time.monotonic()
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    print(f"[modal] copied {source} to {target} in {time.monotonic() - started:.1f} s", flush=True)
    return True


def drzero_command(command: str, argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "drzero.cli", command, *argv]


def run_drzero(command: str, argv: Sequence[str], *, local_corpus: bool = False, gpu_time: bool = False) -> dict:
    """`drzero <command> <argv>` in this container; raise on failure so that Modal retries it."""
    env = dict(os.environ)
    if local_corpus and copy_tree(CORPUS_DB, LOCAL_DB):
        env["DRZERO_DB"] = LOCAL_DB  # the stages start the retriever on $DRZERO_DB themselves
    record = GpuTimeRecord(command, argv) if gpu_time else None
    with committing_volumes(record):
        code = stream(drzero_command(command, argv), f"[{command}] ", env)
        if record:
            record.save(exit_code=code)
    return outcome(command, code)


def run_on_local_store(command: str, argv: Sequence[str], sources: Sequence[str] = ()) -> dict:
    """`drzero <command> [SOURCE...] --db <local copy> <argv>` (ingest, adopt: the store's writers) on a copy of
    /corpus/chromadb on this container's disk, copied back onto the volume and committed when it succeeds."""
    copy_tree(CORPUS_DB, LOCAL_DB)
    result = run_drzero(command, [*sources, "--db", LOCAL_DB, *argv])
    if result["exit_code"] == 0:
        copy_tree(LOCAL_DB, CORPUS_DB)
        corpus_volume.commit()
    return result


def ingest_sources(argv: Sequence[str]) -> list[str]:
    """What `ingest` reads besides its own SOURCEs: /corpus/sources (what `upload-corpus` put there), unless the
    command names a source of its own, a path on the corpus volume that is no option's value (such as
    /corpus/files/wiki18, what `download-corpus` fetched): argparse takes the SOURCEs in one run only."""
    own = any(arg.startswith(f"{CORPUS_DIR}/") and not (index and argv[index - 1].startswith("-"))
              for index, arg in enumerate(argv))
    uploaded = Path(SOURCES_DIR).is_dir() and any(Path(SOURCES_DIR).iterdir())
    return [SOURCES_DIR] if uploaded and not own else []


def outcome(command: str, code: int) -> dict:
    """A finished drzero command's result; an exception when Modal should retry it."""
    if code == 0:
        return {"command": command, "exit_code": 0}
    if code == USAGE_ERROR:
        print(f"[modal] drzero {command} refused its options or config (exit 2); not retried: fix the message "
              f"above and launch again", flush=True)
        return {"command": command, "exit_code": code}
    raise RuntimeError(f"drzero {command} exited with {code}; Modal retries it (when the Function has retries) and "
                       f"it resumes from the checkpoint volume")


# ## Preflight: refuse before a GPU starts
#
# A cheap CPU container with the same image and volumes checks that the stage's inputs are on the
# volumes (each missing one with the action that makes it) and runs the stage's own checks:
# `drzero preflight STAGE ...` (config composes and validates, model and data present, batch sizes,
# W&B key) or the stage's `--dry-run`. The single-node app and the cluster app each have a
# Function that runs this.


def check_inputs(command: list, required: list) -> dict:
    problems = [f"{path} is missing: {fix}" for path, fix in required if not Path(path).exists()]
    if command:
        code = stream(drzero_command(command[0], command[1:]), "[preflight] ")
        if code != 0:
            problems.append(f"`drzero {shlex.join(command)}` found problems (exit {code}); its report is above")
    return {"ok": not problems, "problems": problems}
