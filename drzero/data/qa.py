"""Reading a QA file: what ``drzero evaluate`` and ``drzero make-eval-set``'s output have in common.

    items, rows_in_file = read_qa_file("/corpus/data/eval_demo.parquet", limit=100)
    items[0].question, items[0].golden_answers, items[0].hops

``read_qa_file`` reads parquet or JSONL (or a JSON list) with either Search-R1/FlashRAG columns
(``question``, ``golden_answers``, ``data_source``) or verl rows whose question sits in the prompt after
``Question:`` and whose answers are ``reward_model.ground_truth.target`` (Search-R1's test.parquet has
both; so do our files). Bad input is a ``ConfigError`` that names the file and the row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from drzero.config import ConfigError

UNKNOWN_HOPS = "unknown"
QUESTION_MARKER = "Question:"  # our solver prompt and Search-R1's both end with "Question: <question>"
QA_SUFFIXES = (".parquet", ".jsonl", ".json")
_SEARCH_ZERO = re.compile(r"search_zero_(\d+)")


@dataclass(frozen=True)
class QaItem:
    index: int                         # row number in the file, from 0
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    hops: str                          # "1".."4" (from extra_info.hops, a hops column or search_zero_{h}) or "unknown"
    id: str | None = field(default=None, compare=False)  # the row's own id, when it has one (FlashRAG's "test_0")


def text_answers(value) -> list[str]:
    """Gold answers from a list, a string, a number or ``{"target": ...}``; blanks dropped."""
    if isinstance(value, dict):
        value = value.get("target")
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def question_from_prompt(prompt) -> str | None:
    """The text after the last ``Question:`` of the last user message that has one (or of a plain string)."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        texts = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    else:
        return None
    for text in reversed([t for t in texts if isinstance(t, str)]):
        _, marker, question = text.rpartition(QUESTION_MARKER)
        if marker and question.strip():
            return question.strip()
    return None


def question_of(row: dict) -> str | None:
    for value in (row.get("question"), _as_dict(row.get("extra_info")).get("question")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return question_from_prompt(row.get("prompt"))


def golden_answers_of(row: dict) -> list[str]:
    """``golden_answers`` (Search-R1), else ``reward_model.ground_truth`` (verl), else an ``answer`` field."""
    candidates = (row.get("golden_answers"), _as_dict(row.get("reward_model")).get("ground_truth"),
                  row.get("answers"), row.get("answer"), _as_dict(row.get("extra_info")).get("answer"))
    for value in candidates:
        answers = text_answers(value)
        if answers:
            return answers
    return []


def hops_label(row: dict, data_source: str) -> str:
    for value in (_as_dict(row.get("extra_info")).get("hops"), row.get("hops")):
        if value is not None and str(value).strip().isdigit():
            return str(int(str(value).strip()))
    match = _SEARCH_ZERO.fullmatch(data_source)
    return match.group(1) if match else UNKNOWN_HOPS


def _load_rows(path: Path, limit: int | None) -> tuple[list[dict], int]:
    """(the first ``limit`` rows, rows in the file)."""
    if path.suffix == ".parquet":
        import pyarrow as pa  # ~0.1 s to import, and an optional extra: only for parquet files
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise ConfigError(f"data={str(path)!r} is not a readable parquet file ({error}).") from error
        return table.slice(0, limit).to_pylist(), table.num_rows
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), 1):  # numbered here: the error's own lineno is 1
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        error.lineno = number
                        raise
    except json.JSONDecodeError as error:
        raise ConfigError(f"data={str(path)!r} is not JSON lines or a JSON list (line {error.lineno}: "
                          f"{error.msg}).") from error
    if not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"data={str(path)!r}: every record must be a JSON object with a question and its answers.")
    return rows[:limit], len(rows)


def read_qa_file(path: str | Path, limit: int | None = None) -> tuple[list[QaItem], int]:
    """(QA items of the first ``limit`` rows, rows in the file); ConfigError naming the file on bad input."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data={str(path)!r} is not valid: expected an existing parquet or JSONL file.")
    rows, total = _load_rows(path, limit)
    if not rows:
        raise ConfigError(f"data={str(path)!r} holds no rows; expected one question per row "
                          f"(Search-R1 format: question, golden_answers, data_source).")
    default_source = path.stem  # FlashRAG files carry no data_source: name them after the file
    items = []
    for index, row in enumerate(rows):
        question = question_of(row)
        if question is None:
            columns = ", ".join(sorted(row)) or "none"
            raise ConfigError(
                f"data={str(path)!r}: row {index} has no question (columns: {columns}); expected a 'question' "
                f"column, extra_info.question, or a user prompt that ends with '{QUESTION_MARKER} ...'.")
        answers = golden_answers_of(row)
        if not answers:
            raise ConfigError(
                f"data={str(path)!r}: row {index} ({question[:60]!r}) has no gold answer; expected "
                f"'golden_answers' or reward_model.ground_truth.target (a proposer seed parquet has none: "
                f"evaluate on solver data or an eval set).")
        source = str(row.get("data_source") or default_source)
        row_id = row.get("id")
        items.append(QaItem(index, question, tuple(answers), source, hops_label(row, source),
                            None if row_id is None else str(row_id)))
    return items, total
