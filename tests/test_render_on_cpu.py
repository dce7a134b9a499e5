"""One rendering everywhere: verl's dataset and tool agent loop, our SGLang client, our budgets.

The tiny model carries a Qwen3-style chat template that honours ``enable_thinking``; verl's own
``RLHFDataset`` and ``ToolAgentLoop`` (our budget-recording subclass, registered as verl's
``tool_agent``) run in-process against the stand-in SGLang server's ``/generate`` and a real
retriever, and the tokens they produce are compared with our client's.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from drzero.prompts import solver_messages
from drzero.rollout.client import AgentRolloutClient, GenerationSettings
from drzero.rollout.render import ChatRenderer, ToolOutputLimit, verl_tool_schemas
from drzero.rollout.search import SearchSettings
from fake_sglang import FakeSGLang, SearchThenAnswer

QUESTION = "Which institution employs the first author of Sparse Lattice Codes?"
THINKING_OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    return run_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("qwen3") / "model"), no_weights=True,
                                          chat_template="qwen3"))


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir)


def _verl_config(overrides=()):
    from omegaconf import OmegaConf

    from drzero.layout import config_dir
    from drzero.verl.overrides import compose

    config = compose([f"actor_rollout_ref.rollout.multi_turn.tool_config_path={config_dir() / 'search_tool_config.yaml'}",
                      "+data.apply_chat_template_kwargs.enable_thinking=false", *overrides])
    OmegaConf.resolve(config)
    return config


def test_the_thinking_switch_reaches_the_template(qwen3):
    off = ChatRenderer(qwen3, chat_template_kwargs=THINKING_OFF).prompt_text(solver_messages(QUESTION))
    default = ChatRenderer(qwen3).prompt_text(solver_messages(QUESTION))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert default.endswith("<|im_start|>assistant\n")


def test_prompt_is_byte_identical_in_verl_dataset_agent_loop_client_and_budget(qwen3, tmp_path):
    """RLHFDataset's overlong filter, verl's agent-loop rendering, our renderer and PromptBudget agree."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from verl.utils.chat_template import apply_chat_template
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from drzero.data.budget import PromptBudget

    config = _verl_config()
    messages = solver_messages(QUESTION)
    # verl's agent loop: tools as ToolAgentLoop dumps them, kwargs from data.apply_chat_template_kwargs
    from verl.tools.utils.tool_registry import initialize_tools_from_config

    tools = [t.tool_schema.model_dump(exclude_unset=True, exclude_none=True)
             for t in initialize_tools_from_config(config.actor_rollout_ref.rollout.multi_turn.tool_config_path)]
    kwargs = OmegaConf.to_container(config.data.apply_chat_template_kwargs)
    verl_ids = list(apply_chat_template(qwen3, messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        **kwargs))
    ours = ChatRenderer(qwen3, chat_template_kwargs=THINKING_OFF)
    assert tools == verl_tool_schemas() == ours.tools
    assert ours.prompt_ids(messages) == verl_ids
    assert PromptBudget(qwen3, THINKING_OFF).rendered_length(messages) == len(verl_ids)
    assert "<think>\n\n</think>" in qwen3.decode(verl_ids)

    # RLHFDataset drops a row whose rendering is one token over the budget, keeps it at the budget
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": messages, "data_source": "search_zero_1"}]), path)
    for budget, kept in ((len(verl_ids), 1), (len(verl_ids) - 1, 0)):
        data = OmegaConf.merge(config.data, {"max_prompt_length": budget, "filter_overlong_prompts_workers": 1})
        assert len(RLHFDataset(str(path), qwen3, data)) == kept


class _ServerManager:
    """verl's AsyncLLMServerManager.generate over HTTP to the stand-in's /generate, with the max_new_tokens
    verl's SGLang server computes (min(response, prompt + response - context))."""

    def __init__(self, base_url: str, prompt_length: int, response_length: int):
        self.base_url, self.prompt_length, self.response_length = base_url, prompt_length, response_length

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None):
        import httpx
        from verl.workers.rollout.replica import TokenOutput

        max_new = min(self.response_length, self.prompt_length + self.response_length - len(prompt_ids))
        async with httpx.AsyncClient(trust_env=False) as http:
            reply = (await http.post(f"{self.base_url}/generate", json={
                "input_ids": prompt_ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 1.0}})).json()
        return TokenOutput(token_ids=reply["output_ids"])


def _verl_rollout(qwen3, base_url, config, messages):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    from drzero.rollout.agent_loop import BudgetedToolAgentLoop

    rollout = config.actor_rollout_ref.rollout

    async def go():  # verl binds the agent loop to the event loop it is built in
        loop = BudgetedToolAgentLoop(trainer_config=DictConfigWrap(config),
                                     server_manager=_ServerManager(base_url, rollout.prompt_length,
                                                                   rollout.response_length),
                                     tokenizer=qwen3, processor=None, dataset_cls=None,
                                     data_config=DictConfigWrap(config.data))
        return await loop.run({}, raw_prompt=messages, tools_kwargs={})

    return asyncio.run(go())


def _our_rollout(qwen3, base_url, retriever_url, config, messages):
    rollout = config.actor_rollout_ref.rollout
    settings = GenerationSettings(base_url=base_url, model="solver", api="generate", max_turns=5,
                                  max_prompt_tokens=rollout.prompt_length, max_response_tokens=rollout.response_length,
                                  tool_output=ToolOutputLimit(rollout.multi_turn.max_tool_response_length),
                                  chat_template_kwargs=THINKING_OFF, retries=0, timeout=10)
    client = AgentRolloutClient(settings, SearchSettings(url=retriever_url, max_chars=1600), tokenizer=qwen3)

    async def go():
        try:
            return await client.run(messages)
        finally:
            await client.aclose()
            from drzero.rollout import search

            await search.close_sessions()

    return asyncio.run(go())


@pytest.mark.parametrize("response_length, cut", [(3072, False), (420, True)])
def test_client_tokens_equal_verls_tool_agent_loop_and_the_budget_cut_is_the_same(
        qwen3, retriever, monkeypatch, response_length, cut):
    """Same policy, same retriever: verl's ToolAgentLoop and our client produce the same response tokens,
    and end at the same place when the second search result does not fit the response budget."""
    retriever_url = f"{retriever.url}/retrieve"
    monkeypatch.setenv("DRZERO_RETRIEVER_URL", retriever_url)
    config = _verl_config([f"data.max_response_length={response_length}", "data.max_prompt_length=1024"])
    messages = solver_messages(QUESTION)
    fake = FakeSGLang(SearchThenAnswer({QUESTION: ["Tessaly Institute"]}, searches=2), tokenizer=qwen3)
    with fake.serve() as base_url:
        verl_out = _verl_rollout(qwen3, base_url, config, messages)
        verl_requests = len(fake.requests)
        ours = _our_rollout(qwen3, base_url, retriever_url, config, messages)
    # the first request each sent: the same prompt ids, byte for byte
    assert fake.requests[verl_requests]["input_ids"] == fake.requests[0]["input_ids"] == verl_out.prompt_ids
    assert qwen3.decode(verl_out.prompt_ids) == ChatRenderer(qwen3, chat_template_kwargs=THINKING_OFF).prompt_text(
        messages)
    verl_text = qwen3.decode(verl_out.response_ids, skip_special_tokens=True)
    assert ours.response_text == verl_text
    assert ours.response_tokens == len(verl_out.response_ids)
    assert bool(verl_out.extra_fields.get("budget_cut")) is cut
    assert ours.budget_cut is cut
    if cut:
        assert ours.stop_reason == "budget" and ours.final_answer is None and ours.valid_tool_calls == 2
    else:
        assert ours.stop_reason == "answer" and ours.final_answer == "Tessaly Institute"
        assert verl_text.count("<tool_response>") == 2


def test_tool_output_is_cut_as_verl_cuts_it(qwen3, monkeypatch, tmp_path):
    """verl's ToolAgentLoop._call_tool and ToolOutputLimit cut a long result identically, each side."""
    from verl.experimental.agent_loop.tool_parser import FunctionCall
    from verl.tools.schemas import ToolResponse

    from drzero.rollout.search_tool import SearchTool

    long_text = json.dumps({"result": "Doc 1 (Title: A) " + "word " * 1500})

    async def execute(self, instance_id, parameters, **kwargs):
        return ToolResponse(text=long_text), 0.0, {}

    monkeypatch.setattr(SearchTool, "execute", execute)
    for side in ("middle", "left", "right"):
        config = _verl_config([f"actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side={side}",
                               "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=700"])
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap

        from drzero.rollout.agent_loop import BudgetedToolAgentLoop

        call = FunctionCall(name="search", arguments=json.dumps({"query_list": ["x"]}))

        async def go():
            loop = BudgetedToolAgentLoop(trainer_config=DictConfigWrap(config), server_manager=None,
                                         tokenizer=qwen3, processor=None, dataset_cls=None,
                                         data_config=DictConfigWrap(config.data))
            return await loop._call_tool(call, {}, None)

        response, _, _ = asyncio.run(go())
        assert response.text == ToolOutputLimit(700, side).apply(long_text)
        assert len(response.text) <= ToolOutputLimit(700, side).longest


def test_search_tool_fits_every_passage_into_the_cap():
    from drzero.rollout.search import fitted_text

    hits = [[{"document": {"contents": f"Paper {i}\n" + "lattice obfuscation \"quoted\" " * 80}} for i in range(3)]]
    text = fitted_text(hits, 1600)
    assert len(text) <= 1600
    body = json.loads(text)["result"]
    assert all(f"Doc {i} (Title: Paper {i - 1})" in body for i in (1, 2, 3))  # no passage dropped
    assert body.count("…") == 3
    short = [[{"document": {"contents": "T\nshort body"}}]]
    assert json.loads(fitted_text(short, 1600))["result"] == "Doc 1 (Title: T) short body"


def test_tool_caps_agree_between_verl_config_and_search_tool():
    import yaml

    from drzero.layout import config_dir

    base = yaml.safe_load((config_dir() / "search_multiturn_grpo.yaml").read_text())
    tool = yaml.safe_load((config_dir() / "search_tool_config.yaml").read_text())["tools"][0]["config"]
    assert base["actor_rollout_ref"]["rollout"]["multi_turn"]["max_tool_response_length"] == tool["max_result_chars"]
