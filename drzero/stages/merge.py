"""`drzero merge`: merge a stage's FSDP checkpoint into a Hugging Face model directory.

    drzero merge --stage challenger --iteration 1
    drzero merge --stage solver --iteration 1 --dry-run

verl's own model merger (``python -m verl.model_merger merge --backend fsdp``) reads the actor of
the checkpoint's latest step (or --step) and writes CHECKPOINTS/<stage>_iter<K>_hf, which the
next stage serves (gen-data the proposer, the challenger of the next iteration the solver).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from drzero.config import env_default, option
from drzero.layout import latest_step
from drzero.plan import StagePlan
from drzero.stages.base import run_stage


@dataclass(kw_only=True)
class MergeConfig:
    stage: str = option("solver", choices=["challenger", "solver"], help="which stage's checkpoint to merge")
    iteration: int = option(1, help="iteration whose checkpoint to merge")
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR",
                              help="checkpoint root ($DRZERO_CHECKPOINTS)")
    step: int | None = option(None, help="global step to merge (default: the latest)")
    dry_run: bool = option(False, help="print the merge command; run nothing")


def plan_merge(cfg: MergeConfig) -> StagePlan:
    """FSDP checkpoint -> Hugging Face directory through verl's own model merger."""
    checkpoint = Path(cfg.checkpoints).resolve() / f"{cfg.stage}_iter{cfg.iteration}"
    step = cfg.step if cfg.step is not None else latest_step(checkpoint)
    source = checkpoint / (f"global_step_{step}" if step is not None else "global_step_<latest>") / "actor"
    target = Path(cfg.checkpoints).resolve() / f"{cfg.stage}_iter{cfg.iteration}_hf"
    command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(source),
               "--target_dir", str(target)]
    return StagePlan(name=f"merge {cfg.stage} (iteration {cfg.iteration})", command=command, inputs=[checkpoint],
                     outputs=[target],
                     # the latest step exists only once the stage before has run: planned again just before
                     replan=(lambda: plan_merge(cfg)) if step is None else None)


def main(cfg: MergeConfig) -> int:
    """`drzero merge`: dry run or the real merge (drzero.stages.base.run_stage)."""
    return run_stage(plan_merge(cfg), cfg)


def plan_in_run(run, iteration: int, stage: str) -> StagePlan:
    """The merge of ``stage``'s checkpoint in iteration ``iteration`` of `drzero evolve`."""
    return plan_merge(MergeConfig(stage=stage, iteration=iteration, checkpoints=run.checkpoints))
