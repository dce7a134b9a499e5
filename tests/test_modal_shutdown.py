"""Issue 29, item 7: a stopped Modal container commits state.json and the last checkpoint within Modal's grace
period. A real process runs the container side (backends/modal_container.py's `run_drzero`) with a real child in
place of `drzero`, and gets a real signal, the way Modal stops a sync Function: SIGINT (preemption, `modal app
stop`: Python's KeyboardInterrupt) or SIGUSR1 (a cancelled call: modal raises InputCancellation). Only the volumes
are fakes, which note what is on disk at each commit and when.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

modal = pytest.importorskip("modal")
from backends import modal_container as mc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The container side, as Modal runs it: its signal handlers raise what Modal's do, and note when the signal came.
CONTAINER = r'''
import json, signal, sys, time
from pathlib import Path
import modal.exception
from backends import modal_container as mc

report, child, checkpoints, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
events = {"commits": []}

def stopped(signum, frame):
    events.setdefault("signal_at", time.monotonic())
    if signum == signal.SIGUSR1:  # modal/_container_entrypoint.py, for a sync Function
        raise modal.exception.InputCancellation("Input was cancelled by user")
    raise KeyboardInterrupt  # Python's own SIGINT handler, as in a Modal container

signal.signal(signal.SIGINT, stopped)
signal.signal(signal.SIGUSR1, stopped)

class Volume:
    def __init__(self, name):
        self.name = name
    def commit(self):
        files = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*") if p.is_file())
        events["commits"].append({"volume": self.name, "at": time.monotonic(), "files": files})
    def reload(self):
        pass

mc.checkpoints_volume, mc.corpus_volume = Volume("checkpoints"), Volume("corpus")
real_stream = mc.stream
mc.stream = lambda command, prefix, env=None: real_stream([sys.executable, child, str(checkpoints), mode], prefix, env)
try:
    mc.run_drzero("solver", [])
except BaseException as error:
    events["raised"] = type(error).__name__
events["ended_at"] = time.monotonic()
report.write_text(json.dumps(events))
'''

# In place of `drzero solver`: on SIGTERM it takes a moment to stop (services, verl), then leaves state.json and a
# complete checkpoint behind, as drzero does; a stubborn one ignores SIGTERM.
CHILD = r'''
import signal, sys, time
from pathlib import Path

checkpoints, mode = Path(sys.argv[1]), sys.argv[2]

def stop(signum, frame):
    if mode == "stubborn":
        return
    time.sleep(2)
    step = checkpoints / "solver_iter1" / "global_step_5"
    step.mkdir(parents=True, exist_ok=True)
    (step / "model.pt").write_text("weights")
    (checkpoints / "solver_iter1" / "latest_checkpointed_iteration.txt").write_text("5")
    (checkpoints / "state.json").write_text('{"stages": {"iter1/solver": {"status": "running"}}}')
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(0.1)
'''

SAVED = {"state.json", "solver_iter1/latest_checkpointed_iteration.txt", "solver_iter1/global_step_5/model.pt"}


def _stop(tmp_path: Path, mode: str, signals: list[int]) -> tuple[dict, float]:
    (tmp_path / "container.py").write_text(CONTAINER)
    (tmp_path / "child.py").write_text(CHILD)
    checkpoints, report, log = tmp_path / "checkpoints", tmp_path / "report.json", tmp_path / "log.txt"
    checkpoints.mkdir()
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(tmp_path / "container.py"), str(report),
                                    str(tmp_path / "child.py"), str(checkpoints), mode], cwd=REPO, stdout=output,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 60
            while "[solver] ready" not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            started = time.monotonic()
            for index, signum in enumerate(signals):
                if index:
                    time.sleep(0.5)  # Modal (or an impatient user) signals again while we stop
                os.kill(process.pid, signum)
            process.wait(timeout=mc.GRACE_PERIOD + 5)
        finally:
            if process.poll() is None:
                process.kill()
    return json.loads(report.read_text()), time.monotonic() - started


def test_the_shutdown_fits_in_modals_grace_period():
    assert mc.CHILD_STOP_WAIT + mc.COMMIT_THREAD_WAIT + 10 <= mc.GRACE_PERIOD  # 10 s left for the last commit


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGUSR1], [signal.SIGUSR1, signal.SIGINT]],
                         ids=["preempted or stopped", "call cancelled", "cancelled, then stopped"])
def test_a_stopped_container_commits_state_and_the_last_checkpoint_within_the_grace_period(tmp_path, signals):
    events, took = _stop(tmp_path, "cooperative", signals)
    assert events["raised"] in ("KeyboardInterrupt", "InputCancellation")
    last = [commit for commit in events["commits"] if commit["volume"] == "checkpoints"][-1]
    assert SAVED <= set(last["files"]), last   # what the command left on its way out is committed
    assert last["at"] - events["signal_at"] < mc.GRACE_PERIOD - 5 and took < mc.GRACE_PERIOD


def test_a_command_that_ignores_sigterm_is_killed_in_time_for_the_last_commit(tmp_path):
    events, took = _stop(tmp_path, "stubborn", [signal.SIGINT])
    last = [commit for commit in events["commits"] if commit["volume"] == "checkpoints"][-1]
    assert mc.CHILD_STOP_WAIT <= last["at"] - events["signal_at"] < mc.GRACE_PERIOD - 5
    assert took < mc.GRACE_PERIOD
