"""The service supervisor with real child processes: our retriever, an http.server in SGLang's place,
and small scripts that crash, hang, ignore SIGTERM or hold a port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from drzero.services.ports import port_owner
from drzero.services.specs import ServiceError, ServiceSpec, is_secret, retriever_service, sglang_service
from drzero.services.supervisor import Supervisor, wait_for_health

REPO = Path(__file__).resolve().parents[1]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its parent counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def sglang_stand_in(tmp_path: Path, port: int | None = None) -> ServiceSpec:
    """A plain http.server in SGLang's place: a file named `health` makes GET /health a 200."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    (root / "health").write_text("ok")
    port = port or free_port()
    return ServiceSpec("sglang", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                  "--directory", str(root)], port, startup_timeout=30)


def _pid_from_log(lines: list[str], name: str) -> int:
    return int(next(line for line in lines if line.startswith(f"[{name}] pid "))[len(f"[{name}] pid "):])


def test_supervises_the_real_retriever_beside_an_sglang_stand_in(demo_db, tmp_path):
    # One Supervisor for both: the retriever takes seconds to load, so it is started once here.
    before = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []
    retriever = retriever_service(demo_db, port=free_port(), startup_timeout=120)
    specs = [retriever, sglang_stand_in(tmp_path)]
    with Supervisor(specs, log=lines.append) as services:
        pids = services.pids
        assert services.urls == {"retriever": f"http://127.0.0.1:{retriever.port}",
                                 "sglang": f"http://127.0.0.1:{specs[1].port}"}
        response = httpx.post(f"{services.urls['retriever']}/retrieve",
                              json={"queries": ["federated learning"], "topk": 2}, timeout=60, trust_env=False)
        assert response.status_code == 200
        assert len(response.json()["result"][0]) == 2
        wait_for_health(services.urls["sglang"], timeout=5)  # what a stage does for an external server
        services.check_alive()
        owner = port_owner(retriever.port)
        assert owner.startswith(f"pid {pids['retriever']} (python") and "serve-retriever" in owner, owner
        assert signal.getsignal(signal.SIGTERM) is not before  # ours, while inside
    assert signal.getsignal(signal.SIGTERM) is before
    assert any(line.startswith("[retriever] ") for line in lines)
    assert any(line.startswith("[sglang] ") and "GET /health" in line for line in lines)
    assert any(line.startswith("[services] retriever is healthy") for line in lines)
    assert all(_gone(pid) for pid in pids.values())
    assert all(port_owner(spec.port) is None for spec in specs)


def test_a_child_that_exits_early_is_reported_at_once():
    spec = ServiceSpec("sglang", _python("""
        import sys
        print("ValueError: model path /models/missing does not exist")
        sys.exit(3)
    """), free_port(), startup_timeout=60)
    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        with Supervisor([spec], log=lambda line: None):
            pass
    assert time.monotonic() - started < 10  # not after the 60 s startup timeout
    message = str(error.value)
    assert "sglang exited with code 3" in message
    assert "model path /models/missing does not exist" in message


def test_a_command_that_cannot_start_is_a_service_error(tmp_path):
    spec = ServiceSpec("sglang", [str(tmp_path / "no-such-python"), "-m", "sglang.launch_server"], free_port())
    with pytest.raises(ServiceError, match=r"could not start sglang .*No such file"):
        with Supervisor([spec], log=lambda line: None):
            pass


def test_a_child_that_never_gets_healthy_is_stopped_after_its_timeout():
    lines: list[str] = []
    spec = ServiceSpec("sglang", _python("""
        import os, time
        print("pid", os.getpid())
        time.sleep(120)
    """), free_port(), startup_timeout=2)
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"sglang was not healthy after 2 s") as error:
        with Supervisor([spec], log=lines.append, poll_interval=0.2):
            pass
    assert time.monotonic() - started < 15
    assert "pid " in str(error.value)  # the log tail comes along
    assert _gone(_pid_from_log(lines, "sglang"))


def test_a_taken_port_is_refused_and_its_holder_left_alone(tmp_path):
    port = free_port()
    holder = subprocess.Popen(_python(f"""
        import socket, time
        s = socket.socket()
        s.bind(("127.0.0.1", {port}))
        s.listen()
        print("listening", flush=True)
        time.sleep(60)
    """), stdout=subprocess.PIPE, text=True)
    marker = tmp_path / "started"
    try:
        assert holder.stdout.readline().strip() == "listening"
        # The first service is fine; the check must refuse before starting even that one.
        first = ServiceSpec("retriever", _python(f"open({str(marker)!r}, 'w').close()"), free_port())
        with pytest.raises(ServiceError) as error:
            with Supervisor([first, sglang_stand_in(tmp_path, port)], log=lambda line: None):
                pass
        message = str(error.value)
        assert f"port {port} for sglang is taken by pid {holder.pid} (python" in message
        assert "--sglang-url" in message
        time.sleep(0.5)
        assert not marker.exists()
        assert holder.poll() is None  # never kill what we did not start
    finally:
        holder.kill()
        holder.wait()
    assert port_owner(port) is None


def test_sigterm_to_the_stage_stops_its_services(tmp_path):
    spec = sglang_stand_in(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys, time
        from drzero.services.specs import ServiceSpec
        from drzero.services.supervisor import Supervisor
        spec = ServiceSpec("sglang", {spec.command!r}, {spec.port})
        with Supervisor([spec]) as services:
            print("ready", services.pids["sglang"], flush=True)
            time.sleep(60)
        print("not reached", flush=True)
    """))
    process = subprocess.Popen([sys.executable, str(driver)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        ready = process.stdout.readline().split()
        assert ready[0] == "ready", ready
        child = int(ready[1])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert "not reached" not in process.stdout.read()
        assert _gone(child)
        assert port_owner(spec.port) is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stop_kills_the_whole_tree_even_when_sigterm_is_ignored(tmp_path):
    lines: list[str] = []
    www = sglang_stand_in(tmp_path).command[-1]  # a directory holding `health`
    port = free_port()
    # Healthy, but ignores SIGTERM and has a worker of its own: both must still go.
    stubborn = ServiceSpec("stubborn", _python(f"""
        import os, signal, subprocess, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("pid", os.getpid(), worker.pid)
        os.chdir({www!r})
        from http.server import HTTPServer, SimpleHTTPRequestHandler
        HTTPServer(("127.0.0.1", {port}), SimpleHTTPRequestHandler).serve_forever()
    """), port)
    started = time.monotonic()
    with Supervisor([stubborn], log=lines.append, stop_timeout=1):
        pass
    assert time.monotonic() - started < 15
    pid, worker = map(int, next(line for line in lines if line.startswith("[stubborn] pid ")).split()[2:4])
    assert _gone(pid) and _gone(worker)
    assert any("did not stop within 1 s; killing it" in line for line in lines)


def test_check_alive_reports_a_child_that_dies_after_startup(tmp_path):
    port = free_port()
    spec = ServiceSpec("sglang", _python(f"""
        import os, threading, time
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class Health(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()

        server = HTTPServer(("127.0.0.1", {port}), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(2)
        print("CUDA error: an illegal memory access was encountered", flush=True)
        os._exit(5)
    """), port)
    with Supervisor([spec], log=lambda line: None, poll_interval=0.1) as services:
        services.check_alive()
        deadline = time.monotonic() + 15
        with pytest.raises(ServiceError) as error:
            while time.monotonic() < deadline:
                services.check_alive()
                time.sleep(0.1)
    message = str(error.value)
    assert "sglang exited with code 5 while the stage was running" in message
    assert "illegal memory access" in message


def test_wait_for_health_names_the_url_when_nothing_answers():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServiceError, match=rf"{url}/health was not healthy after 1 s"):
        wait_for_health(url, timeout=1, poll_interval=0.2)
    assert time.monotonic() - started < 5


def test_builders_spell_the_commands_out():
    sglang = sglang_service("/models/solver", dp=2, tp=1, mem_fraction=0.6, extra_args=["--context-length", "8192"])
    line = sglang.command_line
    for part in ("-m sglang.launch_server", "--model-path /models/solver", "--dp-size 2", "--tp-size 1",
                 "--mem-fraction-static 0.6", "--tool-call-parser qwen25", "--served-model-name solver",
                 "--host 127.0.0.1", "--port 8001", "--context-length 8192"):
        assert part in line, part
    assert sglang.url == "http://127.0.0.1:8001" and sglang.startup_timeout == 1800

    retriever = retriever_service("/corpus/db", device="cuda", copy_to_local="/tmp/db", embedder="BAAI/bge-m3")
    line = retriever.command_line
    for part in ("-m drzero.cli serve-retriever", "--db /corpus/db", "--port 8000", "--device cuda",
                 "--copy-to-local /tmp/db", "--embedder BAAI/bge-m3", "--collection corpus"):
        assert part in line, part
    assert retriever.url == "http://127.0.0.1:8000" and retriever.startup_timeout == 300
    assert ServiceSpec("x", ["x"], 9000, host="0.0.0.0").url == "http://127.0.0.1:9000"


# --- services die with their parent; stale servers of ours are cleared; no secrets ---------------

@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """Pid files in this test's own folder (the default is shared by every run of this user)."""
    folder = tmp_path / "run"
    monkeypatch.setenv("DRZERO_RUN_DIR", str(folder))
    return folder


def _stage_with(spec: ServiceSpec, tmp_path: Path) -> subprocess.Popen:
    """A stage process that supervises ``spec`` and prints the child's pid once it is healthy."""
    driver = tmp_path / "stage.py"
    driver.write_text(textwrap.dedent(f"""
        import time
        from drzero.services.specs import ServiceSpec
        from drzero.services.supervisor import Supervisor
        with Supervisor([ServiceSpec({spec.name!r}, {spec.command!r}, {spec.port})]) as services:
            print("ready", services.pids[{spec.name!r}], flush=True)
            time.sleep(120)
    """))
    return subprocess.Popen([sys.executable, str(driver)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _kill_stage(stage: subprocess.Popen) -> int:
    ready = stage.stdout.readline().split()
    assert ready[:1] == ["ready"], ready
    stage.kill()  # SIGKILL: no handler, no `finally`, no __exit__ runs in the stage
    stage.wait(timeout=10)
    return int(ready[1])


def test_services_die_when_their_stage_is_killed_with_sigkill(tmp_path, run_dir):
    spec = sglang_stand_in(tmp_path)
    stage = _stage_with(spec, tmp_path)
    try:
        child = _kill_stage(stage)
        assert _gone(child, timeout=10), "the service outlived its stage (orphaned, holding its port)"
        deadline = time.monotonic() + 10
        while port_owner(spec.port) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_owner(spec.port) is None
    finally:
        if stage.poll() is None:
            stage.kill()


def test_a_stale_server_of_ours_is_stopped_on_start_and_a_foreign_one_refused(tmp_path, run_dir):
    www = sglang_stand_in(tmp_path).command[-1]
    port = free_port()
    # A server that ignores SIGTERM (so the parent-death signal does not end it) survives a kill -9 of its stage.
    deaf = ServiceSpec("sglang", _python(f"""
        import os, signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.chdir({www!r})
        from http.server import HTTPServer, SimpleHTTPRequestHandler
        HTTPServer(("127.0.0.1", {port}), SimpleHTTPRequestHandler).serve_forever()
    """), port)
    stage = _stage_with(deaf, tmp_path)
    stale = _kill_stage(stage)
    try:
        time.sleep(0.5)
        assert not _gone(stale, timeout=0.1) and f"pid {stale}" in port_owner(port)
        assert json.loads((run_dir / f"service-{port}.json").read_text())["pid"] == stale

        lines: list[str] = []
        with Supervisor([sglang_stand_in(tmp_path, port)], log=lines.append, stop_timeout=1) as services:
            assert services.pids["sglang"] != stale
            assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200
        assert _gone(stale)
        assert any(f"the sglang an earlier run started" in line and "stopping it" in line for line in lines)
        assert not (run_dir / f"service-{port}.json").exists()  # removed once its server stopped
    finally:
        if not _gone(stale, timeout=0.1):
            os.kill(stale, signal.SIGKILL)

    # A pid file naming some other process group proves nothing: the holder is refused, not stopped.
    holder = subprocess.Popen(sglang_stand_in(tmp_path, port).command, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while port_owner(port) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        (run_dir / f"service-{port}.json").write_text(json.dumps({"name": "sglang", "pid": stale, "pgid": stale}))
        with pytest.raises(ServiceError, match=f"port {port} for sglang is taken by pid {holder.pid}"):
            with Supervisor([sglang_stand_in(tmp_path, port)], log=lambda line: None):
                pass
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_children_get_no_secrets_unless_they_name_them(tmp_path, run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("DRZERO_SOMETHING", "kept")
    www = sglang_stand_in(tmp_path).command[-1]
    dumps = {}
    specs = []
    for name, secrets in (("retriever", ()), ("sglang", ("HF_TOKEN",))):
        port, dumps[name] = free_port(), tmp_path / f"{name}.env.json"
        specs.append(ServiceSpec(name, _python(f"""
            import json, os
            json.dump(dict(os.environ), open({str(dumps[name])!r}, "w"))
            os.chdir({www!r})
            from http.server import HTTPServer, SimpleHTTPRequestHandler
            HTTPServer(("127.0.0.1", {port}), SimpleHTTPRequestHandler).serve_forever()
        """), port, pass_secrets=secrets, env={"EXTRA": "1"}))
    with Supervisor(specs, log=lambda line: None):
        pass
    retriever, sglang = (json.loads(dumps[name].read_text()) for name in ("retriever", "sglang"))
    assert not {"WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(retriever)
    assert retriever["DRZERO_SOMETHING"] == "kept" and retriever["EXTRA"] == "1" and "PATH" in retriever
    assert sglang["HF_TOKEN"] == "hf-secret-value" and "WANDB_API_KEY" not in sglang
    assert sglang_service("/m").pass_secrets == ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    assert retriever_service("/db").pass_secrets == ()
    assert not is_secret("TOKENIZERS_PARALLELISM") and is_secret("MODAL_TOKEN_SECRET") and is_secret("GITHUB_TOKEN")


@pytest.mark.parametrize("content", ['"x"', "[]", '{"pid": "12", "pgid": 12}', '{"pid": 1'])
def test_a_damaged_pid_file_is_set_aside_in_one_sentence_not_raised(run_dir, content, caplog):
    """A pid file that is not an object once raised AttributeError when its service stopped."""
    from drzero.services.ports import forget_pid as _forget_pid, pid_file, stale_server

    run_dir.mkdir()
    port = free_port()
    pid_file(port).write_text(content)
    _forget_pid(port, os.getpid())
    assert not pid_file(port).exists() and len(list(run_dir.glob(f"service-{port}.json.damaged-*"))) == 1
    pid_file(port).write_text(content)
    assert stale_server(port, os.getpid()) is None  # proves nothing: the holder is refused, never stopped
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 2 and all(s.endswith("should one still hold the port, stop it by hand") for s in said)
