"""Split documents into passages of roughly 100-200 words on sentence boundaries.

Passages follow the Search-R1 corpus layout (``contents = "title\\ntext"``), so the title
travels with every passage and a search hit reads on its own. Consecutive passages share a
few trailing sentences (``overlap_words``) so that a fact that straddles a cut is whole in
at least one of them.

Text with no sentence ends and no spaces (a minified dump, a file of NUL bytes) would make one
huge "word": every passage is also cut at ``max_chars`` characters, so no passage, and no
search response, is larger than that.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from drzero.corpus.documents import Document

# A sentence ends at . ! or ? followed by space and an upper-case letter, digit, quote or bracket;
# blank lines (paragraphs) always end one. Abbreviations like "e.g. the" stay whole (lower case).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])|\n\s*\n")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    source: str
    chunk: int
    extra: tuple[tuple[str, object], ...] = ()   # the document's own metadata (record fields)

    @property
    def contents(self) -> str:
        return f"{self.title}\n{self.text}"

    @property
    def metadata(self) -> dict:
        return {**dict(self.extra), "title": self.title, "source": self.source, "chunk": self.chunk}


def passage_id(contents: str) -> str:
    """Stable id from the passage's content: the same text always gets the same id."""
    return hashlib.sha256(contents.encode("utf-8")).hexdigest()[:32]


def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def default_max_chars(max_words: int) -> int:
    # 12 characters a word is about twice English's average (~6 with the space): ordinary text never
    # reaches the cap, a run of characters with no spaces is cut at it.
    return max_words * 12


def _word_windows(sentence: str, max_words: int, max_chars: int) -> list[str]:
    words = sentence.split()
    windows = [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]
    return [w[i:i + max_chars] for w in windows for i in range(0, len(w), max_chars)]


def split_text(text: str, max_words: int = 200, overlap_words: int = 30, max_chars: int | None = None) -> list[str]:
    """Greedy packing of whole sentences up to ``max_words``; a longer sentence is cut in windows.

    No passage is longer than ``max_chars`` characters (default ``default_max_chars(max_words)``).
    """
    max_chars = max_chars or default_max_chars(max_words)
    sentences: list[str] = []
    for sentence in split_sentences(text):
        too_long = len(sentence.split()) > max_words or len(sentence) > max_chars
        sentences.extend(_word_windows(sentence, max_words, max_chars) if too_long else [sentence])
    counts = [len(s.split()) for s in sentences]
    chunks: list[str] = []
    start = 0
    while start < len(sentences):
        end, words = start, 0
        chars = 0
        while end < len(sentences) and (end == start or (words + counts[end] <= max_words
                                                         and chars + 1 + len(sentences[end]) <= max_chars)):
            words += counts[end]
            chars += len(sentences[end]) + (end > start)
            end += 1
        chunks.append(" ".join(sentences[start:end]))
        if end == len(sentences):
            break
        # Step back over trailing sentences worth at most overlap_words, always moving forward.
        next_start, overlap = end, 0
        while next_start - 1 > start and overlap + counts[next_start - 1] <= overlap_words:
            next_start -= 1
            overlap += counts[next_start]
        start = next_start
    return chunks


def split_document(document: Document, max_words: int = 200, overlap_words: int = 30,
                   max_chars: int | None = None) -> list[Passage]:
    passages = []
    extra = tuple(sorted(document.metadata.items()))
    for index, text in enumerate(split_text(document.text, max_words, overlap_words, max_chars)):
        contents = f"{document.title}\n{text}"
        passages.append(Passage(id=passage_id(contents), title=document.title, text=text,
                                source=document.source, chunk=index, extra=extra))
    return passages
