"""Form a Ray cluster from a launcher's node rank and addresses, then run one drzero command on it.

    python -m drzero.cluster.launch --rank 0 --ips 10.0.0.1,10.0.0.2 --gpus 8 -- evolve --iterations 3
    python -m drzero.cluster.launch --rank 1 --ips 10.0.0.1,10.0.0.2 --gpus 8 -- evolve --iterations 3

Every node of a multi-node launch (a Modal cluster, a SkyPilot task with ``num_nodes``) runs the
same line; on SkyPilot ``--rank``, ``--ips`` and ``--gpus`` default to its ``SKYPILOT_NODE_RANK``,
``SKYPILOT_NODE_IPS`` and ``SKYPILOT_NUM_GPUS_PER_NODE``. The node of rank 0 starts the Ray head,
waits until every node has joined, and runs ``drzero COMMAND ... --ray-address HEAD:PORT`` (which
reads the cluster's shape and checks it, drzero.cluster.ray); its exit status is the command's. Every
other node waits for the head, joins it, and stays a Ray node until the head goes away, then
exits 0. Each node runs its Ray in the foreground (``ray start --block``) as a child of this
process, and stops only that child: ``ray stop`` would also stop a launcher's own Ray (SkyPilot runs
one on every node).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from drzero.cluster.ray import connected

# SkyPilot's own Ray listens on 6379/6380 on its nodes; verl's and SkyPilot's examples put a job's Ray beside it.
RAY_PORT = 6385
JOIN_TIMEOUT = 600.0  # seconds for the head to come up and every node to join: containers start minutes apart


@dataclass(frozen=True)
class NodeRole:
    rank: int
    ips: tuple[str, ...]           # every node's address, rank 0 first
    gpus: int
    command: tuple[str, ...] = ()  # the drzero command and its options, run on rank 0
    port: int = RAY_PORT
    cpus: int | None = None
    ray_args: tuple[str, ...] = ()  # more `ray start` options for this node (--temp-dir=..., --resources=...)

    def __post_init__(self) -> None:
        if not self.ips:
            raise ValueError("--ips is empty: give every node's address, rank 0 first (or set SKYPILOT_NODE_IPS)")
        if not 0 <= self.rank < len(self.ips):
            raise ValueError(f"--rank {self.rank} is not valid for {len(self.ips)} node(s): expected 0 to "
                             f"{len(self.ips) - 1}")
        if self.gpus < 0:
            raise ValueError(f"--gpus {self.gpus} is not valid: expected the GPUs of one node, >= 0")

    @property
    def head(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return len(self.ips)

    @property
    def address(self) -> str:
        return f"{self.ips[0]}:{self.port}"

    def ray_start(self) -> list[str]:
        """`ray start` for this node, in the foreground so that stopping it stops only this node's Ray."""
        # Ray's CLI through this interpreter: an image's `ray` script may belong to another Python
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                   f"--node-ip-address={self.ips[self.rank]}", f"--num-gpus={self.gpus}"]
        if self.cpus is not None:
            command.append(f"--num-cpus={self.cpus}")
        command += self.ray_args
        if self.head:
            return command + ["--head", f"--port={self.port}", "--include-dashboard=false"]
        return command + [f"--address={self.address}"]

    def drzero(self) -> list[str]:
        """The command rank 0 runs: ``drzero COMMAND ...`` on this cluster (before any `--` Hydra overrides)."""
        if not self.command:
            raise ValueError("no drzero command after `--`: e.g. `-- evolve --iterations 3`")
        args = list(self.command)
        split = args.index("--") if "--" in args else len(args)
        return [sys.executable, "-m", "drzero.cli", *args[:split], "--ray-address", self.address, *args[split:]]


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_head(role: NodeRole, timeout: float = JOIN_TIMEOUT, poll: float = 2.0,
                  starting: subprocess.Popen | None = None) -> None:
    """Until the head's port answers; on the head, ``starting`` is its `ray start`, which must not have exited."""
    deadline = time.monotonic() + timeout
    while not reachable(role.ips[0], role.port):
        if starting is not None and starting.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {starting.returncode} before the head answered; "
                               f"its output is above")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray head at {role.address} did not answer within {timeout:g} s; see rank 0's log")
        time.sleep(poll)


def wait_for_nodes(role: NodeRole, timeout: float = JOIN_TIMEOUT, poll: float = 2.0) -> int:
    """Block until ``role.nodes`` nodes are alive in the cluster; the count."""
    import ray  # lazy: Ray is heavy, and only a node of a cluster needs it

    deadline = time.monotonic() + timeout
    with connected(role.address):
        while True:
            alive = sum(bool(node.get("Alive")) for node in ray.nodes())
            if alive >= role.nodes:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive} of {role.nodes} node(s) joined the Ray cluster at {role.address} "
                                   f"within {timeout:g} s; see the other ranks' logs")
            time.sleep(poll)


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run(role: NodeRole, log=print, join_timeout: float = JOIN_TIMEOUT) -> int:
    """This node's part: the head runs the command on the cluster; the others serve it until it ends."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # `ray start` must not read a stale one; rank 0's drzero gets --ray-address
    if not role.head:
        wait_for_head(role, join_timeout)
    log(f"[cluster] node {role.rank} of {role.nodes}: {' '.join(role.ray_start())}")
    ray_node = subprocess.Popen(role.ray_start(), env=env, start_new_session=True)
    try:
        if not role.head:
            code = ray_node.wait()
            # the head is gone once the run ended: this node's Ray then stops too, and that is the normal end
            gone = not reachable(role.ips[0], role.port)
            log(f"[cluster] node {role.rank}: Ray stopped (exit {code})" + ("; the head has ended" if gone else ""))
            return 0 if gone else code
        wait_for_head(role, join_timeout, poll=0.5, starting=ray_node)
        joined = wait_for_nodes(role, join_timeout)
        log(f"[cluster] {joined} node(s) joined {role.address}; running {' '.join(role.drzero())}")
        return subprocess.call(role.drzero(), env=env)
    finally:
        _stop(ray_node)


def role_from_args(argv: Sequence[str], environ: dict | None = None) -> NodeRole:
    environ = os.environ if environ is None else environ
    argv = list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m drzero.cluster.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=environ.get("SKYPILOT_NODE_RANK"),
                        help="this node's rank, 0 for the head ($SKYPILOT_NODE_RANK)")
    parser.add_argument("--ips", default=environ.get("SKYPILOT_NODE_IPS", ""),
                        help="every node's address, rank order, comma or newline separated ($SKYPILOT_NODE_IPS)")
    parser.add_argument("--gpus", type=int, default=environ.get("SKYPILOT_NUM_GPUS_PER_NODE", 0),
                        help="GPUs of this node ($SKYPILOT_NUM_GPUS_PER_NODE)")
    parser.add_argument("--cpus", type=int, help="CPUs Ray may use on this node (default: Ray's count)")
    parser.add_argument("--port", type=int, default=RAY_PORT, help=f"the Ray head's port (default {RAY_PORT})")
    parser.add_argument("--ray-args", default="", metavar="'ARGS'",
                        help="more `ray start` options for this node, e.g. --ray-args='--temp-dir=/scratch/ray'")
    args = parser.parse_args(argv)
    if args.rank is None:
        parser.error("--rank is required (or $SKYPILOT_NODE_RANK)")
    ips = tuple(ip.strip() for ip in args.ips.replace(",", "\n").splitlines() if ip.strip())
    try:
        return NodeRole(int(args.rank), ips, int(args.gpus), tuple(command), args.port, args.cpus,
                        tuple(shlex.split(args.ray_args)))
    except ValueError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    role = role_from_args(sys.argv[1:] if argv is None else argv)
    if role.head and not role.command:
        print("python -m drzero.cluster.launch: no drzero command after `--` for rank 0, e.g. `-- evolve`",
              file=sys.stderr)
        return 2
    return run(role, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
