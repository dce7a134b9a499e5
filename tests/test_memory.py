"""The memory model against hand-computed cases; `drzero memory` and the preflight through verl's real config."""

import json
import re

import pytest

from drzero.cli import main
from drzero.models.memory import (AUTOCAST_ACTIVATIONS, BF16_ACTIVATIONS, SGLANG_CONTEXT_GIB, Engine, StageSetup,
                                 TrainSetup, actor_resident, activation_bytes, plan_memory, single_gpu_peak)
from drzero.models.registry import REGISTRY, model_shape
from drzero.models.shapes import GIB, GPU_MEMORY_GIB, KNOWN_SHAPES, ModelShape

QWEN3_32B = KNOWN_SHAPES["Qwen/Qwen3-32B"]
SEED_GUIDE = dict(use_recipe=False)  # the shipped config: full FT, no offload, rollout tp2 @0.5, reward dp4xtp2 @0.5


def test_parameter_counts_match_the_published_ones():
    # Qwen2.5-0.5B by hand: embedding 151936 x 896 (tied); per layer q 896x896+896, k and v 896x128+128,
    # o 896x896, MLP 3 x 896 x 4864, two norms of 896; 24 layers; final norm 896
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"].params == 151936 * 896 + 24 * layer + 896 == 494_032_768
    # Qwen3-32B: untied head, head_dim 128 (q is 64 x 128 = 8192 wide), q/k norms of 128
    layer = 5120 * 8192 + 2 * 5120 * 1024 + 8192 * 5120 + 3 * 5120 * 25600 + 2 * 5120 + 2 * 128
    assert QWEN3_32B.params == 2 * 151936 * 5120 + 64 * layer + 5120 == 32_762_123_264
    assert round(KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"].params / 1e9, 2) == 7.62  # model card: 7.61B
    assert round(KNOWN_SHAPES["Qwen/Qwen3-8B"].params / 1e9, 1) == 8.2


def test_shape_from_config_json(tmp_path):
    config = {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
              "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 25600, "vocab_size": 151936,
              "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = ModelShape.from_dir(tmp_path)
    assert shape.params == QWEN3_32B.params and shape.qk_norm and not shape.qkv_bias
    assert model_shape(str(tmp_path)).params == QWEN3_32B.params  # a local directory wins over the table
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="no num_hidden_layers, num_attention_heads, intermediate_size, vocab_size"):
        ModelShape.from_dir(tmp_path)


def test_fsdp_state_is_16_bytes_per_parameter_sharded_over_every_gpu_of_every_node():
    one_node = {t.name: t.gib for t in actor_resident(TrainSetup(QWEN3_32B, world=8), "train")}
    assert one_node["actor weights (fp32, sharded)"] == pytest.approx(4 * 32_762_123_264 / 8 / GIB)  # 15.26
    assert one_node["grads + AdamW moments (fp32, sharded)"] == pytest.approx(12 * 32_762_123_264 / 8 / GIB)
    two_nodes = {t.name: t.gib for t in actor_resident(TrainSetup(QWEN3_32B, world=16), "train")}
    assert two_nodes["actor weights (fp32, sharded)"] == pytest.approx(one_node["actor weights (fp32, sharded)"] / 2)
    cpu = actor_resident(TrainSetup(QWEN3_32B, strategy="fsdp2", offload_policy=True), "train")
    assert sum(t.gib for t in cpu) == 0  # FSDP2's CPUOffloadPolicy keeps all of it in host memory
    # verl's FSDP1 offload moves the flat parameters, not the last step's gradients
    rollout = {t.name: t.gib for t in actor_resident(TrainSetup(QWEN3_32B, param_offload=True,
                                                                optimizer_offload=True), "rollout")}
    assert rollout["actor weights (fp32, sharded)"] == 0 and rollout["AdamW moments (fp32, sharded)"] == 0
    assert rollout["actor grads (fp32, sharded)"] == pytest.approx(4 * 32_762_123_264 / 8 / GIB)


def test_activations_per_token_and_layer_by_hand():
    tiny = ModelShape("t", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=768, vocab=1000, tied=False,
                      head_dim=64, qk_norm=True)
    # bf16 (FSDP): 16 h + 4 q + 4 kv + 8 I, plus Qwen3's q/k norms 6 q + 6 kv
    assert BF16_ACTIVATIONS.layer(tiny) == 16 * 256 + 4 * 256 + 4 * 128 + 8 * 768 + 6 * 256 + 6 * 128 == 14080
    assert AUTOCAST_ACTIVATIONS.layer(tiny) == 26 * 256 + 4 * 256 + 4 * 128 + 8 * 768 + 6 * 256 + 6 * 128
    kept, _ = activation_bytes(tiny, 100, checkpointing=True, acts=BF16_ACTIVATIONS)
    assert kept == 2 * (2 * 256 * 100) + 8 * 256 * 100  # each layer's bf16 input + the final norm and head input
    kept_all, _ = activation_bytes(tiny, 100, checkpointing=False, acts=BF16_ACTIVATIONS)
    assert kept_all == 2 * 14080 * 100 + 8 * 256 * 100


def test_single_gpu_peak_by_hand():
    s = KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"]
    peak = single_gpu_peak(TrainSetup(s, world=1, micro_batch=2, sequence_tokens=4096, checkpointing=False))
    tokens = 8192
    layer = 26 * 896 + 4 * 896 + 4 * 128 + 8 * 4864
    expected = (12 * s.params + 2 * s.linear_params + 24 * layer * tokens + 13 * 896 * tokens
                + 6 * tokens * 151936) / GIB
    assert peak["forward_backward"] == pytest.approx(expected)
    assert peak["optimizer_step"] == pytest.approx(20 * s.params / GIB)  # weights, moments, grads, sqrt(v)
    assert 25 < peak["peak"] < 26.5  # measured on an H200: 25.77 GiB (benchmarks/results)


def test_sglang_takes_its_fraction_of_the_memory_free_when_it_starts():
    engine = Engine("verl's rollout", QWEN3_32B, tp=2, fraction=0.5, sequence_tokens=4096)
    weights, kv = engine.pool(70.0)
    assert weights == pytest.approx(2 * QWEN3_32B.params / 2 / GIB)  # bf16, half per rank: 30.5 GiB
    assert kv == pytest.approx(35.0 - weights)
    assert QWEN3_32B.kv_bytes_per_token(2) == 2 * 64 * 4 * 128 * 2  # K and V, 64 layers, 4 of 8 KV heads
    alone = plan_memory(StageSetup("gen-data", 79.1, server=Engine("gen-data server", QWEN3_32B, 2, 0.8, 4096)))
    assert alone.fits and alone.peak == pytest.approx(SGLANG_CONTEXT_GIB + 0.8 * (79.1 - SGLANG_CONTEXT_GIB) + 3.0)
    squeezed = plan_memory(StageSetup("gen-data", 79.1, server=Engine("gen-data server", QWEN3_32B, 2, 0.3, 4096)))
    assert not squeezed.fits and "cannot hold one 4096-token trajectory" in squeezed.problems[0]


def test_lora_with_the_sglang_rollout_is_refused():
    setup = StageSetup("solver", 139.8, train=TrainSetup(QWEN3_32B, lora_rank=32),
                       rollout=Engine("verl's rollout", QWEN3_32B, 4, 0.5, 3072))
    memory = plan_memory(setup)
    assert any("loads no adapter" in p for p in memory.problems)


def test_recipes_exist_for_every_listed_training_model_on_h100_and_h200():
    for key in ("qwen3-32b", "qwen3-14b", "qwen3-8b", "qwen2.5-7b-instruct", "qwen2.5-3b-instruct"):
        assert set(REGISTRY[key].recipes) == {"H100", "H200"}, key
        # a GPU gets the recipe of the largest kind that is no bigger
        assert REGISTRY[key].recipe(GPU_MEMORY_GIB["A100-80GB"], 8) is REGISTRY[key].recipes["H100"]
        assert REGISTRY[key].recipe(GPU_MEMORY_GIB["H100"], 4) is None  # recipes are for 8 GPUs a node
    assert REGISTRY["qwen3-32b"].recipe(GPU_MEMORY_GIB["L40S"], 8) is None
    assert set(GPU_MEMORY_GIB) >= {"H100", "H200", "A100-80GB", "A100-40GB", "L40S", "A10G"}


# -- through verl's config --------------------------------------------------------------------------

def _stage(cls, **kwargs):
    base = dict(db="/nonexistent/db", data_dir="/nonexistent/data", checkpoints="/nonexistent/ckpt",
                logger="console", retriever_url="http://127.0.0.1:8000/retrieve")
    return cls(**{**base, **kwargs})


def _memory_check(plan):
    from drzero.verl.preflight import run_checks

    return {c.name: c for c in run_checks(plan, allow_download=True)}["memory"]


def test_preflight_refuses_the_seed_guides_qwen3_32b_settings_and_accepts_the_recipe():
    from drzero.stages.challenger import ChallengerConfig, plan_challenger
    from drzero.stages.solver import SolverConfig, plan_solver

    check = _memory_check(plan_challenger(_stage(ChallengerConfig, model="qwen3-32b", **SEED_GUIDE)))
    assert not check.ok
    # one trajectory = the shipped prompt + response budgets (config/search_multiturn_grpo.yaml)
    assert "verl's rollout: 0.5 x" in check.message and "cannot hold one 4608-token trajectory" in check.message
    assert "smallest change that fits: --rollout-tp 4 --sglang-dp 2 --sglang-tp 4" in check.message
    solver = _memory_check(plan_solver(_stage(SolverConfig, model="qwen3-32b", **SEED_GUIDE)))
    assert not solver.ok and "smallest change that fits" in solver.message

    plan = plan_challenger(_stage(ChallengerConfig, model="qwen3-32b"))  # the recipe, applied by default
    assert "actor_rollout_ref.actor.fsdp_config.offload_policy=True" in plan.verl_overrides
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=4" in plan.verl_overrides
    assert "--dp-size 2 --tp-size 4 --mem-fraction-static 0.3" in plan.services[0].command_line
    check = _memory_check(plan)
    assert check.ok and "of 79.1 GiB per H100" in check.message


def test_user_settings_win_over_the_recipe():
    from drzero.verl.overrides import compose
    from drzero.stages.challenger import ChallengerConfig, plan_challenger

    plan = plan_challenger(_stage(ChallengerConfig, model="qwen3-32b", sglang_mem=0.4, rollout_tp=8,
                                  overrides=["actor_rollout_ref.rollout.gpu_memory_utilization=0.6"]))
    assert "--mem-fraction-static 0.4" in plan.services[0].command_line
    config = compose(plan.verl_overrides)
    assert config.actor_rollout_ref.rollout.gpu_memory_utilization == 0.6
    assert config.actor_rollout_ref.rollout.tensor_model_parallel_size == 8
    assert config.actor_rollout_ref.actor.strategy == "fsdp2"  # the rest of the recipe stays
    # a reward server shaped by hand (as the Modal backend does for 8 GPUs) takes drzero's fraction, not the
    # recipe's, which is sized for the recipe's tp 4
    plan = plan_challenger(_stage(ChallengerConfig, model="qwen3-32b", sglang_dp=4, sglang_tp=2))
    assert "--dp-size 4 --tp-size 2 --mem-fraction-static 0.5" in plan.services[0].command_line
    assert _memory_check(plan).ok


def test_the_plan_evolve_makes_for_qwen3_32b_fits_by_default(tmp_path):
    from drzero.pipeline import EvolveConfig, iteration_plans

    cfg = _stage(EvolveConfig, model="qwen3-32b", checkpoints=str(tmp_path))
    plans = iteration_plans(cfg, 1)
    for name in ("challenger", "solver"):
        check = _memory_check(plans[name])
        assert check.ok, (name, check.message)


@pytest.mark.parametrize("gpu", ["H100", "H200"])
def test_drzero_memory_for_every_registry_model(gpu, capsys):
    for key in REGISTRY:
        assert main(["memory", "--model", key, "--gpu", gpu]) == 0, capsys.readouterr().out
        out = capsys.readouterr().out
        for stage in ("challenger", "solver", "gen-data", "evaluate"):
            assert f"{stage}: 8 x {gpu} ({GPU_MEMORY_GIB[gpu]:.1f} GiB per GPU)" in out
        assert "verdict: fits" in out and "every stage fits" in out
        if REGISTRY[key].recipes:  # each recipe keeps >= 8% headroom in every stage (registry.py says so)
            for line in out.splitlines():
                if "verdict: fits: peak" in line:
                    peak, capacity = (float(x) for x in re.findall(r"[\d.]+(?= of| GiB)", line)[:2])
                    assert peak <= 0.92 * capacity, (key, gpu, line)


def test_drzero_memory_exits_1_when_a_stage_does_not_fit(capsys):
    assert main(["memory", "--model", "qwen3-32b", "--gpu", "H100", "--no-recipe", "--stage", "challenger"]) == 1
    out = capsys.readouterr().out
    assert "headroom" in out and "DOES NOT FIT" in out and "does not fit: challenger" in out
    assert main(["memory", "--model", "qwen3-8b", "--gpu-mem", "20", "--stage", "solver"]) == 1
    with pytest.raises(SystemExit):
        main(["memory", "--model", "no-such/model-xyz"])


def test_more_nodes_shard_the_actor_over_every_gpu_and_qwen3_32b_names_the_nodes_it_needs(capsys):
    """`drzero memory --nodes N` counts the GPUs of every node; the 32B's H100 recipe for 4 nodes trains on the GPUs."""
    cluster = REGISTRY["qwen3-32b"].cluster_recipes["H100"]
    assert cluster.nodes == 4 and "offload_policy" not in " ".join(cluster.overrides)
    assert REGISTRY["qwen3-32b"].recipe(GPU_MEMORY_GIB["H100"], 8, nodes=4) is cluster
    assert REGISTRY["qwen3-32b"].recipe(GPU_MEMORY_GIB["H100"], 8, nodes=2) is REGISTRY["qwen3-32b"].recipes["H100"]
    assert REGISTRY["qwen3-32b"].recipe(GPU_MEMORY_GIB["H200"], 8, nodes=4) is REGISTRY["qwen3-32b"].recipes["H200"]

    hosts = {}
    for nodes in (1, 2, 4):
        assert main(["memory", "--model", "qwen3-32b", "--gpu", "H100", "--nodes", str(nodes),
                     "--stage", "challenger"]) == 0
        out = capsys.readouterr().out
        assert f"challenger: 8 x H100 (79.1 GiB per GPU) x {nodes} node(s)" in out
        hosts[nodes] = float(re.search(r"host memory for the offloaded actor: (\d+) GiB per node", out).group(1))
    # the same host-memory training on 1 and 2 nodes, its state split over twice the nodes; on 4, GPU-resident
    assert hosts[1] == pytest.approx(2 * hosts[2], abs=1) and hosts[4] < hosts[2] / 2

    # the 4-node settings on 2 nodes: the challenger's update does not fit
    offload = ["--", "actor_rollout_ref.actor.fsdp_config.param_offload=True",
               "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True"]
    assert main(["memory", "--model", "qwen3-32b", "--gpu", "H100", "--nodes", "2", "--no-recipe", "--rollout-tp", "4",
                 "--sglang-dp", "2", "--sglang-tp", "4", "--sglang-mem", "0.3", "--stage", "challenger", *offload]) == 1
    assert "DOES NOT FIT: training: actor update" in capsys.readouterr().out
