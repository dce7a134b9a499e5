"""Stage plans, preflight (one test per mistake it must catch) and dry runs, all through verl 0.7.1's config code."""

import shutil

import pytest

from drzero.cli import main
from drzero.verl.preflight import run_checks
from drzero.stages.challenger import ChallengerConfig, plan_challenger
from drzero.stages.solver import SolverConfig, plan_solver


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    return run_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("tinymodel") / "model")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_db, tiny_model_dir):
    """data/ with the seed parquet (and a solver parquet for iteration 1), checkpoints/ empty."""
    import pyarrow.parquet as pq

    from drzero.atomic import commit_set, parquet_writer
    from drzero.stages.prepare_data import PrepareDataConfig, run_prepare_data
    from drzero.prompts import solver_messages

    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(data / "zero_ratio4321.parquet"), rows=512,
                                       val_rows=16, tokenizer=str(tiny_model_dir)))
    solver_data = {}
    for suffix in ("", "_val"):  # stands in for gen-data's output: solver prompts in the same row format
        rows = pq.read_table(data / f"zero_ratio4321{suffix}.parquet").to_pylist()
        for row in rows:
            row["prompt"] = solver_messages(f"Which venue published {row['extra_info']['seed_title']}?")
            row["reward_model"] = {"style": "rule", "ground_truth": {"target": ["x"]}}
        solver_data[data / f"solver_iter1{suffix}.parquet"] = parquet_writer(rows)
    commit_set(solver_data, data / "solver_iter1.manifest.json", {})  # committed as a set, as gen-data does
    return {"db": str(demo_db), "data_dir": str(data), "checkpoints": str(root / "checkpoints"),
            "model": str(tiny_model_dir), "logger": "console", "retriever_url": "http://127.0.0.1:8000/retrieve"}


def _checks(plan, **kwargs):
    return {c.name: c for c in run_checks(plan, **kwargs)}


def _failed(checks):
    return {name: c.message for name, c in checks.items() if not c.ok}


def test_challenger_plan_is_hrpo_with_the_proposer_reward_and_passes_preflight(workdir):
    plan = plan_challenger(ChallengerConfig(**workdir))
    overrides = plan.verl_overrides
    assert "algorithm.adv_estimator=hrpo" in overrides and "actor_rollout_ref.rollout.n=1" in overrides
    assert "reward.custom_reward_function.name=proposer_compute_score" in overrides
    assert "+reward.custom_reward_function.reward_kwargs.base_url='http://127.0.0.1:8001'" in overrides
    assert [s.name for s in plan.services] == ["sglang"]  # retriever given by URL, SGLang started for the probes
    assert "--served-model-name solver" in plan.services[0].command_line
    checks = _checks(plan)
    assert _failed(checks) == {}
    assert checks["sglang API"].skipped and checks["flash-attn"].skipped  # no CUDA here


def test_later_iterations_resume_the_proposer_and_serve_the_merged_solver(workdir):
    plan = plan_challenger(ChallengerConfig(**{**workdir, "iteration": 3}))
    assert "trainer.resume_mode=resume_path" in plan.verl_overrides
    assert any(o.endswith("challenger_iter2/global_step_100") for o in plan.verl_overrides)
    assert "trainer.total_training_steps=150" in plan.verl_overrides
    assert "solver_iter2_hf" in plan.services[0].command_line
    solver = plan_solver(SolverConfig(**{**workdir, "iteration": 3}))
    assert any(o.endswith("solver_iter2_hf") for o in solver.verl_overrides if o.startswith("actor_rollout_ref.model"))


def test_solver_plan_is_grpo_n5_with_em_and_passes_preflight(workdir):
    plan = plan_solver(SolverConfig(**workdir))
    assert "actor_rollout_ref.rollout.n=5" in plan.verl_overrides and "data.max_prompt_length=512" in plan.verl_overrides
    assert "reward.custom_reward_function.name=solver_compute_score" in plan.verl_overrides
    assert plan.services == []
    assert _failed(_checks(plan)) == {}


@pytest.mark.parametrize("stage", ["challenger", "solver"])
def test_dry_run_prints_the_resolved_verl_config_and_starts_nothing(stage, workdir, capsys):
    args = [stage, "--dry-run"] + [f"--{k.replace('_', '-')}={v}" for k, v in workdir.items()]
    assert main(args + ["--", "trainer.save_freq=10"]) == 0
    out = capsys.readouterr().out
    assert "drzero.verl.entry" in out and "all checks passed" in out
    assert "save_freq: 10" in out  # the pass-through override reached verl's resolved config
    assert f"adv_estimator: {'hrpo' if stage == 'challenger' else 'grpo'}" in out


# -- one test per preflight mistake ------------------------------------------------------------------

def _challenger(workdir, *overrides, **options):
    cfg = ChallengerConfig(**{**workdir, **options})
    cfg.overrides = list(overrides)
    return plan_challenger(cfg)


@pytest.mark.parametrize("overrides,check,expected", [
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null"], "micro batch sizes",
     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"),
    (["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=null"], "verl validate_config",
     "log_prob_micro_batch_size"),
    (["+data.train_batch_size=128"], "hydra overrides", "drop the leading '+'"),
    (["reward.custom_reward_function.reward_kwargs.topk=3"], "hydra overrides", "write +reward.custom_reward_function"),
    (["data.train_files=relative/seeds.parquet"], "data.train_files", "relative path"),
    (["actor_rollout_ref.rollout.multi_turn.tool_config_path=config/search_tool_config.yaml"],
     "actor_rollout_ref.rollout.multi_turn.tool_config_path", "is relative"),
    (["data.max_prompt_length=700"], "prompt budget", "data.max_prompt_length=700"),
    (["actor_rollout_ref.rollout.multi_turn.format=qwen"], "tool parser", "not a verl 0.7.1 parser"),
    (["algorithm.adv_estimator=hrpoo"], "advantage estimator", "hrpoo"),
    (["actor_rollout_ref.actor.ppo_mini_batch_size=512"], "batch sizes", "ppo_mini_batch_size=512"),
])
def test_preflight_catches_config_mistakes(workdir, overrides, check, expected):
    failed = _failed(_checks(_challenger(workdir, *overrides)))
    assert check in failed and expected in failed[check], failed


def test_preflight_catches_missing_and_unreadable_data(workdir, tmp_path):
    empty = {**workdir, "data_dir": str(tmp_path / "nothing-here")}
    assert "no stage of this run writes it" in _failed(_checks(_challenger(empty)))["data.train_files"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero_ratio4321.parquet").write_bytes(b"not parquet")
    shutil.copy(f"{workdir['data_dir']}/zero_ratio4321_val.parquet", broken)
    failed = _failed(_checks(_challenger({**workdir, "data_dir": str(broken)})))
    assert "not a readable parquet" in failed["data.train_files"]


def test_preflight_catches_a_model_that_is_not_on_disk(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("DRZERO_MODELS_DIR", str(tmp_path / "models"))
    failed = _failed(_checks(_challenger(workdir, model="qwen3-8b")))
    assert "Qwen/Qwen3-8B is not on disk" in failed["model path"] and "--allow-download" in failed["model path"]
    assert "model path" not in _failed(_checks(_challenger(workdir, model="qwen3-8b"), allow_download=True))
    failed = _failed(_checks(_challenger(workdir, model=str(tmp_path / "missing-model"))))
    assert "does not exist" in failed["model path"]


def test_preflight_catches_gpu_layout_mistakes(workdir):
    assert "--sglang-dp 3 x --sglang-tp 2 = 6, but the node has 8 GPUs" in _failed(_checks(_challenger(workdir, sglang_dp=3)))["sglang dp x tp"]
    failed = _failed(_checks(_challenger(workdir, gpus=3)))
    assert "divide by 3 GPUs" in failed["batch sizes"]


def test_preflight_catches_a_missing_wandb_key(workdir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    assert "WANDB_API_KEY" in _failed(_checks(_challenger(workdir, logger="console,wandb")))["wandb"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert "wandb" not in _failed(_checks(_challenger(workdir, logger="console,wandb")))


def test_gpu_checks_report_sglang_drift_and_flash_attn(workdir):
    failed = _failed(_checks(_challenger(workdir), gpu_checks=True))  # forced on a machine without them
    assert "does not match verl 0.7.1" in failed["sglang API"]
    assert "attn_implementation=sdpa" in failed["flash-attn"]


def test_preflight_command_exits_1_with_the_fix(workdir, capsys):
    args = ["preflight", "challenger"] + [f"--{k.replace('_', '-')}={v}" for k, v in workdir.items()]
    assert main(args + ["--", "algorithm.adv_estimator=hrpoo"]) == 1
    assert "[FAIL] advantage estimator" in capsys.readouterr().out
