"""`drzero adopt --faiss-index`: a FAISS flat index (built here with faiss-cpu) and its wiki-18-style corpus become a
collection whose vectors live in a side file, served by exact search with FAISS's own answers."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import drzero_command
from drzero.corpus.adopt import AdoptConfig
from drzero.corpus.adopt_faiss import LineIndex, run_adopt_faiss
from drzero.corpus.faiss_file import FaissFlatFile
from drzero.corpus.store import CorpusStore, StoreError, read_index_check
from drzero.corpus.vector_file import SequentialIds, VectorFile, has_side_file
from drzero.retrieval.search_cli import SearchConfig, _ask_store
from drzero.retrieval.server import RetrieverConfig
from drzero.retrieval.service import RetrievalService

faiss = pytest.importorskip("faiss")

PASSAGES = 600
SUBJECTS = ["lattice cryptography", "river deltas", "baroque music", "protein folding", "volcanic islands",
            "medieval trade", "neural networks", "coral reefs", "jazz harmony", "orbital mechanics"]
QUERIES = ["how do volcanic islands form", "who wrote baroque music", "trade routes in medieval europe",
           "what do neural networks learn", "lattice problems in cryptography"]


def _record(i: int) -> dict:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return {"id": str(i), "contents": f'"{subject.title()} {i}"\nPassage {i} is about {subject}, part {i // 10} '
                                      f'of a survey, with remark {i * 7 % 13}.'}


def _write_corpus(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_index(path, vectors, metric="ip"):
    index = faiss.IndexFlatIP(vectors.shape[1]) if metric == "ip" else faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(path))
    return path


@pytest.fixture(scope="module")
def wiki(tmp_path_factory, minilm):
    """(corpus.jsonl, e5_Flat-style IndexFlatIP of the passages as MiniLM embeds them, the vectors)."""
    where = tmp_path_factory.mktemp("wiki")
    records = [_record(i) for i in range(PASSAGES)]
    vectors = minilm.encode([r["contents"] for r in records], "")
    return _write_corpus(where / "wiki-18.jsonl", records), _write_index(where / "e5_Flat.index", vectors), vectors


def _adopt(db, corpus, index, **extra):
    return run_adopt_faiss(AdoptConfig(db=str(db), embedder="minilm", faiss_index=str(index), corpus=str(corpus),
                                       samples=16, **extra))


@pytest.fixture(scope="module")
def adopted(wiki, tmp_path_factory):
    corpus, index, _ = wiki
    db = tmp_path_factory.mktemp("adopted") / "db"
    return db, _adopt(db, corpus, index)


def test_the_header_reader_agrees_with_faiss(tmp_path, wiki):
    _, index, vectors = wiki
    flat = FaissFlatFile.open(index)
    assert (flat.metric, flat.dimension, flat.count) == ("inner product", 384, PASSAGES)
    assert np.array_equal(flat.vectors(), faiss.read_index(str(index)).reconstruct_n(0, PASSAGES))
    l2 = FaissFlatFile.open(_write_index(tmp_path / "l2.index", vectors[:10], "l2"))
    assert l2.metric == "L2" and np.array_equal(l2.vectors(), vectors[:10])


def _split(index, where, cuts):
    """The index file cut into parts at byte offsets ``cuts`` (mid-row, as ``split -b`` cuts Search-R1's index)."""
    data = index.read_bytes()
    bounds = [0, *cuts, len(data)]
    parts = []
    for number, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        part = where / f"part_a{chr(ord('a') + number)}"
        part.write_bytes(data[begin:end])
        parts.append(part)
    return parts


def test_an_index_in_parts_reads_as_their_concatenation(tmp_path, wiki):
    _, index, _ = wiki
    whole = FaissFlatFile.open(index)
    parts = _split(index, tmp_path, [1000, 1000 + 384 * 4 * 250 + 7])  # inside the header's row 0, mid-row later
    split = FaissFlatFile.open(parts)
    assert (split.metric, split.dimension, split.count, split.offset) == (whole.metric, 384, PASSAGES, whole.offset)
    assert np.array_equal(split.vectors()[0:PASSAGES], whole.vectors())
    assert np.array_equal(split.vectors()[[0, 251, 252, PASSAGES - 1]], whole.vectors()[[0, 251, 252, PASSAGES - 1]])
    with pytest.raises(StoreError) as missing:
        FaissFlatFile.open(parts[:2])
    assert "truncated or damaged or a part is missing" in str(missing.value) and str(missing.value).count(".") <= 3
    with pytest.raises(StoreError) as swapped:
        FaissFlatFile.open([parts[1], parts[0], parts[2]])
    assert "the first one holds the header" in str(swapped.value)


def test_an_index_in_parts_is_adopted_as_the_joined_file_is(tmp_path, wiki, adopted):
    corpus, index, _ = wiki
    parts = _split(index, tmp_path, [len(index.read_bytes()) // 2 + 3])
    db = tmp_path / "db"
    result = run_adopt_faiss(AdoptConfig(db=str(db), embedder="minilm", faiss_index=[str(p) for p in parts],
                                         corpus=str(corpus), samples=16))
    assert result.render().startswith("adopted FAISS index part_aa+part_ab: ")
    joined_db, _ = adopted
    assert CorpusStore.open_existing(db).count() == PASSAGES
    mine = VectorFile.open(db / "vectors" / "corpus")
    joined = VectorFile.open(joined_db / "vectors" / "corpus")
    assert np.array_equal(np.asarray(mine.vectors), np.asarray(joined.vectors))


def test_line_index_finds_any_line(tmp_path, monkeypatch):
    monkeypatch.setattr("drzero.corpus.adopt_faiss.ANCHOR_LINES", 7)
    monkeypatch.setattr("drzero.corpus.adopt_faiss.SCAN_BYTES", 100)  # anchors found across many reads
    records = [_record(i) for i in range(50)]
    corpus = _write_corpus(tmp_path / "c.jsonl", records)
    corpus.write_text(corpus.read_text().rstrip("\n"))  # a last line without its newline still counts
    lines = LineIndex.of(corpus, tmp_path / "lines.json")
    assert lines.count == 50 and LineIndex.of(corpus, tmp_path / "lines.json").anchors == lines.anchors  # cached
    for n in (0, 6, 7, 8, 20, 49):
        assert json.loads(lines.line(n)) == records[n]
    assert [json.loads(raw)["id"] for raw in lines.lines_from(45)] == ["45", "46", "47", "48", "49"]


def test_an_adopted_index_is_served_with_faiss_own_top_k(adopted, wiki, minilm):
    db, result = adopted
    corpus, index, _ = wiki
    assert "adopted FAISS index e5_Flat.index: 600 vectors of 384 dimensions" in result.render()
    store = CorpusStore.open_existing(db)
    assert has_side_file(store) and store.count() == PASSAGES
    assert read_index_check(db, "corpus") == {"collection": "corpus", "state": "checked", "passages": PASSAGES}
    got = store.collection.get(ids=["42"], include=["documents", "metadatas"])
    assert got["documents"] == [_record(42)["contents"]]                 # served as Search-R1 serves it
    assert got["metadatas"][0]["title"] == "Baroque Music 42"             # the title line, unquoted
    side = VectorFile.of(store)
    assert isinstance(side.ids, SequentialIds) and not (side.directory / "ids.txt").exists()

    queries = minilm.encode_queries(QUERIES)
    _, expected = faiss.read_index(str(index)).search(queries, 5)
    service = RetrievalService.open(RetrieverConfig(db=str(db), device="cpu"))
    assert service.exact is not None and service.exact.precision == "fp32"
    assert [[h.id for h in hits] for hits in service.search(QUERIES, 5)] == [[str(r) for r in row]
                                                                           for row in expected]
    hits = _ask_store(SearchConfig(queries=QUERIES, db=str(db), topk=5), QUERIES)   # `drzero search --db`
    assert [[h["document"]["id"] for h in per_query] for per_query in hits] == [[str(r) for r in row]
                                                                              for row in expected]
    with pytest.raises(StoreError, match="side file .* no HNSW index .* --index exact"):
        RetrievalService.open(RetrieverConfig(db=str(db), device="cpu", index="hnsw"))
    assert "nothing to do" in _adopt(db, corpus, index).render()      # a second run finds it done


def test_an_l2_index_of_unnormalized_vectors_is_served_by_cosine(tmp_path, wiki, minilm):
    corpus, _, vectors = wiki
    scaled = vectors * np.linspace(0.5, 3.0, len(vectors), dtype=np.float32)[:, None]
    result = _adopt(tmp_path / "db", corpus, _write_index(tmp_path / "l2.index", scaled, "l2"))
    assert result.normalized and "(L2, normalized)" in result.render()
    service = RetrievalService.open(RetrieverConfig(db=str(tmp_path / "db"), device="cpu"))
    expected = np.argsort(-(minilm.encode_queries(QUERIES) @ vectors.T), axis=1)[:, :3]
    assert [[h.id for h in hits] for hits in service.search(QUERIES, 3)] == [[str(r) for r in row]
                                                                           for row in expected]


def _mismatched(case, tmp_path, wiki):
    corpus, index, vectors = wiki
    rng = np.random.default_rng(0)
    if case == "dimension":
        return corpus, _write_index(tmp_path / "x.index", rng.standard_normal((PASSAGES, 16)))
    if case == "count":
        lines = corpus.read_text().splitlines(keepends=True)
        return _write_corpus(tmp_path / "short.jsonl", [json.loads(x) for x in lines[:-1]]), index
    if case == "embedder":
        other = rng.standard_normal(vectors.shape).astype(np.float32)
        return corpus, _write_index(tmp_path / "x.index", other / np.linalg.norm(other, axis=1, keepdims=True))
    if case == "hnsw":
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], 8)
        hnsw.add(vectors)
        faiss.write_index(hnsw, str(tmp_path / "x.index"))
        return corpus, tmp_path / "x.index"
    truncated = tmp_path / "x.index"
    truncated.write_bytes(index.read_bytes()[:-100])
    return corpus, truncated


@pytest.mark.parametrize("case, said", [
    ("dimension", "holds 16-dimensional vectors but .*makes 384-dimensional"),
    ("count", "holds 600 vectors but .*has 599 lines; rows pair with lines by position"),
    ("embedder", "vectors of .* were not made by sentence-transformers/all-MiniLM-L6-v2"),
    ("hnsw", "is an HNSW index .*not IndexFlatIP or IndexFlatL2"),
    ("truncated", "truncated or damaged"),
])
def test_a_mismatched_index_is_refused_in_one_sentence_before_anything_is_written(case, said, tmp_path, wiki):
    corpus, index = _mismatched(case, tmp_path, wiki)
    with pytest.raises(StoreError, match=said) as refused:
        _adopt(tmp_path / "db", corpus, index)
    assert "\n" not in str(refused.value) and str(refused.value).endswith(".")
    assert CorpusStore.open_for_writing(tmp_path / "db") is None
    assert not (tmp_path / "db" / "vectors" / "corpus" / "vectors.npy").exists()


def test_the_command_refuses_with_exit_2_and_one_line(tmp_path, wiki):
    corpus, index = _mismatched("count", tmp_path, wiki)
    result = subprocess.run(drzero_command("adopt", "--faiss-index", str(index), "--corpus", str(corpus),
                                           "--embedder", "minilm", "--db", str(tmp_path / "db")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("drzero adopt: error: ")
    assert "599 lines" in result.stderr


def _collection(db):
    store = CorpusStore.open_existing(db)
    got = store.collection.get(include=["documents", "metadatas"])
    return sorted(zip(got["ids"], got["documents"], [json.dumps(m, sort_keys=True) for m in got["metadatas"]]))


def test_kill_9_during_adopt_resumes_to_the_same_store(tmp_path, wiki, adopted):
    corpus, index, _ = wiki
    db = tmp_path / "db"
    meta = db / "vectors" / "corpus" / "meta.json"
    process = subprocess.Popen(drzero_command("adopt", "--faiss-index", str(index), "--corpus", str(corpus),
                                              "--embedder", "minilm", "--db", str(db), "--samples", "16",
                                              "--document-batch", "3"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline and process.poll() is None:
        try:
            seen = json.loads(meta.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen.get("id_rows", 0) >= 60:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert seen.get("rows") == PASSAGES and 60 <= seen["id_rows"] < PASSAGES and not seen["complete"], seen
    assert read_index_check(db, "corpus")["state"] == "writing"
    with pytest.raises(StoreError, match="incomplete"):  # the retriever refuses the half-written store
        RetrievalService.open(RetrieverConfig(db=str(db), device="cpu"))

    result = _adopt(db, corpus, index)
    assert result.copy_gbps is None and result.documents_per_s is not None  # only the documents were left
    reference, _ = adopted
    assert _collection(db) == _collection(reference)
    assert np.array_equal(VectorFile.open(db / "vectors" / "corpus").vectors,
                          VectorFile.open(reference / "vectors" / "corpus").vectors)
    assert read_index_check(db, "corpus")["state"] == "checked"


def test_fp16_exact_search_over_the_adopted_store_matches_fp32(adopted, minilm):
    db, _ = adopted
    full = RetrievalService.open(RetrieverConfig(db=str(db), device="cpu", exact_precision="fp32"))
    half = RetrievalService.open(RetrieverConfig(db=str(db), device="cpu", exact_precision="fp16",
                                                 exact_devices=["cpu", "cpu"]))
    vectors = minilm.encode_queries_tensor(QUERIES)
    rows, scores = full.exact.search(vectors, 3)
    rows16, scores16 = half.exact.search(vectors, 3)
    assert half.exact.rescore == 4 and np.array_equal(rows, rows16) and np.allclose(scores, scores16, atol=1e-6)
    assert isinstance(torch.as_tensor(scores16), torch.Tensor)


def test_a_gzipped_corpus_is_unpacked_once_beside_itself_and_adopted(tmp_path, wiki):
    import gzip

    corpus, index, _ = wiki
    packed = tmp_path / "wiki-18.jsonl.gz"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    result = run_adopt_faiss(AdoptConfig(db=str(tmp_path / "db"), embedder="minilm", faiss_index=[str(index)],
                                         corpus=str(packed), samples=16))
    plain = tmp_path / "wiki-18.jsonl"
    assert plain.read_bytes() == corpus.read_bytes() and not list(tmp_path.glob(".*.part"))
    assert CorpusStore.open_existing(tmp_path / "db").count() == PASSAGES == result.index.count
    truncated = tmp_path / "cut" / "wiki-18.jsonl.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(packed.read_bytes()[:-100])
    with pytest.raises(StoreError) as refused:
        run_adopt_faiss(AdoptConfig(db=str(tmp_path / "db2"), embedder="minilm", faiss_index=[str(index)],
                                    corpus=str(truncated), samples=16))
    assert str(refused.value).startswith(f"cannot unpack {truncated}") and not list(truncated.parent.glob(".*"))
