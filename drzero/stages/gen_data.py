"""`drzero gen-data`: sample questions from the merged proposer into the solver's training data.

    drzero gen-data --iteration 1
    drzero gen-data --iteration 1 --dry-run
    drzero gen-data --iteration 2 --verify --solver-url http://127.0.0.1:8002

Starts the retriever and an SGLang server with the merged proposer of iteration K (or uses the
ones at --retriever-url / --sglang-url), then runs the gen-data engine (drzero.data.gen_data) on
partition K-1 of the seed parquet: --samples proposer rollouts per seed, the best-formatted valid
one kept, and writes DATA_DIR/solver_iterK.parquet, its validation parquet and manifest. A run
killed part way resumes with the seeds it had not finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from drzero.config import SGLangOptions, option, require
from drzero.data.gen_data import GenDataJob, run_gen_data, solver_set, summary_lines
from drzero.data.seed import seed_set
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.prompts import MAX_QUESTION_WORDS
from drzero.services.specs import sglang_service
from drzero.stages.base import SGLANG_PORT, StageConfig, on_cluster, run_stage, same_run, thinking_word

PROPOSER_SERVER = (4, 2, 0.8)  # dp, tp, --mem-fraction-static on 8 GPUs: nothing else runs beside it


@dataclass(kw_only=True)
class GenDataConfig(StageConfig, SGLangOptions):
    """Questions from the merged proposer, which its SGLang server serves."""

    samples: int = option(5, help="proposer samples per seed; the best-formatted valid one is kept (Dr. Zero: 5)")
    max_question_words: int = option(MAX_QUESTION_WORDS, help="cut every kept question to this many words "
                                                              "(Dr. Zero: 50)")
    limit: int | None = option(None, help="only the first N seeds of the partition (smoke runs)")
    verify: bool = option(False, help="reject questions the solver answers without searching or never answers "
                                      "(needs --solver-url)")
    verify_probes: int = option(5, help="solver rollouts per question with --verify")
    solver_url: str | None = option(None, metavar="URL", help="SGLang serving the current solver, for --verify")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.samples >= 1, "samples", self.samples, "an integer >= 1")
        require(self.max_question_words >= 1, "max_question_words", self.max_question_words, "an integer >= 1")
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "an integer >= 1, or unset for all seeds")
        require(self.verify_probes >= 1, "verify_probes", self.verify_probes, "an integer >= 1")
        require(not self.verify or bool(self.solver_url), "solver_url", self.solver_url,
                "the solver server's URL when --verify is on (the probes need a server)")

    def proposer_server(self) -> tuple[int, int, float]:
        given = (self.sglang_dp, self.sglang_tp, self.sglang_mem)
        return tuple(g if g is not None else d for g, d in zip(given, PROPOSER_SERVER))  # type: ignore[return-value]


def plan_gen_data(cfg: GenDataConfig) -> StagePlan:
    """The merged proposer behind SGLang, the retriever, and the gen-data engine in this process."""
    layout = cfg.layout
    proposer = layout.merged("challenger", cfg.iteration)
    services, retriever_url = cfg.retriever()
    if cfg.sglang_url:
        proposer_url = cfg.sglang_url
    else:
        dp, tp, mem = cfg.proposer_server()
        spec = sglang_service(str(proposer), port=SGLANG_PORT, dp=dp, tp=tp, mem_fraction=mem,
                              tool_call_parser=resolve_model(cfg.model).tool_call_parser, served_model_name="proposer")
        services.append(spec)
        proposer_url = spec.url
    thinking = cfg.thinking_setting()

    def generate():  # configured when it runs: the seed data may come from an earlier stage of this run
        result = run_gen_data(GenDataJob(
            iteration=cfg.iteration, seeds=str(layout.seeds), out=str(layout.solver_data(cfg.iteration)),
            samples=cfg.samples, max_question_words=cfg.max_question_words, verify=cfg.verify,
            verify_probes=cfg.verify_probes, solver_url=cfg.solver_url, limit=cfg.limit, proposer_url=proposer_url,
            proposer_model="proposer", retriever_url=retriever_url, tokenizer=str(proposer), thinking=bool(thinking)))
        print(summary_lines(result), flush=True)
        return result

    return StagePlan(name=f"gen-data (iteration {cfg.iteration})", run=generate,
                     run_label=f"drzero gen-data --iteration {cfg.iteration} (proposer at {proposer_url}, "
                               f"{cfg.samples} samples per seed of partition {cfg.iteration - 1}, thinking "
                               f"{thinking_word(thinking)})",
                     services=services, inputs=[layout.seeds, proposer], reads_sets=(seed_set(layout),),
                     outputs=[layout.solver_data(cfg.iteration), layout.solver_val(cfg.iteration)],
                     writes_set=solver_set(layout, cfg.iteration))


def main(cfg: GenDataConfig) -> int:
    """`drzero gen-data`: dry run, preflight or the real run (drzero.stages.base.run_stage)."""
    return run_stage(plan_gen_data(on_cluster(cfg)), cfg)


def plan_in_run(run, iteration: int) -> StagePlan:
    """This stage in iteration ``iteration`` of `drzero evolve` (``run``: its drzero.pipeline.EvolveConfig)."""
    return plan_gen_data(same_run(run, GenDataConfig, iteration=iteration))
