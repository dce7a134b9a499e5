"""The record every reader produces and every chunker consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One source document before it is split into passages.

    ``source`` says where it came from (a file path, ``path#record-3`` for one record of a
    JSONL file, or ``demo:paper/P0012`` for the demo corpus) and ends up in each passage's
    metadata, so a search hit can be traced back. ``metadata`` holds a record's other fields,
    flattened to the scalars ChromaDB stores (lists joined with ``"; "``).
    """

    title: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)
