"""The `drzero` command: one subcommand per stage, plus the tools around them.

    drzero ingest SOURCE... --db DIR        build or extend the corpus collection
    drzero ingest --demo --db DIR           the bundled demo research world
    drzero adopt --db DIR --collection C --embedder M   use a collection another system built
    drzero adopt --faiss-index F --corpus J --embedder M --db DIR   use a FAISS flat index and its corpus
    drzero serve-retriever --db DIR         the Search-R1-compatible retrieval service
                                            (--db also takes a Chroma server: http://host:port)
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
    drzero evaluate --model URL --benchmark all   the papers' seven QA sets (FlashRAG's files), with a manifest
    drzero report --checkpoints DIR         report.png + report.md of a run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from typing import Callable

from drzero import __version__
from drzero.cluster.ray import ClusterError
from drzero.config import ConfigError, add_config_arguments, config_from_args
from drzero.corpus.adopt import AdoptConfig, run_adopt
from drzero.corpus.adopt_faiss import run_adopt_faiss
from drzero.corpus.ingest import IngestConfig, run_ingest
from drzero.corpus.store import StoreError
from drzero.data.budget import TokenBudgetError
from drzero.models.files import ModelNotFound
from drzero.models.registry import REGISTRY, ListModelsConfig, render_registry
from drzero.pipeline import EvolveConfig, evolve
from drzero.retrieval.search_cli import SearchConfig, run_search
from drzero.retrieval.server import RetrieverConfig
from drzero.retrieval.serving import serve
from drzero.services.specs import ServiceError
from drzero.stages.registry import EVOLVE, STAGES
from drzero.tools import eval_set, report, smoke
from drzero.tools.memory import MemoryConfig, run_memory
from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

# The stages a preflight checks on its own: the verl ones (`drzero preflight STAGE` is `drzero STAGE --preflight`).
PREFLIGHT_STAGES = tuple(name for name, stage in STAGES.items() if stage.check[:1] == ("preflight",))


def _ingest(cfg: IngestConfig) -> int:
    print(run_ingest(cfg).render())
    return 0


def _adopt(cfg: AdoptConfig) -> int:
    print((run_adopt_faiss(cfg) if cfg.faiss_index else run_adopt(cfg)).render())
    return 0


def _serve_retriever(cfg: RetrieverConfig) -> int:
    logging.getLogger().setLevel(cfg.log_level.upper())
    return serve(cfg)


def _search(cfg: SearchConfig) -> int:
    run_search(cfg)
    return 0


def _tiny_model(cfg: TinyModelConfig) -> int:
    run_tiny_model(cfg)
    return 0


def _list_models(cfg: ListModelsConfig) -> int:
    print(json.dumps({k: dataclasses.asdict(v) for k, v in REGISTRY.items()}, indent=2) if cfg.json
          else render_registry())
    return 0


def _make_eval_set(cfg: eval_set.MakeEvalSetConfig) -> int:
    print(eval_set.summary_lines(eval_set.run_make_eval_set(cfg)))
    return 0


def _report(cfg: report.ReportConfig) -> int:
    print(report.summary_lines(report.run_report(cfg)))
    return 0


def _smoke(cfg: smoke.SmokeConfig) -> int:
    result = smoke.run_smoke(cfg)
    print(smoke.summary_lines(result))
    return 0 if result.ok else 1


def _stage(name: str) -> tuple[str, type, Callable[..., int]]:
    stage = STAGES[name]
    return stage.summary, stage.config, stage.main


def commands() -> dict[str, tuple[str, type, Callable[..., int]]]:
    """Every subcommand: (one line for `drzero --help`, its config, config -> exit status)."""
    return {
        "ingest": ("read, split, embed and store documents in the ChromaDB corpus", IngestConfig, _ingest),
        "adopt": ("record the embedder of a collection another system built, or adopt a FAISS flat index and its "
                  "corpus, after checking their vectors",
                  AdoptConfig, _adopt),
        "serve-retriever": ("serve the corpus over HTTP (Search-R1 /retrieve contract)", RetrieverConfig,
                            _serve_retriever),
        "search": ("ask the retriever at --url (default http://127.0.0.1:8000) from the shell; --db reads the store "
                   "directly", SearchConfig, _search),
        "prepare-data": _stage("prepare-data"),
        "tiny-model": ("build a tiny offline ChatML tokenizer and model for CPU dry runs", TinyModelConfig,
                       _tiny_model),
        "challenger": _stage("challenger"),
        "gen-data": _stage("gen-data"),
        "solver": _stage("solver"),
        "merge": _stage("merge"),
        "evolve": (EVOLVE.summary, EvolveConfig, evolve),
        "train": ("alias of evolve", EvolveConfig, evolve),
        "list-models": ("the model registry: names, local weights, tool parser, tp", ListModelsConfig, _list_models),
        "memory": ("will it fit? per-GPU memory of every stage, from the model's shape", MemoryConfig, run_memory),
        "make-eval-set": ("write a QA set with known answers (1-4 hops) from the demo world",
                          eval_set.MakeEvalSetConfig, _make_eval_set),
        "evaluate": _stage("evaluate"),
        "report": ("picture and tables of a run: evaluation, generated questions, stages", report.ReportConfig,
                   _report),
        "smoke": ("check the whole stack here: imports, retriever, search; on a GPU also SGLang, an agent rollout "
                  "and one verl step", smoke.SmokeConfig, _smoke),
    }


PREFLIGHT_DESCRIPTION = """`drzero preflight`: check a challenger or solver run before any GPU starts.

    drzero preflight challenger --iteration 1 [stage options] [-- hydra overrides]
    drzero preflight solver --iteration 1

Checks the data, the model, the services and the machine (CUDA, SGLang) the stage needs, and names
what to fix. It is `drzero STAGE --preflight`: it takes the stage's options (`drzero challenger --help`)."""


def plain(text: str) -> str:
    """Help text as plain text: the docstrings' reStructuredText literals (``--model``) without their quotes."""
    return re.sub(r"``([^`]+)``", r"\1", text)


def command_description(config_cls: type) -> str:
    """The `--help` text of one command: the docstring of the module that owns its config."""
    return plain((sys.modules[config_cls.__module__].__doc__ or "").strip())


class PlainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; option help without reStructuredText quotes."""

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drzero", description="Train Dr. Zero-style self-evolving search agents on your own corpus.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--version", action="version", version=f"drzero {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, config_cls, handler) in commands().items():
        # no abbreviations: `evolve --iteration 2` must not pass as `--iterations 2`
        command = sub.add_parser(name, help=summary, description=command_description(config_cls),
                                 allow_abbrev=False, formatter_class=PlainHelpFormatter)
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
    try:
        return args.handler(config_from_args(args.config_cls, args))
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
