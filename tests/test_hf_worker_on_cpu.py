"""The `hf` engine's verl wiring on CPU: replica, worker method, TaskRunner role, stage overrides.

verl's own classes throughout (RolloutReplica, RolloutReplicaRegistry, TokenOutput, the TaskRunner's
add_actor_rollout_worker); only the GPU worker itself is not started (the GPU smoke does that).
"""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from drzero.verl.hf import worker as hf_worker
from drzero.verl.hf.engine import HFEngine, ResponseLimits
from verl_harness import compose_ppo_config


def rollout_config(tp: int):
    config = compose_ppo_config([f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}",
                                 "actor_rollout_ref.rollout.name=hf"])
    return config.actor_rollout_ref.rollout


def test_replica_is_served_by_its_training_worker():
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    hf_worker.register_hf_replica()
    replica_cls = RolloutReplicaRegistry.get("hf")
    assert replica_cls is hf_worker.HFReplica
    workers = [object(), object()]
    group = types.SimpleNamespace(workers=workers)
    replica = replica_cls(replica_rank=1, config=rollout_config(1), model_config=None, gpus_per_node=2)
    asyncio.run(replica.init_hybrid(group))
    assert replica.server_handle is workers[1] and replica.server_address == "hf_1"
    assert replica.servers == []
    asyncio.run(replica.sleep())     # verl calls it after every rollout: nothing to do, must not fail

    sharded = replica_cls(replica_rank=0, config=rollout_config(2), model_config=None, gpus_per_node=2)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=1"):
        asyncio.run(sharded.init_hybrid(group))


def test_worker_generate_returns_verls_token_output():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.workers.rollout.replica import TokenOutput

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    engine = HFEngine(model, limits=ResponseLimits(8, 4, 64), stop_token_ids=[63], pad_token_id=0)
    worker = types.SimpleNamespace(rollout=engine, global_steps=3)
    out = asyncio.run(hf_worker.HFWorker.generate(worker, prompt_ids=[1, 2, 3], request_id="r",
                                                  sampling_params={"temperature": 0, "top_p": 1.0, "top_k": -1,
                                                                   "repetition_penalty": 1.0, "logprobs": True}))
    assert isinstance(out, TokenOutput)
    # greedy by hand: up to the response limit of 4, cut after the stop token 63 and keeping it
    ids, expected, expected_logp = [1, 2, 3], [], []
    with torch.no_grad():
        while len(expected) < 4 and (not expected or expected[-1] != 63):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(logp.argmax())
            ids.append(token)
            expected.append(token)
            expected_logp.append(float(logp[token]))
    assert list(out.token_ids) == expected
    assert out.log_probs == pytest.approx(expected_logp, abs=1e-4)
    assert out.extra_fields == {"global_steps": 3}
    with pytest.raises(ValueError, match="text only"):
        asyncio.run(hf_worker.HFWorker.generate(worker, prompt_ids=[1], request_id="r", sampling_params={},
                                                image_data=[b"x"]))


def test_task_runner_puts_the_hf_worker_in_the_actor_rollout_role():
    from verl.trainer.ppo.ray_trainer import Role

    config = compose_ppo_config(["actor_rollout_ref.rollout.name=hf"])
    runner = hf_worker.HFTaskRunner()
    worker_cls, _ = runner.add_actor_rollout_worker(config)
    assert worker_cls is hf_worker.HFWorker
    remote = runner.role_worker_mapping[Role.ActorRollout]   # what run() hands verl's worker group
    assert issubclass(remote.__ray_metadata__.modified_class, hf_worker.HFWorker)
    config = compose_ppo_config(["actor_rollout_ref.rollout.name=hf", "trainer.use_legacy_worker_impl=disable"])
    with pytest.raises(ValueError, match="FSDP worker"):
        hf_worker.HFTaskRunner().add_actor_rollout_worker(config)


def test_engine_hf_stage_overrides(tmp_path):
    from drzero.stages.solver import SolverConfig, plan_solver

    common = dict(db=str(tmp_path / "db"), data_dir=str(tmp_path / "data"), checkpoints=str(tmp_path / "ck"),
                  model=str(tmp_path / "model"), retriever_url="http://127.0.0.1:1/retrieve", gpus=1)
    hf = plan_solver(SolverConfig(engine="hf", **common)).verl_overrides
    assert "actor_rollout_ref.rollout.name=hf" in hf
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=1" in hf
    assert "actor_rollout_ref.model.use_remove_padding=false" in hf
    assert "+actor_rollout_ref.model.override_config.attn_implementation=sdpa" in hf
    sglang = plan_solver(SolverConfig(**common)).verl_overrides
    assert not any("rollout.name" in o or "attn_implementation" in o for o in sglang)
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=2" in sglang


def test_challenger_engine_hf_serves_probes_without_sglang(tmp_path):
    from drzero.stages.challenger import ChallengerConfig, plan_challenger

    plan = plan_challenger(ChallengerConfig(engine="hf", db=str(tmp_path / "db"), data_dir=str(tmp_path / "d"),
                                            checkpoints=str(tmp_path / "ck"), model=str(tmp_path / "m"),
                                            retriever_url="http://127.0.0.1:1/retrieve", gpus=1))
    assert [s.name for s in plan.services] == ["hf-server"]
    assert "drzero.verl.hf.server" in plan.services[0].command
    assert plan.sglang_gpus is None and plan.sglang_parser is None   # no SGLang checks for a server not started


def test_preflight_gpu_checks_need_neither_sglang_nor_flash_attn_with_engine_hf(tmp_path):
    from drzero.verl.overrides import compose
    from drzero.verl.preflight import gpu_only_checks
    from drzero.verl.overrides import engine_overrides

    checks = gpu_only_checks(compose(engine_overrides("hf")), enabled=True)   # as on a GPU machine
    assert [(c.name, c.ok, c.skipped) for c in checks] == [("sglang API", True, True), ("flash-attn", True, True)]


def test_challenger_with_a_running_server_skips_sglangs_own_checks(tmp_path):
    """--sglang-url: no SGLang is started, so its dp x tp = GPUs check must not refuse a 1-GPU run."""
    from drzero.stages.challenger import ChallengerConfig, plan_challenger

    plan = plan_challenger(ChallengerConfig(sglang_url="http://127.0.0.1:8001", db=str(tmp_path / "db"),
                                            data_dir=str(tmp_path / "d"), checkpoints=str(tmp_path / "ck"),
                                            model=str(tmp_path / "m"), retriever_url="http://127.0.0.1:1/retrieve",
                                            gpus=1))
    assert plan.services == [] and plan.sglang_gpus is None
