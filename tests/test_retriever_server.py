"""The retrieval service as a user meets it: a real `drzero serve-retriever` process on loopback."""

import asyncio
import json
import subprocess

import httpx
import numpy as np
import pytest

from conftest import drzero_command, start_retriever, stop
from drzero.corpus.demo import build_demo_world
from drzero.corpus.ingest import DEMO_FACTS_FILE


def _post(server, payload, **kwargs):
    # json.dumps escapes a lone surrogate as "\\ud800", as a model's JSON would; httpx's json= cannot encode it
    return httpx.post(f"{server.url}/retrieve", content=json.dumps(payload).encode(), timeout=60, trust_env=False,
                      headers={"content-type": "application/json"}, **kwargs)


def _demo_world(demo_db):
    facts = json.loads((demo_db / DEMO_FACTS_FILE).read_text())
    return build_demo_world(seed=facts["seed"], papers=len(facts["papers"]))


def test_retrieve_follows_the_search_r1_contract(retriever, demo_db, minilm):
    world = _demo_world(demo_db)
    questions = world.questions(2, count=3)
    response = _post(retriever, {"queries": [q.question for q in questions], "topk": 4, "return_scores": True})
    assert response.status_code == 200
    result = response.json()["result"]
    assert len(result) == 3
    for question, hits in zip(questions, result):
        assert len(hits) == 4
        assert set(hits[0]["document"]) == {"id", "contents", "title", "source"}
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)  # best first
        # the question names an entity of the seed document: it must be among the hits
        assert question.seed_source in [hit["document"]["source"] for hit in hits]
        # scores are cosine similarities of the query and passage embeddings
        query = minilm.encode_queries([question.question])[0]
        passage = minilm.encode_passages([hits[0]["document"]["contents"]])[0]
        assert hits[0]["score"] == pytest.approx(float(np.dot(query, passage)), abs=1e-3)


def test_defaults_and_bare_documents(retriever):
    default = _post(retriever, {"queries": ["a paper on federated learning"]}).json()["result"][0]
    assert len(default) == 3 and "score" in default[0]
    bare = _post(retriever, {"queries": ["a paper on federated learning"], "return_scores": False}).json()
    assert "contents" in bare["result"][0][0] and "score" not in bare["result"][0][0]


def test_health_and_docs(retriever, demo_db):
    health = httpx.get(f"{retriever.url}/health", trust_env=False).json()
    assert health["status"] == "ok" and health["passages"] > 100
    assert health["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert httpx.get(f"{retriever.url}/docs", trust_env=False).status_code == 200
    schema = httpx.get(f"{retriever.url}/openapi.json", trust_env=False).json()
    assert "/retrieve" in schema["paths"]


BAD_REQUESTS = [  # what still fails a whole request; tests/test_retriever_contract.py has what no longer does
    ({"queries": "not a list"}, 422, "queries"),
    ({"topk": 3}, 422, "queries"),
    ({"queries": ["ok"], "topk": -2}, 422, "topk"),
    ({"queries": ["ok"], "topk": 51}, 422, "topk"),
    ({"queries": ["x" * 2000] * 51}, 422, "queries"),  # 102,000 characters, over the 100,000 per request
    ({"queries": ["ok"], "return_scores": "perhaps"}, 422, "return_scores"),
    (["ok"], 422, "body"),
]


@pytest.mark.parametrize("payload,status,field", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(retriever, payload, status, field):
    response = _post(retriever, payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field
    assert body["detail"].startswith(f"{field}: ")
    assert _post(retriever, {"queries": ["still up?"]}).status_code == 200


def test_the_old_worst_case_request_is_refused_with_the_limit_and_what_to_do(retriever):
    response = _post(retriever, {"queries": ["x" * 2000] * 512})  # 1,024,000 characters: ~24 s of encoder
    assert response.status_code == 422
    assert response.json() == {"field": "queries", "detail": (
        "queries: the queries hold 1024000 characters in all; the limit per request is 100000 "
        "(--max-request-chars); split them over several requests")}


def test_a_lone_surrogate_names_its_query(retriever):
    response = _post(retriever, {"queries": ["ok", "ok", "a\ud800b"]})
    assert response.status_code == 200
    (error,) = response.json()["errors"]
    assert error["detail"].startswith("queries[2]: query holds a lone UTF-16 surrogate ('\\ud800' at character 1)")


@pytest.mark.parametrize("content_type,body", [
    ("text/plain", json.dumps({"queries": ["federated learning"]}).encode()),
    ("application/x-www-form-urlencoded", b'{"queries": ["federated learning"]}'),  # what curl -d sends
    ("application/x-www-form-urlencoded", b"queries=federated+learning"),
    ("multipart/form-data; boundary=xyz", b"--xyz--"),
    (None, b'{"queries": ["federated learning"]}'),
])
def test_a_body_not_sent_as_json_gets_415_naming_the_content_type(retriever, content_type, body):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{retriever.url}/retrieve", content=body, headers=headers, trust_env=False, timeout=60)
    assert response.status_code == 415, response.text
    assert response.json()["field"] == "content-type"
    detail = response.json()["detail"]
    assert detail.startswith("content-type: the body must be sent as application/json")
    assert (repr(content_type) if content_type else "no Content-Type") in detail
    assert "-H 'Content-Type: application/json'" in detail


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_and_none_are_served(retriever, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{retriever.url}/retrieve", content=b'{"queries": ["federated learning"]}',
                          headers=headers, trust_env=False, timeout=60)
    assert response.status_code == 200, response.text


def test_malformed_json_and_oversized_bodies(retriever):
    malformed = httpx.post(f"{retriever.url}/retrieve", content=b'{"queries": ["a"', trust_env=False,
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["field"] == "body"
    assert "malformed JSON" in malformed.json()["detail"]
    huge = json.dumps({"queries": ["lattice " * 100] * 2000}).encode()  # ~1.6 MB, over the 1 MiB default
    too_large = httpx.post(f"{retriever.url}/retrieve", content=huge, trust_env=False,
                           headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and too_large.json()["field"] == "body"

    def chunks():  # no content-length: the limit must hold for a streamed body too
        for _ in range(40):
            yield b" " * 50_000

    streamed = httpx.post(f"{retriever.url}/retrieve", content=chunks(), trust_env=False,
                          headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert _post(retriever, {"queries": ["still up?"]}).status_code == 200


def test_2000_requests_at_32_concurrency_get_no_5xx(retriever):
    async def load():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=retriever.url, limits=limits, timeout=120, trust_env=False) as client:
            semaphore = asyncio.Semaphore(32)

            async def one(i: int):
                async with semaphore:
                    response = await client.post("/retrieve", json={"queries": [f"paper number {i} on lattices"],
                                                                    "topk": 1 + i % 5})
                    statuses.append(response.status_code)
                    assert len(response.json()["result"][0]) == 1 + i % 5

            await asyncio.gather(*(one(i) for i in range(2000)))
        return statuses

    statuses = asyncio.run(load())
    assert len(statuses) == 2000
    assert statuses.count(200) == 2000


def _refusal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(drzero_command("serve-retriever", *args, "--port", "1"), capture_output=True, text=True,
                          timeout=120)


def test_device_cuda_without_cuda_is_one_sentence(demo_db):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _refusal("--db", str(demo_db), "--device", "cuda")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "device='cuda' is not available" in errors[0] and "--device cpu" in errors[0]


def test_refuses_to_start_on_a_missing_store(tmp_path):
    result = _refusal("--db", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "no corpus at" in result.stderr and "drzero ingest" in result.stderr


def test_refuses_to_start_on_an_empty_collection(tmp_path):
    from drzero.corpus.embedder import spec_for
    from drzero.corpus.store import CorpusStore

    CorpusStore.create(tmp_path / "db", spec_for("minilm"), 384)
    result = _refusal("--db", str(tmp_path / "db"))
    assert result.returncode != 0 and "is empty" in result.stderr


def test_refuses_to_start_on_another_collection_name(demo_db):
    result = _refusal("--db", str(demo_db), "--collection", "papers")
    assert result.returncode != 0 and "collection 'papers' not found" in result.stderr


def test_refuses_to_serve_a_collection_built_with_another_embedder(demo_db):
    result = _refusal("--db", str(demo_db), "--embedder", "intfloat/e5-large-v2")
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert "built with embedder 'sentence-transformers/all-MiniLM-L6-v2'" in error_lines[0]
    assert "'intfloat/e5-large-v2'" in error_lines[0]


def test_copy_to_local_serves_from_the_copy(demo_db, tmp_path):
    local = tmp_path / "local-copy"
    server = start_retriever(demo_db, tmp_path / "copy.log", "--copy-to-local", str(local), "--no-batching")
    try:
        assert (local / "chroma.sqlite3").is_file()
        response = _post(server, {"queries": ["federated learning"], "topk": 2})
        assert response.status_code == 200 and len(response.json()["result"][0]) == 2
        assert httpx.get(f"{server.url}/health", trust_env=False).json()["batching"] is False
    finally:
        stop(server)


def test_the_encoder_and_the_exact_index_offer_their_own_precisions():
    """--precision is the encoder's (bf16 included); --exact-precision the exact index's rows (no bf16)."""
    import dataclasses

    from drzero.corpus.embedder import PRECISIONS
    from drzero.retrieval.exact_index import PRECISIONS as EXACT_PRECISIONS
    from drzero.retrieval.server import RetrieverConfig

    fields = {f.name: f.metadata["choices"] for f in dataclasses.fields(RetrieverConfig)}
    assert fields["precision"] == list(PRECISIONS) and "bf16" in fields["precision"]
    assert fields["exact_precision"] == list(EXACT_PRECISIONS)
