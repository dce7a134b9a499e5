"""Every stage that starts a retriever serves it on the GPU when the machine has one, and the memory plan counts it.

The retriever's search worker sits on GPU 0 beside an SGLang rank and an FSDP rank; it starts first, so what it
holds (its CUDA context, the fp16 encoder, the exact index, its largest batch) is taken out of what SGLang and
FSDP find free there.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from drzero import gpus
from drzero.cli import main
from drzero.models.memory import Engine, RetrieverLoad, StageSetup, plan_memory
from drzero.models.shapes import ENCODER_SHAPES, KNOWN_SHAPES
from drzero.pipeline import EvolveConfig, all_plans
from drzero.stages import base
from drzero.stages.challenger import ChallengerConfig, plan_challenger
from drzero.verl.preflight import with_store_size


def _evolve(tmp_path, **kwargs) -> EvolveConfig:
    return EvolveConfig(iterations=1, db=str(tmp_path / "db"), data_dir=str(tmp_path / "data"),
                        checkpoints=str(tmp_path / "ckpt"), logger="console", eval_data=None, **kwargs)


def _retriever_lines(plans) -> dict[str, str]:
    return {key: spec.command_line for key, plan in plans for spec in plan.services if spec.name == "retriever"}


def test_on_a_gpu_machine_every_stage_serves_its_retriever_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "nvidia_gpu_present", lambda: True)
    lines = _retriever_lines(all_plans(_evolve(tmp_path)))
    assert set(lines) == {"iter1/challenger", "iter1/gen-data", "iter1/solver"}
    assert all("--device cuda" in line for line in lines.values()), lines


def test_without_a_gpu_auto_stays_on_the_cpu_and_the_option_wins_either_way(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "nvidia_gpu_present", lambda: False)
    assert all("--device cpu" in line for line in _retriever_lines(all_plans(_evolve(tmp_path))).values())
    monkeypatch.setattr(base, "nvidia_gpu_present", lambda: True)
    forced = _retriever_lines(all_plans(_evolve(tmp_path, retriever_device="cpu")))
    assert forced and all("--device cpu" in line for line in forced.values())
    # a retriever at --retriever-url is someone else's: nothing is started and nothing is counted here
    elsewhere = _evolve(tmp_path, retriever_url="http://10.0.0.9:8000/retrieve")
    assert not _retriever_lines(all_plans(elsewhere))
    assert all(plan.memory is None or plan.memory.retriever is None for _, plan in all_plans(elsewhere))


def test_cuda_visible_devices_empty_hides_the_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpus.nvidia_gpu_present()


def test_the_retriever_is_its_own_line_and_sglang_gets_what_it_leaves(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "nvidia_gpu_present", lambda: True)
    plan = plan_challenger(ChallengerConfig(db=str(tmp_path / "db"), data_dir=str(tmp_path), logger="console",
                                            checkpoints=str(tmp_path), model="qwen2.5-3b-instruct"))
    load = plan.memory.retriever
    assert load is not None and load.encoder.name == "intfloat/e5-large-v2"

    shape = KNOWN_SHAPES["Qwen/Qwen2.5-3B-Instruct"]
    server = Engine("gen-data server", shape, 2, 0.8, 4096, dp=4)
    sized = replace(load, passages=1_000_000)
    alone = plan_memory(StageSetup("gen-data", 79.1, server=server))
    beside = plan_memory(StageSetup("gen-data", 79.1, server=server, retriever=sized))
    held = sum(t.gib for t in sized.terms())
    terms = {t.name: t.gib for t in beside.phases[0].terms}
    assert [n for n in terms if n.startswith("retriever:")] == [
        "retriever: CUDA context", "retriever: encoder weights (fp16)", "retriever: exact index",
        "retriever: largest batch"]
    assert terms["retriever: exact index"] == pytest.approx(1_000_000 * 1024 * 4 / 2**30)
    assert terms["retriever: encoder weights (fp16)"] == pytest.approx(0.62, abs=0.01)
    kv_alone = {t.name: t.gib for t in alone.phases[0].terms}["gen-data server: KV cache"]
    # SGLang sizes its pool from the memory free when it starts, after the retriever took its share
    assert terms["gen-data server: KV cache"] == pytest.approx(kv_alone - 0.8 * held)
    assert beside.peak == pytest.approx(alone.peak + 0.2 * held)


def test_an_index_over_the_cap_stays_on_the_cpu_and_is_not_counted_on_the_gpu():
    load = RetrieverLoad(ENCODER_SHAPES["intfloat/e5-large-v2"], passages=21_015_324)
    index = {t.name: t for t in load.terms()}["retriever: exact index"]
    assert index.gib == 0 and "HNSW on the CPU" in index.note


def test_preflight_sizes_the_index_from_the_store_it_will_serve(demo_db, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "nvidia_gpu_present", lambda: True)
    plan = plan_challenger(ChallengerConfig(db=str(demo_db), data_dir=str(tmp_path), logger="console",
                                            checkpoints=str(tmp_path), model="qwen2.5-3b-instruct"))
    assert plan.memory.retriever.passages is None  # planning does not open the store
    sized = with_store_size(plan.memory, plan.corpus)
    assert sized.retriever.passages > 100 and sized.retriever.encoder.name.endswith("all-MiniLM-L6-v2")
    assert with_store_size(plan.memory, plan.corpus, planned={plan.corpus[0]}).retriever.passages is None


def test_drzero_memory_shows_the_retriever(capsys):
    assert main(["memory", "--model", "qwen2.5-3b-instruct", "--stage", "solver", "--passages", "2000000"]) == 0
    out = capsys.readouterr().out
    assert "retriever: encoder weights (fp16)" in out and "2,000,000 x 1024 fp32" in out
    assert main(["memory", "--model", "qwen2.5-3b-instruct", "--stage", "solver",
                 "--retriever-device", "cpu"]) == 0
    assert "retriever:" not in capsys.readouterr().out
