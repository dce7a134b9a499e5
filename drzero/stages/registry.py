"""The stage registry: every stage of the loop, once, for the CLI, `evolve`, the memory plan and the backends.

    from drzero.stages.registry import STAGES
    STAGES["solver"].config, STAGES["solver"].main(cfg), STAGES["solver"].plan_in_run(run, iteration)
    STAGES["solver"].gpu, STAGES["solver"].takes_overrides, STAGES["solver"].hours

A stage is a `drzero` command and a module of drzero.stages that owns its config, its plan and
its run. What the CLI needs (the config, the handler), what `drzero evolve` needs (the plan of
the stage inside a run) and what a backend needs to place it (GPUs or not, SGLang servers or
not, Hydra overrides for verl or not, how long it usually runs) is declared here and nowhere
else. A new stage: a module with ``Config``, ``main`` and ``plan_in_run``, one line here, and its
place in drzero.pipeline's iteration if `evolve` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from drzero.stages import challenger, evaluate, gen_data, merge, prepare_data, solver


@dataclass(frozen=True)
class Stage:
    """One stage of the loop, as the CLI and every backend see it."""

    name: str                    # the `drzero` command
    summary: str                 # one line for `drzero --help`
    module: ModuleType | None    # the stage's module: its config, ``main`` and ``plan_in_run``
    config: type | None          # its typed config: `drzero <name> --help` lists its fields
    gpu: bool                    # runs on GPUs (a backend gives it the node's GPUs)
    sglang: bool = False         # starts SGLang servers whose dp x tp fill the node's GPUs
    takes_overrides: bool = False  # Hydra overrides after `--` go to verl
    sized_by_gpus: bool = False  # takes --gpus / --gpu (and SGLang's dp x tp off a full node)
    logs_to_wandb: bool = False  # a verl trainer that reports to Weights & Biases
    hours: float = 1.0           # rough wall-clock hours on 8 x H100 (cost estimates; Dr. Zero: ~a day for 3 iterations)
    check: tuple[str, ...] = ()  # the `drzero` argv prefix that checks it before a GPU starts (() = none)

    @property
    def main(self) -> Callable[..., int]:
        """The command: config -> exit status."""
        return self.module.main

    @property
    def plan_in_run(self) -> Callable:
        """The stage's plan inside `drzero evolve`: (run config, iteration, ...) -> StagePlan."""
        return self.module.plan_in_run

    @property
    def function(self) -> str:
        """Its name as a Python identifier (a Modal Function's name)."""
        return self.name.replace("-", "_")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare-data", "write the proposer's seed parquet (train, validation, manifest)",
          prepare_data, prepare_data.PrepareDataConfig, gpu=False, hours=0.25),
    Stage("challenger", "train the proposer with HRPO for one iteration (verl)",
          challenger, challenger.ChallengerConfig, gpu=True, sglang=True, takes_overrides=True, sized_by_gpus=True,
          logs_to_wandb=True, hours=4.0, check=("preflight", "challenger")),
    Stage("gen-data", "sample questions from the merged proposer into solver data",
          gen_data, gen_data.GenDataConfig, gpu=True, sglang=True, sized_by_gpus=True, hours=1.0,
          check=("gen-data", "--dry-run")),
    Stage("solver", "train the solver with GRPO for one iteration (verl)",
          solver, solver.SolverConfig, gpu=True, takes_overrides=True, sized_by_gpus=True, logs_to_wandb=True,
          hours=2.5, check=("preflight", "solver")),
    Stage("merge", "merge an FSDP checkpoint into a Hugging Face model directory",
          merge, merge.MergeConfig, gpu=True, hours=0.25, check=("merge", "--dry-run")),
    Stage("evaluate", "answer a QA set or the papers' seven benchmarks with the solver and search: EM, F1, cover-EM",
          evaluate, evaluate.EvaluateConfig, gpu=True, hours=0.5),
]}

# `drzero evolve` (alias `train`): every stage in order. It starts SGLang and passes overrides to verl because its
# stages do; on 8 x H100, Dr. Zero's three iterations take about a day.
EVOLVE = Stage("evolve", "run the whole loop, resumable: prepare-data, then challenger/gen-data/solver per iteration",
               None, None, gpu=True, sglang=True, takes_overrides=True, sized_by_gpus=True, logs_to_wandb=True,
               hours=24.0, check=("evolve", "--dry-run"))
