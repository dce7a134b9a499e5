"""`drzero evolve` (alias `drzero train`): the whole self-evolution loop as one resumable pipeline.

    drzero evolve --iterations 3
    drzero evolve --iterations 2 --dry-run          # every stage's plan, config and preflight; nothing runs

    prepare-data -> [iteration k: challenger -> merge challenger -> gen-data -> solver -> merge solver
                     (-> evaluate, with --eval-data or --eval-benchmarks)] x N

``state.json`` in the checkpoint directory records each stage's status and outputs. A stage
that is done (and whose outputs still exist) is skipped; one that was running when the process
died runs again and verl resumes it from its last checkpoint (``resume_mode=auto``). So after
any crash or preemption the same command continues where the run stopped.

What is on disk is the proof, not state.json alone: prepare-data and gen-data are done only when
their manifest agrees with their files (drzero.atomic), and a verl stage whose own checkpoint
already holds ``total_training_steps`` is done (verl would otherwise validate and run one step
more). A state.json that is empty, corrupt or holds an entry of the wrong shape is moved aside with
one sentence and rebuilt from that evidence; an entry that says "done" without naming the stage's
outputs proves nothing; a damaged manifest of a stage's outputs is moved aside and the stage runs again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from drzero.atomic import write_json_atomically
from drzero.checks import report
from drzero.cluster.ray import attach, before_stage, report_checks
from drzero.config import env_default, option, require
from drzero.data.benchmarks import BENCHMARKS, resolve_benchmarks
from drzero.plan import StagePlan
from drzero.records import DamagedRecord, Each, OneOf, Optional, read_record, set_aside
from drzero.stages.base import StageConfig, execute, finished_step, resolved_config
from drzero.stages.registry import STAGES
from drzero.verl.preflight import machine_check, run_checks

log = logging.getLogger(__name__)


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
        "QA set to evaluate the base model and each iteration's merged solver on (e.g. from `drzero make-eval-set` or "
        "Search-R1's test.parquet); results go to CHECKPOINTS/eval/iter{k} (iter0: the base model) for "
        "`drzero report`"))
    eval_benchmarks: str | None = option(None, metavar="NAME[,NAME...]|all", help=(
        f"also evaluate the base model and each iteration's merged solver on these of the papers' QA sets "
        f"({', '.join(BENCHMARKS)}, or all; `drzero evaluate --benchmark`)"))
    eval_benchmark_dir: str = option(str(Path(env_default("DRZERO_DATA_DIR", "/corpus/data")) / "benchmarks"),
                                     metavar="DIR", help=(
        "the benchmark sets as FlashRAG lays them out, DIR/<name>/<split>.jsonl (fetched into it when missing and "
        "online)"))
    eval_limit: int | None = option(None, help=(
        "questions per benchmark set (a seeded subset, the same every iteration) and of --eval-data (its first N)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", self.eval_limit,
                "an integer >= 1, or unset for every question")
        if self.eval_data:  # the plan and state.json name absolute paths, whatever directory resumes the run
            self.eval_data = str(Path(self.eval_data).resolve())
        if self.eval_benchmarks:
            resolve_benchmarks(self.eval_benchmarks)  # an unknown name fails now, not after a day of training
            self.eval_benchmark_dir = str(Path(self.eval_benchmark_dir).expanduser().resolve())

    @property
    def evaluates(self) -> bool:
        """True when every iteration ends with an evaluation (--eval-data or --eval-benchmarks)."""
        return bool(self.eval_data or self.eval_benchmarks)


# -- state.json ------------------------------------------------------------------------------------

# What drzero writes into state.json (``RunState.mark``) and reads back; anything else is damage.
STATE_FILE = {"version": Optional(int),
              "stages": Each({"status": OneOf("running", "done"), "outputs": Optional([str]),
                              "updated": Optional(str)})}


class RunState:
    """Stage status on disk, written atomically and durably (file and directory fsync'd) after every change.

    A state.json that cannot be read or has an entry of the wrong shape (empty after a power loss,
    truncated, edited by hand) is moved aside with one sentence naming what was wrong (drzero.records);
    ``rebuilt`` is then True and ``rebuild`` recovers what the files on disk prove.
    """

    def __init__(self, path: Path, warn=log.warning, move_aside: bool = True):
        self.path = path
        self.stages: dict[str, dict] = {}
        self.rebuilt = False
        try:
            recorded = read_record(path, STATE_FILE)
        except DamagedRecord as damage:
            self.rebuilt = True
            set_aside(path, str(damage), "the run's state is rebuilt from the manifests and checkpoints on disk "
                                         "(every stage they do not prove done runs again)", warn, move=move_aside)
            return
        if recorded is not None:
            self.stages = recorded["stages"]

    def is_done(self, key: str, plan: StagePlan | None = None) -> bool:
        if plan is not None and plan.writes_set is not None and plan.writes_set.problem() is not None:
            return False  # a set of outputs is done only when its manifest agrees with the files
        if plan is not None and plan.done_when_outputs_exist and all(p.exists() for p in plan.outputs):
            return True  # prepare-data: "when missing" — committed data made by another run counts
        return self.unproven(key, plan) is None and self.stages.get(key, {}).get("status") == "done"

    def unproven(self, key: str, plan: StagePlan | None = None) -> str | None:
        """Why state.json's "done" for ``key`` proves nothing, when it does not: the entry must name the plan's
        outputs (``{"status": "done", "outputs": []}`` names none) and they must be on disk."""
        entry = self.stages.get(key, {})
        if entry.get("status") != "done":
            return None
        recorded = entry.get("outputs") or []
        expected = [str(p) for p in plan.outputs] if plan is not None else recorded
        unnamed = [p for p in expected if p not in recorded]
        if unnamed:
            return f"state.json records it as done but does not name {', '.join(unnamed)} among its outputs"
        gone = [p for p in expected if not Path(p).exists()]
        return f"state.json records it as done but {', '.join(gone)} is not on disk" if gone else None

    def mark(self, key: str, status: str, outputs: list[Path] = ()) -> None:
        entry = self.stages.setdefault(key, {})
        entry.update(status=status, outputs=[str(p) for p in outputs], updated=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime()))
        write_json_atomically({"version": 1, "stages": self.stages}, self.path)

    def rebuild(self, plans: list[tuple[str, StagePlan]], print_fn=print) -> None:
        """After a damaged state.json: mark done every stage whose files on disk prove it finished.

        Proof is a manifest that agrees with its files (prepare-data, gen-data) or a verl checkpoint
        at its last step. A merge or evaluation leaves no such proof, so it runs again (a merge is
        minutes; it rewrites the same directory).
        """
        for key, plan in plans:
            committed = plan.writes_set is not None and plan.writes_set.problem() is None
            if not committed and finished_step(plan) is None:
                continue
            self.mark(key, "done", plan.outputs)
            print_fn(f"[rebuilt] {key}: done, as its files on disk show")


def set_aside_damaged_sets(plans: list[tuple[str, StagePlan]], warn, move: bool) -> None:
    """A stage's output manifest that does not parse, or lacks what its readers read, proves nothing and would stop
    each reader: it is moved aside (a dry run only says so), and the stage that writes it runs again."""
    for key, plan in plans:
        damage = plan.writes_set.damage() if plan.writes_set is not None else None
        if damage is not None:
            set_aside(plan.writes_set.manifest, damage, f"{key} runs again to write it", warn, move=move)


# -- plans -------------------------------------------------------------------------------------------

# One iteration of the loop: (state.json key, the registry's stage, what the stage's plan_in_run takes beyond the run
# and the iteration). evaluate runs only with --eval-data or --eval-benchmarks.
ITERATION = (("challenger", "challenger", {}), ("merge-challenger", "merge", {"stage": "challenger"}),
             ("gen-data", "gen-data", {}), ("solver", "solver", {}), ("merge-solver", "merge", {"stage": "solver"}),
             ("evaluate", "evaluate", {}))
ITERATION_STAGES = tuple(key for key, _, _ in ITERATION)


def iteration_plans(cfg: EvolveConfig, iteration: int) -> dict[str, StagePlan]:
    """The stages of one iteration, planned, by their key in state.json."""
    return {key: STAGES[stage].plan_in_run(cfg, iteration, **extra) for key, stage, extra in ITERATION
            if stage != "evaluate" or cfg.evaluates}


def all_plans(cfg: EvolveConfig) -> list[tuple[str, StagePlan]]:
    """Every stage of the run, planned once, in order: prepare-data, then each iteration's stages."""
    plans = [("prepare-data", STAGES["prepare-data"].plan_in_run(cfg))]
    if cfg.evaluates:  # the base model first: the baseline every iteration's scores are read against
        plans.append(("iter0/evaluate", STAGES["evaluate"].plan_in_run(cfg, 0)))
    for iteration in range(1, cfg.iterations + 1):
        plans += [(f"iter{iteration}/{key}", plan) for key, plan in iteration_plans(cfg, iteration).items()]
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
    # lazy: only a dry run reads verl's resolved config, and the CLI starts faster without them
    import yaml
    from omegaconf import OmegaConf

    config = OmegaConf.create(yaml.safe_load(resolved))
    lines = []
    for key in DIGEST_KEYS:
        value = OmegaConf.select(config, key, throw_on_missing=False)
        if value is not None:
            lines.append(f"      {key} = {value}")
    return "\n".join(lines)


def check_remaining(cfg: EvolveConfig, state: RunState, plans: list[tuple[str, StagePlan]], print_fn=print, *,
                    verbose: bool, resolve: bool) -> int:
    """Preflight every stage that is not done yet, counting on what earlier stages will write.

    Run before the first stage starts, so a solver mistake is found before hours of proposer
    training, not after. Returns the number of problems found.
    """
    planned: set[Path] = set()  # what the stages still to run will (re)write before a later stage reads it
    problems = 0
    for key, plan in plans:
        if state.is_done(key, plan):  # its outputs are on disk: the stages after it check them as they are
            if verbose:
                print_fn(f"[skip] {key}: done")
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
            for refusal in plan.input_set_problems(planned):
                problems += 1
                print_fn(f"  [FAIL] {key}: {refusal}")
        planned.update(plan.outputs)
    return problems


def dry_run(cfg: EvolveConfig, state: RunState, print_fn=print,
            plans: list[tuple[str, StagePlan]] | None = None) -> int:
    plans = all_plans(cfg) if plans is None else plans
    problems = check_remaining(cfg, state, plans, print_fn, verbose=True, resolve=True)
    if cfg.ray_address:
        problems += report_checks(cfg, [plan for key, plan in plans if not state.is_done(key, plan)], print_fn)
    print_fn(f"dry run: {len(plans)} stages planned, {problems} problem(s)")
    return 1 if problems else 0


def evolve(cfg: EvolveConfig, print_fn=print) -> int:
    cluster = attach(cfg)  # on a Ray cluster: nodes and GPUs from it, the services at this node's address
    if cluster is not None:
        print_fn(cluster.describe())
    def warn(message: str) -> None:
        print_fn(f"evolve: warning: {message}")

    state = RunState(cfg.layout.state, warn=warn, move_aside=not cfg.dry_run)
    plans = all_plans(cfg)
    set_aside_damaged_sets(plans, warn, move=not cfg.dry_run)
    if cfg.dry_run:
        return dry_run(cfg, state, print_fn, plans)
    if state.rebuilt:
        state.rebuild(plans, print_fn)
    if not cfg.skip_preflight:
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
    for key, plan in plans:
        if plan.replan is not None:  # a merge of the latest step: that step exists only once the stage before ran
            plan = plan.replan()
        if state.is_done(key, plan):
            print_fn(f"[skip] {key}: done")
            continue
        step = finished_step(plan)
        if step is not None:
            print_fn(f"[skip] {key}: its checkpoint already holds step {step}, the last; recorded as done")
            state.mark(key, "done", plan.outputs)
            continue
        resumed = state.stages.get(key, {}).get("status") == "running"
        unproven = state.unproven(key, plan)
        print_fn(f"[{'resume' if resumed else 'run'}] {key}" + (f" ({unproven})" if unproven else ""))
        before_stage(cfg, plan, print_fn)  # on a cluster: every node sees what the stages before wrote
        state.mark(key, "running")
        execute(plan)
        state.mark(key, "done", plan.outputs)
    print_fn(f"evolve: all {cfg.iterations} iteration(s) done; state in {cfg.layout.state}")
    return 0


def stage_key(name: str, iteration: int) -> str:
    return name if name == "prepare-data" else f"iter{iteration}/{name}"


