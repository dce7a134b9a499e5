"""Who holds a port, and which servers of ours an earlier run left behind, read from /proc.

    port_owner(8001)            # None, or "pid 1234 (python -m sglang.launch_server ...)"
    stale_server(8001, holder)  # the pid-file record when the holder is a server an earlier run of ours started

Each started service is recorded in a pid file per port (``pid_file``, under ``run_dir()``), so a server of
ours that outlived its run is recognised, and stopped, by the next start instead of blocking it; anything
else holding the port is only named. Without /proc (macOS) a port is probed by binding it, and holders are
not named.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from drzero.atomic import write_json_atomically
from drzero.records import DamagedRecord, Optional, read_record, set_aside
from drzero.services.specs import ServiceSpec

log = logging.getLogger(__name__)

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


def describe_pid(pid: int) -> str:
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
    return describe_pid(pid) if pid is not None else "an unknown process"


# --- pid files: servers of ours an earlier run left behind ---------------------------------


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


def record_pid(spec: ServiceSpec, pid: int) -> None:
    """Write ``spec``'s pid file for the child ``pid`` (the leader of its own process group)."""
    try:
        run_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomically({"name": spec.name, "pid": pid, "pgid": pid, "start_time": _start_time(pid),
                               "port": spec.port, "command": spec.command_line}, pid_file(spec.port))
    except OSError as error:  # the pid file is a second line of defence; the service runs without it
        log.warning("could not record %s's pid in %s (%s)", spec.name, pid_file(spec.port), error)


PID_RECORD = {"pid": int, "pgid": int, "start_time": Optional(int)}  # what is read back of a pid file (record_pid)


def pid_record(port: int) -> dict | None:
    """The pid file of the server of ours on ``port``; None when there is none or it is damaged (moved aside)."""
    path = pid_file(port)
    try:
        return read_record(path, PID_RECORD)
    except DamagedRecord as damage:
        set_aside(path, str(damage), "a server it named is not recognized as ours: should one still hold the port, "
                                     "stop it by hand", log.warning)
        return None


def forget_pid(port: int, pid: int) -> None:
    """Remove the pid file of ``port`` when it still names ``pid`` (a later run may have replaced it)."""
    record = pid_record(port)
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
    record = pid_record(port) if holder is not None else None
    if record is None:
        return None
    pgid = record["pgid"]
    if _pgid(holder) != pgid:
        return None
    leader_start = _start_time(pgid)
    if leader_start is not None and leader_start != record.get("start_time"):
        return None
    return record


# --- process groups ------------------------------------------------------------------------


def live_group_members(pgid: int) -> list[int] | None:
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
