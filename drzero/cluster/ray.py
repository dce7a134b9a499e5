"""More than one node: a stage or `drzero evolve` on a Ray cluster that already exists.

    RAY_ADDRESS=10.0.0.1:6379 drzero evolve --iterations 3
    drzero solver --iteration 1 --ray-address 10.0.0.1:6379

verl trains on Ray; on one node its ``ray.init()`` starts a private Ray, on several it joins the
cluster named by ``RAY_ADDRESS`` (Ray's own variable, which ``ray.init()`` reads). drzero asks the
same cluster, before anything starts, what the stage needs to know:

* how many nodes have GPUs and how many each has: ``trainer.nnodes`` and ``trainer.n_gpus_per_node``
  (every GPU node must have the same count; a head without GPUs only coordinates);
* where the services go: the retriever and the reward / gen-data SGLang server run beside
  ``drzero``, on the node it runs on (the head, in the Modal and SkyPilot launchers), bound to that
  node's cluster address, not 127.0.0.1, so that verl's workers on every node reach them. The
  search tool's URL reaches those workers through Ray's ``runtime_env`` (a worker started by
  ``ray start`` does not inherit drzero's environment);
* whether the cluster is one: the same drzero, verl, Ray, torch and SGLang on every node, and the
  data and checkpoint directories shared: this node writes a marker in each, every node reads it
  and writes its own, and this node reads those back. A file system that only syncs now and then
  (Modal Volumes) is given ``$DRZERO_SHARED_PATH_WAIT`` seconds to show them; the same check
  runs before every stage, so what one stage wrote is on every node before the next starts.

Nothing here starts or stops a cluster: ``ray start`` (or Modal, SkyPilot, KubeRay) does that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from drzero.checks import Check
from drzero.rewards.wiring import hydra_value

RAY_ADDRESS_ENV = "RAY_ADDRESS"
SHARED_WAIT_ENV = "DRZERO_SHARED_PATH_WAIT"
# What must match on every node: a mismatch fails minutes into a run, in a worker's log.
PACKAGES = ("drzero", "verl", "ray", "torch", "transformers", "sglang", "flash-attn")
MARKER_DIR = ".drzero-cluster-check"
PROBE_TIMEOUT = 120.0      # seconds for every node to answer; a node busy starting workers is slow
POLL_INTERVAL = 0.5


class ClusterError(RuntimeError):
    """The cluster cannot run the stage as asked; the message says what to change."""


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    gpus: int
    cpus: float
    head: bool
    resources: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Cluster:
    address: str
    nodes: tuple[Node, ...]
    here: str  # the node this process runs on (its Ray node id): where the services start

    @property
    def head(self) -> Node:
        return next((n for n in self.nodes if n.head), self.nodes[0])

    @property
    def local(self) -> Node:
        return next(n for n in self.nodes if n.node_id == self.here)

    @property
    def gpu_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.gpus > 0]

    @property
    def nnodes(self) -> int:
        return len(self.gpu_nodes)

    @property
    def gpus_per_node(self) -> int:
        """The GPU count every GPU node shares (verl's n_gpus_per_node); ClusterError when they differ."""
        counts = sorted({n.gpus for n in self.gpu_nodes})
        if not counts:
            raise ClusterError(f"the Ray cluster at {self.address} has no GPUs on any of its {len(self.nodes)} "
                               f"node(s); start each node with `ray start ... --num-gpus N` on a GPU machine")
        if len(counts) > 1:
            shape = ", ".join(f"{n.ip}: {n.gpus}" for n in self.gpu_nodes)
            raise ClusterError(f"the Ray cluster's nodes have different GPU counts ({shape}); verl gives every node "
                               f"the same trainer.n_gpus_per_node: start each node with the same --num-gpus")
        return counts[0]

    def describe(self) -> str:
        parts = [f"{n.ip} ({n.gpus} GPU{'s' if n.gpus != 1 else ''}"
                 + (", head" if n.head else "") + (", services" if n.node_id == self.here else "") + ")"
                 for n in self.nodes]
        return f"Ray cluster {self.address}: {len(self.nodes)} node(s): " + ", ".join(parts)


def address_of(explicit: str | None) -> str | None:
    """The cluster to use: ``--ray-address``, else ``$RAY_ADDRESS``, else None (one node, verl's own Ray)."""
    return explicit or os.environ.get(RAY_ADDRESS_ENV) or None


@contextlib.contextmanager
def connected(address: str) -> Iterator[None]:
    """This process as a Ray driver of the cluster at ``address``, for as long as the block runs."""
    import ray  # lazy: Ray is heavy, and only a run on a cluster needs it

    if ray.is_initialized():
        yield
        return
    unreachable = _unreachable(address)
    if unreachable:  # ray.init would retry for minutes
        raise ClusterError(f"could not join the Ray cluster at {address} ({unreachable}); start it with `ray start "
                           f"--head` on the head and `ray start --address HEAD:PORT` on the others, and run drzero on "
                           f"one of its nodes")
    try:
        ray.init(address=address, namespace="drzero-preflight", log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"could not join the Ray cluster at {address} ({str(error).splitlines()[0]}); start it "
                           f"with `ray start --head` on the head and `ray start --address HEAD:PORT` on the others, "
                           f"and run drzero on one of its nodes") from error
    try:
        yield
    finally:
        ray.shutdown()


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a ``host:port`` Ray address; None when something listens (or it is not host:port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as error:
        return f"nothing answers there: {error.strerror or error}"


def read_nodes(address: str) -> Cluster:
    """The live nodes of the cluster this process is connected to."""
    import ray  # lazy: Ray is heavy, and only a run on a cluster needs it

    nodes = []
    for entry in ray.nodes():
        if not entry.get("Alive"):
            continue
        resources = dict(entry.get("Resources", {}))
        nodes.append(Node(entry["NodeID"], entry["NodeManagerAddress"], int(resources.get("GPU", 0)),
                          float(resources.get("CPU", 0)), "node:__internal_head__" in resources, resources))
    nodes.sort(key=lambda n: (not n.head, n.ip, n.node_id))
    return Cluster(address, tuple(nodes), ray.get_runtime_context().get_node_id())


def discover(address: str) -> Cluster:
    with connected(address):
        return read_nodes(address)


def attach(cfg) -> Cluster | None:
    """A stage config on the cluster named by ``cfg.ray_address`` or ``$RAY_ADDRESS``: its nodes and GPUs
    per node from Ray, its services on this node's cluster address. None (and ``cfg`` unchanged) without one."""
    address = address_of(cfg.ray_address)
    if address is None:
        return None
    cluster = discover(address)
    cfg.ray_address = address
    cfg.nnodes, cfg.gpus = cluster.nnodes, cluster.gpus_per_node
    cfg.services_host = cfg.services_host or cluster.local.ip
    return cluster


def worker_env_overrides(env: dict[str, str]) -> list[str]:
    """Hydra overrides that hand ``env`` to every Ray worker verl starts, through ``ray.init(runtime_env=...)``
    (verl 0.7.1 merges ``ray_kwargs.ray_init.runtime_env`` into its own)."""

    return [f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}={hydra_value(value)}"
            for key, value in sorted(env.items())]


# -- what each node reports -------------------------------------------------------------------------


def installed_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _wait_for(path: Path, text: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            if path.read_text() == text:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def node_report(paths: Sequence[str], token: str, wait: float, files: Sequence[str] = ()) -> dict:
    """Run on one node: its versions, for each path whether it sees this run's marker (then it adds its own),
    and which of ``files`` (model directories) it has."""
    import ray  # lazy: Ray is heavy, and only a run on a cluster needs it

    node_id = ray.get_runtime_context().get_node_id()
    shared = {}
    for path in paths:
        marker = Path(path) / MARKER_DIR / token
        seen = _wait_for(marker / "origin", token, wait)
        if seen:
            try:
                (marker / node_id).write_text(token)
            except OSError as error:
                seen = False
                shared[path] = f"cannot write there ({error})"
                continue
        shared[path] = "ok" if seen else "does not see the marker written on the services node"
    return {"node_id": node_id, "host": socket.gethostname(), "versions": installed_versions(), "shared": shared,
            "missing": [f for f in files if not Path(f).exists()]}


@dataclass
class Probe:
    """What every node reported, and which markers this node saw back."""

    reports: dict[str, dict]                   # node id -> node_report
    returned: dict[str, dict[str, bool]]       # path -> node id -> this node read its marker
    missing: dict[str, str] = field(default_factory=dict)  # node id -> why it did not answer
    files: tuple[str, ...] = ()                # the model directories every node was asked for


def probe(cluster: Cluster, paths: Sequence[str], wait: float | None = None,
          timeout: float = PROBE_TIMEOUT, files: Sequence[str] = ()) -> Probe:
    """Ask every node for its versions, to read and write a marker in each of ``paths``, and whether it has
    ``files`` (connected to Ray)."""
    import ray  # lazy: Ray is heavy, and only a run on a cluster needs it
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wait = float(os.environ.get(SHARED_WAIT_ENV, "0")) if wait is None else wait
    token = uuid.uuid4().hex
    markers = [Path(path) / MARKER_DIR / token for path in paths]
    try:
        for marker in markers:
            marker.mkdir(parents=True, exist_ok=True)
            (marker / "origin").write_text(token)
        remote = ray.remote(node_report)
        pending = {node.node_id: remote.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote(list(paths), token, wait, list(files)) for node in cluster.nodes}
        reports, missing = {}, {}
        deadline = time.monotonic() + timeout + wait
        for node_id, ref in pending.items():
            try:
                reports[node_id] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as error:  # a node that is gone, or cannot import drzero: a finding, not a crash
                missing[node_id] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        returned = {}
        until = time.monotonic() + wait  # one wait for all: each node wrote its marker before it answered
        for path, marker in zip(paths, markers):
            returned[path] = {node_id: reports.get(node_id, {}).get("shared", {}).get(path) == "ok"
                              and _wait_for(marker / node_id, token, max(0.0, until - time.monotonic()))
                              for node_id in pending}
    finally:
        for marker in markers:
            shutil.rmtree(marker, ignore_errors=True)
            with contextlib.suppress(OSError):
                marker.parent.rmdir()  # the last check run leaves nothing behind
    return Probe(reports, returned, missing, tuple(files))


# -- the preflight's findings -------------------------------------------------------------------


def cluster_checks(cluster: Cluster, found: Probe, paths: dict[str, str], needs_gpu_services: bool = False) -> list:
    """The preflight lines for a cluster: its shape, the same versions everywhere, shared paths, the services node."""

    ip = {n.node_id: n.ip for n in cluster.nodes}
    checks = []
    try:
        shape = f"{cluster.nnodes} node(s) x {cluster.gpus_per_node} GPUs: trainer.nnodes and n_gpus_per_node"
        checks.append(Check("ray cluster", True, f"{cluster.describe()}; {shape}"))
    except ClusterError as error:
        checks.append(Check("ray cluster", False, str(error)))
    for node_id, why in found.missing.items():
        checks.append(Check("ray node", False, f"{ip.get(node_id, node_id)} did not answer ({why}); is drzero "
                                               f"installed there, in the same image?"))
    versions = {node_id: report["versions"] for node_id, report in found.reports.items()}
    differing = sorted({key for v in versions.values() for key in v
                        if len({w.get(key) for w in versions.values()}) > 1})
    if differing:
        detail = "; ".join(f"{key}: " + ", ".join(f"{ip.get(n, n)} {v.get(key)}" for n, v in versions.items())
                           for key in differing)
        checks.append(Check("same versions on every node", False, f"{detail}; run every node from the same image"))
    elif versions:
        mine = next(iter(versions.values()))
        checks.append(Check("same versions on every node", True,
                            ", ".join(f"{k} {mine[k]}" for k in ("drzero", "verl", "ray") if k in mine)))
    for label, path in paths.items():
        blind = [ip.get(n, n) for n, r in found.reports.items() if r["shared"].get(path) != "ok"]
        unseen = [ip.get(n, n) for n, ok in found.returned.get(path, {}).items() if not ok and n in found.reports]
        unseen = [n for n in unseen if n not in blind]
        if blind or unseen:
            what = []
            if blind:
                what.append(f"{', '.join(blind)} cannot read what this node writes there")
            if unseen:
                what.append(f"this node cannot read what {', '.join(unseen)} wrote there")
            checks.append(Check(f"shared {label}", False, f"{path}: {'; '.join(what)}; every node must mount the "
                                                          f"same file system at the same path (NFS, a cloud bucket "
                                                          f"mount, SkyPilot file_mounts)"))
        else:
            checks.append(Check(f"shared {label}", True, f"{path}: every node read and wrote a marker"))
    lacking = {f: [ip.get(n, n) for n, r in found.reports.items() if f in r.get("missing", ())]
               for r in found.reports.values() for f in r.get("missing", ())}
    for path, nodes in lacking.items():
        checks.append(Check("model on every node", False, f"{path} is missing on {', '.join(nodes)}; put the weights "
                                                          f"on the shared file system or on every node"))
    if found.files and not lacking:
        checks.append(Check("model on every node", True, ", ".join(found.files)))
    local = cluster.local
    if needs_gpu_services and local.gpus == 0:
        checks.append(Check("services node", False, f"this node ({local.ip}) has no GPUs but the stage starts an "
                                                    f"SGLang server beside drzero; run drzero on a GPU node"))
    else:
        checks.append(Check("services node", True, f"retriever and SGLang start on {local.ip}"
                                                    + (" (the head)" if local.head else "")))
    return checks


def stage_cluster_checks(cfg, plans: Sequence) -> list:
    """Every cluster check for these plans of ``cfg`` (connects to the cluster); none without one."""
    address = address_of(cfg.ray_address)
    if address is None:
        return []
    layout = cfg.layout
    paths = {"data directory": str(layout.data_dir), "checkpoint directory": str(layout.checkpoints)}
    for path in paths.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    needs_gpu = any("sglang.launch_server" in spec.command for plan in plans for spec in plan.services)
    prefix = "actor_rollout_ref.model.path="
    models = sorted({o[len(prefix):] for plan in plans for o in plan.verl_overrides or () if o.startswith(prefix)
                     and Path(o[len(prefix):]).is_absolute() and Path(o[len(prefix):]).exists()})  # not hub names
    with connected(address):
        cluster = read_nodes(address)
        found = probe(cluster, list(paths.values()), files=models)
    return cluster_checks(cluster, found, paths, needs_gpu)


def report_checks(cfg, plans: Sequence, print_fn=print, verbose: bool = True) -> int:
    """Run the cluster checks for ``plans``, print them (only the failures unless ``verbose``); the failure count."""
    checks = stage_cluster_checks(cfg, plans)
    for check in checks:
        if verbose or not check.ok:
            print_fn(check.line())
    return sum(not check.ok for check in checks)


def before_stage(cfg, plan, print_fn=print) -> None:
    """On a cluster, before a stage that runs a command (verl, the merger): every node sees what the stages
    before wrote, and is still there. Raises ClusterError otherwise."""
    if address_of(getattr(cfg, "ray_address", None)) is None or not plan.command:
        return
    if report_checks(cfg, [plan], print_fn, verbose=False):
        raise ClusterError(f"the Ray cluster is not ready for {plan.name} (see above); nothing of it was started. "
                           f"Fix it and run the same command again to resume")
