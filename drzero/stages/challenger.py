"""`drzero challenger`: train the proposer with HRPO for one iteration (verl).

    drzero challenger --iteration 1 -- trainer.total_training_steps=50
    drzero challenger --iteration 1 --dry-run       # the plan and verl's resolved config, nothing started
    drzero preflight challenger --iteration 1       # the checks alone

The proposer writes a question for each seed document; its reward probes the current solver (the
base model in iteration 1, the merged solver of the iteration before after that) through an
SGLang server started beside the trainer, with the same search tool. HRPO groups the
advantages by hop count, one sample per prompt. The proposer continues across iterations: its
dataloader and optimizer resume from the previous iteration's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from drzero.config import SGLangOptions, option, require
from drzero.data.seed import seed_set
from drzero.layout import latest_step
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.rewards.wiring import reward_overrides
from drzero.rollout.render import SOLVER_PROMPT_LENGTH
from drzero.services.specs import sglang_service
from drzero.stages.base import SGLANG_PORT, StageConfig, on_cluster, run_stage, same_run
from drzero.verl.hf.server import hf_server_service
from drzero.verl.overrides import engine_option, verl_command

REWARD_SERVER = (4, 2, 0.5)  # dp, tp, --mem-fraction-static of the reward SGLang on 8 GPUs (DESIGN: services)


@dataclass(kw_only=True)
class ChallengerConfig(StageConfig, SGLangOptions):
    """The proposer's training; its SGLang server serves the current solver to the reward's probes."""

    takes_hydra_overrides: ClassVar[bool] = True
    probes: int = option(5, help="solver probes per question for the difficulty reward (Dr. Zero: 5)")
    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.probes >= 2, "probes", self.probes, "an integer >= 2 (difficulty needs 0 < k < n)")

    def reward_server(self) -> tuple[int, int, float]:
        """dp, tp, mem fraction: what was given, else the model's recipe, else drzero's defaults. A server
        shaped by hand (--sglang-dp/-tp) takes the rest from the defaults: the recipe's fraction is sized
        for the recipe's tp."""
        shaped = self.sglang_dp is not None or self.sglang_tp is not None
        recipe = (None if shaped else self.recipe().reward_server) or REWARD_SERVER
        given = (self.sglang_dp, self.sglang_tp, self.sglang_mem)
        return tuple(g if g is not None else r for g, r in zip(given, recipe))  # type: ignore[return-value]


def plan_challenger(cfg: ChallengerConfig) -> StagePlan:
    """HRPO proposer training; reward probes hit SGLang serving the current solver."""
    layout = cfg.layout
    base = resolve_model(cfg.model)
    # the current solver: the base model in iteration 1, the merged solver of the previous one after
    solver_path = str(layout.merged("solver", cfg.iteration - 1)) if cfg.iteration > 1 else base.path
    services, retriever_url = cfg.retriever()
    dp, tp, mem = cfg.reward_server()
    starts_sglang = not cfg.sglang_url and cfg.engine == "sglang"
    if cfg.sglang_url:
        sglang_url = cfg.sglang_url
    else:
        if cfg.engine == "hf":   # the probes' server in SGLang's API shape, on transformers
            spec = hf_server_service(solver_path, port=SGLANG_PORT, served_model_name="solver",
                                     host=cfg.listen_host())
        else:
            spec = sglang_service(solver_path, port=SGLANG_PORT, dp=dp, tp=tp, mem_fraction=mem,
                                  tool_call_parser=base.tool_call_parser, served_model_name="solver",
                                  host=cfg.listen_host())
        services.append(spec)
        sglang_url = spec.url
    thinking = cfg.thinking_setting()
    overrides = cfg.verl_overrides(base.path, "challenger") + [
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
                                                 "thinking": thinking, "max_prompt_tokens": SOLVER_PROMPT_LENGTH},
                                  probe_limits=True)
    inputs = [layout.seeds, layout.seeds_val] + ([layout.merged("solver", cfg.iteration - 1)] if cfg.iteration > 1
                                                 else [])
    cluster_overrides, env = cfg.cluster_env({"DRZERO_RETRIEVER_URL": retriever_url})
    overrides += cluster_overrides
    return StagePlan(name=f"challenger (iteration {cfg.iteration})", command=verl_command(overrides, cfg.overrides),
                     env=env, services=services, inputs=inputs,
                     outputs=[own], verl_overrides=overrides + cfg.overrides, reads_sets=(seed_set(layout),),
                     # SGLang's own checks only where this stage starts SGLang
                     sglang_parser=base.tool_call_parser if starts_sglang else None,
                     sglang_gpus=(dp, tp) if starts_sglang else None,
                     memory=cfg.placement(("reward server", dp, tp, mem) if starts_sglang else None),
                     corpus=cfg.corpus())


def main(cfg: ChallengerConfig) -> int:
    """`drzero challenger`: dry run, preflight or the real run (drzero.stages.base.run_stage)."""
    return run_stage(plan_challenger(on_cluster(cfg)), cfg)


def plan_in_run(run, iteration: int) -> StagePlan:
    """This stage in iteration ``iteration`` of `drzero evolve` (``run``: its drzero.pipeline.EvolveConfig)."""
    return plan_challenger(same_run(run, ChallengerConfig, iteration=iteration))
