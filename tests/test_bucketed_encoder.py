"""The retriever's fixed-shape query encoder gives the model's own vectors (on the CPU here: the same shapes and
pooling without CUDA graphs; the graphs themselves are measured on a GPU by benchmarks/search_step.py)."""

from __future__ import annotations

import pytest

from drzero.corpus import bucketed_encoder as bucketed_encoder_module
from drzero.corpus.bucketed_encoder import BATCHES, LENGTHS, BucketedEncoder, Unsupported, _bucket
from drzero.corpus.embedder import TEST_EMBEDDER, Embedder, spec_for
from drzero.retrieval.service import CHECK_QUERIES, bucketed_encoder


@pytest.fixture(scope="module")
def embedder():
    return Embedder(spec_for(TEST_EMBEDDER), device="cpu")


def test_shapes_are_the_smallest_bucket_that_holds_the_batch():
    assert [_bucket(BATCHES, n) for n in (1, 3, 200, 256, 900)] == [1, 4, 256, 256, 256]
    assert [_bucket(LENGTHS, n) for n in (5, 16, 17, 600)] == [16, 16, 32, 512]


def test_padded_fixed_shapes_give_the_models_vectors(embedder, monkeypatch):
    monkeypatch.setattr(bucketed_encoder_module, "BATCHES", (1, 2, 4, 8))  # several chunks without a large batch
    fast = BucketedEncoder.of(embedder, graphs=False)
    texts = CHECK_QUERIES + ["a " * 300, "x"] + [f"question number {i} about lattices" for i in range(11)]
    assert fast.check_against(embedder, texts) >= 0.999
    vectors = fast.encode(texts)
    assert tuple(vectors.shape) == (len(texts), embedder.dimension)
    assert float(vectors.norm(dim=1).min()) == pytest.approx(1.0, abs=1e-5)


def test_other_poolings_are_refused_and_the_cpu_keeps_sentence_transformers(embedder, monkeypatch):
    pooling = list(embedder.model)[1]
    monkeypatch.setattr(pooling, "pooling_mode", "max")
    with pytest.raises(Unsupported):
        BucketedEncoder.of(embedder, graphs=False)
    assert bucketed_encoder(embedder) is None  # not on cuda: Embedder.encode serves
