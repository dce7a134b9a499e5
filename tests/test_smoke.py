"""`drzero smoke` on a CPU: the parts that need no GPU run and pass, the GPU parts are named as skipped,
a failure exits non-zero with its reason, and the GPU parts' plans are checked without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from drzero.tools.smoke import (SMOKE_SERVED_NAME, SmokeConfig, check_rollout, run_smoke, run_verl_step, sglang_spec,
                          summary_lines, verl_step_command, write_solver_data)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the smoke")


def _smoke_command(*args: str) -> list[str]:
    """`drzero smoke` once it is wired into the CLI; `python -m drzero.tools.smoke` (the same code) until then."""
    from drzero.cli import commands

    if "smoke" in commands():
        return [sys.executable, "-m", "drzero.cli", "smoke", *args]
    return [sys.executable, "-m", "drzero.tools.smoke", *args]


def test_cpu_path_passes_and_names_the_gpu_parts_it_skipped(demo_db):
    result = run_smoke(SmokeConfig(db=str(demo_db)), log=lambda line: None)
    summary = summary_lines(result)
    assert result.ok, summary
    for module in ("torch", "transformers", "verl", "drzero"):
        check = result.check(f"import {module}")
        assert check.ok and not check.skipped and check.message[0].isdigit(), summary   # a version
    assert result.check("retriever").ok and "healthy at http://127.0.0.1:" in result.check("retriever").message
    search = result.check("search")
    assert search.ok and not search.skipped and "3 passages for" in search.message
    for part in ("GPUs", "sglang", "rollout", "verl step"):
        assert result.check(part).skipped, summary
    assert "sglang.launch_server" in result.check("sglang").message
    assert "drzero.cli solver" in result.check("verl step").message
    assert summary.splitlines()[-1].startswith("smoke passed")
    assert "skipped: GPUs" in summary and "verl step" in summary.splitlines()[-1]


def test_a_missing_db_exits_non_zero_with_the_reason(tmp_path):
    missing = tmp_path / "no-such-db"
    done = subprocess.run(_smoke_command("--db", str(missing)), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"[FAIL] retriever: --db {missing} does not exist" in done.stdout
    assert "drzero ingest" in done.stdout                          # the fix
    assert "[skip] search: needs the retriever" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("smoke FAILED")


def test_require_gpu_makes_no_gpu_a_failure(tmp_path):
    result = run_smoke(SmokeConfig(db=str(tmp_path / "none"), require_gpu=True), log=lambda line: None)
    assert not result.ok
    assert not result.check("GPUs").ok and "--require-gpu" in result.check("GPUs").message


# -- the GPU parts' plans -------------------------------------------------------------------------


def test_the_one_step_verl_run_passes_the_solver_preflight(tmp_path, demo_db):
    """The exact `drzero solver` command the smoke runs on a GPU, through drzero's parser and preflight."""
    from drzero.cli import build_parser
    from drzero.config import config_from_args
    from drzero.corpus.demo import build_demo_world
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model
    from drzero.verl.preflight import run_checks
    from drzero.stages.solver import SolverConfig, plan_solver

    model = run_tiny_model(TinyModelConfig(out=str(tmp_path / "model")))  # a model directory with weights
    train, val = write_solver_data(tmp_path / "data", build_demo_world(papers=60))
    command = verl_step_command(SmokeConfig(), str(model), demo_db, tmp_path, "http://127.0.0.1:9/retrieve")
    assert command[1:4] == ["-m", "drzero.cli", "solver"]
    split = command.index("--")
    cfg = config_from_args(SolverConfig, build_parser().parse_args(command[3:split]))
    cfg.overrides = command[split + 1:]
    plan = plan_solver(cfg)
    overrides = plan.verl_overrides
    for expected in ("trainer.total_training_steps=1", "trainer.n_gpus_per_node=1", "data.train_batch_size=4",
                     "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                     "trainer.logger=[console]", f"data.train_files={train}", f"data.val_files={val}"):
        assert expected in overrides
    assert plan.services == [] and plan.env["DRZERO_RETRIEVER_URL"] == "http://127.0.0.1:9/retrieve"
    checks = run_checks(plan, gpu_checks=False)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert "--allow-download" in verl_step_command(SmokeConfig(allow_download=True), "m", demo_db, tmp_path, "u")


def test_sglang_serves_one_gpu_with_the_models_tool_parser():
    spec = sglang_spec("/corpus/models/Qwen2.5-0.5B-Instruct", "qwen25", 8123)
    line = spec.command_line
    assert "sglang.launch_server --model-path /corpus/models/Qwen2.5-0.5B-Instruct" in line
    for flag in ("--port 8123", "--dp-size 1", "--tp-size 1", "--tool-call-parser qwen25",
                 f"--served-model-name {SMOKE_SERVED_NAME}"):
        assert flag in line


def test_the_rollout_part_against_a_fake_sglang(retriever):
    from fake_sglang import FakeSGLang, Reply, SearchThenAnswer

    question = "Which venue published the paper?"
    with FakeSGLang(SearchThenAnswer({}, default=["NeurIPS"]), model=SMOKE_SERVED_NAME).serve() as url:
        check = check_rollout(url, retriever.url, question, 2)
    assert check.ok and "1 search call(s)" in check.message and "'NeurIPS'" in check.message

    with FakeSGLang(lambda conversation: Reply("<answer>no idea</answer>"), model=SMOKE_SERVED_NAME).serve() as url:
        check = check_rollout(url, retriever.url, question, 2)
    assert not check.ok and "none of 2 rollouts called the search tool" in check.message


def test_the_verl_step_reports_a_crash_and_a_hang_with_the_reason(tmp_path):
    crashed = run_verl_step([sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"], tmp_path, 60,
                            lambda line: None)
    assert not crashed.ok and "exited with 3: CUDA out of memory" in crashed.message
    hung = run_verl_step([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, 1, lambda line: None)
    assert not hung.ok and "did not finish within 1 s" in hung.message
    no_checkpoint = run_verl_step([sys.executable, "-c", "pass"], tmp_path, 60, lambda line: None)
    assert not no_checkpoint.ok and "saved no checkpoint" in no_checkpoint.message


def test_engine_hf_needs_no_sglang_and_serves_with_transformers(tmp_path):
    """--engine hf: SGLang and flash-attn are not needed, the server is drzero's, the verl step uses hf."""
    from drzero.tools.smoke import inference_spec, server_part

    cfg = SmokeConfig(engine="hf")
    spec = inference_spec(cfg, "/models/tiny", "qwen25", 8123)
    assert server_part(cfg) == "hf server" and "drzero.verl.hf.server --model /models/tiny" in spec.command_line
    command = verl_step_command(cfg, "/models/tiny", tmp_path / "db", tmp_path, "http://127.0.0.1:9/retrieve")
    assert command[command.index("--engine") + 1] == "hf"
    result = run_smoke(SmokeConfig(db=str(tmp_path / "none"), engine="hf"), log=lambda line: None)
    for module in ("sglang", "flash_attn"):
        check = result.check(f"import {module}")
        assert check.skipped and "--engine hf" in check.message
