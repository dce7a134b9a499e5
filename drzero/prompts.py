"""Prompt templates for the proposer and the solver, and the parsers for the tags they use.

Both roles talk in the same tags: reasoning in ``<think>``, searches as Qwen/hermes tool calls
``<tool_call>{"name": "search", "arguments": {"query_list": [...]}}</tool_call>``, search results
back in ``<tool_response>`` turns; the proposer ends with ``<question>`` and ``<answer>``, the
solver with ``<answer>``. The wording is our own, written from the method's description.

Each template has an id (``PROPOSER_TEMPLATE_ID``, ``SOLVER_TEMPLATE_ID``) that goes into every
data row's ``extra_info``, so a run can tell which prompt its data was made with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PROPOSER_TEMPLATE_ID = "drzero-proposer-v1"
SOLVER_TEMPLATE_ID = "drzero-solver-v1"

SEARCH_TOOL_NAME = "search"

# The schema verl renders into the chat template (config/search_tool_config.yaml carries the same).
# verl 0.7.1 keeps only type/description/enum on a property, so "items" is left out on purpose.
SEARCH_TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": SEARCH_TOOL_NAME,
        "description": "Search the document collection. Returns the most relevant passages for each query.",
        "parameters": {
            "type": "object",
            "properties": {
                "query_list": {
                    "type": "array",
                    "description": "One or more self-contained search queries, each a list item of type string.",
                },
            },
            "required": ["query_list"],
        },
    },
}

# The reward recovers the seed document as the text after this marker in the proposer prompt.
DOCUMENT_MARKER = "Source document:"

PROPOSER_TEMPLATE = """\
You write quiz questions for a research assistant that can search a document collection.

Your task: read the source document at the end and write ONE question whose answer takes exactly \
{hops} hop(s) to reach.
- Hop 1 is an entity the source document states explicitly: a person, paper, method, place, \
organization, event or date.
- Every further hop follows one relation from the previous entity to a new one, which you find by \
searching the collection. A {hops}-hop question therefore needs exactly {searches} search call(s).
- The entity reached by the last hop is the answer.

How to work:
- Think inside <think> </think> before every step.
- Search with exactly one tool call per turn:
<tool_call>{{"name": "search", "arguments": {{"query_list": ["your query"]}}}}</tool_call>
  The results come back inside <tool_response> </tool_response>.
- When the chain is complete, think once more, then write the question inside <question> </question> \
and its answer inside <answer> </answer>.

Rules:
1. Start from the source document: the question names hop 1 and no later hop.
2. Never reveal an intermediate entity; whoever answers must discover each hop by searching.
3. The answer is short (a name, number, date or phrase of at most five words) and the only correct one.
4. The question must make sense without the source document and be answerable from the collection.
5. Make exactly {searches} search call(s), no more and no fewer.

Example, 1 hop (no search):
<think>The document says the Halvorsen Medal was first awarded in 1987. A one-hop question asks for that \
year.</think>
<question>In what year was the Halvorsen Medal first awarded?</question>
<answer>1987</answer>

Example, 3 hops (two searches):
<think>The document names Mira Okafor as the lead author of "Sparse Lattice Codes". Next I need her \
institution.</think>
<tool_call>{{"name": "search", "arguments": {{"query_list": ["Mira Okafor institution"]}}}}</tool_call>
(results: Mira Okafor is a professor at the Tessaly Institute)
<think>Next hop: where the Tessaly Institute is.</think>
<tool_call>{{"name": "search", "arguments": {{"query_list": ["Tessaly Institute city"]}}}}</tool_call>
(results: the Tessaly Institute is in Ravenport)
<think>Chain: the paper, Mira Okafor, the Tessaly Institute, Ravenport. The question names only the \
paper.</think>
<question>In which city is the institution of the lead author of "Sparse Lattice Codes"?</question>
<answer>Ravenport</answer>

Hops required: {hops}
""" + DOCUMENT_MARKER + "\n{document}"

SOLVER_TEMPLATE = """\
Answer the question below. You can search a document collection as often as you need.
- Think inside <think> </think> whenever you receive new information.
- To search, call the tool: \
<tool_call>{{"name": "search", "arguments": {{"query_list": ["your query"]}}}}</tool_call>
  The results arrive inside <tool_response> </tool_response>.
- When you are sure, give only the final answer inside <answer> </answer>, without explanation, \
for example <answer>Ravenport</answer>.

Question: {question}"""


def render_document(title: str, text: str) -> str:
    """A seed document as the proposer sees it (the Search-R1 ``Doc (Title: …)`` style)."""
    return f"(Title: {title}) {text}" if title else text


def proposer_prompt(hops: int, document: str) -> str:
    if hops < 1:
        raise ValueError(f"hops={hops} is not valid: expected an integer >= 1")
    return PROPOSER_TEMPLATE.format(hops=hops, searches=hops - 1, document=document)


def solver_prompt(question: str) -> str:
    return SOLVER_TEMPLATE.format(question=question.strip())


def proposer_messages(hops: int, document: str) -> list[dict]:
    """One user message, no system message: the chat template adds its own and the tools block."""
    return [{"role": "user", "content": proposer_prompt(hops, document)}]


def solver_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": solver_prompt(question)}]


def extract_source_document(prompt: str) -> str:
    """The seed document embedded in a proposer prompt (text after ``DOCUMENT_MARKER``)."""
    _, marker, document = prompt.rpartition(DOCUMENT_MARKER)
    return document.strip() if marker else ""


# -- parsers -------------------------------------------------------------------------------------

_TAG_CACHE: dict[str, re.Pattern] = {}


def _tag_pattern(tag: str) -> re.Pattern:
    if tag not in _TAG_CACHE:
        _TAG_CACHE[tag] = re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL)
    return _TAG_CACHE[tag]


def tag_contents(text: str, tag: str) -> list[str]:
    """Every ``<tag>…</tag>`` body in ``text``, stripped, in order."""
    return [m.strip() for m in _tag_pattern(tag).findall(text)]


def last_tag(text: str, tag: str) -> str | None:
    """The body of the last ``<tag>…</tag>`` (the model's final word), or None."""
    found = tag_contents(text, tag)
    return found[-1] if found else None


_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>")


def starts_with_think(turn: str) -> bool:
    """Whether an assistant turn opens with a closed, non-empty ``<think>`` block.

    An empty block in front is skipped: it is what a Qwen3 template with thinking off writes into
    the generation prompt, not something the model wrote. So the term rewards reasoning the model
    did, with thinking on or off, and a turn whose thinking never closed does not count.
    """
    while True:
        empty = _EMPTY_THINK.match(turn)
        if not empty:
            break
        turn = turn[empty.end():]
    match = re.match(r"\s*<think>(.*?)</think>", turn, re.DOTALL)
    return match is not None and bool(match.group(1).strip())


MAX_QUESTION_WORDS = 50  # Dr. Zero cuts every generated question to its first 50 words


def cut_question(question: str, max_words: int = MAX_QUESTION_WORDS) -> tuple[str, bool]:
    """The question as the solver will see it (first ``max_words`` words), and whether it was cut."""
    words = question.split()
    return " ".join(words[:max_words]), len(words) > max_words


@dataclass(frozen=True)
class ToolCall:
    """One parsed ``<tool_call>``; ``error`` says why it is not a valid search call."""

    raw: str
    name: str | None = None
    queries: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def parse_tool_call(raw: str) -> ToolCall:
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as error:
        return ToolCall(raw=raw, error=f"tool call is not JSON: {error.msg}")
    if not isinstance(payload, dict):
        return ToolCall(raw=raw, error="tool call must be a JSON object with 'name' and 'arguments'")
    name = payload.get("name")
    arguments = payload.get("arguments")
    if isinstance(arguments, str):  # some models emit the arguments JSON-encoded a second time
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(raw=raw, name=name, error="'arguments' is a string that is not JSON")
    if name != SEARCH_TOOL_NAME:
        return ToolCall(raw=raw, name=name, error=f"unknown tool {name!r}; the only tool is {SEARCH_TOOL_NAME!r}")
    queries = arguments.get("query_list") if isinstance(arguments, dict) else None
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        return ToolCall(raw=raw, name=name, error="'arguments.query_list' must be a non-empty list of strings")
    return ToolCall(raw=raw, name=name, queries=[q.strip() for q in queries])


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` in ``text``, valid or not, in order."""
    return [parse_tool_call(raw) for raw in tag_contents(text, "tool_call")]


@dataclass(frozen=True)
class Proposal:
    question: str | None
    answer: str | None


def parse_proposal(text: str) -> Proposal:
    """The proposer's final ``<question>`` and ``<answer>`` (the last of each)."""
    return Proposal(question=last_tag(text, "question"), answer=last_tag(text, "answer"))
