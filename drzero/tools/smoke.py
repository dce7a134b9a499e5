"""`drzero smoke`: is this machine ready to train? Every layer of the stack, end to end, in minutes.

    drzero smoke                                    # a demo corpus in a temporary directory
    drzero smoke --db /corpus/chromadb --question "Who proposed iO from LWE?"
    drzero smoke --require-gpu                      # on the GPU machine (Modal's smoke passes this)
    drzero smoke --engine hf --model DIR            # a GPU without SGLang: transformers serves and rolls out

It runs, in order, and prints one line per part:

  imports      torch, transformers, verl, drzero (and sglang, flash_attn on a GPU machine), with versions
  GPUs         how many CUDA devices torch sees
  retriever    `drzero serve-retriever` over --db, or over the demo corpus built into a temporary
               directory, started under the service supervisor and healthy
  search       one query through the search tool's own client (drzero.rollout.search)
  sglang       an SGLang server for --model on one GPU, healthy                        [GPU]
               (with --engine hf: "hf server", drzero.verl.hf.server in SGLang's API shape)
  rollout      agent rollouts against it until one calls the search tool              [GPU]
  verl step    `drzero solver` for one step on one GPU: 8 demo-world questions, batch 4 x n=2,
               --steps 1 (trainer.total_training_steps=1), console logger, its own preflight first  [GPU]

Without a GPU the GPU parts are skipped and named as skipped, with the command each would run,
and the smoke passes; with --require-gpu no GPU is a failure. A part that fails makes the
command exit non-zero with its reason; parts that need it are then skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from drzero.atomic import commit_set, parquet_writer
from drzero.checks import Check
from drzero.config import add_config_arguments, config_from_args, option, require
from drzero.corpus.demo import build_demo_world
from drzero.corpus.ingest import DEMO_FACTS_FILE, IngestConfig, load_demo_world, run_ingest
from drzero.models.registry import resolve_model
from drzero.prompts import solver_messages
from drzero.rollout.client import AgentRolloutClient, GenerationSettings
from drzero.rollout.search import SearchSettings, close_sessions, search
from drzero.services.specs import SGLANG_PORT, ServiceError, retriever_service, sglang_service
from drzero.services.supervisor import Supervisor
from drzero.store_location import is_server_address, resolved_db
from drzero.tools.eval_set import demo_rows
from drzero.verl.hf.server import hf_server_service
from drzero.verl.overrides import engine_option

# The registry's one-GPU debugging model: small enough to load in a minute and train one step on one H100.
SMOKE_MODEL = "qwen2.5-0.5b-instruct"
SMOKE_SERVED_NAME = "smoke"
SMOKE_SGLANG_MEM = 0.6                 # --mem-fraction-static: nothing else is on the GPU while it runs
GENERIC_QUESTION = "What are the main results described in these documents?"

# (module, distribution for the version, needed only on a GPU machine)
IMPORTS = (("torch", "torch", False), ("transformers", "transformers", False), ("verl", "verl", False),
           ("drzero", "drzero", False), ("sglang", "sglang", True), ("flash_attn", "flash-attn", True))

# The one-step verl run: 8 train and 4 validation questions, 4 prompts x n=2 per step on one GPU.
VERL_TRAIN_ROWS, VERL_VAL_ROWS = 8, 4
VERL_OVERRIDES = (
    "data.max_response_length=1024",                     # short answers: a plumbing check, not a benchmark
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2",  # one search + the answer: fits 1,024 tokens
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
    "trainer.test_freq=-1",                              # no validation pass; the checkpoint save still runs
)


@dataclass(kw_only=True)
class SmokeConfig:
    db: str | None = option(None, metavar="DIR|URL", help=(
        "corpus to serve and search (a directory or a Chroma server's http://host:port); default: build the demo "
        "corpus into a temporary directory"))
    model: str = option(SMOKE_MODEL, help=(
        "model for SGLang and the one-step verl run: a `drzero list-models` key, a hub name or a directory"))
    question: str | None = option(None, help=(
        "question for the search and the rollout; default: a 2-hop demo-world question (or a generic one "
        "for a corpus without the demo world)"))
    allow_download: bool = option(False, help="let SGLang and verl download --model when it is not on disk")
    require_gpu: bool = option(False, help="fail, rather than skip the GPU parts, when no GPU is visible")
    engine: str = engine_option()
    skip_verl: bool = option(False, help="stop after the rollout; skip the one-step verl run")
    rollouts: int = option(4, help="rollouts to try until one calls the search tool")
    demo_papers: int = option(60, help="size of the demo corpus built when --db is not given, in papers")
    verl_timeout: float = option(1200.0, help="seconds the one-step verl run may take")
    work_dir: str | None = option(None, metavar="DIR", help=(
        "keep the demo corpus, tiny data and the one-step checkpoint here; default: a temporary "
        "directory, removed afterwards"))

    def __post_init__(self) -> None:
        require(self.rollouts >= 1, "rollouts", self.rollouts, "an integer >= 1")
        require(self.demo_papers >= 20, "demo_papers", self.demo_papers, "an integer >= 20")
        require(self.verl_timeout > 0, "verl_timeout", self.verl_timeout, "a number of seconds > 0")


@dataclass
class SmokeResult:
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    @property
    def skipped(self) -> list[Check]:
        return [check for check in self.checks if check.skipped]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


def summary_lines(result: SmokeResult) -> str:
    lines = ["smoke"] + [check.line() for check in result.checks]
    if result.failures:
        reasons = "; ".join(f"{c.name}: {c.message}" for c in result.failures)
        lines.append(f"smoke FAILED in {result.seconds:.0f} s ({len(result.failures)} part(s)): {reasons}")
    else:
        skipped = f"; skipped: {', '.join(c.name for c in result.skipped)}" if result.skipped else ""
        lines.append(f"smoke passed in {result.seconds:.0f} s{skipped}")
    return "\n".join(lines)


# -- the plans of the GPU parts (pure, so they can be checked without a GPU) ----------------------


def server_part(cfg: "SmokeConfig") -> str:
    """The inference-server part's name: SGLang, or drzero's transformers server with --engine hf."""
    return "sglang" if cfg.engine == "sglang" else "hf server"


def inference_spec(cfg: "SmokeConfig", model_path: str, tool_call_parser: str, port: int):
    if cfg.engine == "sglang":
        return sglang_spec(model_path, tool_call_parser, port)
    return hf_server_service(model_path, port, SMOKE_SERVED_NAME)


def sglang_spec(model_path: str, tool_call_parser: str, port: int):
    """One SGLang server on one GPU, serving ``model_path`` as ``smoke``."""
    return sglang_service(model_path, port=port, dp=1, tp=1, mem_fraction=SMOKE_SGLANG_MEM,
                          tool_call_parser=tool_call_parser, served_model_name=SMOKE_SERVED_NAME)


def verl_step_command(cfg: SmokeConfig, model_path: str, db: Path, work: Path, retriever_url: str) -> list[str]:
    """`drzero solver` for one step on one GPU, against the smoke's own retriever."""
    command = [sys.executable, "-m", "drzero.cli", "solver", "--iteration", "1", "--model", model_path,
               "--db", str(db), "--data-dir", str(work / "data"), "--checkpoints", str(work / "checkpoints"),
               "--gpus", "1", "--rollout-tp", "1", "--steps", "1", "--train-batch-size", "4", "--rollout-n", "2",
               "--logger", "console", "--retriever-url", retriever_url, "--engine", cfg.engine]
    if cfg.allow_download:
        command.append("--allow-download")
    return command + ["--", *VERL_OVERRIDES]


def write_solver_data(data_dir: Path, world) -> tuple[Path, Path]:
    """solver_iter1.parquet and its validation file, from the demo world's 1- to 4-hop questions, committed with
    their manifest as gen-data commits them (the solver stage reads no less)."""
    questions = [q for hops in (1, 2, 3, 4) for q in world.questions(hops, count=3)]
    train = questions[:VERL_TRAIN_ROWS]
    val = questions[VERL_TRAIN_ROWS:VERL_TRAIN_ROWS + VERL_VAL_ROWS]
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = data_dir / "solver_iter1.parquet", data_dir / "solver_iter1_val.parquet"
    # the solver-data format gen-data writes, with the questions' known answers
    commit_set({paths[0]: parquet_writer(demo_rows(train, "train")), paths[1]: parquet_writer(demo_rows(val, "test"))},
               data_dir / "solver_iter1.manifest.json", {})
    return paths


# -- the parts ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _version(module, distribution: str) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def check_import(module_name: str, distribution: str, gpu_only: bool, has_gpu: bool) -> Check:
    name = f"import {module_name}"
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or a CUDA library missing underneath: both are the finding
        if gpu_only and not has_gpu:
            return Check(name, True, f"not importable here ({type(error).__name__}); needed only on a GPU "
                                     f"machine", skipped=True)
        return Check(name, False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
                                  f"the environment is incomplete: use the pinned docker/Dockerfile image")
    return Check(name, True, _version(module, distribution))


def count_gpus() -> tuple[int, str]:
    """(CUDA devices torch sees, their name)."""
    try:
        import torch  # seconds to import; and a broken torch is a finding here, not a crash

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return count, (torch.cuda.get_device_name(0) if count else "")
    except Exception:
        return 0, ""


def demo_world_of(db: Path | str):
    """The demo world a store was ingested with, or None for any other corpus or a Chroma server (a damaged record of
    it: ConfigError)."""
    return load_demo_world(db) if isinstance(db, Path) and (db / DEMO_FACTS_FILE).is_file() else None


async def _search_once(url: str, query: str):
    try:
        return await search([query], SearchSettings(url=url, topk=3, retries=1))
    finally:
        await close_sessions()


def check_search(retriever_url: str, query: str) -> Check:
    outcome = asyncio.run(_search_once(f"{retriever_url}/retrieve", query))
    if not outcome.ok or outcome.hits == 0:
        return Check("search", False, outcome.error or f"no passages for {query!r}; the collection is empty")
    first = json.loads(outcome.text)["result"].split("\n", 1)[0]
    return Check("search", True, f"{outcome.hits} passages for {query!r} in {outcome.seconds:.2f} s; "
                                 f"first: {first[:80]}")


async def _rollouts(sglang_url: str, retriever_url: str, question: str, count: int):
    client = AgentRolloutClient(GenerationSettings(base_url=sglang_url, model=SMOKE_SERVED_NAME, api="chat",
                                                   temperature=0.7, max_turns=4, max_response_tokens=1024,
                                                   timeout=120.0, retries=1),
                                SearchSettings(url=f"{retriever_url}/retrieve"))
    try:
        return await client.run_many([solver_messages(question)] * count)
    finally:
        await client.aclose()
        await close_sessions()


def check_rollout(sglang_url: str, retriever_url: str, question: str, count: int) -> Check:
    trajectories = asyncio.run(_rollouts(sglang_url, retriever_url, question, count))
    for number, t in enumerate(trajectories, 1):
        if t.stop_reason != "error" and t.valid_tool_calls and not t.search_failures:
            return Check("rollout", True, f"rollout {number} of {count}: {t.valid_tool_calls} search call(s), "
                                          f"{len(t.assistant_turns)} turn(s), stop {t.stop_reason}, answer "
                                          f"{t.final_answer!r}, {t.seconds:.1f} s")
    errors = [t.error for t in trajectories if t.error]
    if errors:
        return Check("rollout", False, f"SGLang failed the rollouts: {errors[0]}")
    failed_searches = sum(t.search_failures for t in trajectories)
    if failed_searches:
        return Check("rollout", False, f"{failed_searches} search call(s) failed against the retriever; see its log")
    reasons = collections.Counter(t.stop_reason for t in trajectories)
    return Check("rollout", False, f"none of {count} rollouts called the search tool (stop reasons: "
                                   f"{dict(reasons)}); the model's chat template or SGLang's --tool-call-parser "
                                   f"does not match the model")


def run_verl_step(command: list[str], checkpoint: Path, timeout: float, log: Callable[[str], None]) -> Check:
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)

    def stop() -> None:  # SIGTERM to its group: `drzero solver` stops verl and its services on it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)

    watchdog = threading.Timer(timeout, stop)  # a silent hang must not outlive --verl-timeout
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            log("[verl] " + line.rstrip())
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            stop()
            process.wait()
    seconds = time.monotonic() - started
    if code != 0 and seconds >= timeout:
        return Check("verl step", False, f"did not finish within {timeout:g} s (--verl-timeout); its log is above")
    if code != 0:
        last = " | ".join(line for line in list(tail)[-3:] if line.strip())
        return Check("verl step", False, f"`drzero solver` exited with {code}: {last}")
    saved = sorted(p.name for p in checkpoint.glob("global_step_*"))
    if not saved:
        return Check("verl step", False, f"`drzero solver` finished but saved no checkpoint in {checkpoint}")
    return Check("verl step", True, f"1 GRPO step in {seconds:.0f} s; saved {saved[-1]}")


def guarded(name: str, part: Callable[..., Check], *args) -> Check:
    """Run one part; an exception it did not expect is its failure, not the smoke's crash."""
    try:
        return part(*args)
    except Exception as error:
        return Check(name, False, f"{type(error).__name__}: {error}")


# -- the run --------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_smoke(cfg: SmokeConfig, log: Callable[[str], None] = _say) -> SmokeResult:
    """Run every part this machine can run; never raises for a finding."""
    started = time.monotonic()
    result = SmokeResult()
    checks = result.checks

    log("smoke: imports")
    has_gpu = False
    for module_name, distribution, gpu_only in IMPORTS:
        if module_name == "sglang":  # the GPU-only imports are judged by whether there is a GPU
            gpus, device = count_gpus()
            has_gpu = gpus > 0
            if has_gpu:
                checks.append(Check("GPUs", True, f"{gpus} x {device}"))
            elif cfg.require_gpu:
                checks.append(Check("GPUs", False, "no CUDA device visible, and --require-gpu was given"))
            else:
                checks.append(Check("GPUs", True, "none visible; the GPU parts are skipped", skipped=True))
        if cfg.engine == "hf" and module_name in ("sglang", "flash_attn"):
            checks.append(Check(f"import {module_name}", True, "not used with --engine hf", skipped=True))
            continue
        checks.append(check_import(module_name, distribution, gpu_only, has_gpu))

    owned = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="drzero-smoke-") if owned else cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        _service_parts(cfg, work, has_gpu, checks, log)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def _corpus(cfg: SmokeConfig, work: Path, log: Callable[[str], None]) -> tuple[Path | str | None, str]:
    """(the store to serve, a note) — or (None, the reason) when there is none."""
    if cfg.db is not None and is_server_address(cfg.db):
        return resolved_db(cfg.db), f"the Chroma server {resolved_db(cfg.db)}"
    if cfg.db is not None:
        db = Path(cfg.db).expanduser().resolve()
        if not db.is_dir():
            return None, (f"--db {cfg.db} does not exist; build it with `drzero ingest SOURCE... --db {cfg.db}`, "
                          f"or leave out --db to use a demo corpus")
        return db, f"corpus {db}"
    db = work / "demo-db"
    log(f"smoke: building the demo corpus ({cfg.demo_papers} papers) in {db}")
    run_ingest(IngestConfig(db=str(db), demo=True, demo_papers=cfg.demo_papers))
    return db, f"demo corpus of {cfg.demo_papers} papers"


def _service_parts(cfg: SmokeConfig, work: Path, has_gpu: bool, checks: list[Check],
                   log: Callable[[str], None]) -> None:
    gpu_parts = (server_part(cfg), "rollout") + (() if cfg.skip_verl else ("verl step",))

    def skip_rest(names, why: str) -> None:
        checks.extend(Check(name, True, why, skipped=True) for name in names)

    try:
        db, note = _corpus(cfg, work, log)
    except Exception as error:  # a failed demo ingest: the reason is the finding
        db, note = None, f"could not build the demo corpus: {error}"
    if db is None:
        checks.append(Check("retriever", False, note))
        skip_rest(("search",) + gpu_parts, "needs the retriever")
        return

    world = demo_world_of(db)
    question = cfg.question or (world.questions(2, count=1)[0].question if world else GENERIC_QUESTION)
    # a store the user named may sit on a network volume, where SQLite is unreliable: serve a local copy
    local_copy = work / "db-local-copy" if isinstance(db, Path) and cfg.db is not None else None
    # on a GPU machine the retriever runs there, as in every training stage (fp16 encoder, exact search)
    retriever = retriever_service(db, port=_free_port(), copy_to_local=local_copy, device="cuda" if has_gpu else "cpu")
    log(f"smoke: starting the retriever over {db}")
    try:
        with Supervisor([retriever], log=log) as services:
            checks.append(Check("retriever", True, f"healthy at {retriever.url} ({note})"))
            search = guarded("search", check_search, retriever.url, question)
            checks.append(search)
            if not has_gpu:
                model = resolve_model(cfg.model)
                why = "no GPU here; on a GPU machine it runs: "
                spec = inference_spec(cfg, model.path, model.tool_call_parser, SGLANG_PORT)
                checks.append(Check(server_part(cfg), True, why + spec.command_line, skipped=True))
                checks.append(Check("rollout", True, f"no GPU here; on a GPU machine: {cfg.rollouts} agent "
                                                     f"rollouts of {question!r}", skipped=True))
                if not cfg.skip_verl:
                    command = verl_step_command(cfg, model.path, db, work, f"{retriever.url}/retrieve")
                    checks.append(Check("verl step", True, why + shlex.join(command), skipped=True))
                return
            if not search.ok:
                skip_rest(gpu_parts, "needs a working search")
                return
            _gpu_parts(cfg, db, work, world, question, retriever.url, checks, log)
            services.check_alive()
    except ServiceError as error:
        if not any(c.name == "retriever" for c in checks):
            checks.append(Check("retriever", False, str(error).splitlines()[0]))
            skip_rest(("search",) + gpu_parts, "needs the retriever")
        else:
            checks.append(Check("retriever", False, f"died during the smoke: {str(error).splitlines()[0]}"))


def _gpu_parts(cfg: SmokeConfig, db: Path, work: Path, world, question: str, retriever_url: str,
               checks: list[Check], log: Callable[[str], None]) -> None:
    model = resolve_model(cfg.model)
    if not model.local and not cfg.allow_download:
        checks.append(Check(server_part(cfg), False, f"{cfg.model} is not on disk (looked in $DRZERO_MODELS_DIR); "
                                             f"put its weights there (Modal: `python -m backends.modal upload-model "
                                             f"--model {cfg.model}`) or pass --allow-download"))
        checks.extend(Check(n, True, "needs the model", skipped=True)
                      for n in ("rollout",) + (() if cfg.skip_verl else ("verl step",)))
        return
    spec = inference_spec(cfg, model.path, model.tool_call_parser, _free_port())
    log(f"smoke: starting {server_part(cfg)} for {model.path}")
    try:
        with Supervisor([spec], log=log):
            checks.append(Check(server_part(cfg), True, f"healthy at {spec.url} serving {model.path}"))
            checks.append(guarded("rollout", check_rollout, spec.url, retriever_url, question, cfg.rollouts))
    except ServiceError as error:  # SGLang's memory must be free before verl starts: it stops here either way
        checks.append(Check(server_part(cfg), False, str(error).splitlines()[0]))
        checks.extend(Check(n, True, "needs SGLang", skipped=True)
                      for n in ("rollout",) + (() if cfg.skip_verl else ("verl step",))
                      if not any(c.name == n for c in checks))
        return
    if cfg.skip_verl:
        return
    if world is None:
        world = build_demo_world(papers=cfg.demo_papers)  # unanswerable on another corpus; fine for one step
    write_solver_data(work / "data", world)
    command = verl_step_command(cfg, model.path, db, work, f"{retriever_url}/retrieve")
    log("smoke: one verl step: " + " ".join(command))
    checks.append(guarded("verl step", run_verl_step, command, work / "checkpoints" / "solver_iter1",
                          cfg.verl_timeout, log))


def main(argv: list[str] | None = None) -> int:
    """`python -m drzero.tools.smoke`: the same as `drzero smoke`, for environments without the CLI entry."""
    parser = argparse.ArgumentParser(prog="drzero smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SmokeConfig)
    result = run_smoke(config_from_args(SmokeConfig, parser.parse_args(argv)))
    print(summary_lines(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
