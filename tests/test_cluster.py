"""More than one node, on this machine: a real two-node Ray cluster started with `ray start`.

The head and the worker are two Ray nodes on loopback, each in its own temp dir, told apart by a
custom resource; the worker is started the way every non-head node of a Modal or SkyPilot launch is,
by `python -m drzero.cluster.launch --rank 1`, and must end by itself once the head is gone. A stage
attached to the cluster plans both nodes, puts its retriever on the head, and a Ray task pinned to
the worker, given the runtime_env verl would get from the plan, finds the retriever's address and
gets a real search result from it. The nodes are stopped by their process ids (never `ray stop`,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port

pytest.importorskip("ray")

HEAD_RESOURCE, WORKER_RESOURCE = "drzero_test_head", "drzero_test_worker"
RAY = str(Path(sys.executable).with_name("ray"))


# a worker whose head is gone gives up after 3 s instead of Ray's 60 (the launcher's worker then ends)
RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_gcs_rpc_server_reconnect_timeout_s": "3"}


def _node_args(temp_dir: str) -> list[str]:
    """`ray start` options that keep two nodes on one machine apart: own temp dir, own ports, small."""
    return ["--object-store-memory=100000000", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


def _spawn(command: list[str], temp_dir: str) -> subprocess.Popen:
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "node.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _ray_start(temp_dir: str, *args: str) -> subprocess.Popen:
    return _spawn([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                   "--num-gpus=1", *_node_args(temp_dir), *args], temp_dir)


def _launcher(temp_dir: str, rank: int, ips: str, port: int, *args: str, command: tuple[str, ...] = ()) -> list[str]:
    ray_args = " ".join(_node_args(temp_dir) + list(args))
    return [sys.executable, "-m", "drzero.cluster.launch", "--rank", str(rank), "--ips", ips, "--port", str(port),
            "--gpus", "1", "--cpus", "1", f"--ray-args={ray_args}", *(["--", *command] if command else [])]


def _processes_under(temp_dir: str) -> list[int]:
    """Pids of the Ray processes of one node: each names its temp dir on its command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_node(process: subprocess.Popen, temp_dir: str) -> None:
    # SIGTERM first (a node drains for up to 30 s), then SIGKILL: a test cluster has nothing to save
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in [process.pid, *_processes_under(temp_dir)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while _processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _processes_under(temp_dir) and process.poll() is not None:
            return


def _wait_for_nodes(address: str, count: int, timeout: float = 90.0) -> None:
    probe = ("import ray, sys, time\n"
             f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
             f"deadline = time.monotonic() + {timeout}\n"
             f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
             "    assert time.monotonic() < deadline, ray.nodes()\n"
             "    time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=timeout + 60,
                   env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


@pytest.fixture(scope="module")
def two_nodes():
    """(address, head temp dir, worker temp dir) of a live head + worker cluster on loopback."""
    # short paths: Ray's unix sockets live under the temp dir (107 bytes at most)
    head_dir, worker_dir = tempfile.mkdtemp(prefix="dzh"), tempfile.mkdtemp(prefix="dzw")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = _ray_start(head_dir, "--head", f"--port={port}", "--include-dashboard=false",
                      f"--ray-client-server-port={free_port()}", f"--resources={json.dumps({HEAD_RESOURCE: 1})}")
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (Path(head_dir) / "ray_current_cluster").is_file():
            assert head.poll() is None, (Path(head_dir) / "node.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.3)
        worker = _spawn(_launcher(worker_dir, 1, "127.0.0.1,127.0.0.1", port,
                                  f"--resources='{json.dumps({WORKER_RESOURCE: 1})}'"), worker_dir)
        _wait_for_nodes(address, 2)
        yield address, head_dir, worker_dir
    finally:
        _stop_node(head, head_dir)
        if worker is not None:
            try:  # with the head gone, the launcher's worker ends by itself, and says so with exit status 0
                worker_code = worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker_code = None
            _stop_node(worker, worker_dir)
        assert not _processes_under(head_dir) and not _processes_under(worker_dir)
        worker_log = (Path(worker_dir) / "node.log").read_text() if worker is not None else ""
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
        assert worker is None or worker_code == 0, worker_log[-3000:]


@pytest.fixture
def stage_dirs(tmp_path, demo_db, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("DRZERO_RUN_DIR", str(tmp_path / "run"))
    # the plan's retriever on a free port: 8000 may be taken by another test run on this machine
    monkeypatch.setattr("drzero.stages.base.RETRIEVER_PORT", free_port())
    return dict(db=str(demo_db), data_dir=str(tmp_path / "data"), checkpoints=str(tmp_path / "checkpoints"),
                logger="console")


def _search_on_worker(url_variable: str, query: str) -> dict:
    """A Ray task body, run on the worker: what verl's search tool there would see and get."""
    import ray
    import yaml

    from drzero.rollout.search_tool import SearchTool
    from drzero.layout import config_dir

    tool_config = yaml.safe_load((config_dir() / "search_tool_config.yaml").read_text())["tools"][0]["config"]
    tool = SearchTool(tool_config)

    async def call():
        instance, _ = await tool.create()
        response, _, metrics = await tool.execute(instance, {"query_list": [query]})
        return response.text, metrics

    text, metrics = asyncio.run(call())
    return {"node_id": ray.get_runtime_context().get_node_id(), "url": os.environ.get(url_variable),
            "text": text, "metrics": metrics, "resources": list(ray.get_runtime_context().get_assigned_resources())}


def test_a_stage_on_the_cluster_plans_both_nodes_and_a_worker_searches_the_head_retriever(two_nodes, stage_dirs,
                                                                                          tiny_tokenizer_dir):
    import ray

    from drzero.cluster.ray import attach, stage_cluster_checks
    from drzero.rollout.search import RETRIEVER_URL_ENV
    from drzero.services.supervisor import Supervisor
    from drzero.verl.overrides import compose
    from drzero.stages.solver import SolverConfig, plan_solver

    address, _, _ = two_nodes
    cfg = SolverConfig(ray_address=address, model=str(tiny_tokenizer_dir), **stage_dirs)
    cluster = attach(cfg)
    assert [n.head for n in cluster.nodes] == [True, False]
    assert HEAD_RESOURCE in cluster.nodes[0].resources and WORKER_RESOURCE in cluster.nodes[1].resources
    assert cluster.local == cluster.head           # drzero runs on the head: the services go there
    # Ray names a node started on loopback by the machine's address: the one the other nodes reach
    assert (cfg.nnodes, cfg.gpus, cfg.services_host) == (2, 1, cluster.head.ip)

    plan = plan_solver(cfg)
    assert "trainer.nnodes=2" in plan.verl_overrides and "trainer.n_gpus_per_node=1" in plan.verl_overrides
    (retriever,) = plan.services
    assert retriever.host == cluster.head.ip      # bound to the head's cluster address, not a loopback default
    assert plan.env["RAY_ADDRESS"] == address     # verl's ray.init() joins this cluster
    url = plan.env[RETRIEVER_URL_ENV]
    config = compose(plan.verl_overrides)         # what verl's run_ppo hands to ray.init(runtime_env=...)
    runtime_env = dict(config.ray_kwargs.ray_init.runtime_env)
    assert dict(runtime_env["env_vars"]) == {RETRIEVER_URL_ENV: url}

    checks = stage_cluster_checks(cfg, [plan])
    assert all(c.ok for c in checks), "\n".join(c.line() for c in checks)
    assert {c.name for c in checks} == {"ray cluster", "same versions on every node", "shared data directory",
                                        "shared checkpoint directory", "model on every node", "services node"}
    assert not (Path(cfg.checkpoints) / ".drzero-cluster-check").exists()  # the markers are cleaned up

    with Supervisor(plan.services):
        ray.init(address=address, runtime_env={"env_vars": dict(runtime_env["env_vars"])}, log_to_driver=False,
                 logging_level="ERROR")
        try:
            # the task body travels by value: the worker's Python cannot import this test module
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
            task = ray.remote(_search_on_worker).options(num_cpus=0, resources={WORKER_RESOURCE: 1})
            seen = ray.get(task.remote(RETRIEVER_URL_ENV, "federated learning"), timeout=120)
        finally:
            ray.shutdown()
    assert seen["node_id"] == cluster.nodes[1].node_id  # it ran on the worker
    assert seen["url"] == url
    assert seen["metrics"]["status"] == 1 and seen["metrics"]["hits"] >= 1, seen
    assert "Doc 1" in seen["text"]


def test_the_evolve_dry_run_checks_the_cluster(two_nodes, stage_dirs, tiny_tokenizer_dir, capsys):
    from drzero.pipeline import EvolveConfig, evolve

    address, _, _ = two_nodes
    lines = []
    cfg = EvolveConfig(ray_address=address, iterations=1, dry_run=True, model=str(tiny_tokenizer_dir), **stage_dirs)
    evolve(cfg, print_fn=lines.append)
    text = "\n".join(lines)
    assert text.splitlines()[0].startswith(f"Ray cluster {address}: 2 node(s)")
    assert "trainer.nnodes=2" in text
    assert "[  ok] same versions on every node" in text and "[  ok] shared checkpoint directory" in text


def test_without_a_cluster_nothing_changes(stage_dirs):
    from drzero.cluster.ray import attach
    from drzero.stages.solver import SolverConfig, plan_solver

    cfg = SolverConfig(**stage_dirs)
    assert attach(cfg) is None
    plan = plan_solver(cfg)
    assert plan.services[0].host == "127.0.0.1"
    assert "RAY_ADDRESS" not in plan.env
    assert not [o for o in plan.verl_overrides if o.startswith("+ray_kwargs")]


def test_a_cluster_that_is_not_there_is_one_sentence(stage_dirs):
    from drzero.cluster.ray import ClusterError, attach
    from drzero.stages.solver import SolverConfig

    with pytest.raises(ClusterError, match="could not join the Ray cluster at 127.0.0.1:"):
        attach(SolverConfig(ray_address=f"127.0.0.1:{free_port()}", **stage_dirs))


# -- what the preflight says about a cluster that is not one (its findings, without Ray) -------------


def _cluster(*gpus, here=0):
    from drzero.cluster.ray import Cluster, Node

    nodes = tuple(Node(f"n{i}", f"10.0.0.{i + 1}", g, 8.0, i == 0) for i, g in enumerate(gpus))
    return Cluster("10.0.0.1:6385", nodes, nodes[here].node_id)


def _report(versions=None, shared=None):
    return {"node_id": "", "host": "", "versions": {"python": "3.12.3", "drzero": "0.1.0", "verl": "0.7.1",
                                                    "ray": "2.60.0", **(versions or {})},
            "shared": shared or {"/data": "ok", "/ckpt": "ok"}}


def test_a_node_with_other_versions_or_a_path_it_does_not_share_fails_the_preflight():
    from drzero.cluster.ray import Probe, cluster_checks

    cluster = _cluster(8, 8, 8)
    found = Probe({"n0": _report(), "n1": _report({"verl": "0.7.0"}),
                   "n2": _report(shared={"/data": "ok", "/ckpt": "does not see the marker written on the services node"})},
                  {"/data": {"n0": True, "n1": False, "n2": True}, "/ckpt": {"n0": True, "n1": True, "n2": False}})
    checks = {c.name: c for c in cluster_checks(cluster, found, {"data directory": "/data",
                                                                 "checkpoint directory": "/ckpt"})}
    assert checks["ray cluster"].ok and "3 node(s) x 8 GPUs" in checks["ray cluster"].message
    versions = checks["same versions on every node"]
    assert not versions.ok and "verl: 10.0.0.1 0.7.1, 10.0.0.2 0.7.0, 10.0.0.3 0.7.1" in versions.message
    data, ckpt = checks["shared data directory"], checks["shared checkpoint directory"]
    assert not data.ok and "this node cannot read what 10.0.0.2 wrote there" in data.message
    assert not ckpt.ok and "10.0.0.3 cannot read what this node writes there" in ckpt.message
    assert "same file system at the same path" in ckpt.message


def test_nodes_with_different_gpu_counts_a_missing_node_and_gpu_less_services_fail():
    from drzero.cluster.ray import ClusterError, Probe, cluster_checks

    with pytest.raises(ClusterError, match=r"different GPU counts \(10.0.0.1: 8, 10.0.0.2: 4\)"):
        _cluster(8, 4).gpus_per_node
    assert _cluster(0, 8, 8).nnodes == 2 and _cluster(0, 8, 8).gpus_per_node == 8  # a CPU head only coordinates
    found = Probe({"n0": _report()}, {}, {"n1": "GetTimeoutError: timed out"})
    checks = {c.name: c for c in cluster_checks(_cluster(0, 8), found, {}, needs_gpu_services=True)}
    assert not checks["ray node"].ok and "10.0.0.2 did not answer" in checks["ray node"].message
    assert not checks["services node"].ok and "has no GPUs" in checks["services node"].message


def test_a_model_directory_missing_on_a_node_is_named():
    from drzero.cluster.ray import Probe, cluster_checks

    found = Probe({"n0": _report(), "n1": {**_report(), "missing": ["/models/Qwen3-32B"]}}, {})
    checks = [c for c in cluster_checks(_cluster(8, 8), found, {}) if c.name == "model on every node"]
    assert len(checks) == 1 and not checks[0].ok and "/models/Qwen3-32B is missing on 10.0.0.2" in checks[0].message


@pytest.mark.parametrize("engine, server", [("sglang", "sglang"), ("hf", "hf-server")])
def test_the_challengers_reward_server_listens_where_the_workers_reach_it(stage_dirs, tiny_tokenizer_dir, engine,
                                                                           server):
    """On a cluster (as attach leaves the config) the probes' server binds the services node's address."""
    from drzero.stages.challenger import ChallengerConfig, plan_challenger

    cfg = ChallengerConfig(ray_address="10.0.0.1:6385", services_host="10.0.0.1", nnodes=2, engine=engine,
                           model=str(tiny_tokenizer_dir), **stage_dirs)
    plan = plan_challenger(cfg)
    specs = {spec.name: spec for spec in plan.services}
    assert specs["retriever"].host == specs[server].host == "10.0.0.1"
    assert "--host 10.0.0.1" in specs[server].command_line
    assert f"+reward.custom_reward_function.reward_kwargs.base_url='http://10.0.0.1:{specs[server].port}'" \
        in plan.verl_overrides
    assert plan.env["RAY_ADDRESS"] == "10.0.0.1:6385" and "trainer.nnodes=2" in plan.verl_overrides


def test_the_launchers_head_starts_ray_runs_the_command_on_it_and_stops_only_its_own_ray(stage_dirs,
                                                                                         tiny_tokenizer_dir):
    """Rank 0 of `python -m drzero.cluster.launch`, as every Modal and SkyPilot launch runs it (one node here)."""
    head_dir, port = tempfile.mkdtemp(prefix="dzl"), free_port()
    command = ("solver", "--preflight", "--model", str(tiny_tokenizer_dir), "--db", stage_dirs["db"],
               "--data-dir", stage_dirs["data_dir"], "--checkpoints", stage_dirs["checkpoints"], "--logger", "console")
    process = _spawn(_launcher(head_dir, 0, "127.0.0.1", port, f"--ray-client-server-port={free_port()}",
                               command=command), head_dir)
    try:
        code = process.wait(timeout=240)
        log = (Path(head_dir) / "node.log").read_text()
        assert not _processes_under(head_dir), log[-3000:]  # its Ray stopped with it
    finally:
        _stop_node(process, head_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
    assert f"[cluster] 1 node(s) joined 127.0.0.1:{port}; running" in log and f"--ray-address 127.0.0.1:{port}" in log
    assert f"Ray cluster 127.0.0.1:{port}: 1 node(s)" in log                  # drzero attached to it
    assert "[  ok] shared checkpoint directory" in log and "[  ok] same versions on every node" in log
    assert code == 1 and "data.train_files" in log  # the preflight's verdict (no solver data yet) is the exit status
