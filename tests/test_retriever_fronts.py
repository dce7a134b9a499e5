"""`drzero serve-retriever --fronts 2`: two HTTP front processes on one port, in front of one search worker.

Every test runs the real command; which front the kernel gives a connection to depends on the connection's
addresses, so each test opens new connections until both fronts have answered.
"""

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import drzero_command, free_port, start_retriever, stop
from drzero.config import ConfigError
from drzero.corpus.store import CorpusStore
from drzero.retrieval.server import RetrieverConfig

LONG_BATCH = 1024  # queries in the one request that keeps the encoder busy for seconds on a CPU


@pytest.fixture(scope="module")
def two_fronts(demo_db, tmp_path_factory):
    # the default --read-timeout-s: a client starved of CPU under the load test sends head and body seconds apart
    server = start_retriever(demo_db, tmp_path_factory.mktemp("fronts") / "retriever.log", "--fronts", "2",
                             "--max-batch", str(LONG_BATCH), "--max-queries", str(LONG_BATCH),
                             "--max-request-chars", "2000000", "--max-body-bytes", str(4 << 20))
    yield server
    stop(server)


def _health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/health", trust_env=False, timeout=60)  # a new connection each call


def _each_front(server, ask=_health, tries: int = 80) -> dict[int, httpx.Response]:
    """``ask(server)`` on new connections until both fronts have answered; front -> its first answer."""
    answers: dict[int, httpx.Response] = {}
    for _ in range(tries):
        reply = ask(server)
        answers.setdefault(reply.json()["front"], reply)
        if len(answers) == 2:
            return answers
    raise AssertionError(f"only front(s) {sorted(answers)} answered in {tries} new connections")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> set[int]:
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _processes(server) -> tuple[list[int], int]:
    """The fronts' pids (front 1 first) and the worker's, as /health reports them."""
    health = _health(server).json()
    return [front["pid"] for front in health["per_front"]], health["worker"]["pid"]


def test_each_front_answers_health_for_the_whole_server(two_fronts):
    answers = _each_front(two_fronts)
    fronts, worker = _processes(two_fronts)
    assert len(set(fronts)) == 2 and worker not in fronts
    assert {*fronts, worker} <= _children(two_fronts.process.pid)
    assert [_comm(pid) for pid in fronts] == ["drzero-front-1", "drzero-front-2"]
    assert _comm(worker) == "drzero-worker"
    for front, reply in answers.items():
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "ok", body
        assert body["fronts"] == 2 and body["passages"] > 100
        assert [entry["front"] for entry in body["per_front"]] == [1, 2]
        assert body["batches_run"] == sum(entry["batches_run"] for entry in body["per_front"])


def test_requests_are_served_by_both_fronts_and_coalesced_in_one_encoder_pass(two_fronts, demo_db):
    store = CorpusStore.open_existing(demo_db)
    _, passages, _ = store.records(store.all_ids()[:48])
    queries = [text[:300] for text in passages]
    alone = httpx.post(f"{two_fronts.url}/retrieve", json={"queries": queries, "topk": 1}, trust_env=False,
                       timeout=120).json()["result"]
    expected = [hits[0]["document"]["id"] for hits in alone]
    before = _health(two_fronts).json()

    async def load() -> list[tuple[int, list]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=two_fronts.url, limits=limits, timeout=120, trust_env=False) as client:
            async def one(i: int):
                reply = await client.post("/retrieve", json={"queries": [queries[i % len(queries)]],
                                                             "topk": 1 + i % 5})
                return i, reply.json()["result"][0]

            return await asyncio.gather(*(one(i) for i in range(600)))

    for i, hits in asyncio.run(load()):
        assert len(hits) == 1 + i % 5  # each request's own topk, though batched with others'
        assert hits[0]["document"]["id"] == expected[i % len(queries)]  # its own hits, not another's
    after = _health(two_fronts).json()
    for front_before, front_after in zip(before["per_front"], after["per_front"]):
        assert front_after["batches_run"] > front_before["batches_run"], (before, after)  # both fronts served
    worker_before, worker_after = before["worker"], after["worker"]
    assert worker_after["passes_with_several_fronts"] > worker_before["passes_with_several_fronts"], after
    batches = worker_after["front_batches"] - worker_before["front_batches"]
    assert worker_after["encoder_passes"] - worker_before["encoder_passes"] < batches  # passes held several
    assert after["batches_run"] - before["batches_run"] == batches  # every batch came back


def _cut(port: int, first: bytes, then: bytes = b"") -> bytes:
    """What the server answers a connection that sends ``first``, then ``then`` until it is cut."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(first)
        try:
            for _ in range(100 if then else 0):
                sock.sendall(then)
        except OSError:
            pass  # the server closed the connection mid-send
        sock.settimeout(10)
        return sock.recv(4096)


def test_cut_connections_on_both_fronts_add_up_in_health(two_fronts):
    """Cut at once (slow senders on two fronts: test_retriever_guards.py), on new connections that land on both."""
    before = _health(two_fronts).json()
    port = int(two_fronts.url.rsplit(":", 1)[1])
    for _ in range(8):
        assert _cut(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request")
        assert _cut(port, b"GET /health HTTP/1.1\r\nHost: x\r\n",
                    b"X-Padding: " + b"a" * 10_000 + b"\r\n").startswith(b"HTTP/1.1 431")
    after = _health(two_fronts).json()
    assert after["connections_cut"] - before["connections_cut"] == 16
    reasons = {reason: count - before["connections_cut_by_reason"].get(reason, 0)
               for reason, count in after["connections_cut_by_reason"].items()
               if count != before["connections_cut_by_reason"].get(reason, 0)}
    assert reasons == {"malformed HTTP": 8, "head too large": 8}
    for front_before, front_after in zip(before["per_front"], after["per_front"]):
        assert front_after["connections_cut"] > front_before["connections_cut"], (before, after)  # each front cut


def test_health_stays_instant_on_either_front_behind_one_fronts_long_batch(two_fronts):
    """The front without the batch knows the worker is busy from the worker's own times, and does not probe it."""
    time.sleep(5.5)  # past any cached probe: /health must answer from what the worker shows
    long_queries = [("lattice cryptography and federated learning %d " % i) * 20 for i in range(LONG_BATCH)]

    async def batch_and_health():
        async with httpx.AsyncClient(base_url=two_fronts.url, timeout=600, trust_env=False) as client:
            started = time.monotonic()
            search = asyncio.create_task(client.post("/retrieve", json={"queries": long_queries}))
            await asyncio.sleep(1.0)  # the batch is in the encoder now
            answers, slowest = {}, 0.0
            while len(answers) < 2 and not search.done():
                async with httpx.AsyncClient(base_url=two_fronts.url, timeout=60, trust_env=False) as fresh:
                    asked = time.monotonic()
                    health = await fresh.get("/health")
                    slowest = max(slowest, time.monotonic() - asked)
                answers.setdefault(health.json()["front"], health)
            fronts_seen_by = time.monotonic() - started
            reply = await search
            return reply, time.monotonic() - started, fronts_seen_by, answers, slowest

    reply, batch_s, fronts_seen_by, answers, slowest = asyncio.run(batch_and_health())
    assert reply.status_code == 200 and len(reply.json()["result"]) == LONG_BATCH
    assert len(answers) == 2 and fronts_seen_by < batch_s, "the batch ended before both fronts answered"
    assert all(health.status_code == 200 and health.json()["status"] == "ok" for health in answers.values())
    assert slowest < 1.0, (slowest, batch_s)


def test_a_killed_worker_gives_503_from_every_front_and_the_fronts_stay_up(demo_db, tmp_path):
    server = start_retriever(demo_db, tmp_path / "worker.log", "--fronts", "2")
    try:
        fronts, worker = _processes(server)
        os.kill(worker, signal.SIGKILL)
        time.sleep(1.0)
        for reply in _each_front(server).values():
            assert reply.status_code == 503, reply.text
            assert "search worker exited" in reply.json()["detail"]
        for _ in range(10):  # new connections: both fronts, each says why it cannot search
            refused = httpx.post(f"{server.url}/retrieve", json={"queries": ["lattice"]}, trust_env=False)
            assert refused.status_code == 503 and refused.json()["field"] == "retriever"
            assert "search worker exited" in refused.json()["detail"]
        assert server.process.poll() is None and all(_alive(pid) for pid in fronts)
    finally:
        stop(server)
    log = (tmp_path / "worker.log").read_text()
    assert log.count("searches fail until the retriever is restarted") == 1  # the server says it, once
    assert "exit code -9" in log
    assert not any(_alive(pid) for pid in fronts)


def test_a_dead_front_leaves_the_other_serving_and_a_killed_server_leaves_no_process(demo_db, tmp_path):
    server = start_retriever(demo_db, tmp_path / "orphans.log", "--fronts", "2")
    try:
        fronts, worker = _processes(server)
        os.kill(fronts[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "front 1 exited" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "front 1 exited (exit code -9); serving on with 1 of 2 fronts" in server.log()
        for _ in range(10):  # the dead front's socket closed with it: every new connection reaches front 2
            assert _health(server).json()["front"] == 2
            assert httpx.post(f"{server.url}/retrieve", json={"queries": ["lattice"]},
                              trust_env=False).status_code == 200
        server.process.kill()  # kill -9: no shutdown code runs in the server
        server.process.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_alive(fronts[1]) or _alive(worker)):
            time.sleep(0.2)
        assert not _alive(fronts[1]), "a front outlived its server"
        assert not _alive(worker), "the search worker outlived its server"
    finally:
        if server.process.poll() is None:
            stop(server)


def test_fronts_default_to_half_the_cpus_at_most_four_and_are_validated():
    cpus = len(os.sched_getaffinity(0))
    assert RetrieverConfig(db="x").fronts == max(1, min(4, cpus // 2))
    assert RetrieverConfig(db="x", fronts=3).fronts == 3
    with pytest.raises(ConfigError, match="^fronts=0 is not valid: expected an integer >= 1"):
        RetrieverConfig(db="x", fronts=0)


def test_a_taken_port_is_one_sentence_before_the_worker_starts(demo_db):
    """Even a group of SO_REUSEPORT sockets on the port (another server's fronts) is not joined."""
    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        started = time.monotonic()
        result = subprocess.run(drzero_command("serve-retriever", "--db", str(demo_db), "--port", str(port),
                                               "--fronts", "2"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0] and "--port" in errors[0]
    assert "loading embedder" not in result.stderr and time.monotonic() - started < 30
