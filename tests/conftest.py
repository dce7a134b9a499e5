"""Shared fixtures: the offline MiniLM embedder, a small demo corpus, a live retriever on loopback, a Chroma server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Offline and hermetic: no hub, no telemetry, caches in a scratch dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_TEST_PAPERS = 120  # a few hundred passages: big enough to be a corpus, small enough to embed in seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drzero_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "drzero.cli", *args]


def kill_ingest_when_stored(command: list[str], passages: int, timeout: float = 180.0) -> tuple[int, str]:
    """Run the ``drzero ingest`` ``command`` in a session of its own and kill -9 the whole session (its encoder
    processes too) once its progress bar has counted ``passages``; returns the count the bar showed last and the
    output. Progress comes from the run's own bar: opening the store here while it writes would cache a stale view
    of it. Fails when the run ended before it was killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = bytearray()
    reader = threading.Thread(target=lambda: [output.extend(chunk) for chunk in iter(lambda: run.stdout.read1(4096),
                                                                                      b"")], daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    stored = 0
    while time.monotonic() < deadline and run.poll() is None and stored < passages:
        time.sleep(0.05)
        done = re.findall(rb"embedding:.*?\| *(\d+)/", bytes(output))
        stored = int(done[-1]) if done else 0
    assert run.poll() is None, bytes(output).decode()[-2000:]  # still running: killed part-way
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    return stored, bytes(output).decode(errors="replace")


@pytest.fixture(scope="session")
def minilm():
    from drzero.corpus.embedder import TEST_EMBEDDER, Embedder

    return Embedder.from_name(TEST_EMBEDDER)


@pytest.fixture(scope="session")
def demo_db(tmp_path_factory) -> Path:
    """A demo-world collection built through the real ingest path."""
    from drzero.corpus.ingest import IngestConfig, run_ingest

    db = tmp_path_factory.mktemp("demo") / "db"
    run_ingest(IngestConfig(db=str(db), demo=True, demo_papers=DEMO_TEST_PAPERS))
    return db


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The offline ChatML tokenizer `drzero tiny-model` builds (no weights)."""
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    return run_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("tiny") / "model"), no_weights=True))


class RunningServer:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(what: str, command: list[str], log_path: Path, health_path: str, timeout: float,
                 cwd: Path | None = None, ready=lambda answer: True) -> RunningServer:
    """``command`` as a real subprocess on a free loopback port (``{port}`` in it), once GET ``health_path`` is 200
    and ``ready(answer)``; RuntimeError with its log when it exits or is not ready in ``timeout`` seconds."""
    import httpx

    port = free_port()
    handle = log_path.open("w")
    process = subprocess.Popen([part.replace("{port}", str(port)) for part in command], stdout=handle,
                               stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            answer = httpx.get(f"{url}{health_path}", timeout=5, trust_env=False)
            if answer.status_code == 200 and ready(answer):
                return RunningServer(process, url, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{what} not answering after {timeout}s:\n{log_path.read_text()}")


def every_front_started(answer) -> bool:
    """/health from any front answers as soon as that front serves; a sibling still starting shows pid 0 there, and
    a test that reads the fronts' pids (to signal them) must not see it: ``os.kill(0, ...)`` is this test's group."""
    return all(front.get("pid") for front in answer.json().get("per_front", []))


def start_retriever(db: Path, log_path: Path, *extra: str, timeout: float = 120.0) -> RunningServer:
    """Start `drzero serve-retriever` as a real subprocess and wait until /health is 200 from every front."""
    return start_server("retriever", drzero_command("serve-retriever", "--db", str(db), "--port", "{port}", *extra),
                        log_path, "/health", timeout, ready=every_front_started)


def stop(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def retriever(demo_db, tmp_path_factory):
    server = start_retriever(demo_db, tmp_path_factory.mktemp("logs") / "retriever.log")
    yield server
    stop(server)


def start_chroma_server(path: Path, log_path: Path, timeout: float = 60.0) -> RunningServer:
    """`chroma run` (the server that ships in the chromadb package) on a free loopback port, once its heartbeat
    answers."""
    return start_server("chroma run", [sys.executable, "-c", "from chromadb.cli.cli import app; app()", "run",
                                       "--path", str(path), "--host", "127.0.0.1", "--port", "{port}"],
                        log_path, "/api/v2/heartbeat", timeout, cwd=path.parent)


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A real Chroma server for the tests of one module, stopped after them."""
    work = tmp_path_factory.mktemp("chroma-server")
    server = start_chroma_server(work / "data", work / "chroma.log")
    yield server
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# -- leaving the test process ----------------------------------------------------------------------
#
# Once in three full runs here the pytest process itself died with SIGSEGV (exit 139) after printing "all passed",
# in the interpreter's finalization: native libraries loaded by the tests (chromadb's Rust bindings with their tokio
# threads, torch, faiss) tearing down under threads that still run. The tests' own subprocesses (every `drzero`
# command they run) exit normally and are checked; what crashed is the finalization of this one process, after the
# result is known. So the session ends with that result, skipping finalization.

_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _SESSION_STATUS and os.environ.get("DRZERO_TESTS_FINALIZE") != "1":  # =1: finalize as usual (to debug it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])
