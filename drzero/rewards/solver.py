"""Solver reward: exact match of the last ``<answer>`` against any target, after SQuAD normalization.

verl loads this file by path (``reward.custom_reward_function.path``) and calls
``compute_score`` once per trajectory with the decoded response (all turns, tool results
included) and the row's ``reward_model.ground_truth``.
"""

from __future__ import annotations

import re
import string

from drzero.prompts import last_tag

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def targets_of(ground_truth) -> list[str]:
    """``{"target": str | [str]}`` (the parquet form), a bare string, or a list -> a list of strings."""
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth.get("target")
    if ground_truth is None:
        return []
    if isinstance(ground_truth, str):
        return [ground_truth]
    return [str(t) for t in ground_truth]


def exact_match(prediction: str | None, targets: list[str]) -> bool:
    if prediction is None:
        return False
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(t) for t in targets)


def compute_score(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None,
                  **kwargs) -> dict:
    """1.0 when the last <answer> matches a target; the same keys for every sample.

    ``budget_cut`` is 1 when the response budget ended the trajectory (``drzero.rollout.agent_loop``
    records it in the row's extra info).
    """
    prediction = last_tag(solution_str, "answer")
    return {"score": float(exact_match(prediction, targets_of(ground_truth))),
            "answered": float(prediction is not None),
            "budget_cut": float(bool((extra_info or {}).get("budget_cut")))}
