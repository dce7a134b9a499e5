"""`drzero solver`: train the solver with GRPO for one iteration (verl) on the questions gen-data wrote.

    drzero solver --iteration 1
    drzero solver --iteration 1 --dry-run           # the plan and verl's resolved config, nothing started
    drzero preflight solver --iteration 1           # the checks alone

The solver starts from the base model in iteration 1 and from the merged solver of the iteration
before after that; --rollout-n samples per question form a GRPO group, each rewarded by exact
match of its last answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from drzero.config import option, require
from drzero.data.gen_data import solver_set
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.rewards.wiring import reward_overrides
from drzero.rollout.render import SOLVER_PROMPT_LENGTH
from drzero.stages.base import StageConfig, on_cluster, run_stage, same_run
from drzero.verl.overrides import engine_option, verl_command


@dataclass(kw_only=True)
class SolverConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True
    rollout_n: int = option(5, help="samples per prompt for GRPO (Dr. Zero: 5)")
    max_prompt_length: int = option(SOLVER_PROMPT_LENGTH, help="solver prompt budget in tokens")
    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rollout_n >= 2, "rollout_n", self.rollout_n, "an integer >= 2 (GRPO needs a group)")


def plan_solver(cfg: SolverConfig) -> StagePlan:
    """GRPO solver training with the exact-match reward, from the previous solver or the base model."""
    layout = cfg.layout
    base = resolve_model(cfg.model)
    start = str(layout.merged("solver", cfg.iteration - 1)) if cfg.iteration > 1 else base.path
    services, retriever_url = cfg.retriever()
    overrides = cfg.verl_overrides(start, "solver") + [
        "algorithm.adv_estimator=grpo",
        f"actor_rollout_ref.rollout.n={cfg.rollout_n}",
        f"data.max_prompt_length={cfg.max_prompt_length}",
        f"data.train_files={layout.solver_data(cfg.iteration)}",
        f"data.val_files={layout.solver_val(cfg.iteration)}",
        f"trainer.total_training_steps={cfg.steps}",
        "trainer.resume_mode=auto",
    ] + reward_overrides("solver")
    inputs = [layout.solver_data(cfg.iteration), layout.solver_val(cfg.iteration)]
    cluster_overrides, env = cfg.cluster_env({"DRZERO_RETRIEVER_URL": retriever_url})
    overrides += cluster_overrides
    return StagePlan(name=f"solver (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env=env, services=services, inputs=inputs,
                     outputs=[layout.checkpoint("solver", cfg.iteration)], verl_overrides=overrides + cfg.overrides,
                     reads_sets=(solver_set(layout, cfg.iteration),),
                     memory=cfg.placement(), corpus=cfg.corpus())


def main(cfg: SolverConfig) -> int:
    """`drzero solver`: dry run, preflight or the real run (drzero.stages.base.run_stage)."""
    return run_stage(plan_solver(on_cluster(cfg)), cfg)


def plan_in_run(run, iteration: int) -> StagePlan:
    """This stage in iteration ``iteration`` of `drzero evolve` (``run``: its drzero.pipeline.EvolveConfig)."""
    return plan_solver(same_run(run, SolverConfig, iteration=iteration))
