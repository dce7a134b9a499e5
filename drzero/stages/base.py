"""The training stages as typed configs and plans: what each runs, with which services, writing what.

    drzero challenger --iteration 1 -- trainer.total_training_steps=50
    drzero solver --iteration 1
    drzero merge --stage solver --iteration 1

A stage is planned first (``plan_*``): the verl command line with every override as an absolute
path, the services it needs (retriever; SGLang serving the current solver for the proposer's
reward), its inputs and outputs. ``--dry-run`` prints the plan and the resolved config and runs
the preflight; without it ``execute`` starts the services, runs the command and checks the
outputs. The model's recipe for ``--gpu`` (``drzero list-models --json``; ``drzero memory``
shows what it buys) comes before them; overrides after ``--`` go to verl unchanged and last, so they win.
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
from drzero.rollout.render import SOLVER_PROMPT_LENGTH, THINKING_RESPONSE_LENGTH
from drzero.layout import Layout, config_dir, env_default, latest_step
from drzero.models.memory import Placement
from drzero.models.registry import DEFAULT_MODEL, Recipe, model_shape, resolve_model
from drzero.models.shapes import GPU_MEMORY_GIB

log = logging.getLogger(__name__)

CONFIG_NAME = "search_multiturn_grpo"
RETRIEVER_PORT, SGLANG_PORT = 8000, 8001
ROLLOUT_TP = 2
REWARD_SERVER = (4, 2, 0.5)  # dp, tp, --mem-fraction-static of the challenger's reward SGLang on 8 GPUs
ENGINES = ("sglang", "hf")


def engine_option():
    return option("sglang", choices=list(ENGINES), help=(
        "rollout engine: sglang (production) or hf (transformers on the training GPU itself: slow, for "
        "debugging on a GPU without SGLang)"))


def engine_overrides(engine: str) -> list[str]:
    """verl keys for ``--engine``: none for SGLang; for hf its rollout name and no flash-attn."""
    if engine == "sglang":
        return []
    return ["actor_rollout_ref.rollout.name=hf",
            # no flash-attn with this engine: unpadding imports it, and verl's default attention is flash_attention_2
            "actor_rollout_ref.model.use_remove_padding=false",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]


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
    nnodes: int = option(1, help="nodes of --gpus GPUs each (on a Ray cluster: its GPU nodes)")
    steps: int = option(50, help="training steps per iteration (Dr. Zero: 50)")
    train_batch_size: int = option(256, help="prompts per step")
    rollout_tp: int | None = option(None, help=f"tensor parallel size of the training rollout engine (default: the "
                                               f"model's recipe, else {ROLLOUT_TP})")
    gpu: str = option(env_default("DRZERO_GPU", "H100"), choices=sorted(GPU_MEMORY_GIB), help=(
        "GPU kind: picks the model's recipe and sizes the memory check ($DRZERO_GPU)"))
    gpu_mem: float | None = option(None, metavar="GIB", help="memory per GPU in GiB, for a GPU not in --gpu's list")
    use_recipe: bool = option(True, flag="--recipe", help=(
        "apply the model's recipe for --gpu (offload, tp, memory fractions); --no-recipe: the shipped config"))
    retriever_url: str | None = option(None, metavar="URL", help=(
        "retriever /retrieve URL; default: start `drzero serve-retriever` on :8000 for the stage"))
    logger: str = option("console,wandb", help="verl trainer loggers, comma separated")
    thinking: bool = option(False, help=(
        "turn Qwen3 thinking on (off by default; Qwen2.5 has none): verl and every probe pass "
        "enable_thinking=true and the response budget rises to 5,632 tokens"))
    collection: str = option("corpus", help="the corpus collection inside --db (`drzero ingest/adopt --collection`)")
    ray_address: str | None = option(None, metavar="HOST:PORT", help=(
        "run on this existing Ray cluster ($RAY_ADDRESS): --nnodes and --gpus come from its nodes, the services "
        "start on this node at its cluster address, and the preflight checks every node (README: More than one node)"))
    services_host: str | None = option(None, metavar="IP", help=(
        "with --ray-address: the address other nodes reach this node's retriever and SGLang at (default: this "
        "node's address in the Ray cluster)"))
    allow_download: bool = option(False, help="let verl and SGLang download a model that is not on disk")
    dry_run: bool = option(False, help="print the plan, the resolved config and the preflight; start nothing")
    preflight_only: bool = option(False, flag="--preflight", help="run the preflight checks only")

    overrides: list[str] = field(default_factory=list)  # Hydra overrides after `--`, passed to verl unchanged
    takes_hydra_overrides: ClassVar[bool] = False        # whether `drzero <stage> -- key=value` reaches verl

    def __post_init__(self) -> None:
        require(self.iteration >= 1, "iteration", self.iteration, "an integer >= 1")
        require(self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        require(self.nnodes >= 1, "nnodes", self.nnodes, "an integer >= 1")
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

    def placement(self, server: tuple[str, int, int, float] | None = None) -> Placement:
        """What the preflight's memory check needs beyond verl's config."""
        try:
            shape = model_shape(self.model)
        except (OSError, ValueError):  # a config.json that is not a decoder drzero knows: unchecked
            shape = None
        return Placement(f"{self.gpu_mem:g}-GiB GPU" if self.gpu_mem else self.gpu, self.capacity, shape, server)


@dataclass(kw_only=True)
class ChallengerConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True
    probes: int = option(5, help="solver probes per question for the difficulty reward (Dr. Zero: 5)")
    sglang_url: str | None = option(None, metavar="URL", help=(
        "SGLang server already serving the current solver; default: start one on :8001"))
    sglang_dp: int | None = option(None, help=f"data parallel size of the reward SGLang server (default: the "
                                              f"model's recipe, else {REWARD_SERVER[0]})")
    sglang_tp: int | None = option(None, help=f"tensor parallel size of the reward SGLang server (default: the "
                                              f"model's recipe, else {REWARD_SERVER[1]})")
    sglang_mem: float | None = option(None, help=f"--mem-fraction-static of the reward SGLang server (default: the "
                                                 f"model's recipe, else {REWARD_SERVER[2]})")
    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.probes >= 2, "probes", self.probes, "an integer >= 2 (difficulty needs 0 < k < n)")
        require(self.sglang_mem is None or 0 < self.sglang_mem < 1, "sglang_mem", self.sglang_mem,
                "a fraction between 0 and 1")

    def reward_server(self) -> tuple[int, int, float]:
        """dp, tp, mem fraction: what was given, else the model's recipe, else drzero's defaults. A server
        shaped by hand (--sglang-dp/-tp) takes the rest from the defaults: the recipe's fraction is sized
        for the recipe's tp."""
        shaped = self.sglang_dp is not None or self.sglang_tp is not None
        recipe = (None if shaped else self.recipe().reward_server) or REWARD_SERVER
        given = (self.sglang_dp, self.sglang_tp, self.sglang_mem)
        return tuple(g if g is not None else r for g, r in zip(given, recipe))  # type: ignore[return-value]


@dataclass(kw_only=True)
class SolverConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True
    rollout_n: int = option(5, help="samples per prompt for GRPO (Dr. Zero: 5)")
    max_prompt_length: int = option(SOLVER_PROMPT_LENGTH, help="solver prompt budget in tokens")
    engine: str = engine_option()

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
    memory: Placement | None = None                   # GPUs, model shape, SGLang beside the trainer: memory check
    corpus: tuple[Path, str] | None = None            # (store, collection) its retriever serves: preflight opens it

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
    return [sys.executable, "-m", "drzero.verl.entry", f"--config-path={config_dir()}",
            f"--config-name={CONFIG_NAME}", *overrides, *extra]


def retriever_for(cfg: StageConfig) -> tuple[list, str]:
    """(services to start, URL the search tool uses)."""
    if cfg.retriever_url:
        return [], cfg.retriever_url
    from drzero.services.specs import retriever_service

    spec = retriever_service(str(cfg.layout.db), port=RETRIEVER_PORT, collection=cfg.collection,
                             host=listen_host(cfg))
    return [spec], f"{spec.url}/retrieve"


def listen_host(cfg: StageConfig) -> str:
    """Where the stage's own servers listen: loopback on one node; this node's cluster address on several,
    so that verl's workers on the other nodes reach them."""
    return cfg.services_host or "127.0.0.1"


def on_cluster(cfg: StageConfig, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(verl overrides, verl's environment) for a stage on a Ray cluster: ``env`` handed to every Ray worker
    through runtime_env (``ray start`` workers do not inherit ours), and RAY_ADDRESS for verl's ``ray.init()``."""
    if not cfg.ray_address:
        return [], env
    from drzero.cluster.ray import RAY_ADDRESS_ENV, worker_env_overrides

    return worker_env_overrides(env), {**env, RAY_ADDRESS_ENV: cfg.ray_address}


def corpus_of(cfg: StageConfig) -> tuple[Path, str] | None:
    """(store, collection) the stage's own retriever will serve; None when it uses one at --retriever-url."""
    return None if cfg.retriever_url else (cfg.layout.db, cfg.collection)


def template_has_thinking(model_path: str) -> bool:
    """Whether a model directory's chat template takes ``enable_thinking`` (Qwen3-style)."""
    import json

    directory = Path(model_path)
    texts = [p.read_text(errors="ignore") for p in (directory / "chat_template.jinja",) if p.is_file()]
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template") or ""
        texts.append(template if isinstance(template, str) else json.dumps(template))
    return any("enable_thinking" in text for text in texts)


def thinking_setting(cfg: StageConfig) -> bool | None:
    """True/False for a model whose template has the switch (the registry's, or a local template's); else None."""
    model = resolve_model(cfg.model)
    applies = (model.entry.thinking is not None) if model.entry is not None else \
        (model.local and template_has_thinking(model.path))
    if not applies:
        require(not cfg.thinking, "thinking", cfg.thinking,
                f"off: the chat template of {cfg.model} has no enable_thinking switch (Qwen3 models have one)")
        return None
    return bool(cfg.thinking)


def thinking_overrides(thinking: bool | None) -> list[str]:
    """The same switch for verl's dataset and agent loop (data.apply_chat_template_kwargs) and our probes."""
    if thinking is None:
        return []
    overrides = [f"+data.apply_chat_template_kwargs.enable_thinking={'true' if thinking else 'false'}"]
    if thinking:
        overrides.append(f"data.max_response_length={THINKING_RESPONSE_LENGTH}")
    return overrides


def _common_overrides(cfg: StageConfig, model_path: str, stage: str) -> list[str]:
    layout = cfg.layout
    loggers = ",".join(x.strip() for x in cfg.logger.split(",") if x.strip())
    recipe = cfg.recipe()
    return [
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={config_dir() / 'search_tool_config.yaml'}",
        # verl's tool agent loop, recording episodes the response budget ended (drzero.rollout.agent_loop)
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={config_dir() / 'agent_loop_config.yaml'}",
        # the hf engine serves each GPU's rollouts on that GPU's trainer: no tensor parallelism
        f"actor_rollout_ref.rollout.tensor_model_parallel_size="
        f"{1 if engine_of(cfg) == 'hf' else cfg.rollout_tp or recipe.rollout_tp or ROLLOUT_TP}",
        f"data.train_batch_size={cfg.train_batch_size}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={min(256, cfg.train_batch_size)}",
        f"trainer.n_gpus_per_node={cfg.gpus}",
        f"trainer.nnodes={cfg.nnodes}",
        f"trainer.logger=[{loggers}]",
        f"trainer.experiment_name={stage}_iter{cfg.iteration}",
        f"trainer.default_local_dir={layout.checkpoint(stage, cfg.iteration)}",
        *recipe.overrides,  # the model's settings for these GPUs; `--` overrides come later and win
    ] + thinking_overrides(thinking_setting(cfg)) + engine_overrides(engine_of(cfg))


def engine_of(cfg: StageConfig) -> str:
    return getattr(cfg, "engine", "sglang")


def plan_challenger(cfg: ChallengerConfig) -> StagePlan:
    """HRPO proposer training; reward probes hit SGLang serving the current solver."""
    layout = cfg.layout
    base = resolve_model(cfg.model)
    # the current solver: the base model in iteration 1, the merged solver of the previous one after
    solver_path = str(layout.merged("solver", cfg.iteration - 1)) if cfg.iteration > 1 else base.path
    services, retriever_url = retriever_for(cfg)
    dp, tp, mem = cfg.reward_server()
    starts_sglang = not cfg.sglang_url and cfg.engine == "sglang"
    if cfg.sglang_url:
        sglang_url = cfg.sglang_url
    elif cfg.engine == "hf":   # the probes' server in SGLang's API shape, on transformers
        from drzero.verl.hf.server import hf_server_service

        spec = hf_server_service(solver_path, port=SGLANG_PORT, served_model_name="solver", host=listen_host(cfg))
        services.append(spec)
        sglang_url = spec.url
    else:
        from drzero.services.specs import sglang_service

        spec = sglang_service(solver_path, port=SGLANG_PORT, dp=dp, tp=tp,
                              mem_fraction=mem, tool_call_parser=base.tool_call_parser,
                              served_model_name="solver", host=listen_host(cfg))
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
                                                 "retriever_url": retriever_url, "tokenizer": solver_path,
                                                 "thinking": thinking_setting(cfg),
                                                 "max_prompt_tokens": SOLVER_PROMPT_LENGTH},
                                  probe_limits=True)
    inputs = [layout.seeds, layout.seeds_val] + ([layout.merged("solver", cfg.iteration - 1)] if cfg.iteration > 1
                                                 else [])
    cluster_overrides, env = on_cluster(cfg, {"DRZERO_RETRIEVER_URL": retriever_url})
    overrides += cluster_overrides
    return StagePlan(name=f"challenger (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env=env, services=services, inputs=inputs,
                     outputs=[own], verl_overrides=overrides + cfg.overrides,
                     # SGLang's own checks only where this stage starts SGLang
                     sglang_parser=base.tool_call_parser if starts_sglang else None,
                     sglang_gpus=(dp, tp) if starts_sglang else None,
                     memory=cfg.placement(("reward server", dp, tp, mem) if starts_sglang else None),
                     corpus=corpus_of(cfg))


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
    cluster_overrides, env = on_cluster(cfg, {"DRZERO_RETRIEVER_URL": retriever_url})
    overrides += cluster_overrides
    return StagePlan(name=f"solver (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env=env, services=services, inputs=inputs,
                     outputs=[layout.checkpoint("solver", cfg.iteration)], verl_overrides=overrides + cfg.overrides,
                     memory=cfg.placement(), corpus=corpus_of(cfg))


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


def check_inputs(plan: StagePlan) -> None:
    """Refuse a plan whose inputs no stage has produced yet (a dry run of one stage checks this too)."""
    missing = [p for p in plan.inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{plan.name} needs {', '.join(map(str, missing))}, which no stage has produced; "
                                f"run the stage that writes it first (drzero evolve runs them in order).")


def execute(plan: StagePlan) -> None:
    """Start the services, run the stage, stop the services; fail unless every output exists."""
    import os

    from drzero.services.supervisor import Supervisor

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
