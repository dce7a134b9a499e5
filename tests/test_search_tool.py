"""Our search tool loaded by verl 0.7.1's own tool registry and run against a real retriever."""

import asyncio
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from drzero.prompts import SEARCH_TOOL_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TOOL_CONFIG = ROOT / "config" / "search_tool_config.yaml"


def _load_tools(monkeypatch, url: str):
    from verl.tools.utils.tool_registry import initialize_tools_from_config

    monkeypatch.setenv("DRZERO_RETRIEVER_URL", url)
    return initialize_tools_from_config(str(TOOL_CONFIG))


def _run(tool, parameters):
    async def go():
        instance_id, _ = await tool.create(create_kwargs={"data_source": "search_zero_2"})
        try:
            return await tool.execute(instance_id, parameters, agent_data=None)
        finally:
            await tool.release(instance_id)

    return asyncio.run(go())


def test_tool_config_schema_is_the_one_prompts_render():
    config = yaml.safe_load(TOOL_CONFIG.read_text())
    (tool,) = config["tools"]
    assert tool["class_name"] == "drzero.rollout.search_tool.SearchTool"
    assert tool["config"]["type"] == "native"
    assert tool["tool_schema"] == SEARCH_TOOL_SCHEMA


def test_verl_loads_the_tool_and_it_returns_search_r1_text(monkeypatch, retriever, demo_db):
    from verl.tools.schemas import ToolResponse

    from drzero.rollout.search_tool import SearchTool

    (tool,) = _load_tools(monkeypatch, f"{retriever.url}/retrieve")
    assert isinstance(tool, SearchTool) and tool.name == "search"
    response, reward, metrics = _run(tool, {"query_list": ["Federated Learning", "Motion Planning"]})
    assert isinstance(response, ToolResponse) and isinstance(reward, float)
    result = json.loads(response.text)["result"]
    first, second = result.split("\n---\n")
    assert first.startswith("Doc 1 (Title: ") and "Doc 3 (Title: " in first and "Doc 4" not in first
    assert "Motion Planning" in second
    assert metrics == {"status": 1, "query_count": 2, "hits": 6, "seconds": metrics["seconds"]}
    assert all(isinstance(v, (int, float)) for v in metrics.values())


@pytest.mark.parametrize("parameters", [{}, {"query_list": []}, {"query_list": [1, 2]}, {"query_list": ["  "]},
                                        "not a dict"])
def test_bad_parameters_come_back_as_text(monkeypatch, retriever, parameters):
    (tool,) = _load_tools(monkeypatch, f"{retriever.url}/retrieve")
    response, reward, metrics = _run(tool, parameters)
    assert "query_list" in json.loads(response.text)["result"] and metrics["status"] == 0


def test_a_refused_query_says_why_and_the_others_are_answered(monkeypatch, retriever):
    (tool,) = _load_tools(monkeypatch, f"{retriever.url}/retrieve")
    response, _, metrics = _run(tool, {"query_list": ["x" * 5000, "federated learning"]})
    first, second = json.loads(response.text)["result"].split("\n---\n")
    assert first.startswith("Search refused: queries[0]: query is 5000 characters")
    assert second.startswith("Doc 1 (Title: ")
    assert metrics["seconds"] < 1.0  # no backoff spent


def test_a_rejected_request_is_not_retried_and_says_why(monkeypatch, retriever):
    (tool,) = _load_tools(monkeypatch, f"{retriever.url}/retrieve")
    response, _, metrics = _run(tool, {"query_list": ["x" * 2000] * 51})  # over --max-request-chars
    text = json.loads(response.text)["result"]
    assert text.startswith("Search failed: retriever rejected the request: queries: the queries hold")
    assert metrics["status"] == 0 and metrics["seconds"] < 1.0  # no backoff spent on a 4xx


def test_retriever_down_gives_an_error_text_not_an_exception():
    from drzero.rollout.search_tool import SearchTool

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    tool = SearchTool({"type": "native", "retrieval_service_url": f"http://127.0.0.1:{port}/retrieve",
                       "retries": 2, "backoff": 0.01})
    response, _, metrics = _run(tool, {"query_list": ["anything"]})
    assert "retriever unreachable" in json.loads(response.text)["result"] and metrics["status"] == 0


def test_a_slow_retriever_times_out_into_an_error_text():
    from drzero.rollout.search_tool import SearchTool

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_stall():  # accepts connections and never answers
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stall, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/retrieve"
        tool = SearchTool({"type": "native", "retrieval_service_url": url, "timeout": 0.3, "retries": 1,
                           "backoff": 0.01})
        response, _, metrics = _run(tool, {"query_list": ["anything"]})
        assert "timed out" in json.loads(response.text)["result"] and metrics["status"] == 0
        assert len(accepted) == 2  # the first try and one retry
    finally:
        stop.set()
        thread.join()
        listener.close()
        for connection in accepted:
            connection.close()
