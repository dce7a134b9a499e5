"""Start, watch and stop the HTTP services a training stage needs beside it.

A Dr. Zero stage talks to two servers while it trains: the retriever (``drzero
serve-retriever``, port 8000) and an SGLang inference server (port 8001). A stage that
starts them itself wraps its work in a ``Supervisor``::

    specs = [retriever_service(db), sglang_service(model_path, dp=2)]
    with Supervisor(specs) as services:
        ...                       # services.urls["retriever"], services.urls["sglang"]
        services.check_alive()    # now and then during long loops

Entering the ``with`` refuses ports that are already taken (and names who holds them),
starts every child in its own process group with its output streamed to the log under a
``[name]`` prefix, and returns once each answers ``GET /health`` with 200. Children die with
us: each asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, Linux), so a
kill -9 or the OOM killer does not leave them holding the port and the GPUs; and each is recorded
in a pid file per port, so a server of ours that survived anyway (one that ignores SIGTERM, or a
non-Linux host) is stopped by the next start instead of blocking it. Children get the
environment without secrets (W&B, Hugging Face, cloud keys); a spec names the ones it needs. A child that
exits or stays unhealthy during startup raises ``ServiceError`` with its last log lines.
Leaving the ``with`` - normally, by an exception, or by SIGTERM, which is how Modal and
docker stop a container - stops each child's whole process tree: SIGTERM, a grace
period, then SIGKILL. Only processes the supervisor started are ever signalled.

When the services run elsewhere (docker compose passes ``--sglang-url``), a stage only
needs ``wait_for_health(url, timeout)``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from drzero.records import DamagedRecord, Optional, read_record, set_aside

log = logging.getLogger(__name__)

RETRIEVER_PORT = 8000
SGLANG_PORT = 8001
# The retriever loads an embedder and opens ChromaDB; a first model load from a cold
# network volume can take many minutes for SGLang, so its budget is much larger.
RETRIEVER_STARTUP_TIMEOUT = 300.0
SGLANG_STARTUP_TIMEOUT = 1800.0
STOP_TIMEOUT = 20.0
LOG_TAIL_LINES = 50

_HEALTH_REQUEST_TIMEOUT = 5.0  # per poll: a loading server may accept and then hang
_SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class ServiceError(RuntimeError):
    """A service could not be started, stayed unhealthy or died; the message says what to do."""


@dataclass
class ServiceSpec:
    """How to start one HTTP service and how to tell that it is ready."""

    name: str
    command: list[str]
    port: int
    host: str = "127.0.0.1"
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)  # added to os.environ (less its secrets) for the child
    pass_secrets: tuple[str, ...] = ()  # secret variables the child needs from os.environ (see child_environment)
    startup_timeout: float = RETRIEVER_STARTUP_TIMEOUT
    cwd: str | os.PathLike | None = None

    @property
    def url(self) -> str:
        # A server bound to a wildcard address is reached over loopback from here.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.url + self.health_path

    @property
    def command_line(self) -> str:
        """The command as a shell line, for dry runs and logs."""
        return shlex.join(str(part) for part in self.command)


def retriever_service(
    db: str | os.PathLike,
    port: int = RETRIEVER_PORT,
    host: str = "127.0.0.1",
    device: str = "cpu",
    embedder: str | None = None,
    copy_to_local: str | os.PathLike | None = None,
    collection: str = "corpus",
    *,
    startup_timeout: float = RETRIEVER_STARTUP_TIMEOUT,
) -> ServiceSpec:
    """`drzero serve-retriever` over the corpus at ``db``, run by this interpreter."""
    command = [sys.executable, "-m", "drzero.cli", "serve-retriever", "--db", str(db),
               "--collection", collection, "--host", host, "--port", str(port), "--device", device]
    if embedder:
        command += ["--embedder", embedder]
    if copy_to_local:
        command += ["--copy-to-local", str(copy_to_local)]
    return ServiceSpec("retriever", command, port, host=host, startup_timeout=startup_timeout)


def sglang_service(
    model_path: str | os.PathLike,
    port: int = SGLANG_PORT,
    dp: int = 1,
    tp: int = 1,
    mem_fraction: float = 0.5,
    tool_call_parser: str = "qwen25",
    served_model_name: str = "solver",
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = SGLANG_STARTUP_TIMEOUT,
) -> ServiceSpec:
    """An SGLang server for ``model_path`` with ``dp`` data-parallel replicas of ``tp`` GPUs each."""
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", host, "--port", str(port), "--dp-size", str(dp), "--tp-size", str(tp),
               "--mem-fraction-static", str(mem_fraction), "--tool-call-parser", tool_call_parser,
               "--served-model-name", served_model_name, *map(str, extra_args)]
    # a Hugging Face token only for weights it is allowed to download; never the W&B key
    return ServiceSpec("sglang", command, port, host=host, startup_timeout=startup_timeout,
                       pass_secrets=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))


# --- what a child inherits -----------------------------------------------------------------

# A variable is a secret when one of its _-separated words is one of these: WANDB_API_KEY,
# HF_TOKEN, MODAL_TOKEN_SECRET, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN ... (not TOKENIZERS_PARALLELISM).
_SECRET_WORDS = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|KEY|APIKEY)(_|$)")


def is_secret(variable: str) -> bool:
    return bool(_SECRET_WORDS.search(variable.upper()))


def child_environment(spec: ServiceSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a service child runs with: ours, less every secret it does not name, plus its own."""
    environ = os.environ if environ is None else environ
    kept = {k: v for k, v in environ.items() if not is_secret(k) or k in spec.pass_secrets}
    # Python children block-buffer a piped stdout; unbuffered, their lines arrive as written.
    return {"PYTHONUNBUFFERED": "1", **kept, **spec.env}


# --- health --------------------------------------------------------------------------------

# No proxies: health checks go to loopback or a cluster-internal name, and an HTTP(S)_PROXY
# set for downloads would otherwise swallow them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _probe(url: str, timeout: float = _HEALTH_REQUEST_TIMEOUT) -> str | None:
    """None when ``url`` answers 200, else a short reason (for error messages)."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            response.read()
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(reason).__name__


def wait_for_health(url: str, timeout: float = RETRIEVER_STARTUP_TIMEOUT, *, path: str = "/health",
                    poll_interval: float = 0.5) -> None:
    """Wait until ``url`` + ``path`` answers 200, for services started by someone else.

    ``url`` is the service's base URL as given on the command line (``--sglang-url``);
    pass ``path=""`` when it already is the health URL.
    """
    health_url = url.rstrip("/") + path if path else url
    deadline = time.monotonic() + timeout
    while True:
        reason = _probe(health_url, timeout=min(_HEALTH_REQUEST_TIMEOUT, max(timeout, 0.1)))
        if reason is None:
            return
        if time.monotonic() >= deadline:
            raise ServiceError(f"{health_url} was not healthy after {timeout:g} s (last answer: {reason}); "
                               f"check that the service is running and reachable from here, or wait longer")
        time.sleep(min(poll_interval, max(deadline - time.monotonic(), 0.0)))


# --- who holds a port ----------------------------------------------------------------------

_TCP_LISTEN = "0A"
_WILDCARDS = {"0.0.0.0", "::"}


def _decode_proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in the kernel's byte order."""
    words = [int(hex_address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8)]
    packed = b"".join(words)
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    address = socket.inet_ntop(socket.AF_INET6, packed)
    return address.removeprefix("::ffff:") if address.startswith("::ffff:") and "." in address else address


def _listener_inodes(port: int, host: str) -> list[int] | None:
    """Inodes of listening sockets that would clash with binding ``host:port``; None without /proc."""
    wanted = "127.0.0.1" if host in ("localhost", "") else host
    inodes, readable = [], False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port:
                continue
            address = _decode_proc_address(hex_address)
            # A wildcard listener blocks every address; binding a wildcard clashes with any listener.
            if address in _WILDCARDS or wanted in _WILDCARDS or address == wanted:
                inodes.append(int(fields[9]))
    return inodes if readable else None


def _pid_holding(inodes: Iterable[int]) -> int | None:
    """The lowest pid with one of these sockets open (the parent, for forked workers), if visible."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # another user's process, or it just exited
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return pid
            except OSError:
                continue
    return None


def _describe_pid(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        argv = [part.decode(errors="replace") for part in argv if part]
    except OSError:
        argv = []
    if not argv:
        try:
            argv = [Path(f"/proc/{pid}/comm").read_text().strip()]
        except OSError:
            return f"pid {pid}"
    command = " ".join([os.path.basename(argv[0]), *argv[1:]])
    if len(command) > 160:
        command = command[:157] + "..."
    return f"pid {pid} ({command})"


def port_holder(port: int, host: str = "127.0.0.1") -> tuple[bool, int | None]:
    """(whether ``port`` is taken where a server on ``host`` would bind, the pid holding it if visible)."""
    inodes = _listener_inodes(port, host)
    if inodes is None:  # no /proc (macOS): fall back to trying the bind ourselves
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host or "127.0.0.1", port))
            except OSError:
                return True, None
        return False, None
    if not inodes:
        return False, None
    return True, _pid_holding(inodes)


def port_owner(port: int, host: str = "127.0.0.1") -> str | None:
    """Who listens on ``port`` where a server on ``host`` would bind, e.g. "pid 1234 (python -m http.server 8001)".

    None when the port is free. "an unknown process" when the port is taken but the
    holder is not visible from here (another user or PID namespace).
    """
    taken, pid = port_holder(port, host)
    if not taken:
        return None
    return _describe_pid(pid) if pid is not None else "an unknown process"


# --- children die with us ------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is loaded after fork
    except (OSError, AttributeError):
        pass


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook: SIGTERM this child when the thread that started it dies (kill -9 included).

    The kernel watches the *thread* that forked, not the process: a Supervisor entered from a
    worker thread would lose its children when that thread ends. Every stage enters it from the
    main thread.
    """
    if _prctl is None:
        return None

    def hook() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran: nobody would signal us
            os._exit(1)
    return hook


def run_dir() -> Path:
    """Where the pid files of our services live: ``$DRZERO_RUN_DIR``, else a per-user temp folder."""
    override = os.environ.get("DRZERO_RUN_DIR")
    return Path(override) if override else Path(tempfile.gettempdir()) / f"drzero-{os.getuid()}"


def pid_file(port: int) -> Path:
    return run_dir() / f"service-{port}.json"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid,
    it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[19])


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _record_pid(spec: ServiceSpec, pid: int) -> None:
    from drzero.atomic import write_json_atomically

    try:
        run_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomically({"name": spec.name, "pid": pid, "pgid": pid, "start_time": _start_time(pid),
                               "port": spec.port, "command": spec.command_line}, pid_file(spec.port))
    except OSError as error:  # the pid file is a second line of defence; the service runs without it
        log.warning("could not record %s's pid in %s (%s)", spec.name, pid_file(spec.port), error)


PID_RECORD = {"pid": int, "pgid": int, "start_time": Optional(int)}  # what is read back of a pid file (_record_pid)


def _pid_record(port: int) -> dict | None:
    """The pid file of the server of ours on ``port``; None when there is none or it is damaged (moved aside)."""
    path = pid_file(port)
    try:
        return read_record(path, PID_RECORD)
    except DamagedRecord as damage:
        set_aside(path, str(damage), "a server it named is not recognized as ours: should one still hold the port, "
                                     "stop it by hand", log.warning)
        return None


def _forget_pid(port: int, pid: int) -> None:
    record = _pid_record(port)
    try:
        if record is not None and record["pid"] == pid:
            pid_file(port).unlink()
    except OSError:
        pass


def stale_server(port: int, holder: int | None) -> dict | None:
    """The pid-file record of the earlier server of ours that holds ``port``, or None.

    Ours means: ``holder`` (the pid listening on the port) is in the process group the pid file
    recorded, and that group's leader, if it still runs, is the very process we started (same
    start time). A group id cannot be reused while any member lives, so nothing else matches.
    """
    record = _pid_record(port) if holder is not None else None
    if record is None:
        return None
    pgid = record["pgid"]
    if _pgid(holder) != pgid:
        return None
    leader_start = _start_time(pgid)
    if leader_start is not None and leader_start != record.get("start_time"):
        return None
    return record


def stop_group(pgid: int, timeout: float) -> bool:
    """SIGTERM the group, then SIGKILL after ``timeout``; True once no member is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _live_group_members(pgid):
                return True
            time.sleep(0.1)
    return not _live_group_members(pgid)


# --- process groups ------------------------------------------------------------------------


def _live_group_members(pgid: int) -> list[int] | None:
    """Pids of processes in group ``pgid`` that are not zombies; None without /proc."""
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    members = []
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat[stat.rfind(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def _describe_exit(name: str, code: int) -> str:
    if code < 0:
        try:
            return f"{name} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"{name} was killed by signal {-code}"
    return f"{name} exited with code {code}"


class _Child:
    """One started service: its process (leader of its own group), log thread and log tail."""

    def __init__(self, spec: ServiceSpec, sink: Callable[[str], None]):
        self.spec = spec
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.proc = subprocess.Popen(
            spec.command, cwd=spec.cwd, env=child_environment(spec), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: we can stop the whole tree, and ^C reaches only us
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.pgid = self.proc.pid
        _record_pid(spec, self.proc.pid)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._pump, args=(sink,), name=f"log-{spec.name}", daemon=True)
        self._reader.start()

    def _pump(self, sink: Callable[[str], None]) -> None:
        prefix = f"[{self.spec.name}] "
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if "\r" in line:  # progress bars redraw with \r: keep what was on screen last
                line = next((part for part in reversed(line.split("\r")) if part.strip()), "")
            self.tail.append(line)
            try:
                sink(prefix + line)
            except Exception:  # a broken log sink must not stop the pipe draining, or the child blocks
                pass

    def exit_code(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while running.

        The child is not reaped here: while it is an unreaped zombie its pid, and so its
        process group id, cannot be reused by an unrelated process, which keeps signalling
        the group safe until ``reap``.
        """
        if self.proc.returncode is not None:
            return self.proc.returncode
        if not hasattr(os, "waitid"):
            return self.proc.poll()
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def group_alive(self) -> bool:
        if self.proc.returncode is not None:
            return False
        if self.exit_code() is None:
            return True
        members = _live_group_members(self.pgid)  # the leader is gone; its workers may not be
        return bool(members)

    def signal_group(self, sig: int) -> None:
        # Only while the leader is unreaped: then the group id is certainly still ours.
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, join_timeout: float = 5.0) -> None:
        self.proc.wait()
        _forget_pid(self.spec.port, self.proc.pid)
        # A grandchild that left the group could hold the pipe open; don't hang on it.
        self._reader.join(timeout=join_timeout)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()

    def drain(self, timeout: float = 2.0) -> None:
        """Give the log thread a moment to read a dead child's last lines."""
        self._reader.join(timeout=timeout)

    def last_lines(self) -> str:
        if not self.tail:
            return "(it printed nothing)"
        return "\n".join(f"    {line}" for line in self.tail)


# --- the supervisor ------------------------------------------------------------------------


def _make_sink(log: Any) -> Callable[[str], None]:
    if log is None:
        def to_stderr(line: str) -> None:
            stream = sys.stderr  # looked up per line: test runners and notebooks swap it
            stream.write(line + "\n")
            stream.flush()
        return to_stderr
    if callable(log):
        return log
    if hasattr(log, "info"):  # logging.Logger / LoggerAdapter
        return log.info
    raise TypeError(f"log must be a callable or a logger, not {type(log).__name__}")


class Supervisor:
    """Runs services as child processes for the duration of a ``with`` block.

    ``log`` takes each line of the children's output (prefixed ``[name] ``) and the
    supervisor's own notes: a print-like callable or a ``logging.Logger``; default stderr.
    """

    def __init__(self, specs: Sequence[ServiceSpec], log: Callable[[str], Any] | logging.Logger | None = None,
                 poll_interval: float = 0.5, stop_timeout: float = STOP_TIMEOUT):
        names = [spec.name for spec in specs]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"service names must be unique, got {sorted(duplicates)} more than once")
        ports = [spec.port for spec in specs]
        if len(set(ports)) != len(ports):
            raise ValueError(f"services must listen on different ports, got {ports}")
        self.specs = list(specs)
        self.poll_interval = poll_interval
        self.stop_timeout = stop_timeout
        self._sink = _make_sink(log)
        self._children: list[_Child] = []
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        self._entered = False

    @property
    def urls(self) -> dict[str, str]:
        return {spec.name: spec.url for spec in self.specs}

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the running children (each the leader of its own process group)."""
        return {child.spec.name: child.proc.pid for child in self._children}

    def _note(self, message: str) -> None:
        try:
            self._sink(f"[services] {message}")
        except Exception:
            pass

    # -- entering ---------------------------------------------------------------------------

    def __enter__(self) -> Supervisor:
        if self._entered:
            raise RuntimeError("a Supervisor can be entered only once; make a new one")
        self._entered = True
        # All ports first: a clash must leave nothing half-started. A server an earlier run of
        # ours left behind (its pid file says so) is stopped; anything else is named, never stopped.
        for spec in self.specs:
            self._stop_stale(spec)
            owner = port_owner(spec.port, spec.host)
            if owner is not None:
                raise ServiceError(f"port {spec.port} for {spec.name} is taken by {owner}; "
                                   f"stop it or point drzero at it with --{spec.name}-url")
        self._install_sigterm_handler()
        try:
            for spec in self.specs:
                self._note(f"starting {spec.name}: {spec.command_line}")
                try:
                    self._children.append(_Child(spec, self._sink))
                except OSError as exc:  # missing executable or cwd: nothing was started for it
                    raise ServiceError(f"could not start {spec.name} ({exc}); check its command: "
                                       f"{spec.command_line}") from exc
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _stop_stale(self, spec: ServiceSpec) -> None:
        taken, holder = port_holder(spec.port, spec.host)
        record = stale_server(spec.port, holder) if taken else None
        if record is None:
            return
        self._note(f"port {spec.port} is held by {_describe_pid(holder)}, the {record.get('name')} an earlier "
                   f"run started (pid file {pid_file(spec.port)}); stopping it")
        if stop_group(int(record["pgid"]), self.stop_timeout):
            pid_file(spec.port).unlink(missing_ok=True)

    def _wait_until_healthy(self) -> None:
        # All children load in parallel; any of them dying fails the start at once rather
        # than after the slowest one's timeout.
        pending = list(self._children)
        while pending:
            for child in self._children:
                code = child.exit_code()
                if code is not None:
                    self._stop_children([child])
                    raise ServiceError(
                        f"{_describe_exit(child.spec.name, code)} before it was healthy; fix the error in "
                        f"its last log lines below and retry:\n{child.last_lines()}")
            for child in list(pending):
                spec = child.spec
                reason = _probe(spec.health_url)
                elapsed = time.monotonic() - child.started
                if reason is None:
                    self._note(f"{spec.name} is healthy at {spec.url} after {elapsed:.1f} s")
                    pending.remove(child)
                elif elapsed >= spec.startup_timeout:
                    self._stop_children([child])
                    raise ServiceError(
                        f"{spec.name} was not healthy after {spec.startup_timeout:g} s ({spec.health_url}: "
                        f"{reason}) and was stopped; check its last log lines below, or allow a longer "
                        f"startup_timeout:\n{child.last_lines()}")
            if pending:
                time.sleep(self.poll_interval)

    # -- while running ----------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise ServiceError if a child has died since startup; cheap enough to call often."""
        for child in self._children:
            code = child.exit_code()
            if code is not None:
                child.drain()
                raise ServiceError(
                    f"{_describe_exit(child.spec.name, code)} while the stage was running; fix the error in "
                    f"its last log lines below and rerun the stage:\n{child.last_lines()}")

    # -- stopping ---------------------------------------------------------------------------

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every child's process tree (SIGTERM, grace period, SIGKILL). Safe to call twice."""
        children, self._children = self._children, []
        on_main_thread = threading.current_thread() is threading.main_thread()
        if self._sigterm_installed and on_main_thread:
            # A second SIGTERM (docker and Modal may repeat it) must not abort the cleanup
            # half-way and orphan the children; the first one is already being honoured.
            signal.signal(signal.SIGTERM, self._ignore_sigterm_while_stopping)
        try:
            self._stop_children(children)
        finally:
            # From another thread the handler cannot be touched; __exit__ on the main thread restores it.
            if on_main_thread:
                self._restore_sigterm_handler()

    def _stop_children(self, children: list[_Child]) -> None:
        if not children:
            return
        for child in children:
            if child.exit_code() is None:
                self._note(f"stopping {child.spec.name} (pid {child.proc.pid})")
            child.signal_group(signal.SIGTERM)
        # One grace period for all: stopping in parallel, not one after another.
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and any(child.group_alive() for child in children):
            time.sleep(0.1)
        for child in children:
            if child.group_alive():
                self._note(f"{child.spec.name} did not stop within {self.stop_timeout:g} s; killing it")
            # Also catches stragglers of a group whose leader already exited (and any group
            # we could not inspect without /proc).
            child.signal_group(signal.SIGKILL)
        for child in children:
            child.reap()
            if child in self._children:
                self._children.remove(child)

    # -- SIGTERM ----------------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        # Python may only set handlers from the main thread; elsewhere the caller's own
        # shutdown path has to leave the `with` block.
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm_handler(self) -> None:
        if not self._sigterm_installed:
            return
        # None means a handler installed from C; it cannot be put back from Python.
        signal.signal(signal.SIGTERM,
                      self._previous_sigterm if self._previous_sigterm is not None else signal.SIG_DFL)
        self._sigterm_installed = False

    def _on_sigterm(self, signum: int, frame: object) -> None:
        # SIGTERM's default action would end us at once and leave the children running
        # in their own sessions; unwinding runs __exit__, which stops them.
        self._note("SIGTERM received; stopping services")
        raise SystemExit(_SIGTERM_EXIT_CODE)

    def _ignore_sigterm_while_stopping(self, signum: int, frame: object) -> None:
        self._note("SIGTERM received again; already stopping services")
