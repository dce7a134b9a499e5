"""How an evaluation scores one answer against a question's golden answers, as the QA papers do.

    em("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    f1("Paris, France", ["Paris"]) == 2 / 3
    cover_em("in 1987 probably", ["1987"]) == 1.0

All three normalize with SQuAD's rule (``drzero.rewards.solver.normalize_answer``: lower case, ASCII
punctuation and the articles a/an/the removed, whitespace collapsed), the rule of Search-R1's EM reward,
FlashRAG's evaluator and Dr. Zero's solver reward, and take the best golden answer. A missing ``<answer>``
(None) scores 0.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from drzero.rewards.solver import exact_match, normalize_answer


def em(prediction: str | None, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer (the solver reward's test)."""
    return float(exact_match(prediction, list(golds)))


def f1(prediction: str | None, golds: Sequence[str]) -> float:
    """SQuAD token F1 of the normalized prediction, best over the gold answers; 0.0 without a prediction."""
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        expected = normalize_answer(gold).split()
        if not predicted or not expected:
            score = float(predicted == expected)  # SQuAD: two empty answers agree
        else:
            common = sum((Counter(predicted) & Counter(expected)).values())
            precision, recall = common / len(predicted), common / len(expected)
            score = 2 * precision * recall / (precision + recall) if common else 0.0
        best = max(best, score)
    return best


def cover_em(prediction: str | None, golds: Sequence[str]) -> float:
    """1.0 when a normalized gold answer appears in the normalized prediction as whole words (so >= EM)."""
    if prediction is None:
        return 0.0
    normalized = normalize_answer(prediction)
    padded = f" {normalized} "
    return float(any(gold == normalized or (gold and f" {gold} " in padded)
                     for gold in map(normalize_answer, golds)))
