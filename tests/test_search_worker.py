"""The search worker process and the exact index: exact answers, and a dead worker hurts no one else."""

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import start_retriever, stop
from drzero.corpus.embedder import EmbedderSpec, resolve_precision
from drzero.corpus.store import CorpusStore
from drzero.retrieval import exact_index
from drzero.retrieval.exact_index import ExactIndex, choose_index
from drzero.retrieval.server import RetrieverConfig
from drzero.retrieval.tally import Tally
from drzero.retrieval.worker import SearchWorker


def test_exact_index_is_brute_force_across_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(exact_index, "ROWS_PER_CHUNK", 300)  # 1,000 rows: four chunks to merge
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"p{i:04d}" for i in range(1000)]
    store = CorpusStore.create(tmp_path / "db", EmbedderSpec("test-model"), 16)
    store.add(ids, [f"text {i}" for i in range(1000)], [{"title": f"T{i}", "source": "s"} for i in range(1000)],
              vectors)
    index = ExactIndex.from_store(store, "cpu")
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    hits = index.hits(store, torch.from_numpy(queries), 5)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    for row, per_query in zip(expected, hits):
        assert [h.id for h in per_query] == [ids[j] for j in row]
        assert [h.title for h in per_query] == [f"T{j}" for j in row]
        assert [h.contents for h in per_query] == [f"text {j}" for j in row]
    scores = np.array([[h.score for h in per_query] for per_query in hits])
    assert np.allclose(scores, np.take_along_axis(queries @ vectors.T, expected, axis=1), atol=1e-5)


def test_index_choice():
    gib = 2**30
    assert choose_index("auto", "cpu", 10**6, 1024, 8, None).kind == "hnsw"
    assert choose_index("auto", "cuda", 10**6, 1024, 8, 100 * gib).kind == "exact"  # 3.8 GiB of fp32
    too_big = choose_index("auto", "cuda", 3 * 10**6, 1024, 8, 100 * gib)
    assert too_big.kind == "hnsw" and "--exact-max-gib" in too_big.reason
    crowded = choose_index("auto", "cuda", 10**6, 1024, 8, 6 * gib)
    assert crowded.kind == "hnsw" and "free" in crowded.reason
    assert choose_index("exact", "cpu", 10, 8, 8, None).kind == "exact"
    assert choose_index("hnsw", "cuda", 10, 8, 8, 100 * gib).kind == "hnsw"


def test_precision_defaults():
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", "cuda")


def test_the_exact_index_serves_exactly_what_brute_force_finds(demo_db, minilm, tmp_path):
    store = CorpusStore.open_existing(demo_db)
    ids, parts = [], []
    for batch_ids, batch in store.iter_embeddings():
        ids += batch_ids
        parts.append(batch)
    matrix = np.concatenate(parts)
    questions = ["which method secures federated learning", "lattice based signatures", "graph neural networks",
                 "who proposed the protocol", "differential privacy for language models"]
    expected = np.argsort(-(minilm.encode_queries(questions) @ matrix.T), axis=1)[:, :3]
    server = start_retriever(demo_db, tmp_path / "exact.log", "--index", "exact")
    try:
        health = httpx.get(f"{server.url}/health", trust_env=False).json()
        assert health["index"] == "exact" and health["precision"] == "fp32"
        result = httpx.post(f"{server.url}/retrieve", json={"queries": questions, "topk": 3},
                            trust_env=False).json()["result"]
    finally:
        stop(server)
    assert [[hit["document"]["id"] for hit in per_query] for per_query in result] == \
           [[ids[j] for j in row] for row in expected]


def _worker_pid(server) -> int:
    pid = httpx.get(f"{server.url}/health", trust_env=False).json()["worker"]["pid"]
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    assert str(pid) in children, f"the search worker {pid} is not among the server's children {children}"
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "drzero-worker"
    return pid


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_a_killed_worker_gives_503s_naming_the_retriever_and_the_server_stays_up(demo_db, tmp_path):
    server = start_retriever(demo_db, tmp_path / "worker.log")
    try:
        worker = _worker_pid(server)
        assert httpx.post(f"{server.url}/retrieve", json={"queries": ["lattice"]}, trust_env=False).status_code == 200
        os.kill(worker, signal.SIGKILL)
        time.sleep(1.0)
        reply = httpx.post(f"{server.url}/retrieve", json={"queries": ["lattice"]}, trust_env=False)
        assert reply.status_code == 503 and reply.json()["field"] == "retriever"
        assert "search worker exited" in reply.json()["detail"]
        health = httpx.get(f"{server.url}/health", trust_env=False)
        assert health.status_code == 503 and "search worker exited" in health.json()["detail"]
        assert server.process.poll() is None  # the front still answers, and says why it cannot search
    finally:
        stop(server)
    assert "searches fail until the retriever is restarted" in (tmp_path / "worker.log").read_text()


def test_the_worker_exits_when_the_server_is_killed(demo_db, tmp_path):
    server = start_retriever(demo_db, tmp_path / "orphan.log")
    worker = _worker_pid(server)
    server.process.kill()  # kill -9: no shutdown code runs in the front
    server.process.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not _gone(worker):
        time.sleep(0.2)
    assert _gone(worker), "the search worker outlived its server"


def _answers(conn, numbers: set[int]) -> dict[int, tuple]:
    """Read ``conn`` until each batch in ``numbers`` is done or failed: number -> (kind, hits or error)."""
    answers: dict[int, tuple] = {}
    while set(answers) != numbers:
        assert conn.poll(120), f"no answer for batches {numbers - set(answers)}"
        kind, number, *rest = conn.recv()
        if kind != "encoded":
            answers[number] = (kind, *rest)
    return answers


def _ids(hits) -> list[list[str]]:
    return [[hit.id for hit in per_query] for per_query in hits]


def test_the_worker_coalesces_batches_of_several_fronts_and_splits_their_hits_back(demo_db):
    """Batches that two fronts send while the encoder is busy are one forward pass; each front gets its own hits,
    with its own topk; a pass that fails is run again batch by batch, so only the bad batch fails."""
    tally = Tally(2)
    worker = SearchWorker(RetrieverConfig(db=str(demo_db)), "warning", fronts=2, max_batch=1024, tally=tally)
    worker.start()
    first, second = worker.front_conns
    busy_queries = [("lattice cryptography and federated learning %d " % i) * 20 for i in range(256)]
    mine, theirs = ["federated learning", "lattice signatures"], ["graph neural networks", "differential privacy",
                                                                   "who proposed the protocol"]

    def while_busy(*sends):
        """Keep the encoder busy with a long batch from the first front, then send ``sends`` behind it."""
        taken = tally.worker["encoder_passes"] + 1
        first.send(("batch", 100, busy_queries, 1))
        deadline = time.monotonic() + 60
        while tally.worker["encoder_passes"] < taken:  # the encoder has taken the long batch, alone
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for conn, message in sends:
            conn.send(message)

    try:
        first.send(("batch", 1, mine, 2))
        alone_mine = _answers(first, {1})[1][1]
        second.send(("batch", 1, theirs, 4))
        alone_theirs = _answers(second, {1})[1][1]
        passes, several = tally.worker["encoder_passes"], tally.worker["passes_with_several_fronts"]

        while_busy((first, ("batch", 2, mine, 2)), (second, ("batch", 2, theirs, 4)))
        got_mine, got_theirs = _answers(first, {100, 2}), _answers(second, {2})
        assert tally.worker["encoder_passes"] == passes + 2  # the long batch, then both fronts' batches in one
        assert tally.worker["passes_with_several_fronts"] == several + 1
        assert got_mine[2][0] == got_theirs[2][0] == "done"
        assert _ids(got_mine[2][1]) == _ids(alone_mine) and {len(hits) for hits in got_mine[2][1]} == {2}
        assert _ids(got_theirs[2][1]) == _ids(alone_theirs) and {len(hits) for hits in got_theirs[2][1]} == {4}

        # a lone surrogate fails the tokenizer, and with it the pass it shares with the other front's batch
        while_busy((first, ("batch", 3, ["fine", "a\ud800b"], 3)), (second, ("batch", 3, theirs, 4)))
        bad, good = _answers(first, {100, 3})[3], _answers(second, {3})[3]
        assert tally.worker["passes_with_several_fronts"] == several + 2
        assert bad[0] == "failed"
        assert good[0] == "done" and _ids(good[1]) == _ids(alone_theirs)
    finally:
        worker.stop()
