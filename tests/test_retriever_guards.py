"""Clients that could hurt the others: slow senders, too many connections, huge heads, long batches."""

import asyncio
import os
import socket
import threading
import time

import httpx
import pytest

from conftest import start_retriever, stop

READ_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-fronts"])
def guarded(request, demo_db, tmp_path_factory):
    """The guards hold for the server as a whole, whether one process serves HTTP or two fronts share the port."""
    server = start_retriever(demo_db, tmp_path_factory.mktemp("guards") / "retriever.log", "--fronts",
                             str(request.param), "--read-timeout-s", str(READ_TIMEOUT_S), "--max-connections",
                             str(MAX_CONNECTIONS))
    # the processes that hold the connections: the server, or each of its fronts (started: start_retriever waits)
    server.front_pids = [front["pid"] for front in httpx.get(f"{server.url}/health", trust_env=False).json()[
        "per_front"]]
    assert all(server.front_pids) and len(server.front_pids) == request.param, server.front_pids
    yield server
    stop(server)


def _port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _open_fds(server) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in server.front_pids)


def _settled_fds(server) -> int:
    """The descriptors held once the fixture's own request has been closed on the server's side too."""
    previous, deadline = _open_fds(server), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _open_fds(server)
        if now == previous:
            return now
        previous = now
    return previous


def _search(server) -> httpx.Response:
    return httpx.post(f"{server.url}/retrieve", json={"queries": ["federated learning"]}, trust_env=False, timeout=30)


class SlowSender(threading.Thread):
    """A raw socket that sends ``first`` and then one byte of ``trickle`` every 0.2 s until cut off."""

    def __init__(self, port: int, first: bytes, trickle: bytes):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.first, self.trickle = first, trickle
        self.answer = b""
        self.cut_after: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.sock.sendall(self.first)
            for byte in self.trickle:
                self.sock.settimeout(0.2)
                try:
                    chunk = self.sock.recv(4096)
                    self.answer += chunk
                    if not chunk:  # the server closed the connection
                        break
                except socket.timeout:
                    pass
                self.sock.sendall(bytes([byte]))
        except OSError:  # reset or broken pipe: cut off as well
            pass
        self.cut_after = time.monotonic() - started
        self.sock.close()


def test_slow_senders_are_cut_off_while_others_are_served(guarded):
    port = _port(guarded)
    fds_before = _settled_fds(guarded)
    endless_header = b"X-Padding: " + b"a" * 10_000
    body = b'{"queries": ["federated learning"]}' + b" " * 10_000
    senders = (
        [SlowSender(port, b"", b"POST /retrieve HTTP/1.1\r\n" + endless_header) for _ in range(10)]  # trickled head
        + [SlowSender(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\n", endless_header) for _ in range(10)]
        + [SlowSender(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n" % len(body), body) for _ in range(10)]  # trickled body
    )
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # connect, send nothing
    for sender in senders:
        sender.start()
    held = fds_before + len(senders) + len(silent)
    deadline = time.monotonic() + 5.0  # every connection accepted (on a busy machine that may take a moment)
    while _open_fds(guarded) < held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds(guarded) >= held
    started = time.monotonic()
    assert _search(guarded).status_code == 200  # served meanwhile, without waiting for the slow ones
    assert time.monotonic() - started < READ_TIMEOUT_S
    for sender in senders:
        sender.join(timeout=READ_TIMEOUT_S + 10)
        assert sender.cut_after is not None and sender.cut_after < READ_TIMEOUT_S + 3, sender.cut_after
    for sender in senders[:20]:  # no request was handed to the app yet: the server says why it closes
        assert sender.answer.startswith(b"HTTP/1.1 408 Request Timeout"), sender.answer[:200]
        assert b"--read-timeout-s" in sender.answer
    for sock in silent:
        sock.settimeout(READ_TIMEOUT_S + 3)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        sock.close()
    deadline = time.monotonic() + 5
    while _open_fds(guarded) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(guarded) <= fds_before + 2  # every slow connection's descriptor was given back
    assert _search(guarded).status_code == 200


def test_connections_beyond_the_limit_get_503_and_are_closed(guarded):
    held = [socket.create_connection(("127.0.0.1", _port(guarded))) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.3)
    try:
        refused = _search(guarded)
        assert refused.status_code == 503
        assert refused.headers["connection"] == "close"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _search(guarded).status_code != 200:
        time.sleep(0.1)
    assert _search(guarded).status_code == 200
    # uvicorn's own WARNING per refused request is a count instead (a flood of them would bury the log)
    assert httpx.get(f"{guarded.url}/health", trust_env=False).json()["connections_cut_by_reason"][
        "over --max-connections"] >= 1
    assert "Exceeded concurrency limit" not in guarded.log()


def test_cut_connections_are_counted_and_summarized_not_logged_one_by_one(demo_db, tmp_path):
    """A slow-sender attack cut ~1,500 connections a minute, each with a WARNING line of its own."""
    # One process: each front logs its own cuts (test_retriever_fronts.py adds up two fronts' counts)
    server = start_retriever(demo_db, tmp_path / "cuts.log", "--fronts", "1", "--read-timeout-s", "1",
                             "--cut-log-interval-s", "4")
    try:
        port = _port(server)
        malformed = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for sock in malformed:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(15)]
        body = b'{"queries": ["federated learning"]}'
        trickled = [SlowSender(port, b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n" % len(body), body) for _ in range(10)]
        for sender in trickled:
            sender.start()
        for sock in malformed:  # bytes that are not HTTP get the error shape too, not uvicorn's plain text
            sock.settimeout(5)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 400 Bad Request"), answer[:200]
            assert b'"field": "request"' in answer and b"not HTTP/1.1" in answer
        for sender in trickled:
            sender.join(timeout=10)
        for sock in silent:
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        health = httpx.get(f"{server.url}/health", trust_env=False).json()
        assert health["connections_cut"] == 30
        assert health["connections_cut_by_reason"] == {"malformed HTTP": 5, "head not received in time": 15,
                                                        "body not received in time": 10}
        deadline = time.monotonic() + 10
        while "cut 29 more connections" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [line for line in server.log().splitlines() if "WARNING" in line]
        assert len(lines) == 2, lines  # the first cut at once, then one summary line for the other 29
        assert "closing" in lines[0] and "counted and summarized" in lines[0]
        assert "cut 29 more connections in the last 4s" in lines[1] and "30 since the server started" in lines[1]
        assert all("drzero.retrieval.http_guards" in line for line in lines)  # uvicorn's own lines are counted
        assert "Traceback" not in server.log() and " ERROR " not in server.log()
        assert _search(server).status_code == 200
    finally:
        for sock in malformed + silent:
            sock.close()
        stop(server)


def test_a_request_head_over_64_kib_gets_431(guarded):
    with socket.create_connection(("127.0.0.1", _port(guarded))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(100):
                sock.sendall(b"X-Padding: " + b"a" * 10_000 + b"\r\n")
        except OSError:
            pass  # the server closed the connection mid-send
        sock.settimeout(5)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"headers: the request line and headers exceed 65536 bytes" in answer
    assert _search(guarded).status_code == 200


def test_health_stays_instant_behind_a_long_encoder_batch(demo_db, tmp_path):
    """/health must not queue for the encoder behind a batch (compose's healthcheck gives up at 8 s)."""
    server = start_retriever(demo_db, tmp_path / "health.log", "--max-batch", "1024")
    try:
        time.sleep(5.5)  # past any cached probe: /health must answer from what the batch shows
        long_queries = [("lattice cryptography and federated learning %d " % i) * 22 for i in range(1024)]

        async def batch_and_health():
            async with httpx.AsyncClient(base_url=server.url, timeout=300, trust_env=False) as client:
                async def search(part):
                    started = time.monotonic()
                    response = await client.post("/retrieve", json={"queries": part})
                    return response.status_code, time.monotonic() - started

                searches = [asyncio.create_task(search(long_queries[i::16])) for i in range(16)]
                await asyncio.sleep(0.5)  # the batch is in the encoder now
                started = time.monotonic()
                health = await client.get("/health")
                return health, time.monotonic() - started, await asyncio.gather(*searches)

        health, health_s, searches = asyncio.run(batch_and_health())
        assert [status for status, _ in searches] == [200] * 16
        batch_s = min(seconds for _, seconds in searches)
        assert batch_s > 1.5, "the batch was too short to show anything"
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health_s < 1.0, (health_s, batch_s)
    finally:
        stop(server)


@pytest.mark.parametrize("overrides,message", [
    ({"max_request_chars": 1999}, "max_request_chars=1999 is not valid: expected an integer >= max_query_chars=2000"),
    ({"read_timeout_s": 0}, "read_timeout_s=0 is not valid: expected a number of seconds > 0"),
    ({"max_connections": 0}, "max_connections=0 is not valid: expected an integer >= 1"),
])
def test_the_guard_options_are_validated(overrides, message):
    from drzero.config import ConfigError
    from drzero.retrieval.server import RetrieverConfig

    with pytest.raises(ConfigError, match=f"^{message}"):
        RetrieverConfig(db="x", **overrides)
