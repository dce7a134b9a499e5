"""Readers: turn files into Documents.

Supported: ``.jsonl`` and ``.json`` records, ``.txt`` and ``.md`` files, and PDFs.

A JSON file is a list of records, one record, or an object with one key holding the list of
records under any name (``{"papers": [...]}``); the key found is named in the ingest summary.
A record's text is its first non-empty field of ``TEXT_FIELDS`` (``contents`` Search-R1 style,
with the title on its first line) and its title the first of ``TITLE_FIELDS``, unless
``--text-field`` / ``--title-field`` say otherwise. Its other fields become passage metadata,
lists flattened (``authors: [{"value": "A"}, {"value": "B"}]`` -> ``"A; B"``).

A directory is walked without recursion (any depth), symlinked directories unfollowed. A file
that cannot be read, or whose type is not supported, is skipped with a warning and counted in
the ``ReadReport``; so is a malformed record or a JSONL line that is not valid UTF-8 or JSON,
and the rest of its file is still read.

A JSONL file is read a line at a time (one file can be a whole corpus: wiki-18 is 21 M lines), so
its documents go on as they are read; every other file is read whole first, and one that fails
part-way counts nothing. ``ReadReport.bytes_read`` follows the reading, for a progress estimate.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from drzero.corpus.documents import Document

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt", ".md", ".pdf")
STREAMED_SUFFIXES = (".jsonl", ".jsonl.gz")  # read a line at a time; the others are read whole
TEXT_FIELDS = ("text", "contents", "abstract", "body", "content")
TITLE_FIELDS = ("title", "name")
# Metadata keys every passage carries itself; a record field of the same name is kept under "record_<name>".
RESERVED_METADATA = ("title", "source", "chunk")
# A metadata value longer than this is cut: metadata travels with every search hit.
MAX_METADATA_CHARS = 1000
# Files larger than this get a warning with their size and the passages they will make.
HUGE_FILE_BYTES = 50 * 1024 * 1024
# Control characters (NUL and friends) carry no text; tabs and newlines stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class RecordFields:
    """How records are read: which fields hold the text, the title, the metadata, the prepended text."""

    text_field: str | None = None
    title_field: str | None = None
    metadata_fields: tuple[str, ...] | None = None   # None: every other field
    prepend_fields: tuple[str, ...] = ()             # written as "Name: value" lines before the text


@dataclass
class ReadReport:
    files_read: int = 0
    records_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    wrappers: dict[str, str] = field(default_factory=dict)         # JSON file -> key that held its records
    huge_files: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes)
    bytes_read: int = 0  # of the files read so far (a JSONL file's as its lines are read)

    def skip(self, where: str, why: str) -> None:
        log.warning("skipping %s: %s", where, why)
        self.skipped.append((where, why))


def _title_from_stem(path: Path) -> str:
    return re.sub(r"[_\-]+", " ", path.stem).strip() or path.name


def flatten_value(value: object) -> str | int | float | bool | None:
    """A JSON value as one ChromaDB metadata scalar: lists joined with "; ", ``{"value": x}`` read as x."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:MAX_METADATA_CHARS]
    if isinstance(value, dict):
        for key in ("value", "name", "text"):
            if key in value:
                return flatten_value(value[key])
        if len(value) == 1:
            return flatten_value(next(iter(value.values())))
        return json.dumps(value, ensure_ascii=False)[:MAX_METADATA_CHARS]
    if isinstance(value, list):
        parts = [flatten_value(item) for item in value]
        return "; ".join(str(p) for p in parts if p not in (None, ""))[:MAX_METADATA_CHARS]
    return str(value)[:MAX_METADATA_CHARS]


def _unreadable(record: dict, why: str, flag: str, candidates: tuple[str, ...]) -> ValueError:
    keys = ", ".join(sorted(record)) or "(none)"
    return ValueError(f"{why} (looked for {', '.join(map(repr, candidates))}); the record's keys are: {keys}. "
                      f"Pass {flag} KEY to read one of them.")


def record_to_document(record: object, source: str, fields: RecordFields = RecordFields()) -> Document:
    """One JSON record -> Document; raises ValueError naming the keys seen and the flag that would read it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    text_names = (fields.text_field,) if fields.text_field else TEXT_FIELDS
    title_names = (fields.title_field,) if fields.title_field else TITLE_FIELDS
    text_key = next((k for k in text_names if isinstance(record.get(k), str) and record[k].strip()), None)
    if text_key is None:
        present = [k for k in text_names if k in record]
        why = (f"field {present[0]!r} is not a non-empty string" if present else "no text field")
        raise _unreadable(record, why, "--text-field", text_names)
    title_key = next((k for k in title_names if k in record), None)
    title = record.get(title_key) if title_key else None
    if title is not None and not isinstance(title, str):
        title = flatten_value(title)
        title = "" if title is None else str(title)
    text = record[text_key]
    if text_key == "contents" and title is None:
        # Search-R1 corpora put the title, often quoted, on the first line of `contents`.
        first, _, rest = text.partition("\n")
        title, text = first.strip().strip('"'), rest
        if not text.strip():
            raise _unreadable(record, "field 'contents' holds a title line but no text", "--text-field", text_names)
    # A field a record lacks (or holds empty) is left out of its lines, not an error: records vary.
    lines = [f"{k.replace('_', ' ').capitalize()}: {value}" for k in fields.prepend_fields
             if (value := flatten_value(record.get(k))) not in (None, "")]
    if lines:
        text = "\n".join(lines) + "\n\n" + text.strip()
    used = {text_key, title_key, "source"}
    names = fields.metadata_fields if fields.metadata_fields is not None else [k for k in record if k not in used]
    metadata = {}
    for name in names:
        value = flatten_value(record.get(name))
        if value is not None and value != "":
            metadata[f"record_{name}" if name in RESERVED_METADATA else name] = value
    return Document(title=(title or "").strip(), text=_CONTROL.sub("", text).strip(),
                    source=str(record.get("source") or source), metadata=metadata)


def _read_jsonl(path: Path, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    with path.open("rb") as handle:
        yield from _jsonl_lines(path, handle, report, fields, lambda raw: len(raw))


def _read_jsonl_gz(path: Path, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    """A gzipped JSONL file (as wiki-18 is distributed), decompressed as it is read: the progress follows the
    compressed bytes, so it ends at the file's size."""
    with path.open("rb") as compressed, gzip.GzipFile(fileobj=compressed) as handle:
        last = [0]

        def consumed(_raw: bytes) -> int:
            now = compressed.tell()
            step, last[0] = now - last[0], now
            return step

        # a truncated or corrupt archive raises part-way: the lines before it are kept (see _streamed)
        yield from _jsonl_lines(path, handle, report, fields, consumed)


def _jsonl_lines(path: Path, handle, report: ReadReport, fields: RecordFields,
                 consumed: Callable[[bytes], int]) -> Iterator[Document]:
    # Bytes, decoded line by line: one bad byte costs its line, not the file.
    for line_number, raw in enumerate(handle, 1):
        report.bytes_read += consumed(raw)
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            report.skip(where, f"not valid UTF-8 at byte {error.start}: {raw[error.start:error.start + 4]!r}")
            continue
        if not line.strip():
            continue
        try:
            document = record_to_document(json.loads(line), where, fields)
        except (json.JSONDecodeError, ValueError) as error:
            report.skip(where, str(error))
            continue
        report.records_read += 1
        yield document


def find_records(data: object, path: Path, report: ReadReport) -> list:
    """The list of records in a parsed JSON file: the file itself, or the one list-of-objects key of its object."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"expected a list of records or an object, got {type(data).__name__}")
    if any(isinstance(data.get(k), str) for k in TEXT_FIELDS):
        return [data]   # one record
    lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(lists) == 1:
        report.wrappers[str(path)] = lists[0]
        return data[lists[0]]
    if not lists:
        return [data]   # read as one record, whose error names its keys
    raise ValueError(f"{len(lists)} keys hold lists of records ({', '.join(lists)}); expected one. "
                     f"Write the records of one of them to their own .json or .jsonl file.")


def _read_json(path: Path, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for index, record in enumerate(find_records(data, path, report)):
        where = f"{path}#{index}"
        try:
            document = record_to_document(record, where, fields)
        except ValueError as error:
            report.skip(where, str(error))
            continue
        report.records_read += 1
        yield document


def _read_text(path: Path, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    text = _CONTROL.sub("", path.read_text(encoding="utf-8", errors="replace"))
    title = _title_from_stem(path)
    heading = re.match(r"\s*#\s+(.+)\n", text)
    if path.suffix == ".md" and heading:
        title, text = heading.group(1).strip(), text[heading.end():]
    if text.strip():
        report.records_read += 1
        yield Document(title=title, text=text.strip(), source=str(path))
    else:
        report.skip(str(path), "file is empty (no text)")


def _read_pdf(path: Path, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    from pypdf import PdfReader  # ~0.1 s to import; only PDFs need it

    reader = PdfReader(str(path))
    if reader.is_encrypted:
        raise ValueError("PDF is encrypted")
    pages = [page.extract_text() or "" for page in reader.pages]
    # Re-join words hyphenated across line breaks, then fold the layout's hard line breaks.
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", "\n".join(pages))
    text = _CONTROL.sub("", re.sub(r"[ \t]*\n[ \t]*(?!\n)", " ", text))
    meta_title = (reader.metadata.title if reader.metadata else None) or ""
    if not text.strip():
        report.skip(str(path), "PDF has no extractable text (scanned images need OCR first)")
        return
    report.records_read += 1
    yield Document(title=meta_title.strip() or _title_from_stem(path), text=text.strip(), source=str(path))


_READERS = {".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl_gz, ".json": _read_json, ".txt": _read_text, ".md": _read_text, ".pdf": _read_pdf}


def file_kind(path: Path) -> str:
    """The suffix that picks a file's reader: ``.jsonl.gz`` for a gzipped JSONL file, else the last suffix."""
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def walk_files(root: Path, report: ReadReport) -> list[Path]:
    """Every non-hidden file below ``root``, with an explicit stack (no depth limit); symlinked dirs unfollowed."""
    files: list[Path] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            report.skip(str(directory), f"unreadable directory: {error.strerror or error}")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_symlink() and entry.is_dir():
                    report.skip(entry.path, "symlinked directory not followed (it may loop); name it directly")
                elif entry.is_file():
                    files.append(Path(entry.path))
            except OSError as error:
                report.skip(entry.path, f"unreadable: {error.strerror or error}")
    return sorted(files)


def expand_sources(sources: list[str | Path], report: ReadReport) -> list[Path]:
    """Files named directly plus every file below named directories, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(walk_files(path, report))
        elif path.is_file():
            files.append(path)
        else:
            report.skip(str(path), "no such file or directory")
    return files


def read_documents(files: list[Path], report: ReadReport, fields: RecordFields = RecordFields()) -> Iterator[Document]:
    """Documents from every readable file; the rest is skipped and recorded in ``report``."""
    for path in files:
        reader = _READERS.get(file_kind(path))
        if reader is None:
            report.skip(str(path), f"unsupported file type {path.suffix or '(none)'!r}; "
                                   f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
            continue
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        if size > HUGE_FILE_BYTES:
            report.huge_files.append((str(path), size))
        if file_kind(path) in STREAMED_SUFFIXES:
            yield from _streamed(reader, path, size, report, fields)
            continue
        records_before, skipped_before = report.records_read, len(report.skipped)
        try:
            documents = list(reader(path, report, fields))
        except Exception as error:  # any reader failure: one bad file must not end the ingest
            # What this file counted is undone: the summary counts only what was kept.
            report.records_read = records_before
            del report.skipped[skipped_before:]
            report.skip(str(path), f"unreadable: {type(error).__name__}: {error}")
            continue
        finally:
            report.bytes_read += size
        report.files_read += 1
        yield from documents


def _streamed(reader, path: Path, size: int, report: ReadReport, fields: RecordFields) -> Iterator[Document]:
    """A file's documents as they are read; one that fails part-way keeps what it gave (and counts it)."""
    records_before, skipped_before, bytes_before = report.records_read, len(report.skipped), report.bytes_read
    try:
        yield from reader(path, report, fields)
    except Exception as error:  # an I/O error part-way: the records before it are already on their way
        report.bytes_read = bytes_before + size
        kept = report.records_read - records_before
        if not kept:
            del report.skipped[skipped_before:]
            report.skip(str(path), f"unreadable: {type(error).__name__}: {error}")
            return
        report.skip(str(path), f"stopped after {kept} records: {type(error).__name__}: {error}")
    report.files_read += 1
