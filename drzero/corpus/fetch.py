"""Corpus and index files fetched where they will be used: from a URL or a Hugging Face dataset, resumable, checked.

    python -m backends.modal download-corpus https://host/wiki-18.jsonl.gz --to wiki18      # on Modal, into
    python -m backends.modal download-corpus --hub-dataset PeterJinGo/wiki-18-e5-index \\   # /corpus/files/wiki18
        --files part_aa part_ab --to wiki18

A URL is streamed to a hidden partial file beside the target (``.NAME.part``, which ``drzero ingest`` of the
directory does not read) with a record of what is being fetched (``.NAME.fetch.json``: the URL, the size the
server gave, its ETag or Last-Modified). A dropped connection is resumed with an HTTP Range request from the
partial's size, a few times in place and again by the next run (a retried or preempted container): the
server's ETag guards the resume (``If-Range``), and a server that no longer has the file of the size it gave
is refused. ``commit`` (the Modal volume's commit) runs every ``commit_every`` bytes, so a new container sees
what the last one wrote. The file is renamed into place only once its size matches Content-Length and, when the
user gave one, its sha256 matches; a file that does not is moved aside, never left looking complete. A later
run of the same URL finds the record of a finished download and fetches nothing.

A hub dataset goes through drzero.models.download, the path model weights take: its files (names or patterns)
are fetched in batches, committed after each and verified against the hub's sizes and hashes.

Nothing here imports Modal; the tests serve files from a local HTTP server.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from drzero.atomic import fsync_directory, write_json_atomically
from drzero.models import download as hub
from drzero.records import DamagedRecord, read_record, set_aside

CHUNK = 1024**2
COMMIT_EVERY = 2 * 1024**3     # a lost container costs at most this much of the download
PROGRESS_EVERY = 30.0          # seconds between progress lines
ATTEMPTS = 5                   # connections per run before the run gives up (the next run continues)
TIMEOUT = 60.0                 # seconds without a byte before a connection counts as dropped
FETCH_RECORD = {"url": str, "size": (int, None), "etag": (str, None), "last_modified": (str, None),
                "sha256": (str, None), "complete": bool}
HUB_PREFIX = "hf://datasets/"  # huggingface_hub's own way of writing a dataset's address
RETRIED_STATUS = {408, 425, 429, 500, 502, 503, 504}   # the server may answer later; the others will not change
SHA256 = re.compile(r"[0-9a-f]{64}")

Log = Callable[[str], None]


class FetchError(RuntimeError):
    """A download refused: the URL, what was wrong and what to do, in one sentence. Running it again repeats it."""


class FetchInterrupted(FetchError):
    """The connection failed too often; what was fetched is kept, and running the same command again continues."""


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _progress(have: int, total: int | None, started: float, fetched: int) -> str:
    rate = fetched / max(time.monotonic() - started, 1e-6)
    if total is None:
        return f"{hub.human(have)}, {hub.human(rate)}/s"
    eta = f", ETA {duration((total - have) / rate)}" if rate > 0 and total > have else ""
    return f"{hub.human(have)} of {hub.human(total)} ({100 * have / max(total, 1):.0f}%), {hub.human(rate)}/s{eta}"


def split_sha256(url: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` (pip's way of pinning a download) -> (URL, HEX); the fragment never reaches the server."""
    base, _, fragment = url.partition("#")
    found = re.fullmatch(r"sha256=(.*)", fragment)
    return (base, found.group(1).lower()) if found else (base, None)


def url_file_name(url: str) -> str:
    """The file name a URL names (its path's last part, unquoted)."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = PurePosixPath(path).name
    if path.endswith("/") or name in ("", ".", ".."):
        raise FetchError(f"{url} names no file (its path ends in '/'); give the URL of the file itself")
    return name


class _Download:
    """One URL into one file: the partial file, its record, the hash of what the partial holds."""

    def __init__(self, url: str, dest: Path, commit: Callable[[], None], log: Log, commit_every: int):
        self.url, self.dest, self.commit, self.log, self.commit_every = url, dest, commit, log, commit_every
        self.partial = dest.with_name(f".{dest.name}.part")
        self.record_path = dest.with_name(f".{dest.name}.fetch.json")
        self.record: dict | None = None
        self.hasher = hashlib.sha256()
        self.hashed = 0            # bytes of the partial that ``hasher`` has seen

    def read_record(self) -> dict | None:
        try:
            return read_record(self.record_path, FETCH_RECORD)
        except DamagedRecord as damage:
            set_aside(self.record_path, str(damage), "the file is fetched afresh", self.log)
            return None

    def save_record(self, **values) -> None:
        self.record = {**(self.record or {"url": self.url, "size": None, "etag": None, "last_modified": None,
                                          "sha256": None, "complete": False}), **values}
        write_json_atomically(self.record, self.record_path)

    def have(self) -> int:
        return self.partial.stat().st_size if self.partial.is_file() else 0

    def start_over(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.hasher, self.hashed = hashlib.sha256(), 0

    def hash_partial(self) -> None:
        """Bring the hash up to the partial's end (what an earlier run or connection wrote)."""
        with self.partial.open("rb") as handle:
            handle.seek(self.hashed)
            while chunk := handle.read(CHUNK):
                self.hasher.update(chunk)
                self.hashed += len(chunk)

    def refuse(self, what: str) -> FetchError:
        """Move the partial and its record aside (the next run starts afresh) and say so in one sentence."""
        self.record_path.unlink(missing_ok=True)
        aside = None
        if self.partial.exists():
            aside = set_aside(self.partial, what, "the next run fetches the file afresh", lambda line: None)
        self.commit()
        where = f"; moved what was fetched to {aside.name}" if aside else ""
        return FetchError(f"{self.url}: {what}{where}, so the next run fetches it afresh")

    def open(self, have: int) -> http.client.HTTPResponse:
        headers = {"User-Agent": "drzero", "Accept-Encoding": "identity"}  # the bytes as stored, .gz included
        if have:
            headers["Range"] = f"bytes={have}-"
            etag = (self.record or {}).get("etag")
            strong = etag if etag and not etag.startswith("W/") else None   # If-Range takes only a strong ETag
            validator = strong or (self.record or {}).get("last_modified")
            if validator:  # a file changed on the server comes back whole (200), not as a wrong tail
                headers["If-Range"] = validator
        return urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT)

    def connect(self) -> tuple[http.client.HTTPResponse | None, int | None]:
        """A response positioned where the partial ends (None: the partial is already whole), and the full size."""
        have = self.have()
        try:
            response = self.open(have)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and have:   # nothing after the partial's end
                total = content_range_total(error.headers.get("Content-Range"))
                if total == have or (total is None and (self.record or {}).get("size") == have):
                    return None, have
                raise self.refuse(f"the server's file is {hub.human(total) if total else 'shorter'} ("
                                  f"{total or 'size unknown'} bytes), less than the {have} bytes already fetched")
            raise
        if response.status == 206:
            start, total = content_range(response.headers.get("Content-Range"))
            if start != have:
                response.close()
                raise self.refuse(f"asked for bytes from {have}, the server sent bytes from {start}")
            known = (self.record or {}).get("size")
            if known is not None and total is not None and total != known:
                response.close()
                raise self.refuse(f"the server's file is now {total} bytes, it was {known} bytes when this download "
                                  f"began")
            return response, total
        if have:
            self.log(f"{self.url}: the server sent the whole file (it changed, or it takes no ranges); starting over")
        self.start_over()
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        self.save_record(size=total, etag=response.headers.get("ETag"),
                         last_modified=response.headers.get("Last-Modified"), sha256=None, complete=False)
        return response, total


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``*`` for an unknown total -> None."""
    found = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not found:
        return None, None
    return int(found.group(1)), None if found.group(2) == "*" else int(found.group(2))


def content_range_total(value: str | None) -> int | None:
    """The total of a 416's ``bytes */1000``."""
    found = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(found.group(1)) if found else None


def fetch_url(url: str, dest: Path | str, *, commit: Callable[[], None] = lambda: None, sha256: str | None = None,
              log: Log = print, attempts: int = ATTEMPTS, commit_every: int = COMMIT_EVERY,
              progress_every: float = PROGRESS_EVERY, retry_wait: float = 2.0) -> dict:
    """``url`` into the file ``dest``: resumed from a partial file, committed as it goes, checked, then renamed into
    place. FetchError when refused (a 4xx, a size or sha256 mismatch), FetchInterrupted when the connection kept
    failing (running it again continues)."""
    dest = Path(dest)
    sha256 = sha256.lower() if sha256 else None
    if sha256 is not None and not SHA256.fullmatch(sha256):
        raise FetchError(f"{url}: the sha256 given ({sha256!r}) is not 64 hexadecimal digits")
    dest.parent.mkdir(parents=True, exist_ok=True)
    job = _Download(url, dest, commit, log, commit_every)
    record = job.read_record()
    if dest.is_file():
        if (record and record["complete"] and record["url"] == url and record["size"] in (None, dest.stat().st_size)
                and sha256 in (None, record["sha256"])):
            log(f"{dest} is already complete ({hub.human(dest.stat().st_size)}, sha256 {record['sha256']}); "
                f"nothing to fetch")
            return {"path": str(dest), "size": dest.stat().st_size, "sha256": record["sha256"], "fetched": 0,
                    "skipped": True}
        set_aside(dest, "it is not a finished download of this URL" + (" with the sha256 given" if sha256 else ""),
                  "it is fetched again", log)
    if record is None or record["url"] != url:
        job.start_over()  # a partial of another URL, or none: nothing to resume
        record = None
    elif record["complete"]:  # stopped between the record and the rename: the whole partial resumes to a 416
        record = {**record, "complete": False}
    job.record = record
    started, fetched, last_log, last_commit, failures = time.monotonic(), 0, time.monotonic(), 0, 0
    total = (record or {}).get("size")
    log(f"fetching {url} into {dest}" + (f", resuming at {hub.human(job.have())}" if job.have() else ""))
    while True:
        try:
            response, total = job.connect()
            if response is None:
                break
            if job.hashed < job.have():
                job.hash_partial()
            with response, job.partial.open("ab") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    job.hasher.update(chunk)
                    job.hashed += len(chunk)
                    fetched += len(chunk)
                    if fetched - last_commit >= commit_every:
                        out.flush()
                        os.fsync(out.fileno())
                        commit()
                        last_commit = fetched
                    if time.monotonic() - last_log >= progress_every:
                        log(f"  {_progress(job.hashed, total, started, fetched)}")
                        last_log = time.monotonic()
            if total is None or job.have() >= total:
                break
            raise http.client.IncompleteRead(b"", total - job.have())  # closed early without an error
        except urllib.error.HTTPError as error:
            if error.code not in RETRIED_STATUS:
                raise FetchError(f"{url} answered {error.code} {error.reason}; check the URL (a private file needs "
                                 f"a URL that carries its access, e.g. a presigned one)") from None
            problem = f"{error.code} {error.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FetchError(f"{url}: no space left for {dest} at {hub.human(job.have())} ({error.strerror}); "
                                 f"free some, then run the same command again to continue") from None
            problem = str(getattr(error, "reason", None) or error) or type(error).__name__
        failures += 1
        if failures >= attempts:
            commit()  # what was fetched stays for the next run
            raise FetchInterrupted(f"{url}: the connection failed {failures} times, the last at "
                                   f"{hub.human(job.have())} ({problem}); what was fetched is kept, so running the "
                                   f"same command again continues from there")
        log(f"  interrupted at {_progress(job.have(), total, started, fetched)} ({problem}); resuming")
        time.sleep(retry_wait * failures)
    size = job.have()
    if job.hashed < size:
        job.hash_partial()
    if total is not None and size != total:
        raise job.refuse(f"{size} bytes arrived, the server's Content-Length is {total}")
    got = job.hasher.hexdigest()
    if sha256 is not None and got != sha256:
        raise job.refuse(f"its sha256 is {got}, not the {sha256} given")
    with job.partial.open("rb+") as handle:
        os.fsync(handle.fileno())
    job.save_record(size=size, sha256=got, complete=True)  # before the rename: a whole partial with it resumes to 416
    os.replace(job.partial, dest)
    fsync_directory(dest.parent)
    commit()
    seconds = time.monotonic() - started
    log(f"done: {dest}, {hub.human(size)} in {duration(seconds)} ({hub.human(fetched / max(seconds, 1e-6))}/s), "
        f"sha256 {got}" + (" as given" if sha256 else ""))
    return {"path": str(dest), "size": size, "sha256": got, "fetched": fetched, "skipped": False}


def fetch_hub_dataset(repo_id: str, patterns: Sequence[str], target: Path | str, *,
                      commit: Callable[[], None] = lambda: None, log: Log = print) -> dict:
    """The files of a hub dataset that match ``patterns`` (names or globs) into ``target``, verified."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError  # lazy: hub only

    try:
        return hub.download_from_hub(repo_id, Path(target), commit=commit, log=log, repo_type="dataset",
                                     patterns=list(patterns))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise FetchError(f"the hub has no dataset {repo_id!r} this token can read ({type(error).__name__}); check "
                         f"the name, and for a private or gated one the Hugging Face token") from None


def fetch_corpus(source: str, target: Path | str, files: Sequence[str] = (), *,
                 commit: Callable[[], None] = lambda: None, log: Log = print) -> dict:
    """``source`` into the directory ``target``: a URL (``#sha256=HEX`` pins its hash) or ``hf://datasets/OWNER/NAME``
    with the dataset's ``files``."""
    target = Path(target)
    if source.startswith(HUB_PREFIX):
        try:
            return fetch_hub_dataset(source[len(HUB_PREFIX):], files, target, commit=commit, log=log)
        except hub.DownloadError as error:
            raise FetchError(str(error)) from None
    url, sha256 = split_sha256(source)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"{source} is not an http(s) URL or {HUB_PREFIX}OWNER/NAME")
    return fetch_url(url, target / url_file_name(url), commit=commit, sha256=sha256, log=log)
