"""Will a stage fit its GPUs? Its composed verl config, where it runs -> per-GPU memory of every phase.

    ok, line, skipped = memory_check(composed_config, placement, "solver")   # every stage's preflight

``drzero.models.memory`` estimates every phase on one GPU from verl's composed config: the reward
or gen-data SGLang server, verl's rollout engine (created after the FSDP actor), the actor's
update; ``smallest_fix`` names the smallest change that makes a plan fit. `drzero memory`
(drzero.tools.memory) prints the same for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import yaml

from drzero.models.memory import Engine, Placement, StageMemory, StageSetup, TrainSetup, plan_memory
from drzero.models import registry
from drzero.models.shapes import GPU_MEMORY_GIB


def _get(config, key: str, default=None):
    # lazy: omegaconf comes with the train extra; the CPU retriever image runs `drzero` without it
    from omegaconf import OmegaConf

    value = OmegaConf.select(config, key, default=default)
    return default if value is None else value


def stage_setup(config, placement: Placement, stage: str) -> StageSetup:
    """verl's composed config + where the stage runs -> what shares one GPU."""
    shape = placement.shape
    sequence = int(_get(config, "data.max_prompt_length")) + int(_get(config, "data.max_response_length"))
    actor = "actor_rollout_ref.actor."
    dynamic = bool(_get(config, actor + "use_dynamic_bsz", False))
    gpus, nodes = int(_get(config, "trainer.n_gpus_per_node")), int(_get(config, "trainer.nnodes"))
    train = TrainSetup(
        shape, world=gpus * nodes, micro_batch=int(_get(config, actor + "ppo_micro_batch_size_per_gpu", 1)),
        sequence_tokens=sequence, max_tokens=int(_get(config, actor + "ppo_max_token_len_per_gpu")) if dynamic else None,
        checkpointing=bool(_get(config, "actor_rollout_ref.model.enable_gradient_checkpointing", False)),
        strategy=str(_get(config, actor + "strategy", "fsdp")),
        param_offload=bool(_get(config, actor + "fsdp_config.param_offload", False)),
        optimizer_offload=bool(_get(config, actor + "fsdp_config.optimizer_offload", False)),
        offload_policy=bool(_get(config, actor + "fsdp_config.offload_policy", False)),
        lora_rank=int(_get(config, "actor_rollout_ref.model.lora_rank", 0)),
        entropy=bool(_get(config, actor + "calculate_entropy", False)) or float(_get(config, actor + "entropy_coeff",
                                                                                      0)) != 0)
    rollout = Engine("verl's rollout", shape, int(_get(config, "actor_rollout_ref.rollout.tensor_model_parallel_size")),
                     float(_get(config, "actor_rollout_ref.rollout.gpu_memory_utilization")), sequence)
    server = None
    if placement.server is not None:
        role, dp, tp, fraction = placement.server
        server = Engine(role, shape, tp, fraction, sequence, dp=dp)
    sleeps = bool(_get(config, "actor_rollout_ref.rollout.free_cache_engine", True))
    return StageSetup(stage, placement.capacity, placement.gpu, gpus, nodes, train, rollout, server, sleeps,
                      retriever=placement.retriever)


def with_overrides(config, overrides: list[str]):
    """A copy of the composed config with ``key=value`` overrides set (no Hydra composition)."""
    from omegaconf import OmegaConf  # lazy: see _get

    copy = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    for override in overrides:
        key, value = override.lstrip("+").split("=", 1)
        OmegaConf.update(copy, key, yaml.safe_load(value), force_add=True)
    return copy


@dataclass(frozen=True)
class Change:
    """One thing a user can change, as typed: Hydra overrides after `--`, and/or the reward server's size."""

    overrides: tuple[str, ...] = ()
    server: tuple[int, int, float] | None = None   # --sglang-dp, --sglang-tp, --sglang-mem
    rollout_tp: int | None = None

    def __add__(self, other: "Change") -> "Change":
        return Change(self.overrides + other.overrides, other.server or self.server, other.rollout_tp or self.rollout_tp)

    def describe(self) -> str:
        parts = []
        if self.rollout_tp:
            parts.append(f"--rollout-tp {self.rollout_tp}")
        if self.server:
            parts.append("--sglang-dp {} --sglang-tp {} --sglang-mem {:g}".format(*self.server))
        if self.overrides:
            parts.append("-- " + " ".join(self.overrides))
        return " ".join(parts)


OFFLOAD = Change(registry.OFFLOAD)
CPU_POLICY = Change(registry.CPU_OFFLOAD_POLICY)
MICRO_1 = Change(("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",))
TP4 = Change(rollout_tp=4)
SERVER_LOW = Change(server=(4, 2, 0.3))
SERVER_WIDE = Change(server=(2, 4, 0.3))
# least invasive first: single switches, then the same switches together, then host-memory training
CHANGES = [Change(("actor_rollout_ref.actor.fsdp_config.optimizer_offload=True",)), OFFLOAD, TP4, SERVER_LOW,
           MICRO_1, OFFLOAD + TP4, OFFLOAD + SERVER_LOW, OFFLOAD + TP4 + SERVER_WIDE,
           OFFLOAD + TP4 + SERVER_WIDE + MICRO_1, CPU_POLICY + TP4 + SERVER_WIDE,
           CPU_POLICY + TP4 + SERVER_WIDE + Change(("actor_rollout_ref.rollout.gpu_memory_utilization=0.7",))]


def _apply(config, placement: Placement, change: Change, stage: str) -> StageMemory:
    overrides = list(change.overrides)
    if change.rollout_tp:
        overrides.append(f"actor_rollout_ref.rollout.tensor_model_parallel_size={change.rollout_tp}")
    if change.server and placement.server:
        placement = replace(placement, server=(placement.server[0], *change.server))
    return plan_memory(stage_setup(with_overrides(config, overrides), placement, stage))


def smallest_fix(config, placement: Placement, stage: str) -> str:
    """The first change (least invasive first) that makes every phase fit, or what would."""
    gpus = int(_get(config, "trainer.n_gpus_per_node"))
    tried = set()
    for change in CHANGES:
        if placement.server is None:  # no server beside the trainer: only the rest of the change applies
            change = replace(change, server=None)
        if ((change.server and change.server[0] * change.server[1] != gpus) or change in tried
                or (change.rollout_tp and gpus % change.rollout_tp)):
            continue
        tried.add(change)
        if _apply(config, placement, change, stage).fits:
            return change.describe()
    h200 = replace(placement, gpu="H200", capacity=GPU_MEMORY_GIB["H200"])
    if placement.capacity < h200.capacity and any(_apply(config, h200, c, stage).fits for c in CHANGES[:9]):
        return f"none on {gpus} x {placement.gpu}; 8 x H200 fit (--gpu H200 picks the model's H200 recipe)"
    nodes = int(_get(config, "trainer.nnodes"))
    wider = with_overrides(config, [f"trainer.nnodes={2 * nodes}"])
    if any(_apply(wider, placement, c, stage).fits for c in CHANGES[:9]):
        return (f"none on {nodes} node(s); {2 * nodes} nodes fit (--nnodes {2 * nodes} on a stage, "
                f"--nodes {2 * nodes} for drzero memory)")
    return "none that drzero knows: a smaller model or larger GPUs"


def memory_check(config, placement: Placement | None, stage: str) -> tuple[bool, str, bool]:
    """(fits, one line for the preflight, skipped)."""
    if placement is None or placement.shape is None:
        return True, "the model's shape is unknown (no local config.json, not in drzero's table)", True
    memory = plan_memory(stage_setup(config, placement, stage))
    if memory.fits:
        tight = [n for n in memory.notes if "tight" in n]
        return True, (f"peak {memory.peak:.1f} of {placement.capacity:.1f} GiB per {placement.gpu}"
                      + (f"; {tight[0]}" if tight else "")), False
    return False, (f"{memory.problems[0]}; smallest change that fits: {smallest_fix(config, placement, stage)} "
                   f"(`drzero memory` shows every term)"), False
