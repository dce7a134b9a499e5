"""`python -m drzero.verl.hf.server`: a real server process answering drzero's own rollout client.

The proposer reward probes the solver through ``AgentRolloutClient``; with ``--engine hf`` this server
stands where SGLang stands. The model is the offline tiny ChatML model (random weights), so the test
checks the wire shape and limits, not the words.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port


@pytest.fixture(scope="module")
def hf_server(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from drzero.tools.tiny_chatml import build_tiny_model

    model_dir = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.save_pretrained(model_dir)
    build_tiny_model(tokenizer, hidden_size=32, layers=1).save_pretrained(model_dir)
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "hf_server.log"
    process = subprocess.Popen([sys.executable, "-m", "drzero.verl.hf.server", "--model", str(model_dir),
                                "--port", str(port), "--device", "cpu"], stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"hf_server did not start:\n{log.read_text()}")
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _stop_ids(tokenizer_dir) -> set[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None}


def test_chat_completion_has_sglangs_shape_and_honours_max_tokens(hf_server):
    status, reply = post(hf_server + "/v1/chat/completions", {
        "model": "solver", "messages": [{"role": "user", "content": "Who founded Kreidol College?"}],
        "max_tokens": 5, "temperature": 0})
    assert status == 200
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    # "length" means the limit was spent exactly; "stop" means a stop token came first
    tokens = reply["usage"]["completion_tokens"]
    assert (choice["finish_reason"], tokens) in [("length", 5)] + [("stop", n) for n in range(1, 6)]
    again = post(hf_server + "/v1/chat/completions", {
        "model": "solver", "messages": [{"role": "user", "content": "Who founded Kreidol College?"}],
        "max_tokens": 5, "temperature": 0})[1]
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]  # temperature 0 is greedy
    status, reply = post(hf_server + "/v1/completions", {"model": "solver", "prompt": "Kreidol", "max_tokens": 3})
    tokens = reply["usage"]["completion_tokens"]
    assert status == 200 and (reply["choices"][0]["finish_reason"], tokens) in \
        [("length", 3)] + [("stop", n) for n in range(1, 4)]
    status, reply = post(hf_server + "/v1/chat/completions", {"model": "solver", "messages": []})
    assert status == 400 and "messages" in reply["message"]


def test_generate_takes_token_ids_and_answers_in_sglangs_native_shape(hf_server, tiny_tokenizer_dir):
    status, reply = post(hf_server + "/generate", {"input_ids": [5, 6, 7],
                                                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert status == 200
    ids, finish = reply["output_ids"], reply["meta_info"]["finish_reason"]["type"]
    stops = _stop_ids(tiny_tokenizer_dir)
    if finish == "length":   # the limit spent, no stop token in it
        assert len(ids) == 4 and not stops & set(ids)
    else:                    # a stop token ends the output and is kept, nothing after it
        assert finish == "stop" and ids[-1] in stops and not stops & set(ids[:-1]) and len(ids) <= 4
    assert reply["meta_info"]["completion_tokens"] == len(reply["output_ids"])
    status, reply = post(hf_server + "/generate", {"text": "no ids"})
    assert status == 400 and "input_ids" in reply["message"]


@pytest.mark.parametrize("api", ["generate", "chat"])
def test_drzero_rollout_client_runs_against_it(hf_server, tiny_tokenizer_dir, api):
    from transformers import AutoTokenizer

    from drzero.rollout.client import AgentRolloutClient, GenerationSettings
    from drzero.rollout.search import SearchSettings

    # the probes' default is "generate" (rendered as verl renders, token ids over /generate)
    client = AgentRolloutClient(GenerationSettings(base_url=hf_server, model="solver", max_turns=2, api=api,
                                                   max_response_tokens=24, temperature=1.0),
                                SearchSettings(url="http://127.0.0.1:9/retrieve", retries=0),
                                tokenizer=AutoTokenizer.from_pretrained(tiny_tokenizer_dir))

    async def roll():
        try:
            return await asyncio.gather(*[client.run([{"role": "user", "content": f"question {i}"}])
                                          for i in range(3)])
        finally:
            await client.aclose()

    trajectories = asyncio.run(roll())
    assert all(t.stop_reason != "error" and t.assistant_turns for t in trajectories), \
        [(t.stop_reason, t.error) for t in trajectories]
    assert all(t.response_tokens <= 24 for t in trajectories)
