"""`drzero memory`: will the model fit the GPUs? One table per stage, before any GPU starts.

    drzero memory --model qwen3-32b --gpus 8 --gpu H100
    drzero memory --model qwen3-8b --gpu A100-40GB --stage solver --rollout-tp 4 -- actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1
    drzero memory --model qwen3-14b --gpu-mem 44 --no-recipe

Each stage is planned as it would run (the model's recipe for the GPU, then your ``--``
overrides), verl's config is composed as the stage composes it, and ``drzero.models.memory``
estimates every phase on one GPU: the reward or gen-data SGLang server, verl's rollout engine
(created after the FSDP actor), the actor's update. Exit status 1 when a stage does not fit;
the same check runs in every training stage's preflight, which names the smallest change that
makes the plan fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from drzero.config import env_default, option, require
from drzero.models.files import ModelNotFound
from drzero.models.memory import Engine, RetrieverLoad, StageMemory, StageSetup, plan_memory, render
from drzero.models.registry import DEFAULT_MODEL, model_shape
from drzero.models.shapes import DEFAULT_ENCODER, ENCODER_SHAPES, GPU_MEMORY_GIB
from drzero.stages.challenger import ChallengerConfig, plan_challenger
from drzero.stages.gen_data import PROPOSER_SERVER
from drzero.stages.solver import SolverConfig, plan_solver
from drzero.verl.memory_plan import stage_setup
from drzero.verl.overrides import compose

STAGES = ("challenger", "solver", "gen-data", "evaluate")


@dataclass(kw_only=True)
class MemoryConfig:
    takes_hydra_overrides: ClassVar[bool] = True
    model: str = option(DEFAULT_MODEL, help="a `drzero list-models` key, a hub name or a directory with config.json")
    gpus: int = option(8, help="GPUs per node")
    nodes: int = option(1, help="nodes")
    gpu: str = option(env_default("DRZERO_GPU", "H100"), choices=sorted(GPU_MEMORY_GIB), help=(
        "GPU kind ($DRZERO_GPU); picks the model's recipe"))
    gpu_mem: float | None = option(None, metavar="GIB", help="memory per GPU in GiB instead of --gpu's")
    stage: str = option("all", choices=["all", *STAGES], help="which stage to plan")
    use_recipe: bool = option(True, flag="--recipe", help="apply the model's recipe for --gpu; --no-recipe: the "
                                                          "shipped config (config/search_multiturn_grpo.yaml)")
    rollout_tp: int | None = option(None, help="as `drzero challenger --rollout-tp`")
    sglang_dp: int | None = option(None, help="as `drzero challenger --sglang-dp` (the reward server)")
    sglang_tp: int | None = option(None, help="as `drzero challenger --sglang-tp`")
    sglang_mem: float | None = option(None, help="as `drzero challenger --sglang-mem`")
    retriever_device: str = option("cuda", choices=["cuda", "cpu"], help=(
        "where each stage's retriever runs: cuda = on GPU 0, counted here; cpu = not on a GPU"))
    embedder: str = option(DEFAULT_ENCODER, choices=sorted(ENCODER_SHAPES), help="the retriever's encoder")
    passages: int | None = option(None, help=(
        "passages in the corpus: sizes the retriever's exact index on the GPU (default: unknown, not counted; a "
        "stage's preflight reads it from the store)"))
    vectors_in_side_file: bool = option(False, help=(
        "the corpus keeps its vectors in a side file (`drzero adopt --faiss-index`, `drzero ingest --vectors "
        "side-file`): its exact index is always on "
        "the GPU, fp16 unless --retriever-precision says fp32"))
    retriever_precision: str | None = option(None, choices=["fp32", "fp16"], help=(
        "as `drzero serve-retriever --exact-precision` (default: fp16 for a side file, fp32 otherwise)"))
    retriever_shards: int = option(1, help=(
        "GPUs the exact index is split over (`serve-retriever --exact-devices`): GPU 0 holds one shard"))
    overrides: list[str] = field(default_factory=list)  # Hydra overrides after `--`, as the stages take them

    def __post_init__(self) -> None:
        require(self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        require(self.nodes >= 1, "nodes", self.nodes, "an integer >= 1")
        require(self.gpu_mem is None or self.gpu_mem > 0, "gpu_mem", self.gpu_mem, "GiB per GPU, > 0")
        require(self.passages is None or self.passages >= 0, "passages", self.passages, "an integer >= 0")
        require(self.retriever_shards >= 1, "retriever_shards", self.retriever_shards, "an integer >= 1")

    def retriever(self) -> RetrieverLoad | None:
        if self.retriever_device != "cuda":
            return None
        return RetrieverLoad(ENCODER_SHAPES[self.embedder], passages=self.passages,
                             side_file=self.vectors_in_side_file, precision=self.retriever_precision,
                             shards=self.retriever_shards)


def stage_memories(cfg: MemoryConfig) -> list[StageMemory]:
    """Plan each asked-for stage as `drzero <stage>` would and estimate its memory."""
    shape = model_shape(cfg.model)
    if shape is None:
        raise ModelNotFound(f"--model {cfg.model}: drzero knows no shape for it; pass a directory holding its "
                            f"config.json, or one of `drzero list-models`")
    common = dict(model=cfg.model, gpus=cfg.gpus, nnodes=cfg.nodes, gpu=cfg.gpu, gpu_mem=cfg.gpu_mem,
                  use_recipe=cfg.use_recipe, rollout_tp=cfg.rollout_tp, overrides=list(cfg.overrides), logger="console",
                  retriever_device=cfg.retriever_device)
    server = dict(sglang_dp=cfg.sglang_dp, sglang_tp=cfg.sglang_tp, sglang_mem=cfg.sglang_mem)
    plans = {"challenger": plan_challenger(ChallengerConfig(**common, **server)),
             "solver": plan_solver(SolverConfig(**common))}
    memories = []
    composed: dict[str, object] = {}
    for stage in STAGES:
        if cfg.stage not in ("all", stage):
            continue
        source = stage if stage in plans else "challenger"   # gen-data and evaluate use the proposer's budgets
        plan = plans[source]
        if source not in composed:
            composed[source] = compose(plan.verl_overrides)
        placement = replace(plan.memory, retriever=cfg.retriever())
        if stage in plans:
            memories.append(plan_memory(stage_setup(composed[stage], placement, stage)))
            continue
        sequence = stage_setup(composed[source], placement, stage).rollout.sequence_tokens
        dp, tp, fraction = PROPOSER_SERVER  # gen-data and evaluate under `drzero evolve`
        server = Engine(f"{stage} server", shape, tp, fraction, sequence, dp=dp)
        memories.append(plan_memory(StageSetup(stage, placement.capacity, placement.gpu, cfg.gpus, cfg.nodes,
                                               server=server, retriever=placement.retriever)))
    return memories


def run_memory(cfg: MemoryConfig, print_fn=print) -> int:
    memories = stage_memories(cfg)
    for memory in memories:
        print_fn(render(memory) + "\n")
    failing = [m.setup.stage for m in memories if not m.fits]
    gpu = memories[0].setup.gpu if memories else cfg.gpu
    print_fn(f"{cfg.model} on {cfg.nodes} x {cfg.gpus} x {gpu}: "
             + (f"does not fit: {', '.join(failing)}" if failing else "every stage fits"))
    return 1 if failing else 0
