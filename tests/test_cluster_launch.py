"""`python -m drzero.cluster.launch` (every node of a Modal cluster or SkyPilot task) and backends/skypilot.yaml.

The YAML is read by SkyPilot's own parser (`sky.Task.from_yaml_config`, offline) in a venv of its own:
SkyPilot 0.14 pins click and uvicorn below what drzero runs with, so it does not go into .venv. That
venv is built on CI and with DRZERO_SKYPILOT=1 (`pip install skypilot`); elsewhere the test uses it
when present and skips otherwise. The rest runs everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drzero.cluster.launch import RAY_PORT, NodeRole, role_from_args

REPO = Path(__file__).resolve().parents[1]
SKYPILOT_YAML = REPO / "backends" / "skypilot.yaml"
SKYPILOT_PIN = "skypilot==0.14.1"
SKYPILOT_VENV = Path(os.environ.get("DRZERO_SKYPILOT_VENV", Path.home() / ".cache" / "drzero-skypilot" / "venv"))
BUILD_SKYPILOT = os.environ.get("CI", "").lower() == "true" or os.environ.get("DRZERO_SKYPILOT") == "1"


# -- the node roles --------------------------------------------------------------------------------


def test_rank_0_starts_the_head_and_runs_drzero_on_the_cluster_before_its_hydra_overrides():
    role = NodeRole(0, ("10.0.0.1", "10.0.0.2"), 8, ("evolve", "--iterations", "2", "--", "trainer.save_freq=5"))
    start = role.ray_start()
    assert start[:4] == [sys.executable, "-m", "ray.scripts.scripts", "start"] and "--block" in start
    assert {"--head", f"--port={RAY_PORT}", "--node-ip-address=10.0.0.1", "--num-gpus=8"} <= set(start)
    assert role.drzero() == [sys.executable, "-m", "drzero.cli", "evolve", "--iterations", "2", "--ray-address",
                             f"10.0.0.1:{RAY_PORT}", "--", "trainer.save_freq=5"]


def test_other_ranks_join_the_head_at_their_own_address():
    start = NodeRole(1, ("10.0.0.1", "10.0.0.2"), 8).ray_start()
    assert f"--address=10.0.0.1:{RAY_PORT}" in start and "--node-ip-address=10.0.0.2" in start
    assert "--head" not in start


def test_skypilots_variables_give_the_role():
    environ = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n", "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    role = role_from_args(["--", "evolve"], environ)
    assert (role.rank, role.ips, role.gpus, role.nodes, role.command) == (1, ("10.0.0.1", "10.0.0.2"), 8, 2,
                                                                         ("evolve",))


@pytest.mark.parametrize("argv, message", [
    (["--rank", "2", "--ips", "a,b"], "--rank 2 is not valid for 2 node(s)"),
    (["--rank", "0"], "--ips is empty"),
])
def test_a_wrong_role_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        role_from_args(argv, {})
    assert message in capsys.readouterr().err


# -- the SkyPilot task file ------------------------------------------------------------------------


def _task() -> dict:
    return yaml.safe_load(SKYPILOT_YAML.read_text())


def test_the_task_runs_the_launcher_on_every_node_with_drzeros_own_evolve_options():
    from drzero.cli import build_parser

    task = _task()
    assert task["num_nodes"] >= 2 and task["resources"]["accelerators"].endswith(":8")
    assert set(task["file_mounts"]) == {"/corpus", "/checkpoints"}  # what every node must share
    line = [ln for ln in task["run"].replace("\\\n", " ").splitlines() if "drzero.cluster.launch" in ln]
    assert len(line) == 1
    words = shlex.split(line[0])
    for name, value in task["envs"].items():  # the envs as SkyPilot sets them
        words = [w.replace(f"${name}", str(value)) for w in words]
    launcher = words[words.index("drzero.cluster.launch") + 1:]
    assert launcher[0] == "--"  # rank, addresses and GPUs from SkyPilot's variables
    command = launcher[1:] + ["--ray-address", f"10.0.0.1:{RAY_PORT}"]
    args = build_parser().parse_args(command)   # a drzero command line that parses, as typed
    assert args.command == "evolve" and args.model == task["envs"]["DRZERO_MODEL"]


@pytest.fixture(scope="module")
def skypilot_python() -> Path:
    python = SKYPILOT_VENV / "bin" / "python"
    if not python.is_file() and BUILD_SKYPILOT:
        subprocess.run([sys.executable, "-m", "venv", str(SKYPILOT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", SKYPILOT_PIN], check=True, timeout=1200)
    if not python.is_file():
        pytest.skip(f"SkyPilot's parser lives in {SKYPILOT_VENV} (built on CI or with DRZERO_SKYPILOT=1)")
    return python


def test_skypilots_own_parser_reads_the_task(skypilot_python):
    code = f"""
import json, sky, yaml
config = yaml.safe_load(open({str(SKYPILOT_YAML)!r}))
task = sky.Task.from_yaml_config(config, env_overrides=[("DRZERO_MODEL", "qwen3-32b")],
                                 secrets_overrides=[("WANDB_API_KEY", "x")])
(resources,) = task.resources
print(json.dumps({{"nodes": task.num_nodes, "accelerators": resources.accelerators, "envs": task.envs,
                  "mounts": {{path: storage.name for path, storage in task.storage_mounts.items()}},
                  "secrets": sorted(task.secrets), "run": task.run}}))
"""
    done = subprocess.run([str(skypilot_python), "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    assert done.returncode == 0, done.stderr[-3000:]
    task = json.loads(done.stdout.strip().splitlines()[-1])
    assert task["nodes"] == 2 and task["accelerators"] == {"H100": 8}
    assert task["envs"]["DRZERO_MODEL"] == "qwen3-32b" and task["secrets"] == ["WANDB_API_KEY"]
    # the buckets' names come from DRZERO_BUCKET, substituted by SkyPilot
    assert task["mounts"] == {"/corpus": "drzero-run-corpus", "/checkpoints": "drzero-run-checkpoints"}
    assert "python3 -m drzero.cluster.launch -- evolve" in task["run"]


def test_a_head_whose_ray_does_not_start_fails_at_once(capsys):
    import time

    from drzero.cluster.launch import run

    role = NodeRole(0, ("127.0.0.1",), 0, ("list-models",), port=1, ray_args=("--ray-client-server-port=1",))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="`ray start --head` exited with"):
        run(role, log=lambda line: None, join_timeout=120)
    assert time.monotonic() - started < 60  # not the join timeout
