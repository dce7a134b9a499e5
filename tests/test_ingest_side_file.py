"""`drzero ingest --vectors side-file`: the vectors in the vector side file, placeholders in Chroma; served by exact
search with the top-k of a Chroma ingest, appended to by later ingests, resumed after kill -9 to the same store."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import drzero_command, kill_ingest_when_stored
from drzero.config import ConfigError
from drzero.corpus.ingest import IngestConfig, run_ingest
from drzero.corpus.embedder import TEST_EMBEDDER, EmbedderSpec
from drzero.corpus.side_file_ingest import SideFileStore, collection_metadata
from drzero.corpus.store import CorpusStore, StoreError, read_index_check
from drzero.corpus.vector_file import VectorFile, VectorFileWriter, has_side_file
from drzero.retrieval.search_cli import SearchConfig, _ask_store
from drzero.retrieval.server import RetrieverConfig
from drzero.retrieval.service import RetrievalService

QUERIES = ["lattice parameter of scheme number 3", "which scheme concerns parameter 17", "facts about scheme 9"]


def _corpus(tmp_path, documents: int = 12, name: str = "docs.jsonl", first: int = 0):
    path = tmp_path / name
    with path.open("w") as handle:
        for i in range(first, first + documents):
            text = " ".join(f"Fact {i}.{j} about scheme number {i} concerns lattice parameter {j}." for j in range(30))
            handle.write(json.dumps({"title": f"Scheme {i}", "text": text}) + "\n")
    return path


def _ingest(db, *sources, **options) -> object:
    options = {"embedder": "minilm", "max_words": 60, "overlap_words": 10, "batch_size": 7, **options}
    return run_ingest(IngestConfig(sources=[str(s) for s in sources], db=str(db), **options))


def _side_vectors(db) -> dict[str, np.ndarray]:
    side = VectorFile.of(CorpusStore.open_existing(db))
    return {i: np.asarray(side.vectors[row]) for row, i in enumerate(side.ids)}


def _chroma_vectors(db) -> dict[str, np.ndarray]:
    got = CorpusStore.open_existing(db).collection.get(include=["embeddings"])
    return {i: np.asarray(e) for i, e in zip(got["ids"], got["embeddings"])}


def _same_vectors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for passage_id, vector in expected.items():
        assert np.allclose(got[passage_id], vector, atol=1e-5), passage_id


def test_a_side_file_ingest_is_served_with_the_exact_top_k_of_a_chroma_ingest(tmp_path, minilm):
    source = _corpus(tmp_path)
    chroma, side = tmp_path / "chroma", tmp_path / "side"
    _ingest(chroma, source)
    summary = _ingest(side, source, vectors="side-file")
    store = CorpusStore.open_existing(side)
    assert has_side_file(store) and summary.added == store.count() == summary.verified > 12
    assert read_index_check(side, "corpus") == {"collection": "corpus", "state": "checked",
                                                "passages": store.count()}
    placeholders = store.collection.get(limit=3, include=["embeddings"])["embeddings"]
    assert np.asarray(placeholders).shape == (3, 1)  # Chroma never sees a real vector
    _same_vectors(_side_vectors(side), _chroma_vectors(chroma))

    expected_vectors = _chroma_vectors(chroma)
    ids = list(expected_vectors)
    scores = minilm.encode_queries(QUERIES) @ np.stack([expected_vectors[i] for i in ids]).T
    expected = [[ids[r] for r in np.argsort(-row, kind="stable")[:5]] for row in scores]
    service = RetrievalService.open(RetrieverConfig(db=str(side), device="cpu"))
    assert service.exact is not None
    assert [[h.id for h in hits] for hits in service.search(QUERIES, 5)] == expected
    hits = _ask_store(SearchConfig(queries=QUERIES, db=str(side), topk=5), QUERIES)   # `drzero search --db`
    assert [[h["document"]["id"] for h in per_query] for per_query in hits] == expected


def test_a_rerun_adds_nothing_a_second_file_appends_and_verify_checks_every_id(tmp_path):
    db = tmp_path / "db"
    first = _ingest(db, _corpus(tmp_path), vectors="side-file")
    before = VectorFile.of(CorpusStore.open_existing(db))
    rows, ids = len(before), list(before.ids)

    again = _ingest(db, _corpus(tmp_path))               # no --vectors: the collection's own side file
    assert again.added == 0 and again.already_present == first.passages
    assert len(VectorFile.of(CorpusStore.open_existing(db))) == rows

    more = _ingest(db, _corpus(tmp_path, 5, "more.jsonl", first=100))
    side = VectorFile.of(CorpusStore.open_existing(db))
    assert more.added > 0 and len(side) == rows + more.added == more.collection_size
    assert list(side.ids)[:rows] == ids and side.meta["complete"]   # appended after the rows it had
    assert side.vectors.shape == (len(side), 384)                    # the grown file cut to its rows again

    checked = run_ingest(IngestConfig(db=str(db), verify=True))
    assert checked.verified == len(side) and checked.unindexed == 0


def test_the_other_mode_and_a_chroma_server_are_refused_in_one_sentence(tmp_path):
    side, chroma = tmp_path / "side", tmp_path / "chroma"
    _ingest(side, _corpus(tmp_path, 3), vectors="side-file")
    _ingest(chroma, _corpus(tmp_path, 3))
    with pytest.raises(StoreError, match=r"^collection 'corpus' in .*side keeps its vectors in its vector side "
                                         r"file, so --vectors chroma cannot add to it; leave --vectors out"):
        _ingest(side, _corpus(tmp_path, 4), vectors="chroma")
    with pytest.raises(StoreError, match="keeps its vectors in Chroma, so --vectors side-file cannot add to it"):
        _ingest(chroma, _corpus(tmp_path, 4), vectors="side-file")
    adopted = tmp_path / "adopted"   # what `drzero adopt --faiss-index` leaves: a side file of fixed length
    CorpusStore.create(adopted, EmbedderSpec(TEST_EMBEDDER), 384, extra_metadata=collection_metadata("side-file"))
    writer = VectorFileWriter.open(adopted / "vectors" / "corpus", 384, embedder=TEST_EMBEDDER, count=2)
    writer.append(np.ones((2, 384), np.float32), ["0", "1"])
    writer.finish()
    with pytest.raises(StoreError, match="was adopted from a FAISS index: its side file holds the index's 2 rows"):
        _ingest(adopted, _corpus(tmp_path, 4))
    with pytest.raises(ConfigError, match="^--vectors side-file .* the Chroma server http://127.0.0.1:9 has no "
                                          "place for; pass a directory as --db"):
        IngestConfig(sources=["x"], db="http://127.0.0.1:9", vectors="side-file")
    refused = subprocess.run(drzero_command("ingest", "x.jsonl", "--db", "http://127.0.0.1:9", "--vectors",
                                            "side-file"), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--vectors side-file" in refused.stderr


def _store(db) -> CorpusStore:
    return CorpusStore.open_existing(db)


def test_rows_chroma_never_received_are_dropped_when_the_writer_reopens(tmp_path):
    """What a kill between the side file's checkpoint and Chroma's write leaves, repaired at the next open."""
    db = tmp_path / "db"
    _ingest(db, _corpus(tmp_path, 4), vectors="side-file")
    store = _store(db)
    side = VectorFile.of(store)
    rows, dimension = len(side), side.dimension
    writer = VectorFileWriter.open(side.directory, dimension, embedder=side.meta["embedder"])
    writer.reopen()
    writer.append(np.ones((3, dimension), np.float32), ["never-1", "never-2", "never-3"])   # then the kill
    writer.close()
    reopened = SideFileStore.open(store, dimension, side.meta["embedder"])
    assert (reopened.writer.rows, reopened.writer.id_rows) == (rows, rows)
    assert reopened.writer.ids_from(rows - 2) == list(side.ids)[-2:]

    # Not only at the end (a write order this ingest never has): every id is compared, the held rows kept in order.
    original = np.array(side.vectors)
    reopened.writer.append(np.stack([np.ones(dimension), np.full(dimension, 2.0)]).astype(np.float32),
                           ["stray", "late"])
    reopened.writer.close()
    store.collection.upsert(ids=["late"], documents=["late"], embeddings=[[0.5]])
    again = SideFileStore.open(store, dimension, side.meta["embedder"])
    assert again.writer.ids_from(0) == list(side.ids) + ["late"]
    vectors = again.finish().vectors
    assert np.array_equal(vectors[:rows], original) and np.all(vectors[rows] == 2.0) and len(vectors) == rows + 1

    store.collection.upsert(ids=["only-in-chroma"], documents=["x"], embeddings=[[0.5]])
    with pytest.raises(StoreError, match="holds 1 passages that its vector side file .* lacks .*'only-in-chroma'"):
        SideFileStore.open(store, dimension, side.meta["embedder"])


def test_an_ingest_stopped_between_the_side_file_and_chroma_resumes_to_the_same_store(tmp_path, monkeypatch):
    """The worst moment for a stop: a batch's rows counted in the side file, its documents not yet in Chroma."""
    source = _corpus(tmp_path, 10)
    _ingest(tmp_path / "whole", source, vectors="side-file")
    real_add, calls = CorpusStore.add, {"n": 0}

    def stops_before_the_third_chroma_write(store, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_add(store, *args)

    monkeypatch.setattr(CorpusStore, "add", stops_before_the_third_chroma_write)
    with pytest.raises(KeyboardInterrupt):
        _ingest(tmp_path / "db", source, vectors="side-file")
    monkeypatch.setattr(CorpusStore, "add", real_add)
    meta = json.loads((tmp_path / "db" / "vectors" / "corpus" / "meta.json").read_text())
    assert (meta["id_rows"], meta["complete"], _store(tmp_path / "db").count()) == (21, False, 14)

    resumed = _ingest(tmp_path / "db", source)
    assert resumed.already_present == 14 and resumed.collection_size == resumed.passages
    _same_vectors(_side_vectors(tmp_path / "db"), _side_vectors(tmp_path / "whole"))


@pytest.mark.parametrize("encoders", [1, 2])
def test_kill_9_mid_ingest_resumes_to_what_an_uninterrupted_run_writes(tmp_path, encoders):
    source = str(_corpus(tmp_path, 40))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    flags = ["--embedder", "minilm", "--max-words", "60", "--overlap-words", "10", "--batch-size", "4",
             "--vectors", "side-file", "--encoders", str(encoders)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = drzero_command("ingest", source, *flags)
    stored, _ = kill_ingest_when_stored(command + ["--db", str(killed)], 40)
    meta = json.loads((killed / "vectors" / "corpus" / "meta.json").read_text())
    assert not meta["complete"] and meta["id_rows"] >= 40

    resumed = subprocess.run(command + ["--db", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    subprocess.run(command + ["--db", str(whole)], env=env, check=True, capture_output=True, timeout=600)
    expected = _side_vectors(whole)
    assert 40 <= stored < len(expected)
    _same_vectors(_side_vectors(killed), expected)
    got = _store(killed).collection.get(include=["documents"])
    reference = _store(whole).collection.get(include=["documents"])
    assert sorted(zip(got["ids"], got["documents"])) == sorted(zip(reference["ids"], reference["documents"]))
    assert read_index_check(killed, "corpus")["state"] == "checked"
