"""The retrieval contract as clients we did not write use it, against a real `drzero serve-retriever`.

Liberal in what it accepts (verl 0.7.1's SearchTool, Search-R1's client and its rerank body), one bad
query answered in its own entry instead of failing its request, and every error the framework raises
itself (a body that is not UTF-8 or not JSON, nested too deep, a number too long) in the service's
``{"detail", "field"}`` shape.
"""

import asyncio
import json

import httpx
import pytest
import requests

DEFAULT_TOPK = 3  # serve-retriever's --topk default


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # requests (verl's and Search-R1's client) honours proxy variables


def _post(server, payload) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\\ud800", as verl's requests.post(json=...) does
    return _post_raw(server, json.dumps(payload).encode())


def _post_raw(server, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/retrieve", content=body, timeout=60, trust_env=False,
                      headers={"content-type": "application/json"})


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health", trust_env=False, timeout=60).json()


def _assert_error_shape(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "field"}, body
    assert body["field"] == field
    assert body["detail"].startswith(f"{field}: ")


# -- A. errors the framework raised before our handler ------------------------------------------------------------

HOSTILE_BODIES = {
    "invalid UTF-8": b'{"queries": ["caf\xe9 au lait"]}',
    "invalid UTF-8 inside a query only": b'{"queries": ["fine", "\xff\xfe"]}',
    "JSON nested 100,000 deep": b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a bare array nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a 5,000-digit number": b'{"queries": ["lattices"], "topk": ' + b"7" * 5000 + b"}",
    "not JSON at all": b"hello, retriever",
    "binary": bytes(range(256)),
    "an empty body": b"",
    "truncated JSON": b'{"queries": ["a"',
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_a_body_that_cannot_be_read_gets_400_in_the_error_shape(retriever, body):
    response = _post_raw(retriever, body)
    _assert_error_shape(response, 400, "body")
    assert _post(retriever, {"queries": ["still up?"]}).status_code == 200


def test_the_error_names_what_is_wrong_with_the_body(retriever):
    assert "not UTF-8" in _post_raw(retriever, HOSTILE_BODIES["invalid UTF-8"]).json()["detail"]
    assert "nested" in _post_raw(retriever, HOSTILE_BODIES["JSON nested 100,000 deep"]).json()["detail"]
    assert "digits" in _post_raw(retriever, HOSTILE_BODIES["a 5,000-digit number"]).json()["detail"]
    assert "malformed JSON" in _post_raw(retriever, HOSTILE_BODIES["not JSON at all"]).json()["detail"]


def test_hostile_bodies_do_not_disturb_the_requests_beside_them(retriever):
    async def mixed():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=retriever.url, limits=limits, timeout=120, trust_env=False) as client:
            def post(body: bytes):
                return client.post("/retrieve", content=body, headers={"content-type": "application/json"})

            hostile = [post(body) for body in HOSTILE_BODIES.values()] * 3
            good = [post(json.dumps({"queries": [f"paper {i} on lattices"]}).encode()) for i in range(32)]
            return await asyncio.gather(*hostile), await asyncio.gather(*good)

    hostile, good = asyncio.run(mixed())
    assert [r.status_code for r in hostile] == [400] * len(hostile)
    assert [r.status_code for r in good] == [200] * len(good)
    assert all(len(r.json()["result"][0]) == DEFAULT_TOPK for r in good)


@pytest.mark.parametrize("method,path,status,field", [
    ("GET", "/retrieve", 405, "method"),
    ("DELETE", "/health", 405, "method"),
    ("GET", "/nowhere", 404, "path"),
    ("POST", "/search", 404, "path"),
])
def test_routing_errors_get_the_error_shape(retriever, method, path, status, field):
    response = httpx.request(method, f"{retriever.url}{path}", trust_env=False, timeout=60,
                             headers={"content-type": "application/json"}, content=b"{}")
    _assert_error_shape(response, status, field)
    if status == 405:
        assert response.json()["detail"].endswith(f"use {'POST' if path == '/retrieve' else 'GET'}")


# -- B. liberal in what it accepts ------------------------------------------------------------------------------

TOPKS = [(3, 3), ("3", 3), (3.0, 3), ("3.0", 3), (" 2 ", 2), (5, 5), ("5", 5),
         (0, DEFAULT_TOPK), ("0", DEFAULT_TOPK), (None, DEFAULT_TOPK)]


@pytest.mark.parametrize("topk,expected", TOPKS, ids=[json.dumps(topk) for topk, _ in TOPKS])
def test_topk_as_clients_send_it(retriever, topk, expected):
    response = _post(retriever, {"queries": ["federated learning"], "topk": topk})
    assert response.status_code == 200, response.text
    assert len(response.json()["result"][0]) == expected


FLAGS = [(True, True), (False, False), ("true", True), ("false", False), ("True", True), ("FALSE", False),
         (1, True), (0, False), ("1", True), ("0", False), (None, True)]


@pytest.mark.parametrize("value,scores", FLAGS, ids=[json.dumps(value) for value, _ in FLAGS])
def test_return_scores_as_clients_send_it(retriever, value, scores):
    response = _post(retriever, {"queries": ["federated learning"], "return_scores": value})
    assert response.status_code == 200, response.text
    hit = response.json()["result"][0][0]
    assert ("score" in hit) is scores
    assert ("document" in hit) is scores and (("contents" in hit) is not scores)


def test_unknown_keys_are_ignored(retriever):
    response = _post(retriever, {"queries": ["federated learning"], "topk": 2, "top_k": 9, "stream": True,
                                 "metadata": {"run": [1, 2]}})
    assert response.status_code == 200, response.text
    assert len(response.json()["result"][0]) == 2


def test_no_queries_is_an_empty_result(retriever):
    response = _post(retriever, {"queries": [], "topk": 3, "return_scores": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"result": []}


BAD_QUERIES = ["", "   ", "x" * 2001, 42, None, ["nested"], {"q": 1}, "half an emoji \ud83d"]


def test_one_bad_query_does_not_fail_the_others(retriever):
    refused_before = _health(retriever)["queries_refused"]
    queries = ["federated learning", *BAD_QUERIES, "lattice cryptography"]
    response = _post(retriever, {"queries": queries, "topk": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    result = body["result"]
    assert len(result) == len(queries)  # one inner list per query, in order
    assert len(result[0]) == 2 and len(result[-1]) == 2
    assert result[1:-1] == [[]] * len(BAD_QUERIES)
    bad = list(range(1, len(queries) - 1))
    assert [error["index"] for error in body["errors"]] == bad
    for error in body["errors"]:
        assert set(error) == {"index", "field", "detail"}
        assert error["field"] == f"queries[{error['index']}]"
        assert error["detail"].startswith(f"queries[{error['index']}]: ")
    details = [error["detail"] for error in body["errors"]]
    assert "empty" in details[0] and "empty" in details[1]
    assert "2001 characters" in details[2] and "--max-query-chars" in details[2]
    assert details[3] == "queries[4]: expected a string, got the number 42"
    assert details[4].endswith("got null") and details[5].endswith("got a list")
    assert "lone UTF-16 surrogate" in details[7]
    assert _health(retriever)["queries_refused"] - refused_before == len(BAD_QUERIES)
    # a request whose queries are all good carries no "errors" key: the body stays Search-R1's
    assert set(_post(retriever, {"queries": ["lattices"]}).json()) == {"result"}


def test_a_request_of_only_bad_queries_is_answered_without_searching(retriever):
    response = _post(retriever, {"queries": ["", "\udfff"]})
    assert response.status_code == 200, response.text
    assert response.json()["result"] == [[], []]
    assert [error["field"] for error in response.json()["errors"]] == ["queries[0]", "queries[1]"]


def test_a_bad_query_in_a_coalesced_batch_stays_in_its_entry(retriever):
    batches_before = _health(retriever)["batches_run"]
    bodies = [json.dumps({"queries": [f"paper {i} on lattices", "x\ud800" if i % 8 == 3 else "federated"]})
              for i in range(48)]

    async def burst():
        limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
        async with httpx.AsyncClient(base_url=retriever.url, limits=limits, timeout=120, trust_env=False) as client:
            return await asyncio.gather(*(client.post("/retrieve", content=body.encode(),
                                                      headers={"content-type": "application/json"})
                                          for body in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 48
    for i, response in enumerate(responses):
        result = response.json()["result"]
        assert len(result[0]) == DEFAULT_TOPK
        if i % 8 == 3:
            assert result[1] == [] and response.json()["errors"][0]["field"] == "queries[1]"
        else:
            assert len(result[1]) == DEFAULT_TOPK and "errors" not in response.json()
    assert _health(retriever)["batches_run"] - batches_before < 48  # the requests really were coalesced


MALFORMED = [
    (["federated learning"], "body"),
    ("federated learning", "body"),
    (None, "body"),
    (7, "body"),
    ({"topk": 3}, "queries"),
    ({"queries": "federated learning"}, "queries"),
    ({"queries": {"0": "federated learning"}}, "queries"),
    ({"queries": None}, "queries"),
    ({"queries": ["ok"], "topk": -1}, "topk"),
    ({"queries": ["ok"], "topk": "-3"}, "topk"),
    ({"queries": ["ok"], "topk": "three"}, "topk"),
    ({"queries": ["ok"], "topk": ""}, "topk"),
    ({"queries": ["ok"], "topk": 2.5}, "topk"),
    ({"queries": ["ok"], "topk": True}, "topk"),
    ({"queries": ["ok"], "topk": [3]}, "topk"),
    ({"queries": ["ok"], "topk": 51}, "topk"),
    ({"queries": ["ok"], "topk": float("nan")}, "topk"),
    ({"queries": ["ok"], "return_scores": "maybe"}, "return_scores"),
    ({"queries": ["ok"], "return_scores": 2}, "return_scores"),
    ({"queries": ["ok"], "return_scores": [True]}, "return_scores"),
    ({"queries": ["ok"] * 513}, "queries"),
    ({"queries": ["x" * 2000] * 51}, "queries"),  # 102,000 characters, over --max-request-chars
]


@pytest.mark.parametrize("payload,field", MALFORMED, ids=[f"{field}-{i}" for i, (_, field) in enumerate(MALFORMED)])
def test_a_malformed_request_still_gets_422_naming_the_field(retriever, payload, field):
    _assert_error_shape(_post(retriever, payload), 422, field)
    assert _post(retriever, {"queries": ["still up?"]}).status_code == 200


# -- the real clients, with the bodies exactly as they send them --------------------------------------------------

def test_verl_search_tool_gets_the_good_queries_of_a_mixed_batch(retriever):
    """verl 0.7.1's SearchTool (verl/tools/search_tool.py) calls perform_single_search_batch with the model's
    query_list; any non-200 becomes "Search error: API Call Failed" for every query of the call."""
    from verl.tools.utils.search_r1_like_utils import perform_single_search_batch

    url = f"{retriever.url}/retrieve"
    text, metadata = perform_single_search_batch(url, ["federated learning", "", "lattice cryptography"], topk=3,
                                                 timeout=60)
    assert metadata["status"] == "success", metadata
    assert metadata["total_results"] == 6
    blocks = json.loads(text)["result"].split("\n---\n")
    assert len(blocks) == 3 and blocks[0].startswith("Doc 1 (Title: ") and blocks[1] == ""
    assert blocks[2].startswith("Doc 1 (Title: ")
    _, empty = perform_single_search_batch(url, [], topk=3, timeout=60)
    assert empty["status"] == "no_results" and empty["api_request_error"] is None


def _search_r1_batch_search(search_url: str, queries: list, topk: int) -> list[str]:
    """Search-R1's client, as in search_r1/llm_agent/generation.py (LLMGenerationManager.batch_search,
    _batch_search, _passages2string at PeterGriffinJin/Search-R1 a14dc3a): no status check, reads ['result']."""
    payload = {"queries": queries, "topk": topk, "return_scores": True}
    results = requests.post(search_url, json=payload).json()["result"]

    def passages2string(retrieval_result):
        format_reference = ""
        for idx, doc_item in enumerate(retrieval_result):
            content = doc_item["document"]["contents"]
            title = content.split("\n")[0]
            text = "\n".join(content.split("\n")[1:])
            format_reference += f"Doc {idx+1}(Title: {title}) {text}\n"
        return format_reference

    return [passages2string(result) for result in results]


def test_search_r1_client_survives_a_bad_query(retriever):
    texts = _search_r1_batch_search(f"{retriever.url}/retrieve", ["federated learning", "   ", "lattices"], topk=3)
    assert len(texts) == 3
    assert texts[0].count("Doc ") == 3 and texts[1] == "" and texts[2].count("Doc ") == 3


def test_search_r1_rerank_body_is_served(retriever):
    """The body of Search-R1's retrieval_rerank_server.py SearchRequest: topk_retrieval/topk_rerank, no topk."""
    payload = {"queries": ["federated learning", "lattices"], "topk_retrieval": 10, "topk_rerank": 3,
               "return_scores": False}
    response = requests.post(f"{retriever.url}/retrieve", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert [len(hits) for hits in result] == [DEFAULT_TOPK, DEFAULT_TOPK]
    assert "contents" in result[0][0]  # return_scores false: the bare documents, as Search-R1 returns them


def test_health_counts_refused_queries(retriever):
    health = _health(retriever)
    assert isinstance(health["queries_refused"], int)
    assert isinstance(health["connections_cut"], int)
