"""drzero.tools.tiny_agent: the scripted trajectories the trained tiny model learns from, and --trained's options."""

from __future__ import annotations

import json
import random

import pytest

from drzero.tools.tiny_agent import (encode_conversation, hits_text, keyword_search, proposer_conversation,
                                     solver_conversation)


@pytest.fixture(scope="module")
def world():
    from drzero.corpus.demo import build_demo_world

    world = build_demo_world()
    return world, world.passages()


def test_keyword_search_finds_the_passage_a_question_names(world):
    world, passages = world
    questions = world.questions(1, count=40, seed=3)
    by_source = {p.source: p for p in passages}
    found = sum(by_source[q.seed_source] in keyword_search(passages, q.question) for q in questions)
    assert found >= 0.9 * len(questions)


def test_solver_trajectory_searches_reads_and_answers(world):
    from drzero.prompts import parse_tool_calls

    world, passages = world
    question = world.questions(1, count=1, seed=5)[0]
    messages = solver_conversation(question, passages, {p.source: p for p in passages}, random.Random(0))
    call, tool, answer = messages[-3:]
    assert [c.queries for c in parse_tool_calls(call["content"])] == [[question.question]]
    result = json.loads(tool["content"])["result"]      # the search tool's own text
    assert result.count("Doc ") == 3 and question.answer in result
    assert answer["content"] == f"<answer>{question.answer}</answer>"
    assert hits_text([passages[0]]).startswith('{"result": "Doc 1 (Title: ')


def test_loss_covers_assistant_turns_only(world, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from drzero.prompts import SEARCH_TOOL_SCHEMA

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    world, passages = world
    question = world.questions(1, count=1, seed=5)[0]
    messages = solver_conversation(question, passages, {p.source: p for p in passages}, random.Random(0))
    ids, mask = encode_conversation(tokenizer, messages, [SEARCH_TOOL_SCHEMA])
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == messages[-3]["content"] + "<|im_end|>" + messages[-1]["content"] + "<|im_end|>"
    # the whole sequence is the chat template's rendering of the conversation
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tools=[SEARCH_TOOL_SCHEMA],
                                                                  tokenize=False)
    proposer = proposer_conversation(question, {p.source: p for p in passages})
    assert "<question>" in proposer[-1]["content"] and question.answer in proposer[-1]["content"]


def test_trained_refuses_a_corpus():
    from drzero.config import ConfigError
    from drzero.tools.tiny_model import TinyModelConfig

    with pytest.raises(ConfigError, match="trained"):
        TinyModelConfig(out="x", trained=True, db="some-db")


def test_two_hop_proposer_script_searches_for_the_next_document_in_the_chain(world):
    world, passages = world
    by_source = {p.source: p for p in passages}
    question = world.questions(2, count=1, seed=3)[0]
    messages = proposer_conversation(question, by_source, passages)
    calls = [m for m in messages if m["role"] == "assistant" and "<tool_call>" in m["content"]]
    assert len(calls) == question.hops - 1 == 1
    next_title = by_source[question.chain[1]].title
    assert json.loads(calls[0]["content"].split("\n")[1])["arguments"]["query_list"] == [next_title]
    tool = next(m for m in messages if m["role"] == "tool")
    assert f"(Title: {next_title})" in tool["content"]  # the keyword search finds the document it names
    assert messages[-1]["content"].endswith(f"<answer>{question.answer}</answer>")
