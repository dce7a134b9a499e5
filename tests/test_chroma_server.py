"""A Chroma server as the corpus store: `--db http://host:port` for ingest, adopt and serve-retriever.

The server is the real one that ships in the chromadb package (`chroma run`, conftest.chroma_server). That server
(chromadb 1.5.9, Rust) checks no token: CHROMA_SERVER_AUTHN_PROVIDER and CHROMA_SERVER_AUTHN_CREDENTIALS are
ignored by it (it serves every request, as its issues #4965 and #5363 report). A token is enforced by what stands
in front of it, so the token tests put a small authenticating front (``TokenGate``: it lets a request through to
the real server only with the token, as a reverse proxy would) before it.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import drzero_command, free_port, start_retriever, stop
from drzero.config import ConfigError
from drzero.corpus.embedder import spec_for
from drzero.corpus.store import CorpusStore, StoreError, read_index_check, writer_lock
from drzero.layout import Layout
from drzero.services.specs import retriever_service
from drzero.services.supervisor import Supervisor
from drzero.store_location import STORE_SECRET_ENVS, TOKEN_ENV, parse_db

TOKEN = "s3cret-token"
PAPERS = {
    "sponge.txt": "The sponge lemma of Varga and Okafor bounds the leakage of punctured keys by two bits per query.",
    "lattice.txt": "Lattice gadgets from the Helsinki workshop make branching programs oblivious at quadratic cost.",
    "tower.txt": "The tower obfuscator of Mirza stacks graded encodings nine levels deep to hide its circuit.",
}
TOKEN_VARIABLES = (*STORE_SECRET_ENVS, "CHROMA_CLIENT_AUTH_PROVIDER")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("papers")
    for name, text in PAPERS.items():
        (folder / name).write_text(text + "\n")
    return folder


def _environment(**tokens: str) -> dict[str, str]:
    """Ours, less every token variable, plus ``tokens``."""
    return {**{k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}, **tokens}


def _ingest(db: str, sources: Path, collection: str, cwd: Path, **tokens: str) -> subprocess.CompletedProcess:
    return subprocess.run(drzero_command("ingest", str(sources), "--db", db, "--collection", collection,
                                         "--embedder", "minilm"),
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=_environment(**tokens))


def _one_error(result: subprocess.CompletedProcess) -> str:
    """The refusal's one line, after checking it is the only one and that no traceback came with it."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _retrieve(url: str, query: str) -> list[dict]:
    response = httpx.post(f"{url}/retrieve", json={"queries": [query], "topk": 3}, timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()["result"][0]


# -- where --db points -------------------------------------------------------------------------------------------

def test_db_is_a_directory_or_a_server_address_never_a_folder_named_http(tmp_path):
    assert parse_db(str(tmp_path / "db")).path == tmp_path / "db"
    assert parse_db("http://127.0.0.1:8000").url == "http://127.0.0.1:8000"
    assert parse_db("HTTP://Chroma.internal:9000/").url == "http://chroma.internal:9000"
    assert parse_db("http://chroma").url == "http://chroma:8000"          # Chroma's own default port
    assert parse_db("https://chroma.example.org").url == "https://chroma.example.org:443"
    assert parse_db("https://chroma.example.org").ssl
    assert Layout.of("http://127.0.0.1:8000", str(tmp_path), str(tmp_path)).db == "http://127.0.0.1:8000"
    assert Layout.of(str(tmp_path / "db"), str(tmp_path), str(tmp_path)).db == (tmp_path / "db").resolve()
    for address, says in [("ftp://host:21", "scheme 'ftp'"), ("http://host:8000/api/v2", "path or query"),
                          ("http://:8000", "names no host"), ("http://host:port", "not a number"),
                          ("http://user:pw@host:8000", "credentials")]:
        with pytest.raises(ConfigError, match=says):
            parse_db(address)


def test_the_retriever_a_stage_starts_inherits_the_token_only_for_a_server():
    assert retriever_service("/corpus/chromadb").pass_secrets == ()
    assert TOKEN_ENV in retriever_service("http://chroma:8000").pass_secrets


# -- a server without a token ------------------------------------------------------------------------------------

def test_ingest_into_a_chroma_server_then_serve_it(chroma_server, sources, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = _ingest(chroma_server.url, sources, "papers", work)
    assert result.returncode == 0, result.stderr
    assert "added               3" in result.stdout
    assert "no writer's lock" in result.stderr and "not checked after this write" in result.stderr
    assert list(work.iterdir()) == []  # no `http:` folder, lock file or index-check record on this side

    store = CorpusStore.open_existing(chroma_server.url, "papers")
    assert store.count() == 3 and store.recorded_spec().name == "sentence-transformers/all-MiniLM-L6-v2"
    assert read_index_check(chroma_server.url, "papers") is None

    from drzero.corpus.ingest import IngestConfig, run_ingest  # an ingest again adds nothing (no encoder loaded)

    again = run_ingest(IngestConfig(sources=[str(sources)], db=chroma_server.url, collection="papers"))
    assert (again.added, again.already_present, again.collection_size) == (0, 3, 3)

    server = start_retriever(chroma_server.url, tmp_path / "retriever.log", "--collection", "papers",
                             "--copy-to-local", str(tmp_path / "copy"))
    try:
        health = httpx.get(f"{server.url}/health", timeout=10, trust_env=False).json()
        assert health["collection"] == "papers" and health["passages"] == 3
        best = _retrieve(server.url, "who bounds the leakage of punctured keys?")[0]["document"]
        assert best["title"] == "sponge" and "Varga and Okafor" in best["contents"]
        assert _retrieve(server.url, "graded encodings nine levels")[0]["document"]["title"] == "tower"
    finally:
        stop(server)
    assert "--copy-to-local" in server.log() and "skipped" in server.log()
    assert not (tmp_path / "copy").exists()


def test_adopt_a_collection_another_system_wrote_on_the_server(chroma_server, minilm):
    import chromadb

    from drzero.corpus.adopt import AdoptConfig, run_adopt

    texts = [f"{name[:-4]}\n{text}" for name, text in PAPERS.items()]
    client = chromadb.HttpClient(host="127.0.0.1", port=parse_db(chroma_server.url).port)
    foreign = client.create_collection("foreign", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    foreign.add(ids=list(PAPERS), documents=texts, embeddings=minilm.encode_passages(texts))

    result = run_adopt(AdoptConfig(db=chroma_server.url, collection="foreign", embedder="minilm", samples=3))
    assert result.spec.name == "sentence-transformers/all-MiniLM-L6-v2" and result.samples == 3
    assert CorpusStore.open_existing(chroma_server.url, "foreign").recorded_spec() == result.spec


def test_a_missing_collection_on_the_server_names_the_ones_there(chroma_server):
    CorpusStore.create(chroma_server.url, spec_for("minilm"), 384, "present")
    with pytest.raises(StoreError, match=r"collection 'nowhere' not found in http://127\.0\.0\.1:\d+ "
                                         r"\(collections there: .*present"):
        CorpusStore.open_existing(chroma_server.url, "nowhere")
    with writer_lock(chroma_server.url):  # nothing to lock on this machine
        pass


def test_stages_take_the_server_as_their_store(chroma_server, minilm, tmp_path):
    from drzero.stages.prepare_data import PrepareDataConfig
    from drzero.verl.preflight import corpus_check

    texts = [f"{name[:-4]}\n{text}" for name, text in PAPERS.items()]
    store = CorpusStore.create(chroma_server.url, minilm.spec, minilm.dimension, "staged")
    store.add(list(PAPERS), texts, [{"title": name[:-4]} for name in PAPERS], minilm.encode_passages(texts))
    check = corpus_check(chroma_server.url, "staged")  # what preflight runs for a stage's own retriever
    assert check.ok and "3 passages" in check.message, check.message
    with pytest.raises(ConfigError, match="a FILE when --db is a Chroma server"):
        PrepareDataConfig(db=chroma_server.url)        # no store directory to put data/ beside
    train, _, _ = PrepareDataConfig(db=chroma_server.url, out=str(tmp_path / "seeds.parquet")).output_paths()
    assert train == tmp_path / "seeds.parquet"


def test_an_address_where_no_chroma_server_answers_is_one_sentence(tmp_path, sources):
    address = f"http://127.0.0.1:{free_port()}"
    for result in (subprocess.run(drzero_command("serve-retriever", "--db", address, "--port", str(free_port())),
                                  capture_output=True, text=True, timeout=120),
                   _ingest(address, sources, "papers", tmp_path)):
        error = _one_error(result)
        assert f"no Chroma server answers at {address}" in error and "correct --db" in error


def test_an_http_server_that_is_not_chroma_is_named(tmp_path):
    class NotChroma(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotChroma)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreError, match=r"answers, but not as a Chroma server .*HTTP 404"):
            CorpusStore.open_existing(f"http://127.0.0.1:{httpd.server_address[1]}", "papers")
    finally:
        httpd.shutdown()


# -- a server that wants a token ---------------------------------------------------------------------------------

class TokenGate:
    """An authenticating front on a real Chroma server: requests with the token (in ``header``, as Chroma's token
    client sends it) go through; others get 401. The heartbeat stays open, as Chroma's own auth leaves it."""

    def __init__(self, upstream: str, token: str, header: str = "Authorization"):
        self.upstream = urlsplit(upstream)
        self.expected = (header, f"Bearer {token}" if header == "Authorization" else token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _GateHandler)
        self.httpd.gate = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def allows(self, headers) -> bool:
        return headers.get(self.expected[0]) == self.expected[1]


class _GateHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the chromadb client expects

    def _relay(self):
        gate = self.server.gate
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.startswith("/api/v2/heartbeat") and not gate.allows(self.headers):
            return self._answer(401, b'{"error": "AuthError", "message": "missing or wrong token"}', "application/json")
        upstream = http.client.HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        self._answer(reply.status, reply.read(), reply.getheader("Content-Type") or "application/json")
        upstream.close()

    def _answer(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gate(chroma_server):
    gate = TokenGate(chroma_server.url, TOKEN)
    yield gate
    gate.httpd.shutdown()


def test_a_server_that_wants_a_token_refuses_none_and_a_wrong_one_then_serves_with_it(gate, sources, tmp_path,
                                                                                        monkeypatch):
    error = _one_error(_ingest(gate.url, sources, "gated", tmp_path))
    assert f"the Chroma server at {gate.url} refused drzero's requests without a token (HTTP 401)" in error
    assert f"set ${TOKEN_ENV}" in error

    error = _one_error(_ingest(gate.url, sources, "gated", tmp_path, DRZERO_CHROMA_TOKEN="wrong"))
    assert f"refused the token from ${TOKEN_ENV} (HTTP 401)" in error

    result = _ingest(gate.url, sources, "gated", tmp_path, DRZERO_CHROMA_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stderr + result.stdout

    # a stage's retriever: started by the supervisor, which hands a child no secret it is not told to
    for variable in TOKEN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    retriever = retriever_service(gate.url, port=free_port(), collection="gated", startup_timeout=180)
    with Supervisor([retriever], log=lambda line: None) as services:
        best = _retrieve(services.urls["retriever"], "lattice gadgets of the Helsinki workshop")[0]["document"]
        assert best["title"] == "lattice"


def test_chromas_own_token_variables_and_header_are_honoured(gate, chroma_server, monkeypatch):
    CorpusStore.create(chroma_server.url, spec_for("minilm"), 384, "tokens")
    x_gate = TokenGate(chroma_server.url, TOKEN, header="X-Chroma-Token")
    try:
        for variable in TOKEN_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("CHROMA_CLIENT_AUTH_CREDENTIALS", TOKEN)
        assert CorpusStore.open_for_writing(gate.url, "tokens") is not None          # Authorization: Bearer
        with pytest.raises(StoreError, match=r"refused the token from \$CHROMA_CLIENT_AUTH_CREDENTIALS .*"
                                             r"CHROMA_AUTH_TOKEN_TRANSPORT_HEADER=X-Chroma-Token"):
            CorpusStore.open_for_writing(x_gate.url, "tokens")
        monkeypatch.setenv("CHROMA_AUTH_TOKEN_TRANSPORT_HEADER", "X-Chroma-Token")
        assert CorpusStore.open_for_writing(x_gate.url, "tokens") is not None
        monkeypatch.delenv("CHROMA_CLIENT_AUTH_CREDENTIALS")
        monkeypatch.setenv("CHROMA_SERVER_AUTHN_CREDENTIALS", TOKEN)  # the server's own, when both share one env
        assert CorpusStore.open_for_writing(x_gate.url, "tokens") is not None
    finally:
        x_gate.httpd.shutdown()
