"""A newcomer's first hour: honest --help, fast offline failures, GPU-only stages refused up front."""

import os
import socket
import subprocess
import time

import pytest

from conftest import drzero_command
from drzero.cli import PREFLIGHT_DESCRIPTION, commands, command_description, main
from drzero.pipeline import EvolveConfig, evolve
from drzero import pipeline
from drzero.verl import preflight
from drzero.stages.merge import MergeConfig, plan_merge
from drzero.stages.solver import SolverConfig, plan_solver


@pytest.mark.parametrize("command", sorted(commands()) + ["preflight"])
def test_every_command_help_exits_0_with_its_own_description(command, capsys):
    description = (PREFLIGHT_DESCRIPTION if command == "preflight"
                   else command_description(commands()[command][1]))
    first = description.splitlines()[0]
    own = "evolve" if command == "train" else command  # `drzero evolve` (alias `drzero train`)
    assert f"`drzero {own}`" in first, first
    assert "plan_" not in description and "``execute``" not in description
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert first in out
    assert "``" not in out, "--help is plain text, not reStructuredText"


def test_top_level_help_lists_preflight_and_tells_the_truth_about_search(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "preflight" in out.split("drzero preflight STAGE")[0]  # in the command list, not only the epilog
    assert "without a server" not in out and "--url" in out


def test_preflight_of_a_stage_shows_that_stages_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["preflight", "solver", "--help"])
    assert done.value.code == 0
    assert "--iteration" in capsys.readouterr().out


def test_evolve_refuses_iteration_instead_of_ignoring_it(capsys):
    with pytest.raises(SystemExit) as done:
        main(["evolve", "--dry-run", "--iteration", "2"])
    assert done.value.code == 2
    assert "--iteration" in capsys.readouterr().err


def test_evolve_plans_absolute_eval_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert EvolveConfig(eval_data="data/eval.parquet").eval_data == str(tmp_path / "data" / "eval.parquet")


@pytest.mark.parametrize("argv", [["gen-data", "--dry-run"], ["merge", "--dry-run"]])
def test_dry_runs_of_gen_data_and_merge_fail_without_their_input(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--checkpoints", str(tmp_path / "ckpt"), *(["--data-dir", str(tmp_path / "data"),
                                                                 "--retriever-url", "http://127.0.0.1:9/retrieve"]
                                                                if argv[0] == "gen-data" else [])])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "which no stage has produced" in err and str(tmp_path / "ckpt") in err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_ingest_with_the_default_embedder_fails_in_seconds(tmp_path):
    """No hub, no cache: the default (e5-large-v2) embedder fails fast with the message that says what to do."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("A short document about federated learning. " * 5)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DRZERO_MODELS_DIR")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
    started = time.monotonic()
    result = subprocess.run(drzero_command("ingest", str(tmp_path / "docs"), "--db", str(tmp_path / "db")),
                            capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no embedder weights found" in result.stderr and "--embedder" in result.stderr
    assert "could not be reached" in result.stderr
    assert len(lines) <= 3, "\n".join(lines)
    assert elapsed < 15, f"{elapsed:.1f} s"


@pytest.fixture
def evolve_config(tmp_path):
    return EvolveConfig(iterations=1, db=str(tmp_path / "db"), data_dir=str(tmp_path / "data"),
                        checkpoints=str(tmp_path / "ckpt"), model=str(tmp_path / "model"), logger="console",
                        retriever_url="http://127.0.0.1:8000/retrieve")


def test_evolve_without_sglang_is_refused_by_preflight(evolve_config, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(pipeline, "execute", ran.append)
    monkeypatch.setattr(preflight, "_cuda_available", lambda: True)
    monkeypatch.setattr(preflight, "_sglang_installed", lambda: False)
    assert evolve(evolve_config) == 1
    assert ran == []
    out = capsys.readouterr().out
    machine = next(line for line in out.splitlines() if "[FAIL] machine" in line)
    assert "SGLang" in machine and "CUDA" not in machine
    assert "python -m backends.modal" in machine and "--profile gpu" in machine and "docker/Dockerfile" in machine


def test_gpu_only_stages_need_cuda_and_sglang_unless_the_engine_is_hf(evolve_config, monkeypatch):
    from drzero.pipeline import all_plans

    monkeypatch.setattr(preflight, "_cuda_available", lambda: False)
    monkeypatch.setattr(preflight, "_sglang_installed", lambda: False)
    plans = dict(all_plans(evolve_config))
    missing = preflight.machine_check([plans["iter1/challenger"]])
    assert not missing.ok and "CUDA" in missing.message and "SGLang" in missing.message
    assert preflight.machine_check([plan_merge(MergeConfig(checkpoints=str(evolve_config.checkpoints)))]).ok

    monkeypatch.setattr(preflight, "_cuda_available", lambda: True)
    hf = plan_solver(SolverConfig(engine="hf", model=evolve_config.model, db=evolve_config.db,
                                  data_dir=evolve_config.data_dir, checkpoints=evolve_config.checkpoints,
                                  logger="console", retriever_url=evolve_config.retriever_url))
    assert preflight.machine_check([hf]).ok  # --engine hf: CUDA only


def test_a_port_held_by_another_program_is_named_within_seconds():
    import http.server
    import threading

    from drzero.config import ConfigError
    from drzero.retrieval.search_cli import wait_until_healthy

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=f"another process holds the port \\({port}\\)"):
            wait_until_healthy(f"http://127.0.0.1:{port}", 120)
    finally:
        server.shutdown()
        server.server_close()
    assert time.monotonic() - started < 10
