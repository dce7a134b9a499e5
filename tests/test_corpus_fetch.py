"""Corpus files from a URL or a hub dataset (drzero.corpus.fetch), against a real HTTP server on loopback.

The server is Python's http.server with a handler that answers single byte ranges (``Range: bytes=N-``), honours
``If-Range`` when it gives an ETag, and can drop the connection after a number of bytes, as a preempted container
or a flaky link would see it. No Modal, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from drzero.corpus import fetch
from drzero.models import download as md

DATA = bytes(range(256)) * 4096 + b"the end\n"   # 1 MiB and a bit: more than one read chunk


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.etag: str | None = None          # None: a server that sends no ETag
        self.drop_after: list[int] = []       # per response, in turn: close after this many body bytes
        self.requests: list[dict] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: Server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                "if_range": self.headers.get("If-Range")})
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if wanted and (if_range is None or if_range == server.etag):
            start = int(wanted.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if server.etag:
            self.send_header("ETag", server.etag)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.drop_after:
            body = body[:server.drop_after.pop(0)]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _fetch(server, dest, **kwargs):
    lines, commits = [], []
    kwargs.setdefault("retry_wait", 0.0)
    result = fetch.fetch_url(server.url("wiki-18.jsonl.gz"), dest, commit=lambda: commits.append(1),
                             log=lines.append, **kwargs)
    return result, lines, commits


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_full_download_lands_checked_and_a_second_run_fetches_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CHUNK", 256 * 1024)
    server.files["wiki-18.jsonl.gz"] = DATA
    dest = tmp_path / "wiki18" / "wiki-18.jsonl.gz"
    digest = hashlib.sha256(DATA).hexdigest()
    result, lines, commits = _fetch(server, dest, sha256=digest.upper(), progress_every=0.0)
    assert dest.read_bytes() == DATA
    assert result == {"path": str(dest), "size": len(DATA), "sha256": digest, "fetched": len(DATA), "skipped": False}
    assert commits and lines[-1].startswith(f"done: {dest}, {md.human(len(DATA))} in ") and lines[-1].endswith(f"{digest} as given")
    assert any(re.search(r"of 1\.0 MB \(\d+%\), [\d.]+ [KMG]?B/s, ETA \d+m\d\ds$", line) for line in lines)
    assert _hidden(dest.parent) == [".wiki-18.jsonl.gz.fetch.json"]   # no partial left; the record is hidden
    assert json.loads((dest.parent / ".wiki-18.jsonl.gz.fetch.json").read_text())["complete"] is True

    server.requests.clear()
    again, lines, _ = _fetch(server, dest, sha256=digest)
    assert again["skipped"] and again["fetched"] == 0 and server.requests == []   # no connection at all
    assert "already complete" in lines[-1]


def test_a_download_interrupted_part_way_resumes_with_a_range_to_an_identical_file(server, tmp_path):
    server.files["wiki-18.jsonl.gz"] = DATA
    server.etag = '"v1"'
    dest = tmp_path / "wiki-18.jsonl.gz"
    server.drop_after = [300_000]
    with pytest.raises(fetch.FetchInterrupted, match="running the same command again continues") as stopped:
        _fetch(server, dest, attempts=1)   # the container is lost here
    assert "\n" not in str(stopped.value) and not dest.exists()
    assert (tmp_path / ".wiki-18.jsonl.gz.part").stat().st_size == 300_000

    server.requests.clear()
    result, lines, _ = _fetch(server, dest, sha256=hashlib.sha256(DATA).hexdigest())   # the next run
    assert dest.read_bytes() == DATA and result["fetched"] == len(DATA) - 300_000
    assert server.requests == [{"path": "/wiki-18.jsonl.gz", "range": "bytes=300000-", "if_range": '"v1"'}]
    assert "resuming at 300.0 KB" in lines[0]


def test_a_dropped_connection_is_resumed_within_the_same_run(server, tmp_path):
    server.files["wiki-18.jsonl.gz"] = DATA
    server.drop_after = [100_000, 250_000]
    dest = tmp_path / "wiki-18.jsonl.gz"
    result, lines, _ = _fetch(server, dest)
    assert dest.read_bytes() == DATA and result["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-", "bytes=350000-"]
    assert sum("interrupted at" in line for line in lines) == 2


def _interrupted_at_200k(server, tmp_path):
    """wiki-18.jsonl.gz (DATA) on the server, its download cut after 200,000 bytes: the partial is left behind."""
    server.files["wiki-18.jsonl.gz"] = DATA
    dest = tmp_path / "wiki-18.jsonl.gz"
    server.drop_after = [200_000]
    with pytest.raises(fetch.FetchInterrupted):
        _fetch(server, dest, attempts=1)
    return dest


def test_a_file_changed_on_a_server_with_an_etag_starts_over(server, tmp_path):
    server.etag = '"v1"'
    dest = _interrupted_at_200k(server, tmp_path)
    server.files["wiki-18.jsonl.gz"], server.etag = DATA[::-1], '"v2"'
    _, lines, _ = _fetch(server, dest)
    assert dest.read_bytes() == DATA[::-1] and any("starting over" in line for line in lines)


def test_a_size_mismatch_is_refused_in_one_sentence_and_the_partial_moved_aside(server, tmp_path):
    dest = _interrupted_at_200k(server, tmp_path)
    server.files["wiki-18.jsonl.gz"] = DATA + b"more lines\n"   # replaced on a server without ETags
    with pytest.raises(fetch.FetchError) as refused:
        _fetch(server, dest)
    message = str(refused.value)
    assert message.startswith(server.url("wiki-18.jsonl.gz") + ": the server's file is now 1048595 bytes, it was "
                              "1048584 bytes when this download began; moved what was fetched to .wiki-18.jsonl.gz"
                              ".part.damaged-")
    assert "\n" not in message and message.count(". ") == 0
    assert not dest.exists() and not (tmp_path / ".wiki-18.jsonl.gz.part").exists()
    assert [name for name in _hidden(tmp_path) if ".damaged-" in name]
    _fetch(server, dest)   # the next run fetches it afresh
    assert dest.read_bytes() == DATA + b"more lines\n"


def test_a_partial_longer_than_the_servers_file_is_refused(server, tmp_path):
    dest = _interrupted_at_200k(server, tmp_path)
    server.files["wiki-18.jsonl.gz"] = DATA[:1000]
    with pytest.raises(fetch.FetchError, match="less than the 200000 bytes already fetched"):
        _fetch(server, dest)
    assert not dest.exists() and not (tmp_path / ".wiki-18.jsonl.gz.part").exists()


def test_a_sha256_mismatch_is_refused_and_nothing_looks_complete(server, tmp_path):
    server.files["wiki-18.jsonl.gz"] = DATA
    dest = tmp_path / "wiki-18.jsonl.gz"
    with pytest.raises(fetch.FetchError) as refused:
        _fetch(server, dest, sha256="0" * 64)
    message = str(refused.value)
    assert f"its sha256 is {hashlib.sha256(DATA).hexdigest()}, not the {'0' * 64} given" in message
    assert "\n" not in message and "so the next run fetches it afresh" in message
    assert not dest.exists() and not (tmp_path / ".wiki-18.jsonl.gz.fetch.json").exists()
    (aside,) = [name for name in _hidden(tmp_path) if ".damaged-" in name]
    assert (tmp_path / aside).read_bytes() == DATA   # kept for a look, under a name no one takes for the file


def test_a_missing_file_gives_one_sentence_naming_the_url_and_the_status(server, tmp_path):
    with pytest.raises(fetch.FetchError) as refused:
        _fetch(server, tmp_path / "wiki-18.jsonl.gz")
    assert not isinstance(refused.value, fetch.FetchInterrupted)
    message = str(refused.value)
    assert message.startswith(f"{server.url('wiki-18.jsonl.gz')} answered 404 Not Found; check the URL")
    assert "\n" not in message and len(server.requests) == 1   # a 404 is not retried
    assert list(tmp_path.iterdir()) == [] or _hidden(tmp_path) == sorted(p.name for p in tmp_path.iterdir())


def test_the_volume_is_committed_as_the_download_goes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CHUNK", 64 * 1024)
    server.files["wiki-18.jsonl.gz"] = DATA
    _, _, commits = _fetch(server, tmp_path / "wiki-18.jsonl.gz", commit_every=256 * 1024)
    assert len(commits) >= 4 + 1   # every 256 kB, and once the file is in place


def test_a_file_not_finished_by_a_download_is_set_aside_and_fetched(server, tmp_path):
    server.files["wiki-18.jsonl.gz"] = DATA
    dest = tmp_path / "wiki-18.jsonl.gz"
    dest.write_bytes(DATA[:10])   # put there by hand, or by another tool
    _, lines, _ = _fetch(server, dest)
    assert dest.read_bytes() == DATA and any("not a finished download of this URL" in line for line in lines)


def test_fetch_corpus_takes_a_url_pinned_by_sha256_into_a_directory(server, tmp_path):
    server.files["dumps/wiki-18.jsonl.gz"] = DATA
    digest = hashlib.sha256(DATA).hexdigest()
    result = fetch.fetch_corpus(server.url("dumps/wiki-18.jsonl.gz") + f"#sha256={digest}", tmp_path / "wiki18",
                                log=lambda line: None)
    assert result["path"] == str(tmp_path / "wiki18" / "wiki-18.jsonl.gz") and result["sha256"] == digest
    assert server.requests[0]["path"] == "/dumps/wiki-18.jsonl.gz"   # the fragment stays here
    with pytest.raises(fetch.FetchError, match="is not an http"):
        fetch.fetch_corpus("ftp://host/x.jsonl", tmp_path)
    with pytest.raises(fetch.FetchError, match="names no file"):
        fetch.fetch_corpus(server.url("dumps/"), tmp_path)


# -- a hub dataset ---------------------------------------------------------------------------------


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """huggingface_hub's own DatasetInfo from an answer shaped as the hub sends it; snapshot_download copies from a
    directory that plays the hub."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import DatasetInfo

    root = tmp_path / "hub"
    files = {"retrieval-corpus/wiki18_100w.jsonl.gz": DATA, "retrieval-corpus/README.md": b"# corpus\n",
             "nq/test.jsonl": b'{"question": "q"}\n'}
    siblings = []
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        siblings.append({"rfilename": name, "size": len(data), "blobId": "b" * 40,
                         "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}})
    answer = {"id": "RUC-NLPIR/FlashRAG_datasets", "sha": "c" * 40, "siblings": siblings}
    calls = []
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, revision=None, files_metadata=False:
                        DatasetInfo(**answer))

    def snapshot_download(repo_id, *, repo_type=None, revision=None, local_dir=None, allow_patterns=None,
                          max_workers=8):
        calls.append({"repo_id": repo_id, "repo_type": repo_type, "paths": sorted(allow_patterns)})
        for path in allow_patterns:
            (Path(local_dir) / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / path, Path(local_dir) / path)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_dataset_brings_only_the_files_asked_for_verified(fake_dataset, tmp_path):
    target = tmp_path / "files" / "wiki18"
    lines = []
    result = fetch.fetch_corpus("hf://datasets/RUC-NLPIR/FlashRAG_datasets", target,
                                ["retrieval-corpus/*.jsonl.gz"], log=lines.append)
    assert (target / "retrieval-corpus" / "wiki18_100w.jsonl.gz").read_bytes() == DATA
    assert fake_dataset == [{"repo_id": "RUC-NLPIR/FlashRAG_datasets", "repo_type": "dataset",
                             "paths": ["retrieval-corpus/wiki18_100w.jsonl.gz"]}]
    assert not result["skipped"] and lines[-1].endswith("verified")
    assert md.local_state(target) == "verified"
    again = fetch.fetch_corpus("hf://datasets/RUC-NLPIR/FlashRAG_datasets", target,
                               ["retrieval-corpus/wiki18_100w.jsonl.gz"], log=lines.append)
    assert again["skipped"] and len(fake_dataset) == 1


def test_hub_files_that_match_nothing_are_refused_in_one_sentence(fake_dataset, tmp_path):
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch_corpus("hf://datasets/RUC-NLPIR/FlashRAG_datasets", tmp_path, ["wiki-18.jsonl"],
                           log=lambda line: None)
    assert str(refused.value).startswith("no file of the hub dataset RUC-NLPIR/FlashRAG_datasets matches "
                                         "wiki-18.jsonl; give its files' paths")
    assert fake_dataset == []


def test_a_run_stopped_between_the_record_and_the_rename_finishes_without_fetching_again(server, tmp_path):
    server.files["wiki-18.jsonl.gz"] = DATA
    dest = tmp_path / "wiki-18.jsonl.gz"
    _fetch(server, dest)
    dest.rename(tmp_path / ".wiki-18.jsonl.gz.part")   # the record says complete, the rename never happened
    server.requests.clear()
    result, _, _ = _fetch(server, dest, sha256=hashlib.sha256(DATA).hexdigest())
    assert dest.read_bytes() == DATA and result["fetched"] == 0
    assert [r["range"] for r in server.requests] == [f"bytes={len(DATA)}-"]   # answered 416: nothing after its end
