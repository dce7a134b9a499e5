"""Token budgets of rendered prompts, counted the way verl counts them.

verl 0.7.1 measures a prompt as ``apply_chat_template(messages, tools=<tool schemas>,
add_generation_prompt=True, tokenize=True)`` — the tool schema alone adds a hundred tokens or
more — and only when ``data.filter_overlong_prompts=True``; with the filter off an overlong
prompt is neither dropped nor truncated. So every row is checked here, where the error can say
what to change.

Rendering and tokenizing 100k prompts of ~1.5k tokens one by one would take minutes. A
proposer prompt is a fixed template per hop count with the seed document at the end, after a
newline and before the end-of-turn token, where byte-level BPE never merges across; so its
length is the template's (measured once per hop count) plus the document's. That sum is checked
against the exact rendering on a sample of rows, and if any differs every row is rendered.
"""

from __future__ import annotations

import logging
import json
import math
import random
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from drzero.prompts import proposer_messages, solver_messages
from drzero.rollout.render import ChatRenderer, ToolOutputLimit, thinking_kwargs
from drzero.rollout.search import format_hits

log = logging.getLogger(__name__)

SAMPLE_ROWS = 64

# A realistic long multi-hop question, repeated to gen-data's 50-word cap for the solver check.
LONG_QUESTION = ("In what year was the institution that employs the doctoral advisor of the first author of the "
                 "paper which introduced the lattice-based obfuscation scheme presented at the symposium on "
                 "theoretical cryptography founded?")


class TokenBudgetError(ValueError):
    """A rendered prompt does not fit its budget; the message says which and what to change."""


class PromptBudget:
    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        try:
            self.renderer = ChatRenderer(tokenizer, chat_template_kwargs=dict(chat_template_kwargs or {}))
        except ValueError as error:
            raise TokenBudgetError(f"{error} (--tokenizer)") from None
        self.tokenizer = tokenizer
        self.tools = self.renderer.tools
        self.last_check: dict = {}

    def rendered_length(self, messages: list[dict]) -> int:
        return len(self.renderer.prompt_ids(messages))
    def document_lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def check_solver_template(self, budget: int, question_words: int = 50) -> int:
        """Length of a solver prompt for the longest question gen-data keeps (50 words)."""
        words = (LONG_QUESTION.split() * (question_words // len(LONG_QUESTION.split()) + 1))[:question_words]
        question = " ".join(words).rstrip("?.,") + "?"
        length = self.rendered_length(solver_messages(question))
        if length > budget:
            raise TokenBudgetError(f"a solver prompt with a {question_words}-word question renders to {length} "
                                   f"tokens, over solver_max_prompt_length={budget}; raise the budget "
                                   f"(data.max_prompt_length of the solver stage) or shorten the template.")
        return length

    def proposer_lengths(self, rows: list[dict], document_tokens: dict[str, int]) -> np.ndarray:
        """Rendered length of every proposer row, tools included."""
        hops = sorted({row["extra_info"]["hops"] for row in rows})
        template = {h: self.rendered_length(proposer_messages(h, "")) for h in hops}
        lengths = np.array([template[row["extra_info"]["hops"]] + document_tokens[row["extra_info"]["seed_id"]]
                            for row in rows])
        sample = random.Random(0).sample(range(len(rows)), min(SAMPLE_ROWS, len(rows)))
        mismatches = sum(int(self.rendered_length(rows[i]["prompt"]) != lengths[i]) for i in sample)
        self.last_check = {"method": "template+document", "sampled_rows": len(sample), "mismatches": mismatches}
        if mismatches:
            log.warning("%d of %d sampled prompts do not add up with this tokenizer; rendering every row exactly",
                        mismatches, len(sample))
            lengths = np.array([self.rendered_length(row["prompt"])
                                for row in tqdm(rows, desc="prompt budget", unit="row", mininterval=1.0)])
            self.last_check["method"] = "every row rendered"
        return lengths


# -- the response budget ---------------------------------------------------------------------------
#
# verl 0.7.1's ToolAgentLoop counts every response token against data.max_response_length: the
# model's own turns *and* the tool results spliced in between them. When the next tool result
# does not fit, it ends the episode there, with no answer (reward 0). So the worst case that
# must fit is the longest trajectory the method asks for: a proposer at its most hops makes
# hops - 1 searches, a solver at max_assistant_turns makes max_assistant_turns - 1 searches, each
# search returning a result cut to max_tool_response_length characters, plus the final turn.

# What the model itself writes, per turn (tokens). A search turn is a short <think> and one tool
# call (~100 + ~30 tokens); the final turn a <think> and the answer, or for the proposer the
# question of up to 50 words and its answer. With thinking on, Qwen3 reasons at length in every
# turn; THINKING_TOKENS is what each turn gets for that.
SEARCH_TURN_TOKENS = 160
FINAL_TURN_TOKENS = 160
THINKING_TOKENS = 512

# Without a tokenizer on disk (a dry run for a model not yet downloaded), the measured constants of
# benchmarks/token_budget.py with the Qwen2.5/Qwen3 vocabulary stand in: the fewest characters per
# token of any sampled search result (demo world and 5,921 real cryptography abstracts), and the
# tokens a Qwen3 tool turn wraps around the result text.
DEFAULT_CHARS_PER_TOKEN = 3.05
DEFAULT_TOOL_TURN_OVERHEAD = 15


@dataclass(frozen=True)
class BudgetRow:
    role: str            # "proposer" or "solver"
    hops: int | None     # proposer rows: the hop count
    searches: int
    tool_tokens: int     # all search results together, wrappers included
    model_tokens: int    # what the model writes in all its turns
    budget: int

    @property
    def total(self) -> int:
        return self.tool_tokens + self.model_tokens

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass(frozen=True)
class ResponseBudget:
    """The worst-case response of each trajectory shape against ``max_response_length``."""

    max_response_length: int
    tool_output: ToolOutputLimit
    max_assistant_turns: int
    thinking: bool | None = None
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    tool_turn_overhead: int = DEFAULT_TOOL_TURN_OVERHEAD
    measured_with: str = "measured constants (no tokenizer on disk)"

    @property
    def per_search(self) -> int:
        """Tokens one search result can take: the cut text at the corpus's densest, plus the turn wrapper."""
        return math.ceil(self.tool_output.longest / self.chars_per_token) + self.tool_turn_overhead

    @property
    def per_turn(self) -> int:
        return SEARCH_TURN_TOKENS + (THINKING_TOKENS if self.thinking else 0)

    @property
    def final_turn(self) -> int:
        return FINAL_TURN_TOKENS + (THINKING_TOKENS if self.thinking else 0)

    def row(self, role: str, searches: int, hops: int | None = None) -> BudgetRow:
        return BudgetRow(role, hops, searches, searches * self.per_search,
                         searches * self.per_turn + self.final_turn, self.max_response_length)

    def rows(self, max_hops: int = 4, roles: tuple[str, ...] = ("proposer", "solver")) -> list[BudgetRow]:
        rows = []
        if "proposer" in roles:
            rows += [self.row("proposer", hops - 1, hops) for hops in range(1, max_hops + 1)]
        if "solver" in roles:
            rows.append(self.row("solver", max(self.max_assistant_turns - 1, 0)))
        return rows

    def table(self, rows: list[BudgetRow]) -> str:
        head = (f"response budget {self.max_response_length} tokens; per search <= {self.per_search} "
                f"({self.tool_output.max_length} chars cut {self.tool_output.side}, >= {self.chars_per_token:.2f} "
                f"chars/token, +{self.tool_turn_overhead} turn tokens; {self.measured_with}); model turns "
                f"{self.per_turn} per search + {self.final_turn} final; thinking "
                f"{'n/a' if self.thinking is None else 'on' if self.thinking else 'off'}")
        lines = [head, f"{'trajectory':<18}{'searches':>9}{'tool':>7}{'model':>7}{'total':>7}{'budget':>8}  fits"]
        for r in rows:
            name = f"proposer {r.hops} hop{'s' if r.hops != 1 else ''}" if r.role == "proposer" else \
                f"solver {self.max_assistant_turns} turns"
            lines.append(f"{name:<18}{r.searches:>9}{r.tool_tokens:>7}{r.model_tokens:>7}{r.total:>7}{r.budget:>8}  "
                         f"{'yes' if r.fits else 'NO'}")
        return "\n".join(lines)

    def required_length(self, rows: list[BudgetRow]) -> int:
        return max(r.total for r in rows)


def tool_turn_overhead(renderer: ChatRenderer) -> int:
    """Tokens verl adds around a tool result: the user turn with its <tool_response> tags and the next
    assistant header (with Qwen3 and thinking off, its empty <think> block too)."""
    return len(renderer.tool_turn_ids([""]))


def chars_per_token_of_results(renderer: ChatRenderer, passages: list[tuple[str, str]], topk: int = 3,
                               samples: int = 400, limit: ToolOutputLimit | None = None,
                               seed: int = 0) -> dict:
    """Characters per token of search results built from ``passages`` ((title, text) pairs).

    Each sample is what the search tool would return for one query: ``topk`` passages in the
    ``Doc i (Title: …)`` layout, JSON-wrapped, then cut as verl cuts it. Returns the minimum (the
    worst case a budget must plan for), the 1st percentile and the mean.
    """
    rng = random.Random(seed)
    ratios = []
    for _ in range(min(samples, max(1, len(passages)))):
        hits = [{"document": {"contents": f"{title}\n{text}"}} for title, text in
                (rng.choice(passages) for _ in range(topk))]
        text = json.dumps({"result": format_hits([hits])}, ensure_ascii=False)
        if limit is not None:
            text = limit.apply(text)
        ratios.append(len(text) / max(1, renderer.count(text)))
    values = np.array(ratios)
    return {"min": float(values.min()), "p1": float(np.percentile(values, 1)), "mean": float(values.mean()),
            "samples": len(ratios)}


def response_budget_for(config, tokenizer=None, manifest: dict | None = None) -> ResponseBudget:
    """The response budget a composed verl config sets, measured with ``tokenizer`` when there is one.

    The corpus's densest search results (characters per token) come from the seed manifest that
    prepare-data writes; without one, or without a tokenizer, the measured constants stand in.
    """
    from omegaconf import OmegaConf

    multi_turn = config.actor_rollout_ref.rollout.multi_turn
    thinking = OmegaConf.select(config, "data.apply_chat_template_kwargs.enable_thinking", default=None)
    limit = ToolOutputLimit(int(multi_turn.max_tool_response_length),
                            str(OmegaConf.select(config, "actor_rollout_ref.rollout.multi_turn."
                                                         "tool_response_truncate_side", default="middle")))
    measured = ((manifest or {}).get("search_results") or {}).get("chars_per_token") or {}
    chars_per_token = float(measured.get("min") or DEFAULT_CHARS_PER_TOKEN)
    overhead, source = DEFAULT_TOOL_TURN_OVERHEAD, "measured constants (no tokenizer on disk)"
    if tokenizer is not None:
        renderer = ChatRenderer(tokenizer, chat_template_kwargs=thinking_kwargs(thinking))
        overhead, source = tool_turn_overhead(renderer), "the model's tokenizer"
    if measured:
        source += f", corpus density from the seed manifest ({measured.get('samples')} results)"
    return ResponseBudget(max_response_length=int(config.data.max_response_length), tool_output=limit,
                          max_assistant_turns=int(multi_turn.max_assistant_turns),
                          thinking=None if thinking is None else bool(thinking), chars_per_token=chars_per_token,
                          tool_turn_overhead=overhead, measured_with=source)
