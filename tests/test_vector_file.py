"""The vector side file (resumable writer, memory-mapped reader, verify) and the exact index over it: sharded
equals unsharded, fp16 with fp32 re-scoring finds what fp32 finds."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drzero.corpus.embedder import EmbedderSpec
from drzero.corpus.store import CorpusStore, StoreError
from drzero.corpus.vector_file import SequentialIds, VectorFile, VectorFileWriter
from drzero.retrieval import exact_index
from drzero.retrieval.exact_index import ExactIndex, plan_shards


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(count: int, dimension: int, seed: int = 0) -> np.ndarray:
    """Unit vectors (and queries) around one direction: neighbours' cosines differ in the third or fourth digit,
    where fp16 rows misrank (here fp16 alone finds about 0.9 of the true top 3)."""
    centre = np.random.default_rng(0).standard_normal(dimension)
    return _unit(centre + 0.08 * np.random.default_rng(seed).standard_normal((count, dimension)))


def _side_file(directory, vectors, ids=None, dtype="float32") -> VectorFile:
    writer = VectorFileWriter.open(directory, vectors.shape[1], embedder="m", dtype=dtype, count=len(vectors))
    writer.append(vectors, ids if ids is not None else [str(i) for i in range(len(vectors))])
    return writer.finish()


def test_a_killed_writer_resumes_from_what_its_record_counts(tmp_path):
    vectors = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(1000)]
    writer = VectorFileWriter.open(tmp_path / "v", 8, embedder="m")   # count unknown: the file grows
    writer.append(vectors[:300], ids[:300])
    # a kill after these rows and ids reached the files but before meta.json counted them
    writer.append_vectors(vectors[300:400], checkpoint=False)
    writer._ids.write(b"doc-300\ndoc-301\n")
    writer._ids.flush()
    del writer

    again = VectorFileWriter.open(tmp_path / "v", 8, embedder="m")
    assert (again.rows, again.id_rows) == (300, 300)
    again.append(vectors[300:], ids[300:])
    side = again.finish()
    assert side.vectors.shape == (1000, 8) and np.array_equal(side.vectors, vectors)
    assert list(side.ids) == ids and isinstance(side.vectors, np.memmap)
    with pytest.raises(StoreError, match="begun with dimension 8 .*now 16"):
        VectorFileWriter.open(tmp_path / "v", 16, embedder="m")


def test_row_numbers_as_ids_are_recorded_not_written(tmp_path):
    side = _side_file(tmp_path / "v", np.ones((5, 4), np.float32))
    assert side.meta["ids"] == "sequential" and isinstance(side.ids, SequentialIds)
    assert (side.ids[3], side.ids[-1], side.ids[1:3]) == ("3", "4", ["1", "2"])
    mixed = _side_file(tmp_path / "w", np.ones((4, 4), np.float32), ["0", "1", "x", "3"])
    assert list(mixed.ids) == ["0", "1", "x", "3"]


def test_an_incomplete_or_damaged_file_is_refused_in_one_sentence(tmp_path):
    writer = VectorFileWriter.open(tmp_path / "v", 4, embedder="m", count=10)
    writer.append(np.ones((4, 4), np.float32), ["0", "1", "2", "3"])
    with pytest.raises(StoreError, match="incomplete \\(4 vectors and 4 ids written\\)"):
        VectorFile.open(tmp_path / "v")
    with pytest.raises(StoreError, match="holds 4 vectors and 4 ids of 10"):
        writer.finish()
    (tmp_path / "v" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="is damaged"):
        VectorFile.open(tmp_path / "v")


def test_verify_compares_rows_with_the_vectors_chroma_holds(tmp_path):
    vectors = _unit(np.random.default_rng(2).standard_normal((200, 16)))
    ids = [f"p{i}" for i in range(200)]
    store = CorpusStore.create(tmp_path / "db", EmbedderSpec("m"), 16)
    store.add(ids, [f"text {i}" for i in range(200)], [{"title": str(i)} for i in range(200)], vectors)
    assert "rows agree" in _side_file(tmp_path / "good", vectors, ids).verify(store, samples=20)
    shuffled = _side_file(tmp_path / "bad", vectors[::-1].copy(), ids)
    with pytest.raises(StoreError, match="differs from the collection's vector"):
        shuffled.verify(store, samples=20)


def test_sharded_search_equals_unsharded(tmp_path, monkeypatch):
    monkeypatch.setattr(exact_index, "ROWS_PER_CHUNK", 700)     # chunks within each shard, merged
    monkeypatch.setattr(exact_index, "LOAD_BYTES", 500 * 32 * 4)  # loaded 500 rows at a time
    vectors = _clustered(5000, 32)
    side = _side_file(tmp_path / "v", vectors)
    queries = torch.from_numpy(_clustered(40, 32, seed=5))
    one = ExactIndex.from_vector_file(side, ["cpu"], "fp32")
    three = ExactIndex.from_vector_file(side, ["cpu", "cpu", "cpu"], "fp32")
    assert [s.start for s in three.shards] == [0, 1666, 3333]
    rows, scores = one.search(queries, 10)
    rows3, scores3 = three.search(queries, 10)
    expected = np.argsort(-(queries.numpy() @ vectors.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(rows, expected) and np.array_equal(rows3, rows) and np.allclose(scores3, scores)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_fp16_rows_with_fp32_rescoring_find_what_fp32_finds(tmp_path):
    vectors = _clustered(20_000, 64)
    side = _side_file(tmp_path / "v", vectors)
    queries = torch.from_numpy(_clustered(200, 64, seed=7))
    truth, truth_scores = ExactIndex.from_vector_file(side, ["cpu"], "fp32").search(queries, 3)
    plain, _ = ExactIndex.from_vector_file(side, ["cpu", "cpu"], "fp16", rescore=0).search(queries, 3)
    rescored, scores = ExactIndex.from_vector_file(side, ["cpu", "cpu"], "fp16", rescore=4).search(queries, 3)
    assert _recall(rescored, truth) >= 0.99 > _recall(plain, truth) >= 0.8
    assert np.allclose(scores[rescored == truth], truth_scores[rescored == truth], atol=1e-6)  # fp32 scores
    half = _side_file(tmp_path / "h", vectors, dtype="float16")  # no fp32 rows: nothing to re-score with
    assert ExactIndex.from_vector_file(half, ["cpu"], "fp16", rescore=4).rescore == 0


def test_shards_are_planned_over_the_fewest_devices_that_hold_them():
    gib = 2**30
    assert plan_shards(40 * gib, ["cuda:0", "cuda:1"], [80 * gib, 80 * gib]) == ["cuda:0"]
    assert plan_shards(40 * gib, [f"cuda:{i}" for i in range(8)], [30 * gib] * 8) == ["cuda:0", "cuda:1"]
    assert plan_shards(10 * gib, ["cpu", "cpu"], [None, None]) == ["cpu"]
    with pytest.raises(StoreError, match="cannot hold it in 2 shards .*--exact-devices"):
        plan_shards(40 * gib, ["cuda:0", "cuda:1"], [10 * gib, 10 * gib])


def test_meta_json_is_plain_and_small(tmp_path):
    _side_file(tmp_path / "v", np.ones((3, 2), np.float32))
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    assert meta["complete"] and (meta["rows"], meta["dimension"], meta["dtype"]) == (3, 2, "float32")


def test_the_gpu_benchmark_runs_its_cpu_path(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "exact_search.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--passages", "3000", "--dim", "64",
                             "--queries", "16", "--repeats", "1", "--adopt-mib", "1", "--work", str(tmp_path / "w"),
                             "--out", str(tmp_path / "report.md")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "card: CPU; 3,000 x 64" in report and "recall@3 vs exact fp32, top 12 re-scored in fp32 | 1.0000" in report
    assert "adopt's copy pass" in report and not (tmp_path / "w").exists()


def test_truncate_and_retain_cut_the_rows_and_their_ids(tmp_path):
    """The last ids are read from the end of ids.txt (blocks doubling back from its end: here 200 KB of ids)."""
    vectors = np.arange(20_000 * 4, dtype=np.float32).reshape(20_000, 4)
    ids = [f"passage-{i:06d}" for i in range(20_000)]
    writer = VectorFileWriter.open(tmp_path / "v", 4, embedder="m")
    writer.append(vectors, ids)
    assert writer.ids_from(19_990) == ids[19_990:] and writer.ids_from(20_000) == []
    writer.truncate(15_000)
    assert (writer.rows, writer.id_rows) == (15_000, 15_000) and writer.ids_from(14_000) == ids[14_000:15_000]
    writer.retain([*range(10_000), 12_000, 14_999])      # later rows moved down, in order
    side = writer.finish()
    assert list(side.ids) == ids[:10_000] + [ids[12_000], ids[14_999]]
    assert np.array_equal(side.vectors, vectors[[*range(10_000), 12_000, 14_999]])
    with pytest.raises(StoreError, match="is complete"):
        VectorFileWriter.open(tmp_path / "v", 4, embedder="m").append(vectors[:1], ["more"])
    again = VectorFileWriter.open(tmp_path / "v", 4, embedder="m")
    again.reopen()                                        # an ingest adding to the collection
    again.append(vectors[:2], ["more-1", "more-2"])
    assert list(again.finish().ids)[-3:] == [ids[14_999], "more-1", "more-2"]
    fixed = _side_file(tmp_path / "fixed", vectors[:3])
    with pytest.raises(StoreError, match="holds the 3 rows it was begun for"):
        VectorFileWriter.open(fixed.directory, 4, embedder="m", count=3).reopen()
