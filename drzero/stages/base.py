"""What every stage shares: the training stages' options, their services, and the one runner.

    drzero challenger --iteration 1 --dry-run     # any stage: plan, preflight, nothing started
    drzero solver --iteration 1                   # or: preflight, then services + the stage + outputs checked

A stage module (drzero.stages.challenger, .solver, ...) owns its config and turns it into a
``StagePlan`` (drzero.plan): the command with every override as an absolute path, the services
it needs (retriever; SGLang serving the current solver for the proposer's reward), its inputs and
outputs. ``run_stage`` is the one runner behind every `drzero STAGE` command: dry run, preflight
or real run; ``execute`` starts the services, runs the stage, stops the services and checks the
outputs (`drzero evolve` calls it for each stage in turn). The model's recipe for ``--gpu``
(``drzero list-models --json``; ``drzero memory`` shows what it buys) comes before the stage's own
overrides; overrides after ``--`` go to verl unchanged and last, so they win.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from drzero.checks import report
from drzero.cluster.ray import RAY_ADDRESS_ENV, attach, stage_cluster_checks, worker_env_overrides
from drzero.config import ClusterOptions, ConfigError, RunOptions, option, require
from drzero.layout import Layout, checkpointed_step, config_dir
from drzero.models.memory import Placement, RetrieverLoad
from drzero.models.registry import DEFAULT_MODEL, Recipe, model_shape, resolve_model, thinking_switch
from drzero.models.shapes import DEFAULT_ENCODER, ENCODER_SHAPES, GPU_MEMORY_GIB
from drzero.plan import StagePlan
from drzero.gpus import nvidia_gpu_present
from drzero.services.specs import RETRIEVER_DEVICES, retriever_service
from drzero.services.supervisor import Supervisor
from drzero.verl.overrides import ROLLOUT_TP, engine_overrides, thinking_overrides
from drzero.verl.preflight import machine_check, run_checks

log = logging.getLogger(__name__)

RETRIEVER_PORT, SGLANG_PORT = 8000, 8001


@dataclass(kw_only=True)
class StageConfig(RunOptions, ClusterOptions):
    """Options every training stage shares."""

    iteration: int = option(1, help="iteration of the self-evolution loop (1-based)")
    model: str = option(DEFAULT_MODEL, help="base model: a `drzero list-models` key, a hub name or a directory")
    steps: int = option(50, help="training steps per iteration (Dr. Zero: 50)")
    train_batch_size: int = option(256, help="prompts per step")
    rollout_tp: int | None = option(None, help=f"tensor parallel size of the training rollout engine (default: the "
                                               f"model's recipe, else {ROLLOUT_TP})")
    gpu: str = option(os.environ.get("DRZERO_GPU", "H100"), choices=sorted(GPU_MEMORY_GIB), help=(
        "GPU kind: picks the model's recipe and sizes the memory check ($DRZERO_GPU)"))
    gpu_mem: float | None = option(None, metavar="GIB", help="memory per GPU in GiB, for a GPU not in --gpu's list")
    use_recipe: bool = option(True, flag="--recipe", help=(
        "apply the model's recipe for --gpu (offload, tp, memory fractions); --no-recipe: the shipped config"))
    retriever_url: str | None = option(None, metavar="URL", help=(
        "retriever /retrieve URL; default: start `drzero serve-retriever` on :8000 for the stage"))
    retriever_device: str = option("auto", choices=list(RETRIEVER_DEVICES), help=(
        "where the stage's own retriever encodes and searches: auto = GPU 0 (fp16, counted by the memory plan) "
        "when this machine has an NVIDIA GPU, else the CPU"))
    logger: str = option("console,wandb", help="verl trainer loggers, comma separated")
    thinking: bool = option(False, help=(
        "turn Qwen3 thinking on (off by default; Qwen2.5 has none): verl and every probe pass "
        "enable_thinking=true and the response budget rises to 5,632 tokens"))
    allow_download: bool = option(False, help="let verl and SGLang download a model that is not on disk")
    dry_run: bool = option(False, help="print the plan, the resolved config and the preflight; start nothing")
    preflight_only: bool = option(False, flag="--preflight", help="run the preflight checks only")

    overrides: list[str] = field(default_factory=list)  # Hydra overrides after `--`, passed to verl unchanged
    takes_hydra_overrides: ClassVar[bool] = False        # whether `drzero <stage> -- key=value` reaches verl
    engine: ClassVar[str] = "sglang"                     # the rollout engine; a stage with --engine overrides it

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.iteration >= 1, "iteration", self.iteration, "an integer >= 1")
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.train_batch_size >= 1, "train_batch_size", self.train_batch_size, "an integer >= 1")
        require(self.gpu in GPU_MEMORY_GIB, "gpu", self.gpu, f"one of {sorted(GPU_MEMORY_GIB)} (or --gpu-mem GIB)")
        require(self.gpu_mem is None or self.gpu_mem > 0, "gpu_mem", self.gpu_mem, "GiB per GPU, > 0")

    @property
    def layout(self) -> Layout:
        return Layout.of(self.db, self.data_dir, self.checkpoints)

    def recipe(self) -> Recipe:
        """The model's settings for ``gpus`` x ``gpu`` from the registry; none for other models."""
        entry = resolve_model(self.model).entry if self.use_recipe else None
        return (entry.recipe(self.capacity, self.gpus, self.nnodes) if entry else None) or Recipe()

    @property
    def capacity(self) -> float:
        return self.gpu_mem or GPU_MEMORY_GIB[self.gpu]

    def thinking_setting(self) -> bool | None:
        """--thinking for a model whose template has the switch; None for one without (refused when on)."""
        return thinking_switch(self.model, self.thinking)

    def placement(self, server: tuple[str, int, int, float] | None = None) -> Placement:
        """What the preflight's memory check needs beyond verl's config."""
        try:
            shape = model_shape(self.model)
        except (OSError, ValueError):  # a config.json that is not a decoder drzero knows: unchecked
            shape = None
        return Placement(f"{self.gpu_mem:g}-GiB GPU" if self.gpu_mem else self.gpu, self.capacity, shape, server,
                         retriever=self.retriever_load())

    def verl_overrides(self, model_path: str, stage: str) -> list[str]:
        """The overrides every verl stage shares: model, tool and agent loop, batch, GPUs, loggers, checkpoints,
        then the model's recipe, the thinking switch and the engine's own keys."""
        loggers = ",".join(x.strip() for x in self.logger.split(",") if x.strip())
        recipe = self.recipe()
        return [
            f"actor_rollout_ref.model.path={model_path}",
            f"actor_rollout_ref.rollout.multi_turn.tool_config_path={config_dir() / 'search_tool_config.yaml'}",
            # verl's tool agent loop, recording episodes the response budget ended (drzero.rollout.agent_loop)
            f"actor_rollout_ref.rollout.agent.agent_loop_config_path={config_dir() / 'agent_loop_config.yaml'}",
            # the hf engine serves each GPU's rollouts on that GPU's trainer: no tensor parallelism
            f"actor_rollout_ref.rollout.tensor_model_parallel_size="
            f"{1 if self.engine == 'hf' else self.rollout_tp or recipe.rollout_tp or ROLLOUT_TP}",
            f"data.train_batch_size={self.train_batch_size}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={min(256, self.train_batch_size)}",
            f"trainer.n_gpus_per_node={self.gpus}",
            f"trainer.nnodes={self.nnodes}",
            f"trainer.logger=[{loggers}]",
            f"trainer.experiment_name={stage}_iter{self.iteration}",
            f"trainer.default_local_dir={self.layout.checkpoint(stage, self.iteration)}",
            *recipe.overrides,  # the model's settings for these GPUs; `--` overrides come later and win
        ] + thinking_overrides(self.thinking_setting()) + engine_overrides(self.engine)

    def listen_host(self) -> str:
        """Where the stage's own servers listen: loopback on one node; this node's cluster address on several,
        so that verl's workers on the other nodes reach them."""
        return self.services_host or "127.0.0.1"

    def retriever(self) -> tuple[list, str]:
        """(services to start, URL the search tool uses)."""
        if self.retriever_url:
            return [], self.retriever_url
        spec = retriever_service(str(self.layout.db), port=RETRIEVER_PORT, collection=self.collection,
                                 host=self.listen_host(), device=self.retriever_on())
        return [spec], f"{spec.url}/retrieve"

    def retriever_on(self) -> str:
        """The device of the stage's own retriever: --retriever-device, with auto resolved on this machine."""
        if self.retriever_device != "auto":
            return self.retriever_device
        return "cuda" if nvidia_gpu_present() else "cpu"

    def retriever_load(self) -> RetrieverLoad | None:
        """What the stage's own retriever holds on GPU 0, for the memory plan; the store's size is read by the
        preflight (planning does not open the store)."""
        if self.retriever_url or self.retriever_on() != "cuda":
            return None
        return RetrieverLoad(ENCODER_SHAPES[DEFAULT_ENCODER])

    def corpus(self) -> tuple[Path | str, str] | None:
        """(store, collection) the stage's own retriever will serve; None when it uses one at --retriever-url."""
        return None if self.retriever_url else (self.layout.db, self.collection)

    def cluster_env(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """(verl overrides, verl's environment) on a Ray cluster: ``env`` handed to every Ray worker through
        runtime_env (``ray start`` workers do not inherit ours), and RAY_ADDRESS for verl's ``ray.init()``."""
        if not self.ray_address:
            return [], env
        return worker_env_overrides(env), {**env, RAY_ADDRESS_ENV: self.ray_address}



def same_run(run, cls: type, **changes):
    """The config ``cls`` of one stage of ``run`` (`drzero evolve`'s config): every option the two share, then
    ``changes``. Options a stage does not take stay at its defaults."""
    theirs = {f.name for f in dataclasses.fields(run)}
    shared = {f.name: getattr(run, f.name) for f in dataclasses.fields(cls)
              if f.init and f.name in theirs and f.name not in changes}
    return cls(**shared, **changes)


def thinking_word(thinking: bool | None) -> str:
    return "n/a" if thinking is None else "on" if thinking else "off"


# -- running ----------------------------------------------------------------------------------------

def resolved_config(plan: StagePlan) -> str:
    """verl's ``--cfg job`` for the plan, through our own entry module."""
    result = subprocess.run(plan.command + ["--cfg", "job"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"verl could not compose the config for {plan.name}:\n{result.stderr[-2000:]}")
    return result.stdout


def check_inputs(plan: StagePlan) -> None:
    """Refuse a plan whose inputs no stage has produced yet, or whose input sets a killed writer left half
    replaced (a dry run of one stage checks this too; a real one before any service starts)."""
    missing = [p for p in plan.inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{plan.name} needs {', '.join(map(str, missing))}, which no stage has produced; "
                                f"run the stage that writes it first (drzero evolve runs them in order).")
    problems = plan.input_set_problems()
    if problems:
        raise ConfigError(f"{plan.name} refused: " + "; ".join(problems) + ".")


def finished_step(plan: StagePlan) -> int | None:
    """The step of the plan's own complete verl checkpoint when it already holds total_training_steps.

    Resuming such a stage is not a no-op: verl 0.7.1's ``fit`` loads the checkpoint, validates,
    and trains step total+1 before it checks the step count, leaving a ``global_step_{total+1}``
    that merge would then pick. So the stage is recorded as done instead.
    """
    if plan.verl_overrides is None:
        return None
    values = dict(o.lstrip("+").split("=", 1) for o in plan.verl_overrides if "=" in o)  # the last one wins
    total, directory = values.get("trainer.total_training_steps"), values.get("trainer.default_local_dir")
    if not total or not total.isdigit() or not directory:
        return None
    step = checkpointed_step(Path(directory))
    return step if step is not None and step >= int(total) else None


def execute(plan: StagePlan) -> None:
    """Start the services, run the stage, stop the services; fail unless every output exists."""
    check_inputs(plan)
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


def on_cluster(cfg):
    """A stage's config on the Ray cluster of --ray-address / $RAY_ADDRESS, when there is one (drzero.cluster)."""
    cluster = attach(cfg)
    if cluster is not None:
        print(cluster.describe())
    return cfg


def run_stage(plan: StagePlan, cfg) -> int:
    """The one runner of `drzero STAGE`: dry run, preflight or real run; verl stages are preflighted first."""
    verl = plan.runs_verl
    preflight_only = getattr(cfg, "preflight_only", False)
    real_run = not (cfg.dry_run or preflight_only)
    step = finished_step(plan)
    if step is not None and real_run:
        print(f"{plan.name}: its checkpoint already holds step {step}, the last; nothing to run")
        return 0  # resuming would make verl validate and train one step past the end
    if verl:
        checks = run_checks(plan, allow_download=cfg.allow_download)
        if getattr(cfg, "ray_address", None):  # set by on_cluster: the nodes, their versions, shared paths
            checks += stage_cluster_checks(cfg, [plan])
        if real_run:  # does this machine have what the stage needs (CUDA, SGLang)? asked before anything starts
            checks.append(machine_check([plan]))
        print(report(plan, checks))
        if any(not c.ok for c in checks):
            print("fix the problems above; nothing was started", file=sys.stderr)
            return 1
    if preflight_only:
        return 0
    if real_run and not verl:
        machine = machine_check([plan])  # gen-data, merge: no verl preflight, but SGLang may be needed
        if not machine.ok:
            print(f"{plan.name}: refused before anything started\n{machine.line()}", file=sys.stderr)
            return 1
    if cfg.dry_run:
        if not verl:
            check_inputs(plan)  # gen-data, merge: a dry run of a stage whose input is missing would not run
        print(plan.describe())
        if verl:
            print("resolved verl config (drzero.verl.entry --cfg job):")
            print(resolved_config(plan))
        return 0
    execute(plan)
    return 0
