"""The `drzero` command: one subcommand per stage.

    drzero ingest SOURCE... --db DIR        build or extend the corpus collection
    drzero ingest --demo --db DIR           the bundled demo research world
    drzero adopt --db DIR --collection C --embedder M   use a collection another system built
    drzero serve-retriever --db DIR         the Search-R1-compatible retrieval service
    drzero search "query"                   ask the retriever at --url (or the store with --db) from the shell
    drzero prepare-data --db DIR            the proposer's seed parquet for verl
    drzero tiny-model --out DIR             a tiny offline tokenizer + model for CPU dry runs
    drzero evolve --iterations 3            the whole loop; each stage alone: challenger, gen-data,
                                            solver, merge
    drzero preflight STAGE                  check a challenger or solver run before any GPU starts
    drzero list-models                      the model registry
    drzero memory --model M --gpu H100      will it fit? per-GPU memory of every stage
    drzero make-eval-set --demo-db DIR      a QA set with known answers from the demo world
    drzero evaluate --model URL --data F    EM / F1 / cover-EM of the solver with search
    drzero report --checkpoints DIR         report.png + report.md of a run
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from drzero import __version__
from drzero.config import ConfigError, add_config_arguments, config_from_args


def _ingest(args: argparse.Namespace) -> int:
    from drzero.corpus.ingest import IngestConfig, run_ingest

    summary = run_ingest(config_from_args(IngestConfig, args))
    print(summary.render())
    return 0


def _adopt(args: argparse.Namespace) -> int:
    from drzero.corpus.adopt import AdoptConfig, run_adopt

    print(run_adopt(config_from_args(AdoptConfig, args)).render())
    return 0


def _serve_retriever(args: argparse.Namespace) -> int:
    from drzero.retrieval.server import RetrieverConfig, serve

    cfg = config_from_args(RetrieverConfig, args)
    logging.getLogger().setLevel(cfg.log_level.upper())
    serve(cfg)
    return 0


def _search(args: argparse.Namespace) -> int:
    from drzero.retrieval.search_cli import SearchConfig, run_search

    run_search(config_from_args(SearchConfig, args))
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    run_tiny_model(config_from_args(TinyModelConfig, args))
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from drzero.data.seed import PrepareDataConfig, run_prepare_data, summary_lines

    print(summary_lines(run_prepare_data(config_from_args(PrepareDataConfig, args))))
    return 0


PREFLIGHT_STAGES = ("challenger", "solver")


def _run_stage(plan, cfg) -> int:
    """Dry run / preflight / real run of one planned stage; verl stages are preflighted first."""
    from drzero.pipeline import finished_step
    from drzero.verl.preflight import machine_check, report, run_checks
    from drzero.stages.base import check_inputs, execute, resolved_config

    verl = plan.verl_overrides is not None
    preflight_only = getattr(cfg, "preflight_only", False)
    real_run = not (cfg.dry_run or preflight_only)
    step = finished_step(plan)
    if step is not None and real_run:
        print(f"{plan.name}: its checkpoint already holds step {step}, the last; nothing to run")
        return 0  # resuming would make verl validate and train one step past the end
    if verl:
        checks = run_checks(plan, allow_download=cfg.allow_download)
        if getattr(cfg, "ray_address", None):  # set by on_cluster: the nodes, their versions, shared paths
            from drzero.cluster.ray import stage_cluster_checks

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


def on_cluster(cfg):
    """A stage's config on the Ray cluster of --ray-address / $RAY_ADDRESS, when there is one (drzero.cluster.ray)."""
    from drzero.cluster.ray import attach

    cluster = attach(cfg)
    if cluster is not None:
        print(cluster.describe())
    return cfg


def _challenger(args: argparse.Namespace) -> int:
    from drzero.stages.base import ChallengerConfig, plan_challenger

    cfg = on_cluster(config_from_args(ChallengerConfig, args))
    return _run_stage(plan_challenger(cfg), cfg)


def _solver(args: argparse.Namespace) -> int:
    from drzero.stages.base import SolverConfig, plan_solver

    cfg = on_cluster(config_from_args(SolverConfig, args))
    return _run_stage(plan_solver(cfg), cfg)


def _gen_data(args: argparse.Namespace) -> int:
    from drzero.pipeline import GenDataStageConfig, plan_gen_data

    cfg = on_cluster(config_from_args(GenDataStageConfig, args))
    return _run_stage(plan_gen_data(cfg), cfg)


def _merge(args: argparse.Namespace) -> int:
    from drzero.stages.base import MergeConfig, plan_merge

    cfg = config_from_args(MergeConfig, args)
    return _run_stage(plan_merge(cfg), cfg)


def _evolve(args: argparse.Namespace) -> int:
    from drzero.pipeline import EvolveConfig, evolve

    return evolve(config_from_args(EvolveConfig, args))


def _list_models(args: argparse.Namespace) -> int:
    from drzero.models.registry import REGISTRY, ListModelsConfig, render_registry

    cfg = config_from_args(ListModelsConfig, args)
    if cfg.json:
        import dataclasses
        import json

        print(json.dumps({k: dataclasses.asdict(v) for k, v in REGISTRY.items()}, indent=2))
    else:
        print(render_registry())
    return 0


def _memory(args: argparse.Namespace) -> int:
    from drzero.verl.memory_plan import MemoryConfig, run_memory

    return run_memory(config_from_args(MemoryConfig, args))


def _evaluate(args: argparse.Namespace) -> int:
    from drzero.stages.evaluate import EvaluateConfig, run_evaluate, summary_lines

    print(summary_lines(run_evaluate(config_from_args(EvaluateConfig, args))))
    return 0


def _make_eval_set(args: argparse.Namespace) -> int:
    from drzero.tools.eval_set import MakeEvalSetConfig, run_make_eval_set, summary_lines

    print(summary_lines(run_make_eval_set(config_from_args(MakeEvalSetConfig, args))))
    return 0


def _report(args: argparse.Namespace) -> int:
    from drzero.tools.report import ReportConfig, run_report, summary_lines

    print(summary_lines(run_report(config_from_args(ReportConfig, args))))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from drzero.tools.smoke import SmokeConfig, run_smoke, summary_lines

    result = run_smoke(config_from_args(SmokeConfig, args))
    print(summary_lines(result))
    return 0 if result.ok else 1


def _commands() -> dict[str, tuple[str, type, Callable[[argparse.Namespace], int]]]:
    from drzero.corpus.adopt import AdoptConfig
    from drzero.corpus.ingest import IngestConfig
    from drzero.retrieval.search_cli import SearchConfig
    from drzero.data.seed import PrepareDataConfig
    from drzero.tools.eval_set import MakeEvalSetConfig
    from drzero.stages.evaluate import EvaluateConfig
    from drzero.tools.report import ReportConfig
    from drzero.pipeline import EvolveConfig, GenDataStageConfig
    from drzero.retrieval.server import RetrieverConfig
    from drzero.tools.smoke import SmokeConfig
    from drzero.tools.tiny_model import TinyModelConfig
    from drzero.verl.memory_plan import MemoryConfig
    from drzero.models.registry import ListModelsConfig
    from drzero.stages.base import ChallengerConfig, MergeConfig, SolverConfig

    return {
        "ingest": ("read, split, embed and store documents in the ChromaDB corpus", IngestConfig, _ingest),
        "adopt": ("record the embedder of a collection another system built, after checking its vectors",
                  AdoptConfig, _adopt),
        "serve-retriever": ("serve the corpus over HTTP (Search-R1 /retrieve contract)", RetrieverConfig,
                            _serve_retriever),
        "search": ("ask the retriever at --url (default http://127.0.0.1:8000) from the shell; --db reads the store "
                   "directly", SearchConfig, _search),
        "prepare-data": ("write the proposer's seed parquet (train, validation, manifest)", PrepareDataConfig,
                         _prepare_data),
        "tiny-model": ("build a tiny offline ChatML tokenizer and model for CPU dry runs", TinyModelConfig,
                       _tiny_model),
        "challenger": ("train the proposer with HRPO for one iteration (verl)", ChallengerConfig, _challenger),
        "gen-data": ("sample questions from the merged proposer into solver data", GenDataStageConfig, _gen_data),
        "solver": ("train the solver with GRPO for one iteration (verl)", SolverConfig, _solver),
        "merge": ("merge an FSDP checkpoint into a Hugging Face model directory", MergeConfig, _merge),
        "evolve": ("run the whole loop, resumable: prepare-data, then challenger/gen-data/solver per iteration",
                   EvolveConfig, _evolve),
        "train": ("alias of evolve", EvolveConfig, _evolve),
        "list-models": ("the model registry: names, local weights, tool parser, tp", ListModelsConfig, _list_models),
        "memory": ("will it fit? per-GPU memory of every stage, from the model's shape", MemoryConfig, _memory),
        "make-eval-set": ("write a QA set with known answers (1-4 hops) from the demo world", MakeEvalSetConfig,
                          _make_eval_set),
        "evaluate": ("answer a QA set with the solver and the search tool: EM, F1, cover-EM", EvaluateConfig,
                     _evaluate),
        "report": ("picture and tables of a run: evaluation, generated questions, stages", ReportConfig, _report),
        "smoke": ("check the whole stack here: imports, retriever, search; on a GPU also SGLang, an agent rollout "
                  "and one verl step", SmokeConfig, _smoke),
    }


# Commands whose config lives in a module shared with other commands: their own `--help` description.
_OWN_DESCRIPTIONS = {
    "challenger": """`drzero challenger`: train the proposer with HRPO for one iteration (verl).

    drzero challenger --iteration 1 -- trainer.total_training_steps=50
    drzero challenger --iteration 1 --dry-run       # the plan and verl's resolved config, nothing started
    drzero preflight challenger --iteration 1       # the checks alone""",
    "solver": """`drzero solver`: train the solver with GRPO for one iteration (verl) on the questions gen-data wrote.

    drzero solver --iteration 1
    drzero solver --iteration 1 --dry-run           # the plan and verl's resolved config, nothing started
    drzero preflight solver --iteration 1           # the checks alone""",
    "merge": """`drzero merge`: merge a stage's FSDP checkpoint into a Hugging Face model directory.

    drzero merge --stage challenger --iteration 1
    drzero merge --stage solver --iteration 1 --dry-run""",
    "gen-data": """`drzero gen-data`: sample questions from the merged proposer into the solver's training data.

    drzero gen-data --iteration 1
    drzero gen-data --iteration 1 --dry-run""",
}

PREFLIGHT_DESCRIPTION = """`drzero preflight`: check a challenger or solver run before any GPU starts.

    drzero preflight challenger --iteration 1 [stage options] [-- hydra overrides]
    drzero preflight solver --iteration 1

Checks the data, the model, the services and the machine (CUDA, SGLang) the stage needs, and names
what to fix. It is `drzero STAGE --preflight`: it takes the stage's options (`drzero challenger --help`)."""


def command_description(name: str, config_cls: type) -> str:
    """The `--help` text of one command: its module's docstring when the module is that command's own."""
    if name in _OWN_DESCRIPTIONS:
        return _OWN_DESCRIPTIONS[name]
    doc = (sys.modules[config_cls.__module__].__doc__ or "").strip()
    return doc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drzero", description="Train Dr. Zero-style self-evolving search agents on your own corpus.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--version", action="version", version=f"drzero {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, config_cls, handler) in _commands().items():
        # no abbreviations: `evolve --iteration 2` must not pass as `--iterations 2`
        command = sub.add_parser(name, help=summary, description=command_description(name, config_cls),
                                 allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(command, config_cls)
        command.set_defaults(handler=handler, config_cls=config_cls)
    # `drzero preflight STAGE ...` is rewritten to `STAGE --preflight ...` in main(); this entry lists it and
    # answers `drzero preflight --help`.
    preflight = sub.add_parser("preflight", help="check a challenger or solver run before any GPU starts",
                               description=PREFLIGHT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    preflight.add_argument("stage", choices=PREFLIGHT_STAGES, help="the stage to check")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra overrides after `--` go to verl unchanged; `drzero preflight STAGE ...` is `STAGE --preflight ...`.
    hydra_overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if argv[:1] == ["preflight"] and len(argv) > 1 and argv[1] in PREFLIGHT_STAGES:
        argv = [argv[1], "--preflight", *argv[2:]]
    # anything else after `preflight` (nothing, --help, an unknown stage) is answered by its own parser entry
    parser = build_parser()
    args = parser.parse_args(argv)
    if hydra_overrides:
        if not getattr(getattr(args, "config_cls", None), "takes_hydra_overrides", False):
            parser.exit(2, f"drzero {args.command}: error: Hydra overrides after '--' "
                           f"({' '.join(hydra_overrides)}) go to verl; only challenger, solver, evolve and preflight "
                           f"take them (and memory, which plans them).\n")
        args.overrides = hydra_overrides  # the stage config's `overrides` field, passed to verl unchanged
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from drzero.cluster.ray import ClusterError
    from drzero.corpus.store import StoreError
    from drzero.data.budget import TokenBudgetError
    from drzero.models.files import ModelNotFound
    from drzero.services.specs import ServiceError

    try:
        return args.handler(args)
    except (ConfigError, StoreError, ModelNotFound, TokenBudgetError, ServiceError, FileNotFoundError) as error:
        parser.exit(2, f"drzero {args.command}: error: {error}\n")
    except ClusterError as error:  # a node missing or unlike the others: a retry may find it fixed
        print(f"drzero {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
