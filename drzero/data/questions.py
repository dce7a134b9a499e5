"""What became of one seed in gen-data: the proposer's best sample, the solver's verdict, the solver row.

    outcome = SeedOutcome(seed=row)                   # filled by drzero.data.gen_data as the seed's rollouts finish
    best = best_candidate([format_score(...) for each sample])
    row = solver_row(outcome, index, "train", iteration)

The verdicts are what the gen-data manifest counts and `drzero report` draws.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields

from drzero.data.seed import AGENT_NAME, hop_histogram_of
from drzero.prompts import SOLVER_TEMPLATE_ID, extract_source_document, solver_messages
from drzero.records import Each, OneOf
from drzero.rewards.proposer import FormatScore, hops_of
from drzero.rewards.solver import exact_match
from drzero.rollout.client import Trajectory

# What became of a seed; the manifest counts each.
KEPT = "kept"
DROPPED_NO_VALID = "dropped_no_valid"              # no sample passed the format gate
REJECTED_NO_SEARCH = "rejected_no_search"          # a probe answered correctly without searching
REJECTED_UNSOLVED = "rejected_unsolved"            # no probe answered (k = 0)
REJECTED_PROBES_FAILED = "rejected_probes_failed"  # every probe ended in a server error: not verifiable
VERDICTS = (KEPT, DROPPED_NO_VALID, REJECTED_NO_SEARCH, REJECTED_UNSOLVED, REJECTED_PROBES_FAILED)

PROBE_TEMPERATURE = 1.0  # the proposer reward probes at T=1.0 (Dr. Zero); verification measures the same thing



@dataclass
class SeedOutcome:
    """What became of one seed row: its verdict, the kept question if any, and what the rollouts did."""

    seed: dict                              # the seed parquet row
    verdict: str
    question: str | None = None             # cut to max_question_words
    answer: str | None = None
    proposer_format: float = 0.0
    question_cut: bool = False
    stop_reasons: Counter = field(default_factory=Counter)   # of the proposer samples
    invalid_reasons: Counter = field(default_factory=Counter)  # why samples failed the format gate
    rollout_errors: int = 0
    first_error: str | None = None
    probes: int = 0
    probe_errors: int = 0
    probes_correct: int = 0
    calls: int = 0                          # generate requests made: proposer turns and probe turns


# -- the text verl would have decoded ----------------------------------------------------------


def response_text(trajectory: Trajectory) -> str:
    """The rollout's response as verl decodes it: assistant turns with the tool results in between.

    With ``api="generate"`` the client already holds exactly that (``Trajectory.response_text``).
    Otherwise: the ChatML template renders tool results as a user turn of ``<tool_response>`` blocks followed
    by the next assistant header; with special tokens skipped, that leaves ``\\nuser\\n<blocks>\\n
    assistant\\n`` between two assistant turns, which is what ``split_turns`` expects. Tool calls
    that the server parsed out of a turn (SGLang with a tool-call parser) are put back as the
    template renders them, so the format score counts them either way.
    """
    if trajectory.response_text is not None:
        return trajectory.response_text
    messages = trajectory.messages
    # The response is everything after the prompt: walk back over as many assistant turns as the rollout made.
    start, seen = len(messages), 0
    while start > 0 and seen < len(trajectory.assistant_turns):
        start -= 1
        seen += messages[start]["role"] == "assistant"
    parts: list[str] = []
    tool_results: list[str] = []
    for message in messages[start:]:
        if message["role"] == "tool":
            tool_results.append(message.get("content") or "")
            continue
        if tool_results:
            parts.append(_tool_turn(tool_results))
            tool_results = []
        parts.append((message.get("content") or "") + _rendered_tool_calls(message.get("tool_calls") or []))
    if tool_results:  # the rollout ran out of turns right after a search
        parts.append(_tool_turn(tool_results))
    return "".join(parts)


def _tool_turn(results: list[str]) -> str:
    blocks = "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)
    return f"\nuser\n{blocks}\nassistant\n"


def _rendered_tool_calls(calls: list[dict]) -> str:
    rendered = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # keep it as the model wrote it; the format score will call it invalid
        payload = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        rendered.append(f"\n<tool_call>\n{payload}\n</tool_call>")
    return "".join(rendered)


# -- choosing and checking ---------------------------------------------------------------------


def best_candidate(scores: list[FormatScore]) -> int | None:
    """Index of the highest format score above 0; the first one on ties; None when none is valid."""
    best = None
    for index, score in enumerate(scores):
        if score.score > 0 and (best is None or score.score > scores[best].score):
            best = index
    return best


def verification_verdict(probes: list[Trajectory], answer: str) -> str:
    """KEPT, or why the solver probes reject the question (see the verdict constants)."""
    if all(probe.stop_reason == "error" for probe in probes):
        return REJECTED_PROBES_FAILED
    correct = [probe for probe in probes if exact_match(probe.final_answer, [answer])]
    if any(probe.valid_tool_calls == 0 for probe in correct):
        return REJECTED_NO_SEARCH
    return KEPT if correct else REJECTED_UNSOLVED


def generate_calls(trajectories: list[Trajectory]) -> int:
    """Generate requests the rollouts made: one per assistant turn, and the one that failed."""
    return sum(len(t.assistant_turns) + (t.stop_reason == "error") for t in trajectories)


def seed_document(seed: dict) -> str:
    """The document the proposer saw; older seed parquets carry it only inside the prompt."""
    info = seed.get("extra_info") or {}
    if info.get("seed_document"):
        return info["seed_document"]
    return extract_source_document(seed["prompt"][-1]["content"])


def solver_row(outcome: SeedOutcome, index: int, split: str, iteration: int) -> dict:
    seed = outcome.seed
    seed_info = seed["extra_info"]
    hops = hops_of(seed["data_source"], seed_info)
    return {
        "data_source": seed["data_source"],  # search_zero_{h}: routes the EM reward and HRPO's hop groups
        "prompt": solver_messages(outcome.question),
        "ability": seed["ability"],
        "reward_model": {"style": "rule", "ground_truth": {"target": [outcome.answer]}},
        "extra_info": {
            "index": index,
            "split": split,
            "need_tools_kwargs": True,
            # the seed row's own (non-empty: parquet cannot store an empty struct; same keys on every row)
            "tools_kwargs": seed_info["tools_kwargs"],
            "hops": hops,
            "seed_id": seed_info["seed_id"],
            "question": outcome.question,
            "answer": outcome.answer,
            "template_id": SOLVER_TEMPLATE_ID,
            "proposer_format": float(outcome.proposer_format),
            "iteration": iteration,
        },
        "agent_name": AGENT_NAME,
    }


def split_counts(outcomes: list[SeedOutcome], samples: int, hop_levels: int) -> dict:
    kept = [o for o in outcomes if o.verdict == KEPT]
    verdicts = Counter(o.verdict for o in outcomes)
    stop_reasons = sum((o.stop_reasons for o in outcomes), Counter())
    invalid_reasons = sum((o.invalid_reasons for o in outcomes), Counter())
    return {
        "seeds": len(outcomes),
        "candidates": len(outcomes) * samples,
        **{verdict: verdicts[verdict] for verdict in VERDICTS},
        "questions_cut": sum(o.question_cut for o in kept),
        "hop_histogram": hop_histogram_of([hops_of(o.seed["data_source"], o.seed.get("extra_info")) for o in kept],
                                    hop_levels),
        "mean_proposer_format": round(sum(o.proposer_format for o in kept) / len(kept), 4) if kept else 0.0,
        "candidate_stop_reasons": dict(stop_reasons),
        "invalid_candidate_reasons": dict(invalid_reasons),
        "rollout_errors": sum(o.rollout_errors for o in outcomes),
        "probes": sum(o.probes for o in outcomes),
        "probe_errors": sum(o.probe_errors for o in outcomes),
        "probes_correct": sum(o.probes_correct for o in outcomes),
        "generate_calls": sum(o.calls for o in outcomes),
    }



# One finished seed as gen-data's shard journal keeps it (``outcome_record``); a line of another shape is damage.
OUTCOME_RECORD = {"seed_id": str, "verdict": OneOf(*VERDICTS), "question": (str, None), "answer": (str, None),
                  "proposer_format": float, "question_cut": bool, "stop_reasons": Each(int),
                  "invalid_reasons": Each(int), "rollout_errors": int, "first_error": (str, None), "probes": int,
                  "probe_errors": int, "probes_correct": int, "calls": int}


def outcome_record(outcome: SeedOutcome) -> dict:
    # not asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs
    record = {f.name: getattr(outcome, f.name) for f in fields(outcome) if f.name != "seed"}
    record.update(stop_reasons=dict(outcome.stop_reasons), invalid_reasons=dict(outcome.invalid_reasons),
                  seed_id=outcome.seed["extra_info"]["seed_id"])
    return record


def outcome_from_record(record: dict, seed: dict) -> SeedOutcome:
    known = {f.name for f in fields(SeedOutcome)} - {"seed"}  # a newer drzero's extra keys are not ours to set
    outcome = SeedOutcome(seed=seed, **{k: v for k, v in record.items() if k in known})
    outcome.stop_reasons, outcome.invalid_reasons = Counter(outcome.stop_reasons), Counter(outcome.invalid_reasons)
    return outcome


