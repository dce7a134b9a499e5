"""The training stages as typed configs and plans: what each runs, with which services, writing what.

    drzero challenger --iteration 1 -- trainer.total_training_steps=50
    drzero solver --iteration 1
    drzero merge --stage solver --iteration 1

A stage is planned first (``plan_*``): the verl command line with every override as an absolute
path, the services it needs (retriever; SGLang serving the current solver for the proposer's
reward), its inputs and outputs. ``--dry-run`` prints the plan and the resolved config and runs
the preflight; without it ``execute`` starts the services, runs the command and checks the
outputs. Overrides after ``--`` go to verl unchanged and last, so they win.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from drzero.config import option, require
from drzero.rewards.wiring import reward_overrides
from drzero.train.layout import Layout, config_dir, env_default, latest_step
from drzero.train.registry import DEFAULT_MODEL, resolve_model

log = logging.getLogger(__name__)

CONFIG_NAME = "search_multiturn_grpo"
RETRIEVER_PORT, SGLANG_PORT = 8000, 8001


@dataclass(kw_only=True)
class StageConfig:
    """Options every training stage shares."""

    iteration: int = option(1, help="iteration of the self-evolution loop (1-based)")
    model: str = option(DEFAULT_MODEL, help="base model: a `drzero list-models` key, a hub name or a directory")
    db: str = option(env_default("DRZERO_DB", "/corpus/chromadb"), metavar="DIR",
                     help="corpus store ($DRZERO_DB)")
    data_dir: str = option(env_default("DRZERO_DATA_DIR", "/corpus/data"), metavar="DIR",
                           help="seed and solver parquet files ($DRZERO_DATA_DIR)")
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR",
                              help="checkpoints, merged models and state.json ($DRZERO_CHECKPOINTS)")
    gpus: int = option(8, help="GPUs per node")
    nnodes: int = option(1, help="nodes")
    steps: int = option(50, help="training steps per iteration (Dr. Zero: 50)")
    train_batch_size: int = option(256, help="prompts per step")
    rollout_tp: int = option(2, help="tensor parallel size of the training rollout engine")
    retriever_url: str | None = option(None, metavar="URL", help=(
        "retriever /retrieve URL; default: start `drzero serve-retriever` on :8000 for the stage"))
    logger: str = option("console,wandb", help="verl trainer loggers, comma separated")
    allow_download: bool = option(False, help="let verl and SGLang download a model that is not on disk")
    dry_run: bool = option(False, help="print the plan, the resolved config and the preflight; start nothing")
    preflight_only: bool = option(False, flag="--preflight", help="run the preflight checks only")

    overrides: list[str] = field(default_factory=list)  # Hydra overrides after `--`, passed to verl unchanged
    takes_hydra_overrides: ClassVar[bool] = False        # whether `drzero <stage> -- key=value` reaches verl

    def __post_init__(self) -> None:
        require(self.iteration >= 1, "iteration", self.iteration, "an integer >= 1")
        require(self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.train_batch_size >= 1, "train_batch_size", self.train_batch_size, "an integer >= 1")

    @property
    def layout(self) -> Layout:
        return Layout.of(self.db, self.data_dir, self.checkpoints)


@dataclass(kw_only=True)
class ChallengerConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True
    probes: int = option(5, help="solver probes per question for the difficulty reward (Dr. Zero: 5)")
    sglang_url: str | None = option(None, metavar="URL", help=(
        "SGLang server already serving the current solver; default: start one on :8001"))
    sglang_dp: int = option(4, help="data parallel size of the reward SGLang server")
    sglang_tp: int = option(2, help="tensor parallel size of the reward SGLang server")
    sglang_mem: float = option(0.5, help="--mem-fraction-static of the reward SGLang server")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.probes >= 2, "probes", self.probes, "an integer >= 2 (difficulty needs 0 < k < n)")
        require(0 < self.sglang_mem < 1, "sglang_mem", self.sglang_mem, "a fraction between 0 and 1")


@dataclass(kw_only=True)
class SolverConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True
    rollout_n: int = option(5, help="samples per prompt for GRPO (Dr. Zero: 5)")
    max_prompt_length: int = option(512, help="solver prompt budget in tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rollout_n >= 2, "rollout_n", self.rollout_n, "an integer >= 2 (GRPO needs a group)")


@dataclass(kw_only=True)
class MergeConfig:
    stage: str = option("solver", choices=["challenger", "solver"], help="which stage's checkpoint to merge")
    iteration: int = option(1, help="iteration whose checkpoint to merge")
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR",
                              help="checkpoint root ($DRZERO_CHECKPOINTS)")
    step: int | None = option(None, help="global step to merge (default: the latest)")
    dry_run: bool = option(False, help="print the merge command; run nothing")


@dataclass
class StagePlan:
    """Everything a stage will do, before it does any of it."""

    name: str
    command: list[str] | None = None                  # a subprocess (verl, the merger)
    run: Callable[[], object] | None = None           # or work done in this process (gen-data)
    env: dict[str, str] = field(default_factory=dict)
    services: list = field(default_factory=list)      # drzero.services.ServiceSpec
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    verl_overrides: list[str] | None = None           # what preflight composes
    sglang_parser: str | None = None
    sglang_gpus: tuple[int, int] | None = None        # (dp, tp) of the reward server
    done_when_outputs_exist: bool = False             # prepare-data: skip when the data is already there
    manifest: Path | None = None                      # commit marker of a set of outputs (drzero.atomic)
    run_label: str = ""                               # what ``run`` does, for dry runs

    def describe(self) -> str:
        lines = [f"stage {self.name}"]
        for spec in self.services:
            lines.append(f"  service {spec.name}: {spec.command_line}")
        if self.env:
            lines.append("  env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())))
        if self.command:
            lines.append(f"  run {shlex.join(self.command)}")
        elif self.run is not None:
            lines.append(f"  run (in process) {self.run_label or getattr(self.run, '__qualname__', self.run)}")
        lines += [f"  reads {p}" for p in self.inputs] + [f"  writes {p}" for p in self.outputs]
        return "\n".join(lines)


def verl_command(overrides: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "drzero.train.entry", f"--config-path={config_dir()}",
            f"--config-name={CONFIG_NAME}", *overrides, *extra]


def retriever_for(cfg: StageConfig) -> tuple[list, str]:
    """(services to start, URL the search tool uses)."""
    if cfg.retriever_url:
        return [], cfg.retriever_url
    from drzero.services import retriever_service

    spec = retriever_service(str(cfg.layout.db), port=RETRIEVER_PORT)
    return [spec], f"{spec.url}/retrieve"


def _common_overrides(cfg: StageConfig, model_path: str, stage: str) -> list[str]:
    layout = cfg.layout
    loggers = ",".join(x.strip() for x in cfg.logger.split(",") if x.strip())
    return [
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={config_dir() / 'search_tool_config.yaml'}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={cfg.rollout_tp}",
        f"data.train_batch_size={cfg.train_batch_size}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={min(256, cfg.train_batch_size)}",
        f"trainer.n_gpus_per_node={cfg.gpus}",
        f"trainer.nnodes={cfg.nnodes}",
        f"trainer.logger=[{loggers}]",
        f"trainer.experiment_name={stage}_iter{cfg.iteration}",
        f"trainer.default_local_dir={layout.checkpoint(stage, cfg.iteration)}",
    ]


def plan_challenger(cfg: ChallengerConfig) -> StagePlan:
    """HRPO proposer training; reward probes hit SGLang serving the current solver."""
    layout = cfg.layout
    base = resolve_model(cfg.model)
    # the current solver: the base model in iteration 1, the merged solver of the previous one after
    solver_path = str(layout.merged("solver", cfg.iteration - 1)) if cfg.iteration > 1 else base.path
    services, retriever_url = retriever_for(cfg)
    if cfg.sglang_url:
        sglang_url = cfg.sglang_url
    else:
        from drzero.services import sglang_service

        spec = sglang_service(solver_path, port=SGLANG_PORT, dp=cfg.sglang_dp, tp=cfg.sglang_tp,
                              mem_fraction=cfg.sglang_mem, tool_call_parser=base.tool_call_parser,
                              served_model_name="solver")
        services.append(spec)
        sglang_url = spec.url
    overrides = _common_overrides(cfg, base.path, "challenger") + [
        "algorithm.adv_estimator=hrpo",
        "actor_rollout_ref.rollout.n=1",  # HRPO: one sample per prompt, groups are hop counts
        f"data.train_files={layout.seeds}",
        f"data.val_files={layout.seeds_val}",
        # the proposer continues across iterations: iteration k ends at step 50k
        f"trainer.total_training_steps={cfg.steps * cfg.iteration}",
    ]
    own = layout.checkpoint("challenger", cfg.iteration)
    previous = layout.checkpoint("challenger", cfg.iteration - 1)
    if cfg.iteration > 1 and latest_step(own) is None:
        step = latest_step(previous) or cfg.steps * (cfg.iteration - 1)
        overrides += ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={previous}/global_step_{step}"]
    else:
        overrides.append("trainer.resume_mode=auto")  # picks up this iteration's own checkpoint after a crash
    overrides += reward_overrides("challenger", {"base_url": sglang_url, "model_name": "solver", "n": cfg.probes,
                                                 "retriever_url": retriever_url})
    inputs = [layout.seeds, layout.seeds_val] + ([layout.merged("solver", cfg.iteration - 1)] if cfg.iteration > 1
                                                 else [])
    return StagePlan(name=f"challenger (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env={"DRZERO_RETRIEVER_URL": retriever_url}, services=services, inputs=inputs,
                     outputs=[own], verl_overrides=overrides + cfg.overrides,
                     sglang_parser=base.tool_call_parser, sglang_gpus=(cfg.sglang_dp, cfg.sglang_tp))


def plan_solver(cfg: SolverConfig) -> StagePlan:
    """GRPO solver training with the exact-match reward, from the previous solver or the base model."""
    layout = cfg.layout
    base = resolve_model(cfg.model)
    start = str(layout.merged("solver", cfg.iteration - 1)) if cfg.iteration > 1 else base.path
    services, retriever_url = retriever_for(cfg)
    overrides = _common_overrides(cfg, start, "solver") + [
        "algorithm.adv_estimator=grpo",
        f"actor_rollout_ref.rollout.n={cfg.rollout_n}",
        f"data.max_prompt_length={cfg.max_prompt_length}",
        f"data.train_files={layout.solver_data(cfg.iteration)}",
        f"data.val_files={layout.solver_val(cfg.iteration)}",
        f"trainer.total_training_steps={cfg.steps}",
        "trainer.resume_mode=auto",
    ] + reward_overrides("solver")
    inputs = [layout.solver_data(cfg.iteration), layout.solver_val(cfg.iteration)]
    return StagePlan(name=f"solver (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env={"DRZERO_RETRIEVER_URL": retriever_url}, services=services, inputs=inputs,
                     outputs=[layout.checkpoint("solver", cfg.iteration)], verl_overrides=overrides + cfg.overrides)


def plan_merge(cfg: MergeConfig) -> StagePlan:
    """FSDP checkpoint -> Hugging Face directory through verl's own model merger."""
    checkpoint = Path(cfg.checkpoints).resolve() / f"{cfg.stage}_iter{cfg.iteration}"
    step = cfg.step if cfg.step is not None else latest_step(checkpoint)
    source = checkpoint / (f"global_step_{step}" if step is not None else "global_step_<latest>") / "actor"
    target = Path(cfg.checkpoints).resolve() / f"{cfg.stage}_iter{cfg.iteration}_hf"
    command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(source),
               "--target_dir", str(target)]
    return StagePlan(name=f"merge {cfg.stage} (iteration {cfg.iteration})", command=command, inputs=[checkpoint],
                     outputs=[target])


def resolved_config(plan: StagePlan) -> str:
    """verl's ``--cfg job`` for the plan, through our own entry module."""
    result = subprocess.run(plan.command + ["--cfg", "job"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"verl could not compose the config for {plan.name}:\n{result.stderr[-2000:]}")
    return result.stdout


def execute(plan: StagePlan) -> None:
    """Start the services, run the stage, stop the services; fail unless every output exists."""
    import os

    from drzero.services import Supervisor

    missing = [p for p in plan.inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{plan.name} needs {', '.join(map(str, missing))}, which no stage has produced; "
                                f"run the stage that writes it first (drzero evolve runs them in order).")
    with Supervisor(plan.services) as supervisor:
        if plan.command:
            log.info("running %s: %s", plan.name, shlex.join(plan.command))
            process = subprocess.Popen(plan.command, env={**os.environ, **plan.env})
            try:
                while process.poll() is None:
                    try:
                        process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        supervisor.check_alive()
            finally:
                if process.poll() is None:
                    process.terminate()
                    process.wait(timeout=60)
            if process.returncode != 0:
                raise RuntimeError(f"{plan.name} failed with exit code {process.returncode}; its log is above. "
                                   f"Run the same command again to resume from the last checkpoint.")
        elif plan.run is not None:
            plan.run()
    missing = [p for p in plan.outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"{plan.name} finished but did not write {', '.join(map(str, missing))}.")
