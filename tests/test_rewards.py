"""Reward formulas, table-driven: EM normalization, the proposer's format score, difficulty."""

import asyncio
import json

import pytest

from drzero.rewards import proposer, solver
from drzero.rewards.proposer import REASON_ANSWER_IN_QUESTION, REASON_NO_QUESTION_OR_ANSWER, difficulty, format_score

DOC = "(Title: Sparse Lattice Codes) Mira Okafor wrote Sparse Lattice Codes in 2011 at the Tessaly Institute."


def call(query):
    return f'<tool_call>{{"name": "search", "arguments": {{"query_list": ["{query}"]}}}}</tool_call>'


def response(body):
    """A tool turn as verl's decode (special tokens skipped) leaves it between assistant turns."""
    return f"\nuser\n<tool_response>\n{json.dumps({'result': body})}\n</tool_response>\nassistant\n"


FINAL = "<think>done</think>\n<question>Where is the institution of the author of Sparse Lattice Codes?</question>" \
        "\n<answer>Ravenport</answer>"
TWO_SEARCHES = ("<think>who</think>" + call("Mira Okafor") + response("Doc 1 (Title: Mira Okafor) works at Tessaly")
                + "<think>where</think>" + call("Tessaly Institute") + response("Doc 1 (Title: Tessaly) in Ravenport")
                + FINAL)


@pytest.mark.parametrize("name,text,hops,expected", [
    # think 3/3, tool min(3/3,1)=1, answer grounded in results and 1 word -> (1+1+1+1)/4
    ("full 3-hop", TWO_SEARCHES, 3, (1.0, 1.0, 1.0, 1.0)),
    # one search for a 3-hop question: tool (1+1)/3
    ("too few searches", "<think>a</think>" + call("Tessaly Institute") + response("Tessaly is in Ravenport") + FINAL,
     3, ((1 + 1 + 2 / 3 + 1) / 4, 1.0, 2 / 3, 1.0)),
    # no <think> in the first turn: think 1/2
    ("missing think", call("Tessaly Institute") + response("Tessaly is in Ravenport") + FINAL, 2,
     ((1 + 0.5 + 1 + 1) / 4, 0.5, 1.0, 1.0)),
    # two calls in one turn: tool 0 for hops > 1
    ("parallel calls", "<think>a</think>" + call("Mira Okafor") + call("Tessaly") + response("x") + response(
        "Ravenport") + FINAL, 3, ((1 + 1 + 0 + 1) / 4, 1.0, 0.0, 1.0)),
    # answer not in the document nor in the results: answer term 0
    ("ungrounded answer", "<think>a</think>" + call("Tessaly Institute") + response("no city here") + FINAL, 2,
     ((1 + 1 + 1 + 0) / 4, 1.0, 1.0, 0.0)),
    # 1-hop question answered from the document: tool term 1 without searching
    ("1 hop from the document", "<think>doc says 2011</think><question>When did Mira Okafor write Sparse Lattice "
     "Codes?</question><answer>2011</answer>", 1, (1.0, 1.0, 1.0, 1.0)),
    # long answers: 6-10 words -> 0.5, > 10 -> 0
    ("long answer", "<think>x</think><question>What is it?</question><answer>Mira Okafor wrote Sparse Lattice "
     "Codes in 2011</answer>", 1, ((1 + 1 + 1 + 0.5) / 4, 1.0, 1.0, 0.5)),
    ("yes/no answer", "<think>x</think><question>Is it true?</question><answer>Yes</answer>", 1,
     (1.0, 1.0, 1.0, 1.0)),
    # a malformed call is not a valid search: tool 0
    ("malformed call", "<think>a</think><tool_call>{bad json}</tool_call>" + response("error") + FINAL, 2,
     ((1 + 1 + 0 + 0) / 4, 1.0, 0.0, 0.0)),
])
def test_format_score(name, text, hops, expected):
    result = format_score(text, hops, DOC)
    assert (result.score, result.think, result.tool, result.answer) == pytest.approx(expected), name


@pytest.mark.parametrize("text,reason", [
    ("<think>x</think><answer>Ravenport</answer>", REASON_NO_QUESTION_OR_ANSWER),
    ("<think>x</think><question>Where?</question>", REASON_NO_QUESTION_OR_ANSWER),
    ("<question>   </question><answer>a</answer>", REASON_NO_QUESTION_OR_ANSWER),
    ("<think>x</think><question>Is Ravenport the city?</question><answer>ravenport.</answer>",
     REASON_ANSWER_IN_QUESTION),
    ("cut off mid <think> reasoning", REASON_NO_QUESTION_OR_ANSWER),
])
def test_integrity_gate_zeroes_the_format(text, reason):
    result = format_score(text, 2, DOC)
    assert result.score == 0.0 and result.reason == reason


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 1.0), (2, 0.75), (3, 0.5), (4, 0.25), (5, 0.0)])
def test_difficulty_for_every_k_of_5(k, expected):
    assert difficulty(k, 5) == expected


@pytest.mark.parametrize("prediction,targets,match", [
    ("The Tessaly Institute", ["tessaly institute"], True),
    ("  Ravenport!  ", ["Ravenport"], True),
    ("an apple", ["Apple", "pear"], True),
    ("Ravenport city", ["Ravenport"], False),
    ("1,987", ["1987"], True),
    (None, ["x"], False),
])
def test_exact_match_normalization(prediction, targets, match):
    assert solver.exact_match(prediction, targets) is match


def test_solver_score_uses_the_last_answer_and_any_target():
    text = "<think>a</think><answer>Paris</answer>" + response("x") + "<think>b</think><answer>Ravenport</answer>"
    assert solver.compute_score("search_zero_2", text, {"target": ["Oslo", "ravenport"]}) == {
        "score": 1.0, "answered": 1.0, "budget_cut": 0.0}
    assert solver.compute_score("search_zero_2", text, {"target": "Paris"})["score"] == 0.0
    assert solver.compute_score("search_zero_2", "no answer", {"target": ["x"]}) == {
        "score": 0.0, "answered": 0.0, "budget_cut": 0.0}
    # the tool agent loop's record of a budget cut reaches the reward's extra info
    assert solver.compute_score("search_zero_2", "no answer", {"target": ["x"]}, {"budget_cut": 1})["budget_cut"] == 1.0


@pytest.mark.parametrize("turn, counts", [
    ("<think>I reason.</think><tool_call>{}</tool_call>", True),
    ("<think>\n\n</think>\n\n<think>I reason.</think>x", True),     # template's empty block skipped
    ("<think>\n\n</think>\n\n<tool_call>{}</tool_call>", False),    # only the template's empty block
    ("<think>never closed", False),                                    # thinking cut by the budget
])
def test_think_term_counts_reasoning_the_model_wrote(turn, counts):
    from drzero.prompts import starts_with_think

    assert starts_with_think(turn) is counts


def test_turn_splitting_of_a_decoded_response():
    turns, responses = proposer.split_turns(TWO_SEARCHES)
    assert len(turns) == 3 and len(responses) == 2
    assert turns[1].startswith("<think>where</think>") and turns[2].startswith("<think>done</think>")
    assert all(not t.startswith("assistant") and not t.endswith("user") for t in turns)


def test_proposer_reward_without_a_solver_server_still_scores_format():
    result = asyncio.run(proposer.compute_score("search_zero_3", TWO_SEARCHES, {"target": None},
                                                {"hops": 3, "seed_document": DOC}))
    assert result["format"] == 1.0 and result["score"] == 0.5 and result["difficulty"] == 0.0
    assert result["reason"] == proposer.REASON_NO_SOLVER
    assert all(isinstance(v, float) for v in result.values())
