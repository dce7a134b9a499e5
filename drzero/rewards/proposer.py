"""Proposer reward: format score plus difficulty measured by the current solver.

    reward = 0.5 * format + difficulty           (difficulty only when format > 0; Dr. Zero)
    difficulty = (n - k) / (n - 1) if 0 < k < n else 0

``k`` is how many of ``n`` solver probes (multi-turn rollouts with the same search tool against
the SGLang server that serves the current solver, T=1.0) reach the proposer's answer. The probes
run the solver as training will: the question cut to 50 words as gen-data cuts it, the prompt
rendered as verl renders it (``drzero.rollout.render``), the same context and response budget,
turn cap and tool-output cut (``drzero.rollout.client``, ``api="generate"``). ``n`` counts only
probes that completed: a probe that hit a server or retriever failure says nothing about the
question, so it is counted under ``probe_errors`` and left out; with fewer than 2 completed
probes difficulty cannot be measured, and the sample gets its format reward only
(``probes_incomplete`` = 1). A question every probe answers is too easy, one no probe answers is
unsolvable or wrong; one answered sometimes is worth most.

The format score f in [0, 1]: zero unless the proposal has a question and an answer and the
answer does not appear in the question (integrity gate); otherwise the mean of 1, the share of
assistant turns that open with ``<think>``, a tool term (1 for 1-hop questions; else
min((1 + searches) / hops, 1) when every turn makes at most one valid call and each got a
result), and an answer term (1 for <= 5 words, 0.5 for <= 10, when the answer is yes/no or
appears in the seed document or the search results).

verl 0.7.1's reward loop awaits ``compute_score`` per sample. It returns a flat dict of numbers
with the same keys for every sample; why a sample scored low goes to the log and to ``reason``.
``budget_cut`` is 1 when the proposer's own trajectory was ended by the response budget
(``drzero.rollout.agent_loop`` records it), ``probe_budget_cut`` the share of completed probes
that were.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass

from drzero.models.files import load_tokenizer
from drzero.prompts import (MAX_QUESTION_WORDS, cut_question, parse_proposal, parse_tool_calls, solver_messages,
                            starts_with_think)
from drzero.rewards.solver import exact_match, normalize_answer
from drzero.rollout.client import AgentRolloutClient, GenerationSettings
from drzero.rollout.render import ToolOutputLimit, thinking_kwargs
from drzero.rollout.search import SearchSettings

log = logging.getLogger(__name__)

# Numeric reasons, so that W&B can average them and a person can look them up here.
REASON_OK = 0
REASON_NO_QUESTION_OR_ANSWER = 1
REASON_ANSWER_IN_QUESTION = 2
REASON_PROBES_FAILED = 3
REASON_NO_SOLVER = 4
REASON_PROBES_INCOMPLETE = 5
MIN_COMPLETED_PROBES = 2   # difficulty (n - k) / (n - 1) needs n >= 2
REASONS = {REASON_OK: "ok", REASON_NO_QUESTION_OR_ANSWER: "missing <question> or <answer>",
           REASON_ANSWER_IN_QUESTION: "the answer appears in the question",
           REASON_PROBES_FAILED: "every solver probe failed (server or search errors)",
           REASON_NO_SOLVER: "no solver server configured (base_url); difficulty not measured",
           REASON_PROBES_INCOMPLETE: f"fewer than {MIN_COMPLETED_PROBES} solver probes completed; format reward only"}

_TOOL_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)
_ROLE_LINES = {"", "user", "assistant", "tool"}  # what is left of turn headers once special tokens are skipped
_HOPS = re.compile(r"search_zero_(\d+)$")


@dataclass
class FormatScore:
    score: float
    think: float = 0.0
    tool: float = 0.0
    answer: float = 0.0
    question_text: str | None = None
    answer_text: str | None = None
    reason: int = REASON_OK


def split_turns(solution_str: str) -> tuple[list[str], list[str]]:
    """(assistant turns, tool response bodies) of a decoded multi-turn response.

    verl decodes the response with special tokens skipped, so turn markers are gone; the tool
    results the chat template spliced in (``<tool_response>`` blocks, possibly wrapped in a bare
    ``user`` / ``assistant`` role line) are what separates one assistant turn from the next.
    """
    responses = [m.strip() for m in _TOOL_RESPONSE.findall(solution_str)]
    turns = []
    for segment in _TOOL_RESPONSE.split(solution_str)[::2]:
        lines = segment.strip().split("\n")
        while lines and lines[0].strip() in _ROLE_LINES:
            lines.pop(0)
        while lines and lines[-1].strip() in _ROLE_LINES:
            lines.pop()
        if lines:
            turns.append("\n".join(lines).strip())
    return turns, responses


def _grounding_text(document: str, responses: list[str]) -> str:
    parts = [document]
    for body in responses:
        try:
            parts.append(str(json.loads(body).get("result", body)))
        except (ValueError, AttributeError):
            parts.append(body)
    return normalize_answer(" ".join(parts))


def format_score(solution_str: str, hops: int, document: str) -> FormatScore:
    proposal = parse_proposal(solution_str)
    question, answer = proposal.question, proposal.answer
    if not question or not answer:
        return FormatScore(0.0, question_text=question, answer_text=answer, reason=REASON_NO_QUESTION_OR_ANSWER)
    if normalize_answer(answer) in normalize_answer(question):
        return FormatScore(0.0, question_text=question, answer_text=answer, reason=REASON_ANSWER_IN_QUESTION)

    turns, responses = split_turns(solution_str)
    think = sum(starts_with_think(t) for t in turns) / len(turns) if turns else 0.0

    calls_per_turn = [[c for c in parse_tool_calls(t)] for t in turns]
    valid_calls = sum(1 for calls in calls_per_turn for c in calls if c.valid)
    one_call_per_turn = all(len(calls) <= 1 for calls in calls_per_turn)
    if hops <= 1:
        tool = 1.0
    elif valid_calls and one_call_per_turn and valid_calls == len(responses):
        tool = min((1 + valid_calls) / hops, 1.0)
    else:
        tool = 0.0

    words = len(answer.split())
    grounded = normalize_answer(answer) in ("yes", "no") or normalize_answer(answer) in _grounding_text(document,
                                                                                                        responses)
    answer_term = (1.0 if words <= 5 else 0.5 if words <= 10 else 0.0) if grounded else 0.0
    return FormatScore((1 + think + tool + answer_term) / 4, think=think, tool=tool, answer=answer_term,
                       question_text=question, answer_text=answer)


def difficulty(k: int, n: int) -> float:
    """(n - k) / (n - 1) when some but not all probes succeed, else 0 (too easy or unsolvable)."""
    return (n - k) / (n - 1) if 0 < k < n else 0.0


def hops_of(data_source: str, extra_info: dict | None) -> int:
    if extra_info and extra_info.get("hops"):
        return int(extra_info["hops"])
    match = _HOPS.search(data_source or "")
    return int(match.group(1)) if match else 1


# -- solver probes -------------------------------------------------------------------------------

_PROBE_CLIENTS: dict = {}


def _probe_client(base_url: str, model_name: str, api: str, retriever_url: str | None, topk: int,
                  concurrency: int, timeout: float, retries: int, tokenizer: str | None, limits: tuple):
    """One client per settings and event loop, shared by every sample the reward worker scores."""
    key = (id(asyncio.get_running_loop()), base_url, model_name, api, retriever_url, topk, concurrency, timeout,
           retries, tokenizer, limits)
    client = _PROBE_CLIENTS.get(key)
    if client is None:
        max_turns, max_prompt_tokens, max_response_tokens, tool_chars, side, thinking = limits
        loaded_tokenizer = None
        if api == "generate":
            loaded_tokenizer = load_tokenizer(tokenizer or model_name)
        search = SearchSettings.from_config({"retrieval_service_url": retriever_url, "topk": topk,
                                             "max_result_chars": tool_chars} if retriever_url else
                                            {"topk": topk, "max_result_chars": tool_chars})
        client = AgentRolloutClient(GenerationSettings(
            base_url=base_url, model=model_name, api=api, temperature=1.0, max_turns=max_turns,
            max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
            tool_output=ToolOutputLimit(tool_chars, side), chat_template_kwargs=thinking_kwargs(thinking),
            concurrency=concurrency, timeout=timeout, retries=retries), search, tokenizer=loaded_tokenizer)
        _PROBE_CLIENTS[key] = client
    return client


async def compute_score(data_source: str, solution_str: str, ground_truth=None, extra_info: dict | None = None, *,
                        base_url: str | None = None, model_name: str = "solver", n: int = 5, api: str = "generate",
                        retriever_url: str | None = None, topk: int = 3, concurrency: int = 64, max_turns: int = 5,
                        max_prompt_tokens: int = 512, max_response_tokens: int = 3072,
                        max_tool_response_length: int = 1600, tool_response_truncate_side: str = "middle",
                        thinking: bool | None = None, max_question_words: int = MAX_QUESTION_WORDS,
                        timeout: float = 300.0, retries: int = 4, tokenizer: str | None = None, **kwargs) -> dict:
    """The proposer's reward for one trajectory (verl's reward loop awaits this per sample)."""
    extra_info = extra_info or {}
    hops = hops_of(data_source, extra_info)
    document = extra_info.get("seed_document") or ""
    fmt = format_score(solution_str, hops, document)
    k, completed, probe_errors, probe_cut, reason = 0, 0, 0, 0.0, fmt.reason
    if fmt.score > 0:
        if not base_url:
            reason = REASON_NO_SOLVER
        else:
            limits = (int(max_turns), int(max_prompt_tokens), int(max_response_tokens), int(max_tool_response_length),
                      str(tool_response_truncate_side), thinking)
            client = _probe_client(base_url, model_name, api, retriever_url, topk, concurrency, timeout, retries,
                                   tokenizer, limits)
            question, _ = cut_question(fmt.question_text, max_question_words)
            probes = await client.run_many([solver_messages(question)] * n)
            done = [p for p in probes if p.completed]
            completed, probe_errors = len(done), n - len(done)
            k = sum(exact_match(p.final_answer, [fmt.answer_text]) for p in done)
            probe_cut = sum(p.budget_cut for p in done) / len(done) if done else 0.0
            if not done:
                reason = REASON_PROBES_FAILED
                # infrastructure, not the proposal: worth a warning with the first error
                log.warning("proposer sample (hops=%d): %s; first error: %s", hops, REASONS[reason],
                            probes[0].error)
            elif completed < MIN_COMPLETED_PROBES:
                reason = REASON_PROBES_INCOMPLETE
                log.warning("proposer sample (hops=%d): %s (%d of %d failed; first error: %s)", hops,
                            REASONS[reason], probe_errors, n, next(p.error for p in probes if p.error))
    hard = difficulty(k, completed) if fmt.score > 0 and completed >= MIN_COMPLETED_PROBES else 0.0
    if reason not in (REASON_OK, REASON_PROBES_FAILED, REASON_PROBES_INCOMPLETE):
        log.info("proposer sample (hops=%d) scored low: %s", hops, REASONS[reason])
    return {"score": 0.5 * fmt.score + hard, "format": fmt.score, "difficulty": hard, "k": float(k),
            "n": float(completed), "hops": float(hops), "valid": float(fmt.score > 0), "think": fmt.think,
            "tool": fmt.tool, "answer": fmt.answer, "probe_errors": float(probe_errors),
            "probes_incomplete": float(reason in (REASON_PROBES_FAILED, REASON_PROBES_INCOMPLETE)),
            "probe_budget_cut": float(probe_cut), "budget_cut": float(bool(extra_info.get("budget_cut"))),
            "reason": float(reason)}
