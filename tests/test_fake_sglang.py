"""The fake SGLang server: SGLang's OpenAI-compatible wire format over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

import httpx
import pytest

from drzero.prompts import SEARCH_TOOL_SCHEMA, parse_tool_calls, solver_messages
from fake_sglang import (MALFORMED_TOOL_CALL, RAMBLE_WORDS, Conversation, FakeSGLang, Faults, Reply,
                         SearchThenAnswer, Turn, malformed_tool_call, never_answers, parse_chatml, rambles,
                         search_call)

Q1, Q2 = "Where is the Tessaly Institute?", "Who wrote Sparse Lattice Codes?"


def render_chatml(messages: list[dict], tools: list[dict] | None = None) -> str:
    """The ChatML a Qwen-style template renders: tools in the system turn, tool results as user turns."""
    system = "You are a helpful assistant."
    if tools:
        system += "\n\n# Tools\n\nFunctions are described inside <tools></tools>:\n<tools>\n"
        system += "\n".join(json.dumps(tool) for tool in tools) + "\n</tools>"
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
    for message in messages:
        if message["role"] == "tool":
            prompt += f"<|im_start|>user\n<tool_response>\n{message['content']}\n</tool_response><|im_end|>\n"
        else:
            prompt += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return prompt + "<|im_start|>assistant\n"


def client(base_url: str, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=False)


def chat(http: httpx.Client, messages: list[dict], **extra) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "solver", "messages": messages, **extra})


def complete(http: httpx.Client, prompt: str, **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "solver", "prompt": prompt, **extra})


def generate(http: httpx.Client, api: str, messages: list[dict], **extra) -> str:
    """One assistant turn through either API; returns its text."""
    if api == "chat":
        response = chat(http, messages, tools=[SEARCH_TOOL_SCHEMA], **extra)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]
    response = complete(http, render_chatml(messages, [SEARCH_TOOL_SCHEMA]), **extra)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def agent(http: httpx.Client, api: str, question: str, max_turns: int = 4) -> tuple[list[str], str | None]:
    """A minimal agent loop: follow tool calls with a canned search result until the model answers."""
    messages = solver_messages(question)
    turns = []
    for _ in range(max_turns):
        text = generate(http, api, messages)
        turns.append(text)
        messages.append({"role": "assistant", "content": text})
        calls = parse_tool_calls(text)
        if not calls:
            answer = re.search(r"<answer>(.*?)</answer>", text)
            return turns, answer.group(1) if answer else None
        for call in calls:
            result = f"Doc 1 about {call.queries[0]}" if call.valid else f"Invalid tool call: {call.error}."
            messages.append({"role": "tool", "content": json.dumps({"result": result})})
    return turns, None


# -- endpoints and wire format -------------------------------------------------------------------


def test_health_models_and_unhealthy():
    fake = FakeSGLang(never_answers, model="solver")
    with fake.serve() as base_url, client(base_url) as http:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        health = http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        models = http.get("/v1/models").json()
        assert models["object"] == "list"
        assert [(m["id"], m["object"]) for m in models["data"]] == [("solver", "model")]
        fake.healthy = False
        assert http.get("/health").status_code == 503
        fake.healthy = True
        assert http.get("/health").status_code == 200
    assert fake.generate_calls == 0


def test_chat_completion_wire_format():
    fake = FakeSGLang(SearchThenAnswer({Q1: ["Ravenport"]}))
    body = {"model": "solver", "messages": solver_messages(Q1), "tools": [SEARCH_TOOL_SCHEMA],
            "temperature": 1.0, "top_p": 1.0, "max_tokens": 512, "stop": ["<|im_end|>"], "n": 1}
    with fake.serve() as base_url, client(base_url) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    reply = response.json()
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage"}
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and reply["model"] == "solver"
    (choice,) = reply["choices"]
    assert set(choice) == {"index", "message", "finish_reason"} and choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": search_call(Q1), "tool_calls": None}
    assert choice["finish_reason"] == "stop"
    usage = reply["usage"]
    assert all(isinstance(usage[key], int) for key in ("prompt_tokens", "completion_tokens", "total_tokens"))
    assert usage["completion_tokens"] == len(search_call(Q1).split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 50
    # the tool call the client will parse out of the text
    (call,) = parse_tool_calls(choice["message"]["content"])
    assert call.valid and call.queries == [Q1]
    assert fake.requests == [body] and fake.generate_calls == 1
    (seen,) = fake.conversations
    assert seen.api == "chat" and seen.request == body and seen.tools == [SEARCH_TOOL_SCHEMA]
    assert seen.question == Q1 and seen.turns == [Turn("user", solver_messages(Q1)[0]["content"])]


def test_completions_wire_format():
    fake = FakeSGLang(SearchThenAnswer({Q1: ["Ravenport"]}))
    prompt = render_chatml(solver_messages(Q1), [SEARCH_TOOL_SCHEMA])
    with fake.serve() as base_url, client(base_url) as http:
        response = complete(http, prompt, max_tokens=512, temperature=0.7, stop=["<|im_end|>"])
    assert response.status_code == 200
    reply = response.json()
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage"}
    assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion"
    assert isinstance(reply["created"], int) and reply["model"] == "solver"
    (choice,) = reply["choices"]
    assert choice == {"index": 0, "text": search_call(Q1), "finish_reason": "stop", "logprobs": None}
    assert reply["usage"]["prompt_tokens"] == len(prompt.split())
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    (seen,) = fake.conversations
    assert seen.api == "completions" and seen.question == Q1 and seen.tools == [SEARCH_TOOL_SCHEMA]


# -- ChatML parsing ------------------------------------------------------------------------------


def test_chatml_prompt_is_parsed_back_into_turns():
    messages = solver_messages(Q1) + [
        {"role": "assistant", "content": search_call(Q1)},
        {"role": "tool", "content": '{"result": "Doc 1 (Title: Tessaly) It is in Ravenport."}'},
        {"role": "assistant", "content": "<think>one more</think>\n<tool_call>{}</tool_call>"},
        {"role": "tool", "content": "line one\nline two"},
    ]
    turns, prefill = parse_chatml(render_chatml(messages, [SEARCH_TOOL_SCHEMA]))
    assert prefill == ""
    assert turns[0].role == "system" and "<tools>" in turns[0].content
    assert turns[1:] == [Turn(m["role"], m["content"]) for m in messages]
    conversation = Conversation(turns=turns, api="completions", request={})
    assert conversation.question == Q1
    assert conversation.assistant_turns == [messages[1]["content"], messages[3]["content"]]
    assert conversation.tool_responses == [messages[2]["content"], "line one\nline two"]

    # several results in one user turn (Qwen2.5 merges consecutive tool messages), a prefill, plain text
    merged = ("<|im_start|>user\nQuestion: q?<|im_end|>\n<|im_start|>user\n<tool_response>\na\n</tool_response>\n"
              "<tool_response>\nb\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>")
    turns, prefill = parse_chatml(merged)
    assert turns == [Turn("user", "Question: q?"), Turn("tool", "a"), Turn("tool", "b")] and prefill == "<think>"
    assert parse_chatml("just text") == ([Turn("user", "just text")], "")
    with pytest.raises(ValueError, match="not closed"):
        parse_chatml("<|im_start|>user\nno end<|im_start|>assistant\n")


def test_question_property():
    def conversation(*turns):
        return Conversation(turns=[Turn(*t) for t in turns], api="chat", request={})

    assert conversation(("user", "Answer it.\nQuestion:  What?  ")).question == "What?"
    assert conversation(("user", "Question: a? Question: b?")).question == "b?"
    assert conversation(("system", "Question: not me"), ("user", "no marker")).question is None
    assert conversation(("user", "Question: first?"), ("user", "Question: second?")).question == "first?"
    assert conversation().question is None


def test_project_chat_template_gives_the_same_conversation_as_the_chat_api():
    """Render with drzero's own ChatML template (as transformers would) and compare both APIs."""
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from drzero.tools.tiny_chatml import CHAT_TEMPLATE

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, **_: json.dumps(value, ensure_ascii=False)
    messages = solver_messages(Q1) + [
        {"role": "assistant", "content": search_call(Q1)},
        {"role": "tool", "content": '{"result": "Doc 1 (Title: T) Ravenport <b>"}'},
    ]
    prompt = environment.from_string(CHAT_TEMPLATE).render(messages=messages, tools=[SEARCH_TOOL_SCHEMA],
                                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    fake = FakeSGLang(SearchThenAnswer({Q1: ["Ravenport"]}))
    with fake.serve() as base_url, client(base_url) as http:
        by_chat = chat(http, messages, tools=[SEARCH_TOOL_SCHEMA]).json()["choices"][0]["message"]["content"]
        by_completion = complete(http, prompt).json()["choices"][0]["text"]
    assert by_chat == by_completion == "<think>The results answer it.</think>\n<answer>Ravenport</answer>"
    via_chat, via_completions = fake.conversations
    assert via_completions.turns[0].role == "system"  # the template always adds one
    assert via_completions.turns[1:] == via_chat.turns
    assert via_completions.tools == via_chat.tools == [SEARCH_TOOL_SCHEMA]


# -- policies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_search_then_answer_searches_first_and_cycles_answers_per_question(api):
    policy = SearchThenAnswer({Q1: ["Ravenport", "Oslo"]}, default=["no idea"])
    fake = FakeSGLang(policy)
    with fake.serve() as base_url, client(base_url) as http:
        turns, answer = agent(http, api, Q1)
        assert turns[0] == search_call(Q1)
        assert answer == "Ravenport" and len(turns) == 2
        answers = [agent(http, api, Q1)[1] for _ in range(4)]
        assert Counter([answer] + answers) == {"Ravenport": 3, "Oslo": 2}
        assert agent(http, api, Q2)[1] == "no idea"
        assert generate(http, api, [{"role": "user", "content": "Say hi."}]) == "<answer>unknown</answer>"
    assert policy.emitted == {Q1: 5, Q2: 1}
    assert fake.generate_calls == 2 * 6 + 1


def test_search_then_answer_with_several_searches_and_concurrent_probes():
    policy = SearchThenAnswer({Q1: ["a", "b", "c"]}, searches=2)
    fake = FakeSGLang(policy, faults=Faults(latency_s=0.05))
    with fake.serve() as base_url, client(base_url) as http:
        turns, answer = agent(http, "chat", Q1)
        assert [len(parse_tool_calls(turn)) for turn in turns] == [1, 1, 0] and answer == "a"

        async def probes():
            async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as async_http:
                async def probe():
                    messages = solver_messages(Q1)
                    while True:
                        response = await async_http.post("/v1/chat/completions",
                                                         json={"model": "solver", "messages": messages})
                        text = response.json()["choices"][0]["message"]["content"]
                        if "<answer>" in text:
                            return re.search(r"<answer>(.*?)</answer>", text).group(1)
                        messages = messages + [{"role": "assistant", "content": text},
                                               {"role": "tool", "content": "results"}]
                return await asyncio.gather(*(probe() for _ in range(5)))

        assert Counter(asyncio.run(probes())) == {"b": 2, "c": 2, "a": 1}


def test_never_answers_and_malformed_tool_call_policies():
    start = Conversation(turns=[Turn("user", solver_messages(Q1)[0]["content"])], api="chat", request={})
    later = Conversation(turns=start.turns + [Turn("assistant", MALFORMED_TOOL_CALL), Turn("tool", "bad call")],
                         api="chat", request={})
    for conversation in (start, later):
        (call,) = parse_tool_calls(never_answers(conversation).text)
        assert call.valid and call.queries == [Q1]
    assert malformed_tool_call(start).text == MALFORMED_TOOL_CALL
    (call,) = parse_tool_calls(malformed_tool_call(start).text)
    assert not call.valid
    assert malformed_tool_call(later).text == "<answer>x</answer>"
    fake = FakeSGLang(malformed_tool_call)
    with fake.serve() as base_url, client(base_url) as http:
        for api in ("chat", "completions"):
            turns, answer = agent(http, api, Q1)
            assert turns == [MALFORMED_TOOL_CALL, "<answer>x</answer>"] and answer == "x"


def test_policy_may_return_a_string_or_be_async_and_its_errors_are_500s():
    async def slow_policy(conversation: Conversation) -> str:
        await asyncio.sleep(0.01)
        return f"you said {conversation.turns[-1].content}"

    def broken(conversation: Conversation) -> Reply:
        raise KeyError("boom")

    with FakeSGLang(slow_policy).serve() as base_url, client(base_url) as http:
        assert generate(http, "chat", [{"role": "user", "content": "hi"}]) == "you said hi"
    with FakeSGLang(broken).serve() as base_url, client(base_url) as http:
        response = chat(http, [{"role": "user", "content": "hi"}])
        assert response.status_code == 500 and "KeyError" in response.json()["message"]


# -- limits and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_max_tokens_cuts_the_reply_with_finish_reason_length(api):
    with FakeSGLang(rambles).serve() as base_url, client(base_url) as http:
        messages = solver_messages(Q1)
        send = (lambda **kw: chat(http, messages, **kw)) if api == "chat" \
            else (lambda **kw: complete(http, render_chatml(messages), **kw))
        text_of = (lambda c: c["message"]["content"]) if api == "chat" else (lambda c: c["text"])

        cut = send(max_tokens=64).json()
        assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 64
        text = text_of(cut["choices"][0])
        assert text.startswith("<think>") and len(text.split()) == 64 and "</think>" not in text
        assert rambles(None).text.startswith(text)

        whole = send().json()
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert len(text_of(whole["choices"][0]).split()) == RAMBLE_WORDS == whole["usage"]["completion_tokens"]
        assert send(max_tokens=RAMBLE_WORDS).json()["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_cut_before_the_match():
    with FakeSGLang(SearchThenAnswer({Q1: ["x"]})).serve() as base_url, client(base_url) as http:
        text = generate(http, "chat", solver_messages(Q1), stop=["</tool_call>", "never"])
        assert text == search_call(Q1).removesuffix("</tool_call>")
        reply = chat(http, solver_messages(Q1), stop="</tool_call>", max_tokens=3).json()["choices"][0]
        assert reply["finish_reason"] == "length" and len(reply["message"]["content"].split()) == 3


def test_wrong_model_is_404_and_bad_bodies_are_400():
    fake = FakeSGLang(never_answers, model="solver")
    with fake.serve() as base_url, client(base_url) as http:
        for path, body in [("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "q"}]}),
                           ("/v1/completions", {"model": "x", "prompt": "q"})]:
            response = http.post(path, json=body)
            assert response.status_code == 404
            assert response.json() == {"object": "error", "message": "The model `x` does not exist.",
                                       "type": "NotFoundError", "code": 404}
        bad = [
            ("/v1/chat/completions", {"model": "solver"}),
            ("/v1/chat/completions", {"model": "solver", "messages": []}),
            ("/v1/chat/completions", {"model": "solver", "messages": [{"role": "robot", "content": "q"}]}),
            ("/v1/chat/completions", {"model": "solver", "messages": [{"role": "user", "content": "q"}], "n": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}),
            ("/v1/completions", {"model": "solver", "prompt": "q", "max_tokens": -1}),
            ("/v1/completions", {"model": "solver", "prompt": "<|im_start|>user\nq<|im_start|>assistant\n"}),
            ("/v1/completions", {"model": "solver", "prompt": ["q"]}),
            ("/v1/completions", ["not", "an", "object"]),
        ]
        for path, body in bad:
            response = http.post(path, json=body)
            assert response.status_code == 400, body
            error = response.json()
            assert error["object"] == "error" and error["code"] == 400 and error["type"] == "BadRequestError"
            assert error["message"]
        broken = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "JSON" in broken.json()["message"]
        assert http.get("/health").status_code == 200
    assert fake.generate_calls == 2 + len(bad) + 1 and len(fake.requests) == 2 + len(bad)


# -- faults --------------------------------------------------------------------------------------


def test_fail_first_and_fail_every():
    fake = FakeSGLang(never_answers, faults=Faults(fail_first=2))
    with fake.serve() as base_url, client(base_url) as http:
        statuses = [chat(http, solver_messages(Q1)).status_code for _ in range(3)]
        assert statuses == [500, 500, 200]
        fake.faults = Faults(fail_every=3, fail_status=503)
        responses = [chat(http, solver_messages(Q1)) for _ in range(4)]  # generate requests 4 to 7
        assert [r.status_code for r in responses] == [200, 200, 503, 200]
        assert responses[2].json() == {"object": "error", "message": "injected fault on generate request 6",
                                       "type": "ServiceUnavailableError", "code": 503}
    assert fake.generate_calls == 7


def test_hang_times_out_the_client_and_the_server_stays_healthy():
    fake = FakeSGLang(never_answers, faults=Faults(hang_s=30))
    with fake.serve() as base_url:
        with client(base_url, timeout=0.3) as http, pytest.raises(httpx.TimeoutException):
            chat(http, solver_messages(Q1))
        with client(base_url) as http:
            assert http.get("/health").status_code == 200
            fake.faults.hang_s = 0
            assert chat(http, solver_messages(Q1)).status_code == 200
        with client(base_url, timeout=0.2) as http, pytest.raises(httpx.TimeoutException):
            fake.faults.hang_s = 30
            chat(http, solver_messages(Q1))
        closing = time.perf_counter()
    assert time.perf_counter() - closing < 1.0  # hanging requests do not hold up shutdown


def test_latency_is_honoured():
    fake = FakeSGLang(never_answers, faults=Faults(latency_s=0.25))
    with fake.serve() as base_url, client(base_url) as http:
        started = time.perf_counter()
        assert chat(http, solver_messages(Q1)).status_code == 200
        assert 0.25 <= time.perf_counter() - started < 1.0
        started = time.perf_counter()
        assert http.get("/health").status_code == 200  # only generate requests wait
        assert time.perf_counter() - started < 0.2


def test_max_in_flight_counts_concurrent_requests():
    fake = FakeSGLang(SearchThenAnswer({}, default=["a"], searches=0), faults=Faults(latency_s=0.2))

    async def burst(base_url: str, count: int) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as http:
            responses = await asyncio.gather(*(
                http.post("/v1/chat/completions", json={"model": "solver", "messages": solver_messages(f"q{i}")})
                for i in range(count)))
        return [r.status_code for r in responses]

    with fake.serve() as base_url:
        started = time.perf_counter()
        assert asyncio.run(burst(base_url, 20)) == [200] * 20
        assert time.perf_counter() - started < 1.0
    assert 10 <= fake.max_in_flight <= 20 and fake.in_flight == 0 and fake.generate_calls == 20


def test_hundreds_of_concurrent_requests_take_about_one_latency():
    """The benchmark's load. Driven with aiohttp: httpx's own pool is the slow side at this
    concurrency (encode/httpx#3215), and this test is about the server."""
    aiohttp = pytest.importorskip("aiohttp")
    fake = FakeSGLang(SearchThenAnswer({}, default=["a"], searches=0), faults=Faults(latency_s=0.2))

    async def burst(base_url: str, count: int) -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count)) as http:
            async def one(i: int) -> int:
                body = {"model": "solver", "messages": solver_messages(f"q{i}")}
                async with http.post(f"{base_url}/v1/chat/completions", json=body) as response:
                    assert (await response.json())["choices"][0]["message"]["content"].endswith("<answer>a</answer>")
                    return response.status
            return list(await asyncio.gather(*(one(i) for i in range(count))))

    with fake.serve() as base_url:
        started = time.perf_counter()
        assert asyncio.run(burst(base_url, 256)) == [200] * 256
        assert time.perf_counter() - started < 1.5
    assert fake.max_in_flight >= 128 and fake.in_flight == 0 and len(fake.requests) == 256


def test_serve_starts_and_stops_fast_and_can_serve_again():
    fake = FakeSGLang(never_answers)
    for _ in range(2):
        started = time.perf_counter()
        with fake.serve() as base_url, client(base_url) as http:
            assert chat(http, solver_messages(Q1)).status_code == 200
        assert time.perf_counter() - started < 1.0
        with pytest.raises(httpx.ConnectError), client(base_url, timeout=1) as http:
            http.get("/health")
