"""`drzero evolve` (alias `drzero train`): the whole self-evolution loop as one resumable pipeline.

    drzero evolve --iterations 3
    drzero evolve --iterations 2 --dry-run          # every stage's plan, config and preflight; nothing runs

    prepare-data -> [iteration k: challenger -> merge challenger -> gen-data -> solver -> merge solver
                     (-> evaluate, with --eval-data)] x N

``state.json`` in the checkpoint directory records each stage's status and outputs. A stage
that is done (and whose outputs still exist) is skipped; one that was running when the process
died runs again and verl resumes it from its last checkpoint (``resume_mode=auto``). So after
any crash or preemption the same command continues where the run stopped.

What is on disk is the proof, not state.json alone: prepare-data and gen-data are done only when
their manifest agrees with their files (drzero.atomic), and a verl stage whose own checkpoint
already holds ``total_training_steps`` is done (verl would otherwise validate and run one step
more). A state.json that is empty or corrupt is moved aside and rebuilt from that evidence.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from drzero.atomic import verify_set, write_json_atomically
from drzero.config import option, require
from drzero.layout import checkpointed_step
from drzero.stages.base import (ChallengerConfig, MergeConfig, SolverConfig, StageConfig, StagePlan, plan_challenger,
                                 plan_merge, plan_solver)

log = logging.getLogger(__name__)

ITERATION_STAGES = ("challenger", "merge-challenger", "gen-data", "solver", "merge-solver", "evaluate")


@dataclass(kw_only=True)
class GenDataStageConfig(StageConfig):
    samples: int = option(5, help="proposer samples per seed; the best-formatted valid one is kept")
    limit: int | None = option(None, help="only the first N seeds of the partition (smoke runs)")
    verify: bool = option(False, help="reject questions the solver answers without searching or never answers "
                                      "(needs --solver-url)")
    solver_url: str | None = option(None, metavar="URL", help="SGLang serving the current solver, for --verify")
    sglang_url: str | None = option(None, metavar="URL", help=(
        "SGLang already serving the merged proposer; default: start one on :8001"))
    sglang_dp: int = option(4, help="data parallel size of the proposer SGLang server")
    sglang_tp: int = option(2, help="tensor parallel size of the proposer SGLang server")
    sglang_mem: float = option(0.8, help="--mem-fraction-static of the proposer SGLang server (nothing else runs)")


@dataclass(kw_only=True)
class EvolveConfig(StageConfig):
    takes_hydra_overrides: ClassVar[bool] = True  # passed to every verl stage
    iteration: int = 1  # not an option: evolve runs iterations 1..--iterations (a stray --iteration is refused)
    iterations: int = option(3, help="iterations of the loop (Dr. Zero: 3)")
    seed_rows: int | None = option(None, help=(
        "rows of the seed parquet prepare-data writes when it is missing (default: prepare-data's, fresh seeds "
        "for every iteration's challenger and gen-data)"))
    tokenizer: str | None = option(None, metavar="PATH", help="tokenizer for prepare-data (default: the model's)")
    probes: int = option(5, help="solver probes per question in the proposer reward")
    samples: int = option(5, help="proposer samples per seed in gen-data")
    rollout_n: int = option(5, help="solver GRPO group size")
    sglang_dp: int | None = option(None, help="data parallel size of the SGLang servers (default: the model's "
                                              "recipe for the reward server, else 4)")
    sglang_tp: int | None = option(None, help="tensor parallel size of the SGLang servers (default: the model's "
                                              "recipe for the reward server, else 2)")
    skip_preflight: bool = option(False, help="start without checking every remaining stage first (not advised)")
    eval_data: str | None = option(None, metavar="FILE", help=(
        "QA set to evaluate each iteration's merged solver on (e.g. from `drzero make-eval-set` or Search-R1's "
        "test.parquet); results go to CHECKPOINTS/eval/iter{k} for `drzero report`"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        if self.eval_data:  # the plan and state.json name absolute paths, whatever directory resumes the run
            self.eval_data = str(Path(self.eval_data).resolve())


# -- state.json ------------------------------------------------------------------------------------

class RunState:
    """Stage status on disk, written atomically and durably (file and directory fsync'd) after every change.

    A state.json that cannot be read (empty after a power loss, truncated, edited by hand) is
    moved aside with a warning; ``rebuilt`` is then True and ``rebuild`` recovers what the files
    on disk prove.
    """

    def __init__(self, path: Path, warn=log.warning, move_aside: bool = True):
        self.path = path
        self.stages: dict[str, dict] = {}
        self.rebuilt = False
        if path.is_file():
            try:
                stages = json.loads(path.read_text())["stages"]
                if not isinstance(stages, dict):
                    raise ValueError(f"'stages' is a {type(stages).__name__}, not an object")
                self.stages = stages
            except (OSError, ValueError, KeyError, TypeError) as error:
                problem = f"{path} could not be read ({type(error).__name__}: {error})"
                self.rebuilt = True
                if not move_aside:  # a dry run changes nothing
                    warn(f"{problem}; a real run moves it aside and rebuilds it from the files on disk")
                    return
                aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
                path.replace(aside)
                warn(f"{problem}; moved it to {aside.name} and rebuilding the run's state from the manifests "
                     f"and checkpoints on disk")

    def is_done(self, key: str, plan: StagePlan | None = None) -> bool:
        if plan is not None and plan.manifest is not None and verify_set(plan.manifest) is not None:
            return False  # a set of outputs is done only when its manifest agrees with the files
        if plan is not None and plan.done_when_outputs_exist and all(p.exists() for p in plan.outputs):
            return True  # prepare-data: "when missing" — committed data made by another run counts
        entry = self.stages.get(key, {})
        return entry.get("status") == "done" and all(Path(p).exists() for p in entry.get("outputs", []))

    def mark(self, key: str, status: str, outputs: list[Path] = ()) -> None:
        entry = self.stages.setdefault(key, {})
        entry.update(status=status, outputs=[str(p) for p in outputs], updated=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime()))
        write_json_atomically({"version": 1, "stages": self.stages}, self.path)

    def rebuild(self, plans: list[tuple[str, StagePlan]], print_fn=print) -> None:
        """After a corrupt state.json: mark done every stage whose files on disk prove it finished.

        Proof is a manifest that agrees with its files (prepare-data, gen-data) or a verl checkpoint
        at its last step. A merge or evaluation leaves no such proof, so it runs again (a merge is
        minutes; it rewrites the same directory).
        """
        for key, plan in plans:
            proven = (plan.manifest is not None and verify_set(plan.manifest) is None) or \
                finished_step(plan) is not None
            if not proven:
                continue
            self.mark(key, "done", plan.outputs)
            print_fn(f"[rebuilt] {key}: done, as its files on disk show")


# -- plans -------------------------------------------------------------------------------------------

def _shared(cfg: StageConfig, iteration: int) -> dict:
    names = ("model", "db", "collection", "data_dir", "checkpoints", "gpus", "nnodes", "steps", "train_batch_size", "rollout_tp",
             "gpu", "gpu_mem", "use_recipe", "retriever_url", "logger", "allow_download", "overrides", "thinking",
             "ray_address", "services_host")
    return {**{n: getattr(cfg, n) for n in names}, "iteration": iteration}


def _thinking_word(thinking: bool | None) -> str:
    return "n/a" if thinking is None else "on" if thinking else "off"


def plan_prepare_data(cfg: EvolveConfig) -> StagePlan:
    from drzero.data.seed import PrepareDataConfig, run_prepare_data
    from drzero.models.registry import resolve_model

    layout = cfg.layout

    from drzero.stages.base import thinking_setting

    thinking = thinking_setting(cfg)

    def prepare():  # configured when it runs: planning must not fail on a model that a later step provides
        run_prepare_data(PrepareDataConfig(db=cfg.db, collection=cfg.collection, out=str(layout.seeds), rows=cfg.seed_rows,
                                           tokenizer=cfg.tokenizer or resolve_model(cfg.model).path,
                                           thinking=bool(thinking)))

    rows = f" --rows {cfg.seed_rows}" if cfg.seed_rows else ""
    return StagePlan(name="prepare-data", run=prepare, inputs=[layout.db],
                     run_label=f"drzero prepare-data --db {layout.db} --out {layout.seeds}{rows} (thinking "
                               f"{_thinking_word(thinking)})",
                     outputs=[layout.seeds, layout.seeds_val], manifest=layout.seeds_manifest,
                     done_when_outputs_exist=True)


def plan_gen_data(cfg: GenDataStageConfig) -> StagePlan:
    from drzero.data.gen_data import GenDataConfig, run_gen_data, summary_lines
    from drzero.models.registry import resolve_model
    from drzero.stages.base import SGLANG_PORT, retriever_for

    layout = cfg.layout
    proposer = layout.merged("challenger", cfg.iteration)
    services, retriever_url = retriever_for(cfg)
    if cfg.sglang_url:
        proposer_url = cfg.sglang_url
    else:
        from drzero.services.specs import sglang_service

        spec = sglang_service(str(proposer), port=SGLANG_PORT, dp=cfg.sglang_dp, tp=cfg.sglang_tp,
                              mem_fraction=cfg.sglang_mem, tool_call_parser=resolve_model(cfg.model).tool_call_parser,
                              served_model_name="proposer")
        services.append(spec)
        proposer_url = spec.url

    from drzero.stages.base import thinking_setting

    thinking = thinking_setting(cfg)

    def generate():  # configured when it runs: the seed data may come from an earlier stage of this run
        result = run_gen_data(GenDataConfig(
            iteration=cfg.iteration, seeds=str(layout.seeds), out=str(layout.solver_data(cfg.iteration)),
            samples=cfg.samples, verify=cfg.verify, solver_url=cfg.solver_url, limit=cfg.limit,
            proposer_url=proposer_url, proposer_model="proposer", retriever_url=retriever_url,
            tokenizer=str(proposer), thinking=bool(thinking)))
        print(summary_lines(result), flush=True)
        return result

    return StagePlan(name=f"gen-data (iteration {cfg.iteration})", run=generate,
                     run_label=f"drzero gen-data --iteration {cfg.iteration} (proposer at {proposer_url}, "
                               f"{cfg.samples} samples per seed of partition {cfg.iteration - 1}, thinking "
                               f"{_thinking_word(thinking)})",
                     services=services, inputs=[layout.seeds, proposer],
                     outputs=[layout.solver_data(cfg.iteration), layout.solver_val(cfg.iteration)],
                     manifest=layout.solver_manifest(cfg.iteration))


def plan_evaluate(cfg: EvolveConfig, iteration: int) -> StagePlan:
    """The merged solver of this iteration on the QA set; SGLang is started by `drzero evaluate` itself."""
    from drzero.stages.evaluate import EvaluateConfig, run_evaluate
    from drzero.stages.base import retriever_for

    layout = cfg.layout
    services, retriever_url = retriever_for(cfg)
    model = layout.merged("solver", iteration)
    out = layout.checkpoints / "eval" / f"iter{iteration}"

    from drzero.stages.base import thinking_setting

    thinking = thinking_setting(cfg)

    def evaluate():  # configured when it runs: the model is written by the merge before it
        return run_evaluate(EvaluateConfig(model=str(model), data=cfg.eval_data, out=str(out),
                                           retriever_url=retriever_url, dp=cfg.sglang_dp or 4, tp=cfg.sglang_tp or 2,
                                           thinking=bool(thinking)))

    return StagePlan(name=f"evaluate (iteration {iteration})", run=evaluate, services=services,
                     run_label=f"drzero evaluate --model {model} --data {cfg.eval_data} --out {out} (thinking "
                               f"{_thinking_word(thinking)})",
                     inputs=[model, Path(cfg.eval_data)], outputs=[out / "summary.json"])


def iteration_plans(cfg: EvolveConfig, iteration: int) -> dict[str, StagePlan]:
    shared = _shared(cfg, iteration)
    servers = {k: getattr(cfg, k) for k in ("sglang_dp", "sglang_tp") if getattr(cfg, k) is not None}
    merge = dict(iteration=iteration, checkpoints=cfg.checkpoints)
    plans = {
        "challenger": plan_challenger(ChallengerConfig(**shared, probes=cfg.probes, **servers)),
        "merge-challenger": plan_merge(MergeConfig(stage="challenger", **merge)),
        "gen-data": plan_gen_data(GenDataStageConfig(**shared, samples=cfg.samples, **servers)),
        "solver": plan_solver(SolverConfig(**shared, rollout_n=cfg.rollout_n)),
        "merge-solver": plan_merge(MergeConfig(stage="solver", **merge)),
    }
    if cfg.eval_data:
        plans["evaluate"] = plan_evaluate(cfg, iteration)
    return plans


def all_plans(cfg: EvolveConfig) -> list[tuple[str, StagePlan]]:
    plans = [("prepare-data", plan_prepare_data(cfg))]
    for iteration in range(1, cfg.iterations + 1):
        plans += [(f"iter{iteration}/{name}", plan) for name, plan in iteration_plans(cfg, iteration).items()]
    return plans


# -- running -------------------------------------------------------------------------------------

DIGEST_KEYS = ("algorithm.adv_estimator", "actor_rollout_ref.model.path", "actor_rollout_ref.rollout.n",
               "data.train_files", "data.val_files", "data.max_prompt_length", "data.max_response_length",
               "data.apply_chat_template_kwargs.enable_thinking",
               "reward.custom_reward_function.reward_kwargs.thinking", "trainer.total_training_steps",
               "trainer.default_local_dir", "trainer.resume_mode", "trainer.resume_from_path",
               "reward.custom_reward_function.name")


def _digest(resolved: str) -> str:
    """The keys of verl's resolved config that say what this stage will train."""
    import yaml
    from omegaconf import OmegaConf

    config = OmegaConf.create(yaml.safe_load(resolved))
    lines = []
    for key in DIGEST_KEYS:
        value = OmegaConf.select(config, key, throw_on_missing=False)
        if value is not None:
            lines.append(f"      {key} = {value}")
    return "\n".join(lines)


def finished_step(plan: StagePlan) -> int | None:
    """The step of the plan's own complete verl checkpoint when it already holds total_training_steps.

    Resuming such a stage is not a no-op: verl 0.7.1's ``fit`` loads the checkpoint, validates,
    and trains step total+1 before it checks the step count, leaving a ``global_step_{total+1}``
    that merge would then pick. So the pipeline records the stage as done instead.
    """
    if plan.verl_overrides is None:
        return None
    values = dict(o.lstrip("+").split("=", 1) for o in plan.verl_overrides if "=" in o)  # the last one wins
    total, directory = values.get("trainer.total_training_steps"), values.get("trainer.default_local_dir")
    if not total or not total.isdigit() or not directory:
        return None
    step = checkpointed_step(Path(directory))
    return step if step is not None and step >= int(total) else None


def check_remaining(cfg: EvolveConfig, state: RunState, plans: list[tuple[str, StagePlan]], print_fn=print, *,
                    verbose: bool, resolve: bool) -> int:
    """Preflight every stage that is not done yet, counting on what earlier stages will write.

    Run before the first stage starts, so a solver mistake is found before hours of proposer
    training, not after. Returns the number of problems found.
    """
    from drzero.verl.preflight import report, run_checks
    from drzero.stages.base import resolved_config

    planned: set[Path] = set()
    problems = 0
    for key, plan in plans:
        if state.is_done(key, plan):
            if verbose:
                print_fn(f"[skip] {key}: done")
            planned.update(plan.outputs)
            continue
        if verbose:
            print_fn(f"[plan] {key}\n{plan.describe()}")
        if plan.verl_overrides is not None:
            checks = run_checks(plan, planned=planned, allow_download=cfg.allow_download)
            failed = sum(not c.ok for c in checks)
            problems += failed
            if verbose or failed:
                print_fn(report(plan, checks))
            if resolve:
                try:
                    print_fn("  verl --cfg job (through drzero.verl.entry):\n" + _digest(resolved_config(plan)))
                except RuntimeError as error:
                    problems += 1
                    print_fn(f"  {error}")
        else:
            for path in [p for p in plan.inputs if not p.exists() and p not in planned]:
                problems += 1
                print_fn(f"  [FAIL] {key}: input {path} does not exist and no earlier stage writes it")
        planned.update(plan.outputs)
    return problems


def dry_run(cfg: EvolveConfig, state: RunState, print_fn=print) -> int:
    from drzero.cluster.ray import report_checks

    plans = all_plans(cfg)
    problems = check_remaining(cfg, state, plans, print_fn, verbose=True, resolve=True)
    if cfg.ray_address:
        problems += report_checks(cfg, [plan for key, plan in plans if not state.is_done(key, plan)], print_fn)
    print_fn(f"dry run: {len(plans)} stages planned, {problems} problem(s)")
    return 1 if problems else 0


def evolve(cfg: EvolveConfig, print_fn=print) -> int:
    from drzero.cluster.ray import attach, before_stage, report_checks
    from drzero.stages.base import execute

    cluster = attach(cfg)  # on a Ray cluster: nodes and GPUs from it, the services at this node's address
    if cluster is not None:
        print_fn(cluster.describe())
    state = RunState(cfg.layout.state, warn=lambda message: print_fn(f"evolve: warning: {message}"),
                     move_aside=not cfg.dry_run)
    if cfg.dry_run:
        return dry_run(cfg, state, print_fn)
    plans = all_plans(cfg)
    if state.rebuilt:
        state.rebuild(plans, print_fn)
    if not cfg.skip_preflight:
        from drzero.verl.preflight import machine_check

        remaining = [plan for key, plan in plans if not state.is_done(key, plan)]
        machine = machine_check(remaining)
        if not machine.ok:
            print_fn(machine.line())
        problems = (not machine.ok) + check_remaining(cfg, state, plans, print_fn, verbose=False, resolve=False)
        if cluster is not None:
            problems += report_checks(cfg, remaining, print_fn)
        if problems:
            print_fn(f"evolve: preflight found {problems} problem(s) in the stages still to run; nothing was "
                     f"started. Fix them (or look with --dry-run) and run the same command again.")
            return 1
    for key, _ in plans:
        # Planned again now, not at start: a merge's step and a resumed proposer's checkpoint
        # exist only once the stage before has run.
        plan = dict(all_plans(cfg))[key]
        if state.is_done(key, plan):
            print_fn(f"[skip] {key}: done")
            continue
        step = finished_step(plan)
        if step is not None:
            print_fn(f"[skip] {key}: its checkpoint already holds step {step}, the last; recorded as done")
            state.mark(key, "done", plan.outputs)
            continue
        resumed = state.stages.get(key, {}).get("status") == "running"
        print_fn(f"[{'resume' if resumed else 'run'}] {key}")
        before_stage(cfg, plan, print_fn)  # on a cluster: every node sees what the stages before wrote
        state.mark(key, "running")
        execute(plan)
        state.mark(key, "done", plan.outputs)
    print_fn(f"evolve: all {cfg.iterations} iteration(s) done; state in {cfg.layout.state}")
    return 0


def stage_key(name: str, iteration: int) -> str:
    return name if name == "prepare-data" else f"iter{iteration}/{name}"


