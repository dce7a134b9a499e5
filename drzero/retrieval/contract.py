"""The ``POST /retrieve`` contract: how a request body is read, and the shape of the answer.

Clients we did not write must keep working — verl 0.7.1's ``SearchTool``, Search-R1's client, a body
written for Search-R1's rerank server — so a request is read liberally:

- keys other than ``queries``, ``topk`` and ``return_scores`` are ignored (the rerank body's
  ``topk_retrieval``/``topk_rerank``);
- ``topk`` may be ``3``, ``3.0``, ``"3"`` or ``"3.0"``; ``0`` and ``null`` mean the server's ``--topk``
  (Search-R1's server: ``if not request.topk``);
- ``return_scores`` may be ``true``/``false``, ``1``/``0`` or those as strings; ``null`` means true;
- ``queries: []`` is answered ``{"result": []}``.

One bad query (not a string, empty, over ``--max-query-chars``, holding a lone UTF-16 surrogate) does not
fail its request: its entry in ``result`` is an empty list and ``errors`` says why. verl's tool turns any
non-200 into "Search error: API Call Failed" for every query of the call, and both verl's and Search-R1's
clients read each entry of ``result`` as a list of hits (``doc["document"]["contents"]``), so an empty list
is the one entry both survive: the model sees no passages for that query and the rest as usual.

What cannot be read as a request at all is refused with the service's error shape ``{"detail", "field"}``:
400 for a body that is not UTF-8 JSON (malformed, nested too deep, a number too long), 422 for a body that
is not an object, ``queries`` missing or not a list, ``topk`` negative, fractional, not a number or over
``--max-topk``, ``return_scores`` not a truth value, or a request over ``--max-queries`` /
``--max-request-chars``.
"""

from __future__ import annotations

import codecs
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

KEYS = ("queries", "topk", "return_scores")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}

# The request body as /docs shows it: the types clients should send (the reader accepts more, see above).
REQUEST_SCHEMA = {
    "type": "object",
    "required": ["queries"],
    "properties": {
        "queries": {"type": "array", "items": {"type": "string"},
                    "description": "search queries, one result list each; a bad one gets an empty list and an "
                                   "entry in 'errors'"},
        "topk": {"type": "integer", "minimum": 0, "description": "passages per query; 0 or absent: the server's "
                                                                 "--topk"},
        "return_scores": {"type": "boolean", "default": True,
                          "description": "wrap each document with its cosine score"},
    },
    "example": {"queries": ["who proposed indistinguishability obfuscation?"], "topk": 3, "return_scores": True},
}


class RequestLimits(Protocol):
    """What reading a request checks; ``RetrieverConfig`` (``drzero serve-retriever``'s settings) has these."""

    topk: int
    max_topk: int
    max_queries: int
    max_query_chars: int
    max_request_chars: int


class RequestRefused(Exception):
    """The body cannot be read as a request: answered ``status`` with ``{"detail", "field"}``."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


@dataclass
class RetrieveRequest:
    """A request as read: every query as sent, which of them are searched, and why the others are not."""

    queries: list[Any]
    topk: int
    return_scores: bool
    searchable: list[int] = field(default_factory=list)  # indices of the queries that are searched
    errors: list[dict] = field(default_factory=list)  # {"index", "field", "detail"} for each one that is not
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def search_queries(self) -> list[str]:
        return [self.queries[index] for index in self.searchable]

    def answer(self, hits: list[list[Any]]) -> dict:
        """The response body: one list per query sent, in order (``hits`` holds the searched ones')."""
        result: list[list] = [[] for _ in self.queries]
        for index, per_query in zip(self.searchable, hits, strict=True):
            result[index] = [hit.to_json(self.return_scores) for hit in per_query]
        return {"result": result, "errors": self.errors} if self.errors else {"result": result}


def read_request(body: bytes, limits: RequestLimits) -> RetrieveRequest:
    """The request in ``body``, or RequestRefused saying what is wrong with it."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise RequestRefused(422, "body", f"expected a JSON object with a 'queries' list, got {_kind(data)}")
    if "queries" not in data:
        raise RequestRefused(422, "queries", 'missing; send {"queries": ["your question"]}')
    queries = data["queries"]
    if not isinstance(queries, list):
        raise RequestRefused(422, "queries", f"expected a list of strings, got {_kind(queries)}")
    if len(queries) > limits.max_queries:
        raise RequestRefused(422, "queries", f"{len(queries)} queries in one request; the limit is "
                                             f"{limits.max_queries} (--max-queries); split them over several requests")
    request = RetrieveRequest(queries, topk=read_topk(data.get("topk"), limits),
                              return_scores=read_flag(data.get("return_scores"), "return_scores", default=True),
                              ignored_keys=[key for key in data if key not in KEYS])
    chars = 0
    for index, query in enumerate(queries):
        problem = query_problem(query, limits.max_query_chars)
        if problem is None:
            request.searchable.append(index)
            chars += len(query)
        else:
            request.errors.append({"index": index, "field": f"queries[{index}]",
                                   "detail": f"queries[{index}]: {problem}"})
    if chars > limits.max_request_chars:
        raise RequestRefused(422, "queries", f"the queries hold {chars} characters in all; the limit per request is "
                                             f"{limits.max_request_chars} (--max-request-chars); split them over "
                                             f"several requests")
    return request


def parse_json(body: bytes) -> Any:
    """``body`` as JSON text in UTF-8 (a leading byte-order mark is allowed), or RequestRefused (400)."""
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8):]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestRefused(400, "body", f"the body is not UTF-8 text (byte 0x{body[error.start]:02x} at offset "
                                          f"{error.start}); send JSON encoded as UTF-8") from None
    if not text.strip():
        raise RequestRefused(400, "body", 'the body is empty; send a JSON object such as {"queries": ["a question"]}')
    try:
        return json.loads(text)  # the standard parser: it reads "\ud800" (a lone surrogate) as a model may send it
    except json.JSONDecodeError as error:
        raise RequestRefused(400, "body", f"malformed JSON ({error.msg} at line {error.lineno} column "
                                          f"{error.colno})") from None
    except RecursionError:
        raise RequestRefused(400, "body", "the JSON is nested too deeply to read; a request is one object holding "
                                          "a list of query strings") from None
    except ValueError:  # an integer over Python's conversion limit
        raise RequestRefused(400, "body", f"the JSON holds a number of more than {sys.get_int_max_str_digits()} "
                                          f"digits; topk is a small whole number") from None


def read_topk(value: Any, limits: RequestLimits) -> int:
    """``topk`` as sent: a whole number, maybe as a float or a string; 0 or null is the server's default."""
    number = _whole_number(value) if value is not None else 0
    if number is None:
        raise RequestRefused(422, "topk", f"expected a whole number of passages such as 3, got {_kind(value)}")
    if number < 0:
        raise RequestRefused(422, "topk", f"{_show(number)} is negative; send a number of passages from 1 to "
                                          f"{limits.max_topk}, or 0 for the server's default ({limits.topk})")
    if number > limits.max_topk:
        raise RequestRefused(422, "topk", f"{_show(number)} is above the limit of {limits.max_topk} (--max-topk)")
    return number or limits.topk


def read_flag(value: Any, name: str, default: bool) -> bool:
    """A truth value as clients send it: true/false, 1/0, or those as strings; null is ``default``."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestRefused(422, name, f"expected true or false, got {_kind(value)}")


def query_problem(query: Any, max_chars: int) -> str | None:
    """Why ``query`` cannot be searched, or None when it can."""
    if not isinstance(query, str):
        return f"expected a string, got {_kind(query)}"
    if not query.strip():
        return "query is empty"
    if len(query) > max_chars:
        return f"query is {len(query)} characters; the limit is {max_chars} (--max-query-chars); shorten it"
    bad = unencodable_at(query)
    if bad is not None:  # JSON allows "\ud800"; the tokenizer does not, and would fail the whole batch
        return (f"query holds a lone UTF-16 surrogate ({query[bad]!r} at character {bad}), which is not text; "
                f"remove it or replace it with U+FFFD")
    return None


def unencodable_at(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (valid in JSON, not in Unicode text), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool):  # JSON true is no count of passages, though Python's bool is an int
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():  # not NaN, not infinite, no fraction
        return int(value)
    return None


def _show(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _kind(value: Any) -> str:
    """``value`` as JSON names it, without echoing a large or deeply nested one."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {_show(value)}"
    if isinstance(value, str):
        return f"the string {_show(repr(value))}"
    return "a list" if isinstance(value, list) else "an object"
