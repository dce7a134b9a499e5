"""`drzero adopt` on a store another system built, then served as drzero's own."""

import os
import subprocess

import chromadb
import httpx
import numpy as np
import pytest

from conftest import drzero_command, start_retriever, stop
from drzero.corpus.adopt import AdoptConfig, run_adopt
from drzero.corpus.embedder import TEST_EMBEDDER
from drzero.corpus.ingest import IngestConfig, run_ingest
from drzero.corpus.store import CorpusStore, StoreError

ABSTRACTS = [
    ("Obfuscation from well-founded assumptions",
     "Indistinguishability obfuscation can be built from four well-founded assumptions."),
    ("Candidate multilinear maps", "Graded encoding schemes from ideal lattices give candidate multilinear maps."),
    ("Witness encryption", "Witness encryption lets anyone encrypt to an NP statement and decrypt with a witness."),
    ("Learning with errors", "Regev's learning with errors problem is as hard as worst-case lattice problems."),
    ("Functional encryption", "Functional encryption reveals only a function of the encrypted message."),
    ("Punctured programming", "Punctured programming proves the security of obfuscated programs step by step."),
    ("Garbled circuits", "Yao's garbled circuits evaluate a function on hidden inputs once."),
    ("Pairing-based cryptography", "Bilinear pairings on elliptic curves enable identity-based encryption."),
]


def _foreign_store(path, vectors, space="cosine"):
    """A store as the previous system built it: collection `papers`, no title line, no embedder recorded."""
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    collection = client.create_collection("papers", embedding_function=None, metadata={"hnsw:space": space})
    collection.add(ids=[f"chunk-{i}" for i in range(len(ABSTRACTS))], documents=[text for _, text in ABSTRACTS],
                   embeddings=vectors,
                   metadatas=[{"source": f"paper{i}.pdf", "title": title, "chunk_index": 0, "total_chunks": 1,
                               "chunk_type": "abstract", "token_count": len(text.split()), "author": "Someone"}
                              for i, (title, text) in enumerate(ABSTRACTS)])
    return path


def _minilm_with_passage_prefix(minilm):
    return minilm.model.encode(["passage: " + text for _, text in ABSTRACTS], normalize_embeddings=True)


def test_an_adopted_store_is_served_as_stored(tmp_path, minilm):
    db = _foreign_store(tmp_path / "chromadb", _minilm_with_passage_prefix(minilm))
    with pytest.raises(StoreError, match="records no embedder .* `drzero adopt --db .* --collection papers"):
        CorpusStore.open_existing(db, "papers")
    result = subprocess.run(drzero_command("adopt", "--db", str(db), "--collection", "papers", "--embedder", "minilm"),
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "adopted" in result.stdout and "passage prefix 'passage: '" in result.stdout
    store = CorpusStore.open_existing(db, "papers")
    spec = store.recorded_spec()
    assert (spec.name, spec.passage_prefix, spec.query_prefix) == (TEST_EMBEDDER, "passage: ", "query: ")
    meta = store.collection.metadata
    assert meta["drzero:dimension"] == 384
    got = store.collection.get(ids=["chunk-2"], include=["documents", "metadatas", "embeddings"])
    assert got["documents"] == [ABSTRACTS[2][1]] and got["metadatas"][0]["author"] == "Someone"  # untouched
    assert np.allclose(got["embeddings"][0], _minilm_with_passage_prefix(minilm)[2], atol=1e-5)

    server = start_retriever(db, tmp_path / "retriever.log", "--collection", "papers")
    try:
        response = httpx.post(f"{server.url}/retrieve", json={"queries": ["who encrypts to an NP statement?"],
                                                               "topk": 2}, timeout=60, trust_env=False)
        top = response.json()["result"][0][0]
        assert top["document"]["contents"] == ABSTRACTS[2][1]       # as stored: no title line added
        assert top["document"]["title"] == "Witness encryption"      # from its metadata
        assert top["document"]["source"] == "paper2.pdf"
        health = httpx.get(f"{server.url}/health", trust_env=False).json()
        assert health["collection"] == "papers" and health["embedder"] == TEST_EMBEDDER
    finally:
        stop(server)

    again = run_adopt(AdoptConfig(db=str(db), collection="papers", embedder="minilm"))
    assert again.already


def test_adopt_refuses_vectors_another_embedder_made(tmp_path, minilm):
    # Same dimension, other model: MiniLM's vectors of unrelated text stand in for another 384-d model's.
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(384, 384)))
    other = _minilm_with_passage_prefix(minilm) @ rotation.astype(np.float32)
    db = _foreign_store(tmp_path / "chromadb", other)
    with pytest.raises(StoreError) as error:
        run_adopt(AdoptConfig(db=str(db), collection="papers", embedder="minilm"))
    message = str(error.value)
    assert "not made by sentence-transformers/all-MiniLM-L6-v2" in message
    assert "passage prefix ''" in message and "passage prefix 'passage: '" in message and "median cosine" in message
    assert CorpusStore.open_for_writing(db, "papers").recorded_spec() is None   # nothing recorded


def test_adopt_refuses_another_dimension_and_names_both(tmp_path):
    db = _foreign_store(tmp_path / "chromadb", np.random.default_rng(1).normal(size=(len(ABSTRACTS), 1024)))
    with pytest.raises(StoreError, match="1024-dimensional vectors but .* makes 384-dimensional"):
        run_adopt(AdoptConfig(db=str(db), collection="papers", embedder="minilm"))


def test_adopt_names_the_collections_there(tmp_path, minilm):
    db = _foreign_store(tmp_path / "chromadb", _minilm_with_passage_prefix(minilm))
    with pytest.raises(StoreError, match="collection 'docs' not found .*papers"):
        run_adopt(AdoptConfig(db=str(db), collection="docs", embedder="minilm"))


def test_ingest_into_a_foreign_collection_points_at_adopt(tmp_path, minilm):
    db = _foreign_store(tmp_path / "chromadb", _minilm_with_passage_prefix(minilm))
    (tmp_path / "more.txt").write_text("One more document about obfuscation.")
    with pytest.raises(StoreError, match="records no embedder; .*drzero adopt"):
        run_ingest(IngestConfig(sources=[str(tmp_path / "more.txt")], db=str(db), collection="papers",
                                embedder="minilm"))
    assert CorpusStore.open_for_writing(db, "papers").count() == len(ABSTRACTS)


def test_device_cuda_without_cuda_is_one_sentence(tmp_path):
    import subprocess

    import torch

    from conftest import drzero_command

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    db = _foreign_store(tmp_path / "db", np.eye(len(ABSTRACTS), 384, dtype=np.float32))
    result = subprocess.run(drzero_command("adopt", "--db", str(db), "--collection", "papers", "--embedder", "minilm",
                                           "--device", "cuda"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "device='cuda' is not available" in errors[0]
