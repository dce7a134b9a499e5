"""# More than one node on Modal: the verl stages on a Modal cluster

    python -m backends.modal train --nodes 2                    # drzero evolve on 2 nodes of 8×H100
    python -m backends.modal solver --iteration 1 --nodes 4 --gpu H200:8

Multi-node clusters are a feature Modal enables per workspace (its "multi-node clusters" guide);
a workspace without it is told so in one sentence and nothing starts. With `--nodes 1`, the default,
nothing in this file is used.

A clustered Function starts N containers together, each with all GPUs of its node and RDMA
between them. Each runs the same line, `python -m drzero.cluster.launch` with its rank and every
container's address: rank 0 starts the Ray head and runs the `drzero` command on the cluster once
all N nodes have joined; the others join and serve until it ends (drzero/cluster/launch.py). Only
rank 0's result counts, so retries and resume are the single-node path's: a failure on rank 0
raises, Modal runs the whole cluster again, and the command resumes from the checkpoint volume.

Modal Volumes are not a network file system: a container sees what others wrote only after they
commit and it reloads. Every node commits and reloads both volumes every half minute, and drzero's
shared-path check (drzero.cluster.ray) gives that `DRZERO_SHARED_PATH_WAIT` seconds before each stage,
so a stage starts only once every node sees what the stage before wrote.

The clustered Functions are defined in an app of their own, one per cluster size, so that a
workspace without clusters can still run `python -m backends.modal` on one node. They run in the
single-node Functions' place (backends/modal_image.py) with the same container code
(backends/modal_container.py); backends/modal.py imports this module to launch them, and this
module imports neither that one nor its app.
"""

from __future__ import annotations

import os
import sys

import modal

from backends.modal_container import (GpuTimeRecord, check_inputs, committing_volumes, copy_tree, outcome, stream,
                                      visible_gpus)
from backends.modal_image import CORPUS_DB, CPU_TASK, LOCAL_DB, MINUTES, stage_options
from drzero.stages.registry import EVOLVE

app = modal.App("dr-zero-cluster")

SYNC_EVERY = 30            # seconds between a node's volume commit + reload
SHARED_PATH_WAIT = 300     # seconds drzero waits for every node to see a marker (a few sync rounds and a slow commit)
# One Function runs any of the verl stages (challenger, solver, or all of them: evolve): a GPU stage's options
# (the W&B key they log to comes with each launch, as on one node).
CLUSTER_STAGE = stage_options(EVOLVE)

# What a workspace without clusters gets when the app starts: a request the server refuses (invalid, not
# permitted, not implemented) that speaks of clusters. Anything else, a failed image build (a RemoteError), a
# missing object, a rejected request about something else, is reported as what it is (backends/modal.py).
REFUSALS = (modal.exception.InvalidError, modal.exception.PermissionDeniedError, modal.exception.UnimplementedError)
CLUSTER_WORDS = ("cluster", "multi-node", "multinode", "rdma")


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` says that the workspace cannot have a cluster."""
    return isinstance(error, REFUSALS) and any(word in str(error).lower() for word in CLUSTER_WORDS)


def refusal(nodes: int, error: BaseException) -> str:
    """The one sentence for a workspace that cannot have a cluster."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"Modal did not start the {nodes}-node cluster ({first}): multi-node clusters are a feature Modal "
            f"enables per workspace, so ask Modal to enable them for yours, or run on one node without --nodes.")


def cluster_info():
    """This container's rank and every container's address (Modal's cluster context; replaced in tests)."""
    return modal.experimental.get_cluster_info()


def node_command(rank: int, ips: list[str], gpus: int, command: str, argv: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "drzero.cluster.launch", "--rank", str(rank), "--ips", ",".join(ips),
            "--gpus", str(gpus), "--", command, *argv]


def run_node(command: str, argv: tuple[str, ...], nodes: int) -> dict:
    """One container's part of a clustered `drzero <command>`."""
    info = cluster_info()
    ips = list(info.container_ipv4_ips or info.container_ips)  # Ray binds IPv4 by default
    if len(ips) != nodes:
        raise RuntimeError(f"Modal started {len(ips)} container(s) for a {nodes}-node cluster")
    rank = info.rank
    env = {**os.environ, "DRZERO_SHARED_PATH_WAIT": str(SHARED_PATH_WAIT)}
    if rank == 0 and copy_tree(CORPUS_DB, LOCAL_DB):
        env["DRZERO_DB"] = LOCAL_DB  # the retriever runs beside drzero, on rank 0
    label = f"{command}-node{rank}"
    record = GpuTimeRecord(label, argv)  # every node's GPU time counts in `status`
    with committing_volumes(record, every=SYNC_EVERY, reload=True):
        code = stream(node_command(rank, ips, len(visible_gpus()), command, argv), f"[{label}] ", env)
        record.save(exit_code=code)
    if rank != 0:
        return {"command": command, "rank": rank, "exit_code": code}
    return outcome(command, code)


@app.function(**CPU_TASK, cpu=4.0, memory=16 * 1024, timeout=30 * MINUTES)
def cluster_preflight(command: list, required: list) -> dict:
    """The single-node preflight (`backends.modal.preflight`), in this app, before any cluster starts."""
    return check_inputs(command, required)


# One Function per cluster size: Modal fixes the size where the Function is defined.

@app.function(**CLUSTER_STAGE)
@modal.clustered(size=2, rdma=True)
def cluster_2(command: str, *argv: str) -> dict:
    return run_node(command, argv, 2)


@app.function(**CLUSTER_STAGE)
@modal.clustered(size=4, rdma=True)
def cluster_4(command: str, *argv: str) -> dict:
    return run_node(command, argv, 4)


@app.function(**CLUSTER_STAGE)
@modal.clustered(size=8, rdma=True)
def cluster_8(command: str, *argv: str) -> dict:
    return run_node(command, argv, 8)
