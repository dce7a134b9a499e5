"""`python -m backends.modal ... --nodes N`: the clustered Functions, offline and without a Modal account.

The specs come from Modal's own `Function.info()`; launches run against fakes of the Functions and
`app.run`; each node's part runs with Modal's cluster context, the volumes and the child process
replaced, so the rank logic is checked without a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

modal = pytest.importorskip("modal")
from backends import modal as mb  # noqa: E402
from backends import modal_cluster as mc  # noqa: E402
from backends import modal_image as mi  # noqa: E402
from backends import modal_ops as mo  # noqa: E402
from backends import modal_plan as mp  # noqa: E402
from test_modal_backend import REPO, VOLUME_NAMES, FakeFunction, FakeSecret, FakeVolume, _calls  # noqa: E402


# -- the clustered Functions' specs ----------------------------------------------------------------


@pytest.mark.parametrize("size", mp.CLUSTER_SIZES)
def test_one_clustered_function_per_size_with_all_gpus_of_each_node_rdma_and_the_stage_retries(size):
    info = getattr(mc, f"cluster_{size}").info()
    assert (info.cluster_info.size, info.cluster_info.rdma) == (size, True)
    assert info.gpus == [mi.parse_gpu(mi.GPU)]
    assert info.timeout == 24 * 60 * 60 and info.max_retries == 5 and info.single_use_containers
    assert {path: mount.name for path, mount in info.volumes.items()} == VOLUME_NAMES
    assert info.secrets == mb.train.info().secrets == []  # the W&B key comes with the launch, as on one node


def test_the_single_node_app_has_no_clustered_function():
    """A workspace without Modal's clusters still runs every single-node action."""
    def functions(module):
        return {name: value for name, value in vars(module).items() if isinstance(value, modal.Function)}

    assert len(functions(mb)) > 10 and not [name for name, f in functions(mb).items() if f.info().cluster_info]
    assert {name for name, f in functions(mc).items() if f.info().cluster_info} == {"cluster_2", "cluster_4",
                                                                                   "cluster_8"}
    assert mc.cluster_preflight.info().gpus == []


# -- the launch ----------------------------------------------------------------------------------


@pytest.fixture
def cluster_calls(monkeypatch):
    log = []
    for name in ("cluster_2", "cluster_4", "cluster_8"):
        monkeypatch.setattr(mc, name, FakeFunction(name, log, {"exit_code": 0}))
    monkeypatch.setattr(mc, "cluster_preflight", FakeFunction("cluster_preflight", log, {"ok": True, "problems": []}))

    @contextlib.contextmanager
    def run(**kwargs):
        log.append(("cluster app.run", kwargs))
        yield mc.app

    monkeypatch.setattr(mc.app, "run", run)
    monkeypatch.setattr(mb.app, "run", lambda **kwargs: pytest.fail("the single-node app must not start"))
    monkeypatch.setattr(mb, "_app_id", lambda: "ap-cluster")
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume({}))
    monkeypatch.setattr(mp, "GPU", "H100:8")
    monkeypatch.setattr(modal.Secret, "from_name", FakeSecret.from_name)
    monkeypatch.setattr(FakeSecret, "missing", set())
    return log


def test_train_on_two_nodes_runs_evolve_on_the_2_node_function_after_its_preflight(cluster_calls, capsys):
    assert mb.cli(["train", "--nodes", "2", "--model", "qwen3-32b", "--", "trainer.save_freq=10"]) == 0
    argv = ("--model", "qwen3-32b", "--gpus", "8", "--gpu", "H100", "--nnodes", "2", "--", "trainer.save_freq=10")
    assert _calls(cluster_calls, "cluster app.run") == [("cluster app.run", {"detach": True})]
    (_, name, (command, required)), = _calls(cluster_calls, "remote")
    assert name == "cluster_preflight" and command == ["evolve", "--dry-run", *argv] and required
    assert _calls(cluster_calls, "spawn") == [("spawn", "cluster_2", ("evolve", *argv))]
    checker, (_, _, options) = _calls(cluster_calls, "with_options")
    assert checker == ("with_options", "cluster_preflight", {"secrets": ["wandb-secret"]})
    assert options["gpu"] == "H100:8" and options["secrets"] == ["wandb-secret"]  # per node
    out = capsys.readouterr().out
    assert out.startswith("train on Modal: drzero evolve --model qwen3-32b ")
    assert "H100:8 (--gpu or $DRZERO_MODAL_GPU" in out and "on each of 2 nodes" in out
    assert "384 GPU-hours ~ $1,536" in out  # 24 h x 8 GPUs x 2 nodes at $4


def test_a_cluster_launch_is_recorded_and_resumed_on_the_same_cluster(cluster_calls, capsys):
    assert mb.cli(["train", "--nodes", "2", "--stage-args=--iterations 2"]) == 0
    volume = mb.checkpoints_volume
    (path,) = [name for name in volume.files if name.startswith("launches/")]
    record = json.loads(volume.files[path])
    assert record["app_id"] == "ap-cluster" and record["launch"]["nodes"] == 2
    first = list(cluster_calls)
    cluster_calls.clear()
    capsys.readouterr()
    assert mb.cli(["resume"]) == 0
    assert _calls(cluster_calls, "spawn") == _calls(first, "spawn") == [
        ("spawn", "cluster_2", ("evolve", "--gpus", "8", "--gpu", "H100", "--iterations", "2", "--nnodes", "2"))]
    assert _calls(cluster_calls, "cluster app.run") and "  run     iter2/merge-solver" in capsys.readouterr().out


def test_a_single_stage_on_four_nodes(cluster_calls):
    assert mb.cli(["solver", "--iteration", "2", "--nodes", "4", "--gpu", "H200:8"]) == 0
    (_, name, args), = _calls(cluster_calls, "spawn")
    assert name == "cluster_4" and args == ("solver", "--iteration", "2", "--gpus", "8", "--gpu", "H200", "--nnodes", "4")
    (_, _, (command, _)), = _calls(cluster_calls, "remote")
    assert command == ["preflight", "solver", *args[1:]]


@pytest.mark.parametrize("argv, message", [
    (["gen-data", "--nodes", "2"], "only challenger, solver, train run on more than one node"),
    (["train", "--nodes", "3"], "--nodes 3 is not valid: expected 1 (one node) or a cluster of 2, 4, 8 nodes"),
])
def test_what_cannot_run_on_a_cluster_is_refused_before_anything_starts(cluster_calls, capsys, argv, message):
    assert mb.cli(argv) == 2
    assert message in capsys.readouterr().err and cluster_calls == []


def test_a_workspace_without_clusters_is_told_in_one_sentence(cluster_calls, monkeypatch, capsys):
    def refused(**kwargs):
        raise modal.exception.InvalidError("Function cluster_2 requests a cluster, which is not available")

    monkeypatch.setattr(mc.app, "run", refused)
    assert mb.cli(["train", "--nodes", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multi-node clusters are a feature Modal enables per workspace" in err[0]
    assert "which is not available" in err[0] and "without --nodes" in err[0]


def test_nodes_1_is_todays_single_node_launch():
    one = mb.plan_launch(mb.Request("train"))
    assert (one.function, one.nodes) == ("train", 1) and "--nnodes" not in one.argv


def test_help_says_clusters_are_gated():
    done = subprocess.run([sys.executable, "-m", "backends.modal", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert "--nodes" in done.stdout and "feature Modal enables per workspace" in " ".join(done.stdout.split())


def test_the_cluster_estimate_scales_with_the_nodes():
    request = mb.Request("train", nodes=4, price_per_gpu_hour=4.0)
    estimate = mo.estimate(mb.plan_launch(request), request)
    assert (estimate.nodes, estimate.gpu_hours, estimate.dollars) == (4, 768.0, 3072.0)
    assert estimate.dollars_per_attempt_cap == 3072.0


# -- each node's part ----------------------------------------------------------------------------


@pytest.fixture
def node(monkeypatch):
    """run_node with Modal's cluster context, the volumes, the GPU record and the child process faked."""
    seen = {}

    def stream(command, prefix, env):
        seen.update(command=command, prefix=prefix, env=env)
        return seen.get("code", 0)

    class Record:
        def __init__(self, command, argv):
            seen["record"] = command

        def save(self, **updates):
            seen.setdefault("saved", []).append(updates)

    @contextlib.contextmanager
    def committing(record=None, every=None, reload=False):
        seen.update(every=every, reload=reload)
        yield

    monkeypatch.setattr(mc, "stream", stream)
    monkeypatch.setattr(mc, "GpuTimeRecord", Record)
    monkeypatch.setattr(mc, "committing_volumes", committing)
    monkeypatch.setattr(mc, "copy_tree", lambda source, target: True)
    monkeypatch.setattr(mc, "visible_gpus", lambda: ["NVIDIA H100 80GB HBM3"] * 8)

    def at_rank(rank, code=0, ips=("10.0.0.1", "10.0.0.2")):
        seen.clear()
        seen["code"] = code
        monkeypatch.setattr(mc, "cluster_info", lambda: modal.experimental.ClusterInfo(  # modal's own context
            rank=rank, cluster_id="cl-test", container_ips=["fd00::1", "fd00::2"], container_ipv4_ips=list(ips),
            fabric_ids=[]))
        return seen

    return at_rank


def test_every_node_runs_the_launcher_with_its_rank_and_the_ipv4_addresses(node):
    seen = node(0)
    assert mc.cluster_2.local("evolve", "--iterations", "2") == {"command": "evolve", "exit_code": 0}
    assert seen["command"] == [sys.executable, "-m", "drzero.cluster.launch", "--rank", "0", "--ips",
                               "10.0.0.1,10.0.0.2", "--gpus", "8", "--", "evolve", "--iterations", "2"]
    assert seen["env"]["DRZERO_DB"] == mi.LOCAL_DB  # the retriever runs on rank 0, from a local copy
    assert seen["env"]["DRZERO_SHARED_PATH_WAIT"] == str(mc.SHARED_PATH_WAIT)
    assert (seen["every"], seen["reload"]) == (mc.SYNC_EVERY, True) and seen["record"] == "evolve-node0"

    seen = node(1)
    assert mc.cluster_2.local("evolve") == {"command": "evolve", "rank": 1, "exit_code": 0}
    assert seen["command"][3:6] == ["--rank", "1", "--ips"] and "DRZERO_DB" not in seen["env"].keys() - os.environ.keys()
    assert (seen["every"], seen["reload"]) == (mc.SYNC_EVERY, True) and seen["record"] == "evolve-node1"


def test_a_failure_on_rank_0_is_retried_and_a_usage_error_is_not(node):
    node(0, code=1)
    with pytest.raises(RuntimeError, match="Modal retries it"):
        mc.cluster_2.local("evolve")
    node(0, code=2)
    assert mc.cluster_2.local("evolve")["exit_code"] == 2


def test_a_cluster_of_the_wrong_size_is_an_error(node):
    node(0, ips=("10.0.0.1",))
    with pytest.raises(RuntimeError, match="1 container"):
        mc.cluster_2.local("evolve")
