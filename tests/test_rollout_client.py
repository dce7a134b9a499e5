"""The agent rollout client and the proposer reward against the stand-in SGLang server and a real retriever."""

import asyncio
import json

import pytest

from drzero.prompts import solver_messages
from drzero.rewards import proposer
from drzero.rollout.client import AgentRolloutClient, GenerationSettings
from drzero.rollout.search import SearchSettings
from fake_sglang import FakeSGLang, Faults, SearchThenAnswer, malformed_tool_call, never_answers, rambles

QUESTION = "Which institution employs the first author of Sparse Lattice Codes?"


def _client(base_url, retriever_url, api="chat", tokenizer=None, **settings):
    defaults = {"retries": 2, "backoff": 0.01, "timeout": 5.0, "max_turns": 5}
    generation = GenerationSettings(base_url=base_url, model="solver", api=api, **{**defaults, **settings})
    return AgentRolloutClient(generation, SearchSettings(url=retriever_url, retries=1, backoff=0.01),
                              tokenizer=tokenizer)


def _rollouts(client, conversations):
    async def go():
        try:
            return await client.run_many(conversations)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("api", ["chat", "generate"])
def test_search_then_answer_over_both_apis(api, retriever, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir) if api == "generate" else None
    fake = FakeSGLang(SearchThenAnswer({QUESTION: ["Tessaly Institute"]}, searches=2), tokenizer=tokenizer)
    with fake.serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve", api, tokenizer),
                                  [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "answer" and trajectory.final_answer == "Tessaly Institute"
    assert len(trajectory.assistant_turns) == 3 and trajectory.valid_tool_calls == 2
    tool_turns = [m for m in trajectory.messages if m["role"] == "tool"]
    assert len(tool_turns) == 2
    assert json.loads(tool_turns[0]["content"])["result"].startswith("Doc 1 (Title: ")  # real retriever hits
    # the server saw the search results in the conversation of the last turn
    assert len(fake.conversations[-1].tool_responses) == 2
    if api == "generate":
        prompt = tokenizer.decode(fake.requests[-1]["input_ids"])
        assert prompt.endswith("<|im_start|>assistant\n") and "<tools>" in prompt
        assert '{"type": "function", "function": {"name": "search"' in prompt  # verl's tool schema
    else:
        assert fake.requests[-1]["tools"][0]["function"]["name"] == "search"


def test_a_model_that_never_answers_stops_at_max_turns(retriever):
    with FakeSGLang(never_answers).serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve", max_turns=3),
                                  [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "max_turns" and trajectory.final_answer is None
    assert trajectory.tool_calls == 3


def test_a_response_cut_at_max_tokens_stops_the_rollout(retriever):
    with FakeSGLang(rambles).serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve", max_response_tokens=300),
                                  [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "max_tokens" and trajectory.response_tokens == 300


def test_malformed_tool_call_json_gets_an_error_turn_and_the_rollout_goes_on(retriever):
    with FakeSGLang(malformed_tool_call).serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve"), [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "answer" and trajectory.final_answer == "x"
    assert trajectory.tool_calls == 1 and trajectory.valid_tool_calls == 0
    tool_turn = next(m for m in trajectory.messages if m["role"] == "tool")
    assert "Invalid tool call: tool call is not JSON" in json.loads(tool_turn["content"])["result"]


def test_5xx_is_retried_with_backoff(retriever):
    fake = FakeSGLang(SearchThenAnswer({QUESTION: ["A"]}), faults=Faults(fail_first=2))
    with fake.serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve"), [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "answer" and fake.generate_calls == 4  # 2 failures + 2 turns


@pytest.mark.parametrize("faults,expected", [
    (Faults(fail_first=100), "inference server answered 500 (after 3 attempts)"),
    (Faults(hang_s=30), "inference server timed out after 1s (after 3 attempts)"),
])
def test_a_server_that_keeps_failing_ends_the_rollout_with_a_reason(retriever, faults, expected):
    with FakeSGLang(never_answers, faults=faults).serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve", timeout=1.0),
                                  [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "error" and trajectory.error == expected


def test_a_rejected_request_is_not_retried(retriever):
    fake = FakeSGLang(never_answers, model="someone-else")
    with fake.serve() as base_url:
        (trajectory,) = _rollouts(_client(base_url, f"{retriever.url}/retrieve"), [solver_messages(QUESTION)])
    assert trajectory.stop_reason == "error" and "404" in trajectory.error and fake.generate_calls == 1


def test_one_global_bound_on_requests_in_flight(retriever):
    fake = FakeSGLang(SearchThenAnswer({}, default=["a"]), faults=Faults(latency_s=0.05))
    with fake.serve() as base_url:
        trajectories = _rollouts(_client(base_url, f"{retriever.url}/retrieve", concurrency=4),
                                 [solver_messages(f"{QUESTION} {i}") for i in range(24)])
    assert all(t.stop_reason == "answer" for t in trajectories)
    assert fake.max_in_flight == 4


# -- the proposer reward with real probes ------------------------------------------------------

PROPOSAL = ("<think>who</think>" '<tool_call>{"name": "search", "arguments": {"query_list": ["Mira Okafor"]}}'
            "</tool_call>\nuser\n<tool_response>\n{\"result\": \"Doc 1 (Title: Mira Okafor) works at the Tessaly "
            "Institute\"}\n</tool_response>\nassistant\n<think>done</think>"
            f"<question>{QUESTION}</question><answer>Tessaly Institute</answer>")
EXTRA = {"hops": 2, "seed_document": "(Title: Sparse Lattice Codes) by Mira Okafor."}


@pytest.mark.parametrize("answers,k,difficulty", [
    (["Tessaly Institute"] * 5, 5, 0.0),                       # too easy
    (["Tessaly Institute", "the tessaly institute", "x", "y", "z"], 2, 0.75),
    (["x"] * 5, 0, 0.0),                                        # nobody finds it
])
def test_proposer_reward_counts_matching_probes(retriever, answers, k, difficulty, tiny_tokenizer_dir):
    fake = FakeSGLang(SearchThenAnswer({QUESTION: answers}), tokenizer=_tokenizer(tiny_tokenizer_dir))
    with fake.serve() as base_url:
        result = asyncio.run(proposer.compute_score(
            "search_zero_2", PROPOSAL, {"target": None}, EXTRA, base_url=base_url, model_name="solver", n=5,
            retriever_url=f"{retriever.url}/retrieve", retries=1, timeout=5.0, tokenizer=str(tiny_tokenizer_dir)))
    assert result["k"] == k and result["difficulty"] == difficulty
    assert result["format"] == 1.0 and result["score"] == 0.5 + difficulty
    assert fake.generate_calls == 10  # 5 probes x (search turn + answer turn)
    assert {c.question for c in fake.conversations} == {QUESTION}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_proposer_reward_when_the_solver_server_is_down_scores_format_only(retriever, caplog, tiny_tokenizer_dir):
    with FakeSGLang(never_answers, faults=Faults(fail_first=1000),
                    tokenizer=_tokenizer(tiny_tokenizer_dir)).serve() as base_url:
        result = asyncio.run(proposer.compute_score(
            "search_zero_2", PROPOSAL, None, EXTRA, base_url=base_url, retries=1, timeout=2.0,
            retriever_url=f"{retriever.url}/retrieve", tokenizer=str(tiny_tokenizer_dir)))
    assert result["probe_errors"] == 5 and result["reason"] == proposer.REASON_PROBES_FAILED
    assert result["score"] == 0.5 and result["difficulty"] == 0.0
    assert result["n"] == 0 and result["probes_incomplete"] == 1.0
    assert "every solver probe failed" in caplog.text


class FailsTheFirstTurnOf:
    """A solver whose first turn fails (500, retries off) for the first ``failing`` probes; the rest answer."""

    def __init__(self, failing: int, answers: list[str]):
        self.failing, self.policy, self.first_turns = failing, SearchThenAnswer({QUESTION: answers}), 0

    def __call__(self, conversation):
        if not conversation.tool_responses and not conversation.assistant_turns:
            self.first_turns += 1
            if self.first_turns <= self.failing:
                raise RuntimeError("injected solver failure")
        return self.policy(conversation)


@pytest.mark.parametrize("failing, answers, k, n, difficulty, incomplete", [
    # 3 right + 2 errors: the old count said difficulty (5-3)/4 = 0.5; over completed probes k = n = 3 -> 0
    (2, ["Tessaly Institute"] * 3, 3, 3, 0.0, 0.0),
    (2, ["Tessaly Institute", "x", "x"], 1, 3, 1.0, 0.0),
    # one completed probe cannot measure difficulty: format reward only, and counted
    (4, ["Tessaly Institute"], 1, 1, 0.0, 1.0),
])
def test_probe_errors_are_left_out_of_k_and_n(retriever, tiny_tokenizer_dir, failing, answers, k, n, difficulty,
                                             incomplete):
    fake = FakeSGLang(FailsTheFirstTurnOf(failing, answers), tokenizer=_tokenizer(tiny_tokenizer_dir))
    with fake.serve() as base_url:
        result = asyncio.run(proposer.compute_score(
            "search_zero_2", PROPOSAL, None, EXTRA, base_url=base_url, n=5, retries=0, timeout=5.0,
            retriever_url=f"{retriever.url}/retrieve", tokenizer=str(tiny_tokenizer_dir), concurrency=1))
    assert (result["k"], result["n"], result["probe_errors"]) == (k, n, 5 - n)
    assert result["difficulty"] == difficulty and result["probes_incomplete"] == incomplete
    assert result["score"] == 0.5 + difficulty


def test_proposer_reward_with_the_retriever_down_still_scores(tmp_path, tiny_tokenizer_dir):
    fake = FakeSGLang(SearchThenAnswer({QUESTION: ["Tessaly Institute", "x", "x", "x", "x"]}),
                      tokenizer=_tokenizer(tiny_tokenizer_dir))
    with fake.serve() as base_url:
        result = asyncio.run(proposer.compute_score(
            "search_zero_2", PROPOSAL, None, EXTRA, base_url=base_url, retriever_url="http://127.0.0.1:9/retrieve",
            retries=1, timeout=5.0, tokenizer=str(tiny_tokenizer_dir)))
    assert result["k"] == 1 and result["difficulty"] == 1.0
    failed = [t for c in fake.conversations for t in c.tool_responses]
    assert failed and all("Search failed: retriever unreachable" in t for t in failed)


def test_proposer_reward_through_verls_reward_loop(retriever, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from drzero.rewards.wiring import reward_overrides
    from verl_harness import compose_ppo_config, response_batch, score_with_verl

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fake = FakeSGLang(SearchThenAnswer({QUESTION: ["Tessaly Institute", "x", "x", "x", "x"]}), tokenizer=tokenizer)
    with fake.serve() as base_url:
        config = compose_ppo_config([f"actor_rollout_ref.model.path={tiny_tokenizer_dir}",
                                     "actor_rollout_ref.rollout.name=sglang",
                                     *reward_overrides("challenger", {"base_url": base_url, "n": 5,
                                                                      "retriever_url": f"{retriever.url}/retrieve",
                                                                      "timeout": 5.0,
                                                                      "tokenizer": str(tiny_tokenizer_dir)})])
        batch = response_batch(tokenizer, [
            {"response": PROPOSAL, "data_source": "search_zero_2", "ground_truth": {"target": None},
             "extra_info": EXTRA},
            {"response": "<think>gave up</think>", "data_source": "search_zero_3", "ground_truth": {"target": None},
             "extra_info": {"hops": 3, "seed_document": "x"}},
        ])
        first, second = score_with_verl(config, batch)
    assert first["reward_score"] == pytest.approx(0.5 + 1.0)  # k=1 of 5
    assert second["reward_score"] == 0.0
    assert set(first["reward_extra_info"]) == set(second["reward_extra_info"])  # same keys, every sample
    assert all(isinstance(v, float) for v in first["reward_extra_info"].values())
