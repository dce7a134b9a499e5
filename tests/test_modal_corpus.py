"""download-corpus, ingest and adopt on Modal, offline: the command line -> the Function call, and the Functions
run here through modal's `.local()` against a real HTTP server on loopback and a fake volume.

The download itself (resume, checks, refusals) is drzero.corpus.fetch's, tested in tests/test_corpus_fetch.py.
"""

from __future__ import annotations

import hashlib
import threading

import pytest

pytest.importorskip("modal")

from backends import modal as mb  # noqa: E402
from backends import modal_container as mc  # noqa: E402
from backends import modal_plan as mp  # noqa: E402
from drzero.corpus import fetch  # noqa: E402
from test_corpus_fetch import DATA, Server  # noqa: E402
from test_modal_backend import FakeVolume, _calls, fake_modal  # noqa: E402


@pytest.fixture
def modal_calls(monkeypatch):
    return fake_modal(monkeypatch)


@pytest.fixture
def server():
    httpd = Server()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_corpus_is_a_retried_cpu_function_on_the_corpus_volume():
    info = mb.download_corpus.info()
    assert info.gpus == [] and info.max_retries == 5 and info.timeout == 6 * 60 * 60 and info.cpu == 4.0
    assert info.volumes["/corpus"].name == "dr-zero-corpus" and info.secrets == []
    assert mb.FILES_DIR == "/corpus/files"
    hub = mb.plan_launch(mb.Request("download-corpus", hub_dataset="o/n", files=["a"]))
    assert hub.secrets == {"huggingface-secret": False}   # gated datasets; public ones need none
    assert mb.plan_launch(mb.Request("download-corpus", url="https://host/a.jsonl")).secrets == {}


@pytest.mark.parametrize("argv, says", [
    ([], "give the file's URL"),
    (["https://host/a.jsonl", "--hub-dataset", "o/n", "--files", "a"], "one of the two"),
    (["--hub-dataset", "o/n"], "needs --files"),
    (["--hub-dataset", "a/b/c", "--files", "x"], "not a hub dataset name"),
    (["--hub-dataset", "o/n", "--files", "x", "--sha256", "a" * 64], "--sha256 is for a URL"),
    (["https://host/a.jsonl", "--files", "x"], "--files names files of a --hub-dataset"),
    (["https://host/a.jsonl", "--to", "../elsewhere"], "is not valid: give a directory under /corpus/files"),
    (["https://host/a.jsonl", "--to", "/corpus/chromadb"], "is not valid"),
    (["https://host/a.jsonl", "--sha256", "abc"], "not 64 hexadecimal digits"),
    (["ftp://host/a.jsonl"], "is not an http(s) URL"),
])
def test_download_corpus_refuses_a_bad_request_in_one_sentence_before_anything_starts(modal_calls, capsys, argv, says):
    assert mb.cli(["download-corpus", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("download-corpus: ") and says in err and err.count("\n") == 1
    assert modal_calls == []


def test_the_launch_says_where_the_files_land_and_what_comes_next(modal_calls, capsys):
    assert mb.cli(["download-corpus", "https://host/wiki-18.jsonl.gz", "--to", "wiki18"]) == 0
    out = capsys.readouterr().out
    assert "download-corpus on Modal: download (resumable, checked) into /corpus/files/<to>: " \
           "https://host/wiki-18.jsonl.gz wiki18" in out
    assert "python -m backends.modal ingest --stage-args='/corpus/files/wiki18 ...'" in out
    assert _calls(modal_calls, "get") == [("get", "download_corpus")]   # waits and streams its log


def test_a_url_is_parsed_as_the_subject_of_download_corpus_only():
    request = mp.parse_request(["download-corpus", "https://host/x.gz", "--to", "w"])
    assert (request.url, request.app_id, request.to) == ("https://host/x.gz", None, "w")
    assert mp.parse_request(["logs", "ap-1"]).app_id == "ap-1"
    with pytest.raises(SystemExit):
        mp.parse_request(["ingest", "https://host/x.gz"])


# -- the Functions, run here -------------------------------------------------------------------------


@pytest.fixture
def volume_here(monkeypatch, tmp_path):
    volume = FakeVolume({})
    monkeypatch.setattr(mb, "corpus_volume", volume)
    monkeypatch.setattr(mb, "FILES_DIR", str(tmp_path / "files"))
    return volume


def test_download_corpus_fetches_a_url_into_the_files_directory_and_commits(server, volume_here, tmp_path, capsys):
    server.files["wiki-18.jsonl.gz"] = DATA
    digest = hashlib.sha256(DATA).hexdigest()
    result = mb.download_corpus.local(server.url("wiki-18.jsonl.gz") + f"#sha256={digest}", "wiki18")
    target = tmp_path / "files" / "wiki18" / "wiki-18.jsonl.gz"
    assert target.read_bytes() == DATA and volume_here.commits >= 1
    assert result == {"command": "download-corpus", "exit_code": 0, "path": str(target), "size": len(DATA),
                      "sha256": digest, "fetched": len(DATA), "skipped": False}
    assert f"[download-corpus] done: {target}" in capsys.readouterr().out
    again = mb.download_corpus.local(server.url("wiki-18.jsonl.gz"), "wiki18")
    assert again["exit_code"] == 0 and again["skipped"]


def test_a_refused_download_ends_without_a_retry_and_says_why(server, volume_here, capsys):
    result = mb.download_corpus.local(server.url("missing.jsonl.gz"), "wiki18")
    assert result["exit_code"] == 1 and "answered 404 Not Found" in result["error"]
    assert f"[download-corpus] {server.url('missing.jsonl.gz')} answered 404" in capsys.readouterr().out


def test_an_interrupted_download_raises_so_that_modal_retries_it(volume_here, monkeypatch):
    def interrupted(*args, **kwargs):
        raise fetch.FetchInterrupted("https://host/x: the connection failed 5 times")

    monkeypatch.setattr(mb.corpus_fetch, "fetch_corpus", interrupted)
    with pytest.raises(fetch.FetchInterrupted):
        mb.download_corpus.local("https://host/x", "")


def test_adopt_and_ingest_pass_their_arguments_through_to_the_store_writer(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(mb, "run_on_local_store", lambda command, argv, sources=(): seen.append(
        (command, list(argv), list(sources))) or {"command": command, "exit_code": 0})
    monkeypatch.setattr(mc, "SOURCES_DIR", str(tmp_path / "sources"))
    argv = ("--faiss-index", "/corpus/files/w/e5_Flat.index", "--corpus", "/corpus/files/w/wiki18.jsonl")
    assert mb.adopt.local(*argv)["exit_code"] == 0
    assert mb.ingest.local("/corpus/files/w", "--text-field", "contents")["exit_code"] == 0
    assert seen == [("adopt", list(argv), []), ("ingest", ["/corpus/files/w", "--text-field", "contents"], [])]


def test_ingest_reads_the_uploaded_documents_unless_it_names_its_own(monkeypatch, tmp_path):
    sources = tmp_path / "sources"
    monkeypatch.setattr(mc, "SOURCES_DIR", str(sources))
    assert mc.ingest_sources(["--demo"]) == []                       # nothing uploaded
    sources.mkdir()
    (sources / "papers.jsonl").write_text("{}\n")
    assert mc.ingest_sources(["--demo"]) == [str(sources)]
    assert mc.ingest_sources(["--embedder", "/corpus/models/e5-large-v2"]) == [str(sources)]   # an option's value
    assert mc.ingest_sources(["--device", "cuda", "/corpus/files/wiki18"]) == []


@pytest.mark.parametrize("code, copied_back", [(0, True), (2, False)])
def test_the_store_writers_work_on_a_local_copy_copied_back_when_they_succeed(monkeypatch, tmp_path, code,
                                                                              copied_back):
    volume_db, local_db = tmp_path / "corpus" / "chromadb", tmp_path / "local"
    volume_db.mkdir(parents=True)
    (volume_db / "chroma.sqlite3").write_text("before")
    volume = FakeVolume({})
    monkeypatch.setattr(mc, "CORPUS_DB", str(volume_db))
    monkeypatch.setattr(mc, "LOCAL_DB", str(local_db))
    monkeypatch.setattr(mc, "corpus_volume", volume)
    ran = []

    def run_drzero(command, argv, **kwargs):
        ran.append((command, list(argv)))
        (local_db / "chroma.sqlite3").write_text("after")
        return {"command": command, "exit_code": code}

    monkeypatch.setattr(mc, "run_drzero", run_drzero)
    assert mc.run_on_local_store("adopt", ["--collection", "wiki"], sources=["/s"])["exit_code"] == code
    assert ran == [("adopt", ["/s", "--db", str(local_db), "--collection", "wiki"])]
    assert (volume_db / "chroma.sqlite3").read_text() == ("after" if copied_back else "before")
    assert volume.commits == (1 if copied_back else 0)
