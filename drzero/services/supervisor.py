"""Start, watch and stop the HTTP services a training stage needs beside it.

A Dr. Zero stage talks to two servers while it trains: the retriever (``drzero
serve-retriever``, port 8000) and an SGLang inference server (port 8001). A stage that
starts them itself wraps its work in a ``Supervisor``::

    from drzero.services.specs import retriever_service, sglang_service
    from drzero.services.supervisor import Supervisor

    specs = [retriever_service(db), sglang_service(model_path, dp=2)]
    with Supervisor(specs) as services:
        ...                       # services.urls["retriever"], services.urls["sglang"]
        services.check_alive()    # now and then during long loops

Entering the ``with`` refuses ports that are already taken (and names who holds them),
starts every child in its own process group with its output streamed to the log under a
``[name]`` prefix, and returns once each answers ``GET /health`` with 200. Children die with
us: each asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, Linux), so a
kill -9 or the OOM killer does not leave them holding the port and the GPUs; and each is recorded
in a pid file per port (``drzero.services.ports``), so a server of ours that survived anyway (one
that ignores SIGTERM, or a non-Linux host) is stopped by the next start instead of blocking it.
Children get the environment without secrets (W&B, Hugging Face, cloud keys); a spec names the
ones it needs (``drzero.services.specs``). A child that exits or stays unhealthy during startup
raises ``ServiceError`` with its last log lines. Leaving the ``with`` - normally, by an
exception, or by SIGTERM, which is how Modal and docker stop a container - stops each child's
whole process tree: SIGTERM, a grace period, then SIGKILL. Only processes the supervisor started
are ever signalled.

When the services run elsewhere (docker compose passes ``--sglang-url``), a stage only
needs ``wait_for_health(url, timeout)``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from drzero.services.ports import (describe_pid, forget_pid, live_group_members, pid_file, port_holder, port_owner,
                                   record_pid, stale_server)
from drzero.services.specs import RETRIEVER_STARTUP_TIMEOUT, ServiceError, ServiceSpec, child_environment

# Every service gets SIGTERM at once and this long together before SIGKILL: under the 15 s a stage's command has
# to stop on Modal after its SIGTERM (inside Modal's 30 s grace period), so the stop finishes before the last commit.
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 50

_HEALTH_REQUEST_TIMEOUT = 5.0  # per poll: a loading server may accept and then hang
_SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


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


# --- process groups ------------------------------------------------------------------------


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
            if not live_group_members(pgid):
                return True
            time.sleep(0.1)
    return not live_group_members(pgid)


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
        record_pid(spec, self.proc.pid)
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
        members = live_group_members(self.pgid)  # the leader is gone; its workers may not be
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
        forget_pid(self.spec.port, self.proc.pid)
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
        self._note(f"port {spec.port} is held by {describe_pid(holder)}, the {record.get('name')} an earlier "
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
