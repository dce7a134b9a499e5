"""`drzero evaluate`: the solver with the search tool, greedy, over QA sets; EM, token F1 and cover-EM.

    drzero evaluate --model http://127.0.0.1:8001 --data /corpus/data/eval_demo.parquet
    drzero evaluate --model /checkpoints/solver_iter2_hf --data /corpus/data/eval_demo.parquet \\
        --out /checkpoints/eval/iter2 --dp 4 --tp 2        # starts SGLang for the run; `drzero report` reads it
    drzero evaluate --model /checkpoints/solver_iter2_hf --benchmark all --out /checkpoints/eval/iter2
    drzero evaluate --model http://127.0.0.1:8001 --benchmark nq,hotpotqa --benchmark-dir DIR --limit 500

``--model`` is either the URL of a running SGLang server (answering to ``--served-model-name``)
or a model - a directory, a `drzero list-models` key or a hub name - for which the command
starts SGLang on ``--port`` (8001) and stops it at the end; ``--api generate`` renders with
``--tokenizer``, else the model's own, or the one a URL's server names. Every question is asked with our
solver prompt (the prompt stored in the file is not used: the model was trained on ours) through
the same agent loop as training (``drzero.rollout.client``), at temperature 0, with at most
``--max-turns`` assistant turns. The data file is read by ``drzero.data.qa.read_qa_file``:
Search-R1 benchmark files, verl rows, our solver data and `drzero make-eval-set` output.

Search goes to the retriever at ``--retriever-url``; when nothing answers there, the URL is on this
machine and a store is named (``--db`` or ``$DRZERO_DB``, as on Modal), the command serves that store
on the URL's port for the run.

``--benchmark`` asks the papers' seven QA sets (or some of them) as FlashRAG distributes them,
``DIR/<name>/<split>.jsonl`` under ``--benchmark-dir`` (fetched from the hub into it when missing and
online): the test split, or dev where a set has no public test answers (drzero.data.benchmarks). With
``--limit N`` each set is cut to N questions chosen by a seeded hash of their ids (``--seed``): the same
subset every run, recorded. ``--data`` and ``--benchmark`` together ask both; the papers' "Avg." (the
unweighted mean over the sets) covers the benchmarks only.

Scores, all after SQuAD normalization of the last ``<answer>``: EM (equals a gold answer), token
F1 (best over the golds) and cover-EM (a gold answer appears in the prediction as whole words).
A question whose rollout failed (server errors after retries) scores 0 and is counted under
``rollout_errors``; it never stops the run. They are reported overall, per ``data_source``, per
hop count and per benchmark with their average, with the share answered and the agent's turns and
searches. ``--out DIR`` gets ``summary.json``, ``per_question.csv`` and ``manifest.json``, the setup
the numbers depend on (model and checkpoint hash, corpus and store fingerprint, embedder, top-k, turns,
budget, prompt template hash, thinking, decoding, splits and subsets; drzero.stages.evaluate_setup),
written last as the commit of the set. `drzero report --compare` shows where two setups differ.

The benchmarks:
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from drzero.atomic import check_writable, commit_set, describe_file
from drzero.config import DEFAULT_COLLECTION, RETRIEVER_URL_ENV, RolloutOptions, env_default, option, require
from drzero.data.benchmarks import (ALL, BENCHMARKS, Benchmark, benchmark_path, benchmark_table, hub_offline,
                                    load_benchmarks, resolve_benchmarks)
from drzero.data.qa import QA_SUFFIXES, QaItem, read_qa_file
from drzero.gpus import nvidia_gpu_present
from drzero.models.files import load_tokenizer
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.prompts import solver_messages
from drzero.rollout import search
from drzero.rollout.client import AgentRolloutClient, GenerationSettings, Trajectory
from drzero.rollout.render import SOLVER_PROMPT_LENGTH, RolloutLimits, template_thinking_kwargs
from drzero.rollout.search import SearchSettings
from drzero.services.specs import RETRIEVER_DEVICES, ServiceError, retriever_service, sglang_service
from drzero.services.supervisor import Supervisor, wait_for_health
from drzero.stages.base import thinking_word
from drzero.stages.evaluate_results import EvaluationResult, build_summary, csv_text, score, summary_lines
from drzero.stages.evaluate_setup import corpus_setup, evaluation_setup, model_setup

__doc__ += benchmark_table() + "\n"  # --help shows the sets from the one table that defines them

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PER_QUESTION_FILE = "per_question.csv"
MANIFEST_FILE = "manifest.json"
DEFAULT_BENCHMARK_DIR = str(Path(env_default("DRZERO_DATA_DIR", "/corpus/data")) / "benchmarks")
URL_HEALTH_WAIT = 60.0      # a server someone else runs is up already, or it is not coming
SERVED_HEALTH_WAIT = 1800.0  # a first model load from a cold volume takes many minutes (drzero.services)


# -- config --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class EvaluateConfig(RolloutOptions):
    model: str = option(metavar="PATH_OR_URL", help=(
        "http(s) URL of a running SGLang server, or a model (directory, `drzero list-models` key or hub name) "
        "to serve with SGLang for the run"))
    data: str | None = option(None, metavar="FILE", help=(
        "QA file, parquet or JSONL: Search-R1 format (question, golden_answers, data_source), verl rows (question "
        "after 'Question:' in the prompt, answers in reward_model.ground_truth.target), or `drzero make-eval-set` "
        "output (--data, --benchmark or both)"))
    benchmark: str | None = option(None, metavar="NAME[,NAME...]|all", help=(
        f"the papers' QA sets in FlashRAG's format, by name ({', '.join(BENCHMARKS)}) or {ALL!r}; splits in the "
        f"table above"))
    benchmark_dir: str = option(DEFAULT_BENCHMARK_DIR, metavar="DIR", help=(
        "where the benchmark sets are, as FlashRAG lays them out: DIR/<name>/<split>.jsonl ($DRZERO_DATA_DIR/"
        "benchmarks)"))
    download: bool = option(True, help=(
        "fetch a set missing from --benchmark-dir from the hub (RUC-NLPIR/FlashRAG_datasets) into it; "
        "--no-download: never"))
    seed: int = option(0, help="seed of the --limit subset of each benchmark (the same subset for the same seed)")
    out: str | None = option(None, metavar="DIR", help=(
        "directory for summary.json, per_question.csv and manifest.json. Default: eval_<data stem>/ beside the "
        "data file, or eval_<benchmarks>/ in --benchmark-dir; `drzero report` reads CHECKPOINTS/eval/iter<K>/"))
    db: str | None = option(os.environ.get("DRZERO_DB") or None, metavar="DIR|URL", help=(
        "corpus store to serve when nothing answers at --retriever-url on this machine ($DRZERO_DB; a directory "
        "or a Chroma server's http://host:port): evaluate starts `drzero serve-retriever --db DIR` on that port "
        "for the run (on Modal: the corpus volume)"))
    collection: str = option(DEFAULT_COLLECTION, help="the collection inside --db")
    retriever_device: str = option("auto", choices=list(RETRIEVER_DEVICES), help=(
        "where a retriever started here on --db encodes and searches: auto = GPU 0 (beside SGLang) when there is "
        "one, else the CPU; serve a paper-scale corpus on GPUs of its own and pass --retriever-url"))
    served_model_name: str = option("solver", help="model name the SGLang server answers to")
    topk: int = option(3, help="passages per search query")
    limit: int | None = option(None, help=(
        "only the first N questions of --data, and N of each benchmark chosen by a seeded hash of their ids "
        "(--seed)"))
    port: int = option(8001, help="port of the SGLang server started for a model (not a URL)")
    dp: int = option(1, help="data parallel size of the SGLang server started for a model")
    tp: int = option(1, help="tensor parallel size of the SGLang server started for a model")
    mem_fraction: float = option(0.8, help="--mem-fraction-static of the SGLang server started for a model")
    tool_call_parser: str | None = option(None, help=(
        "SGLang --tool-call-parser of the server started for a model (default: the model family's)"))
    wait: float | None = option(None, help=(
        f"seconds to wait for the inference server's /health (default: {URL_HEALTH_WAIT:g} for a URL, "
        f"{SERVED_HEALTH_WAIT:g} for a server started here)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.data or self.benchmark), "data", self.data,
                f"a QA file, or --benchmark with names from {', '.join(BENCHMARKS)} or {ALL!r}")
        if self.data:
            data = Path(self.data).expanduser()
            require(data.is_file(), "data", self.data, "an existing parquet or JSONL file of questions and answers")
            require(data.suffix in QA_SUFFIXES, "data", self.data, f"a file ending in {', '.join(QA_SUFFIXES)}")
        self.benchmark_sets()  # an unknown name fails here, naming the known ones
        for name in ("topk", "dp", "tp"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "an integer >= 1, or unset for all")
        require(1 <= self.port <= 65535, "port", self.port, "a TCP port from 1 to 65535")
        require(0 < self.mem_fraction < 1, "mem_fraction", self.mem_fraction, "a fraction between 0 and 1")
        require(self.wait is None or self.wait >= 0, "wait", self.wait, "a number of seconds >= 0")

    @property
    def serves_model(self) -> bool:
        """True when --model names a model to serve here, False for the URL of a running server."""
        return not self.model.startswith(("http://", "https://"))

    def benchmark_sets(self) -> list[Benchmark]:
        return resolve_benchmarks(self.benchmark) if self.benchmark else []

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        if self.data:
            data = Path(self.data).expanduser()
            return data.parent / f"eval_{data.stem}"
        names = [b.name for b in self.benchmark_sets()]
        asked = ALL if len(names) == len(BENCHMARKS) else "_".join(names)
        return Path(self.benchmark_dir).expanduser() / f"eval_{asked}"


# -- running -------------------------------------------------------------------------------------

@dataclass
class Questions:
    items: list[QaItem]
    rows: int                 # in every file read
    sources: list[dict]       # each file as the manifest records it (drzero.stages.evaluate_setup)


def gather_questions(cfg: EvaluateConfig) -> Questions:
    """The questions of --data (its first --limit rows) and of each benchmark (a seeded --limit subset)."""
    items: list[QaItem] = []
    rows, sources = 0, []
    if cfg.data:
        path = Path(cfg.data).expanduser().resolve()
        asked, total = read_qa_file(path, cfg.limit)
        items, rows = list(asked), total
        sources.append({"name": f"data:{path.stem}", "file": str(path), "rows": total,
                        "sha256": describe_file(path)["sha256"], "questions": len(asked),
                        "subset": None if len(asked) == total else {"first": len(asked)}})
    for loaded in load_benchmarks(cfg.benchmark_sets(), cfg.benchmark_dir, cfg.limit, cfg.seed, cfg.download):
        items += loaded.items
        rows += loaded.rows
        sources.append(loaded.record())
    return Questions(items, rows, sources)


def _check_retriever(url: str) -> dict | None:
    """One real search, so a wrong --retriever-url fails now rather than as N silently bad answers; then what the
    retriever's /health says of its corpus (None from a retriever without one)."""
    import httpx  # lazy: a tenth of a second at import, and only an evaluation needs it (not `drzero --help`)

    try:
        response = httpx.post(url, json={"queries": ["health check"], "topk": 1, "return_scores": True},
                              timeout=30, trust_env=False)
        problem = None if response.status_code == 200 else f"it answered {response.status_code}"
    except httpx.HTTPError as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise ServiceError(f"the retriever at {url} did not answer a test search ({problem}); start it with "
                           f"`drzero serve-retriever --db DIR` or pass --retriever-url (${RETRIEVER_URL_ENV}).")
    return _get_json(url.rstrip("/").removesuffix("/retrieve") + "/health")


def _retriever_services(cfg: EvaluateConfig) -> list:
    """The retriever to start: none when one answers at --retriever-url, or no store is named, or the URL is not
    on this machine; else `drzero serve-retriever --db` on the URL's port."""
    address = urlsplit(cfg.retriever_url)
    if not cfg.db or address.hostname not in ("127.0.0.1", "localhost"):
        return []
    try:
        _check_retriever(cfg.retriever_url)
        return []
    except ServiceError:
        pass
    device = cfg.retriever_device if cfg.retriever_device != "auto" else "cuda" if nvidia_gpu_present() else "cpu"
    log.info("nothing answers at %s: serving %s there for this evaluation", cfg.retriever_url, cfg.db)
    return [retriever_service(cfg.db, port=address.port or 80, collection=cfg.collection, device=device)]


def _get_json(url: str) -> dict | None:
    """A GET's JSON object, or None when the server has no such endpoint (or answers something else)."""
    import httpx  # lazy: see _check_retriever

    try:
        response = httpx.get(url, timeout=10, trust_env=False)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _check_served_name(base_url: str, name: str) -> None:
    """A wrong --served-model-name would fail every request with a 404; say so once, up front."""
    listed = _get_json(f"{base_url}/v1/models") or {}
    served = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)]
    require(not served or name in served, "served_model_name", name,
            f"a model the server at {base_url} serves: {', '.join(map(str, served))}")


def _tokenizer_name(cfg: EvaluateConfig) -> str:
    """The tokenizer ``--api generate`` renders with: --tokenizer, the served model's own, or the one the server at
    the --model URL names (SGLang's /get_model_info)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.serves_model:
        return resolve_model(cfg.model).path
    base_url = cfg.model.rstrip("/").removesuffix("/v1")
    wait_for_health(base_url, timeout=URL_HEALTH_WAIT if cfg.wait is None else cfg.wait)
    named = (_get_json(f"{base_url}/get_model_info") or {}).get("tokenizer_path")
    require(isinstance(named, str) and bool(named), "tokenizer", cfg.tokenizer,
            f"a tokenizer name or directory with --api generate: the server at {base_url} names none")
    return named


def generation_settings(cfg: EvaluateConfig, base_url: str, tokenizer) -> GenerationSettings:
    """How every question is rolled out: training's limits (drzero.rollout.render), greedy."""
    limits = RolloutLimits.from_training_config(SOLVER_PROMPT_LENGTH, cfg.thinking)
    kwargs = (template_thinking_kwargs(tokenizer, cfg.thinking) if tokenizer is not None
              else {"enable_thinking": cfg.thinking})
    return GenerationSettings(base_url=base_url, model=cfg.served_model_name, api=cfg.api,
                              temperature=0.0,  # greedy: evaluation, not exploration
                              max_turns=cfg.max_turns, max_prompt_tokens=limits.max_prompt_tokens,
                              max_response_tokens=cfg.max_response_tokens or limits.max_response_tokens,
                              tool_output=limits.tool_output, chat_template_kwargs=kwargs,
                              timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency)


async def _rollouts(cfg: EvaluateConfig, generation: GenerationSettings, items: list[QaItem], tokenizer,
                    retriever_url: str) -> list[Trajectory]:
    client = AgentRolloutClient(generation, SearchSettings(url=retriever_url, topk=cfg.topk,
                                                           max_chars=generation.tool_output.max_length),
                                tokenizer=tokenizer)
    try:
        with tqdm(total=len(items), desc="evaluate", unit="question", mininterval=1.0) as bar:
            async def tracked(item: QaItem) -> Trajectory:
                try:
                    return await client.run(solver_messages(item.question))
                finally:
                    bar.update(1)

            return list(await asyncio.gather(*(tracked(item) for item in items)))
    finally:
        await client.aclose()
        await search.close_sessions()


def _serve_and_roll_out(cfg: EvaluateConfig, items: list[QaItem], tokenizer, timings: dict,
                        retriever_url: str) -> tuple[list[Trajectory], GenerationSettings, str | None]:
    """(trajectories, the settings they ran under, where the model's weights are when known)."""
    started = time.perf_counter()
    if not cfg.serves_model:
        base_url = cfg.model.rstrip("/").removesuffix("/v1")
        wait_for_health(base_url, timeout=URL_HEALTH_WAIT if cfg.wait is None else cfg.wait)
        _check_served_name(base_url, cfg.served_model_name)
        model_path = (_get_json(f"{base_url}/get_model_info") or {}).get("model_path")  # SGLang names its weights
        timings["startup_seconds"] = round(time.perf_counter() - started, 2)
        generation = generation_settings(cfg, base_url, tokenizer)
        return asyncio.run(_rollouts(cfg, generation, items, tokenizer, retriever_url)), generation, model_path
    model = resolve_model(cfg.model)
    spec = sglang_service(model.path, port=cfg.port, dp=cfg.dp, tp=cfg.tp, mem_fraction=cfg.mem_fraction,
                          tool_call_parser=cfg.tool_call_parser or model.tool_call_parser,
                          served_model_name=cfg.served_model_name,
                          startup_timeout=SERVED_HEALTH_WAIT if cfg.wait is None else cfg.wait)
    generation = generation_settings(cfg, spec.url, tokenizer)
    with Supervisor([spec]) as services:
        timings["startup_seconds"] = round(time.perf_counter() - started, 2)
        trajectories = asyncio.run(_rollouts(cfg, generation, items, tokenizer, retriever_url))
        try:
            services.check_alive()
        except ServiceError as died:  # the rows are still written; this says why the late ones failed
            log.error("%s", died)
    return trajectories, generation, model.path


def _text_writer(text: str):
    return lambda temporary: temporary.write_text(text, encoding="utf-8")


def run_evaluate(cfg: EvaluateConfig) -> EvaluationResult:
    started = time.perf_counter()
    questions = gather_questions(cfg)  # every file read and checked before any server starts
    out_dir = cfg.output_dir()
    check_writable(out_dir)  # before any server time is spent
    tokenizer_name = _tokenizer_name(cfg) if cfg.api == "generate" else cfg.tokenizer
    tokenizer = load_tokenizer(tokenizer_name) if cfg.api == "generate" else None
    retriever_url, services = cfg.retriever_url, _retriever_services(cfg)
    with Supervisor(services) if services else contextlib.nullcontext():
        health = _check_retriever(retriever_url)
        timings = {"load_seconds": round(time.perf_counter() - started, 2)}
        rolled = time.perf_counter()
        trajectories, generation, model_path = _serve_and_roll_out(cfg, questions.items, tokenizer, timings,
                                                                   retriever_url)
        timings["rollout_seconds"] = round(time.perf_counter() - rolled - timings["startup_seconds"], 2)
    records = [score(item, trajectory) for item, trajectory in zip(questions.items, trajectories)]

    setup = evaluation_setup(
        model=model_setup(cfg.model, cfg.served_model_name, model_path, tokenizer_name),
        corpus=corpus_setup(retriever_url, health), topk=cfg.topk, generation=asdict(generation),
        thinking=cfg.thinking, chat_template=getattr(tokenizer, "chat_template", None), questions=questions.sources)
    summary_path, per_question_path = out_dir / SUMMARY_FILE, out_dir / PER_QUESTION_FILE
    manifest_path = out_dir / MANIFEST_FILE
    summary = build_summary(cfg, records, questions.rows, timings)
    summary["files"] = {"summary": str(summary_path), "per_question": str(per_question_path),
                        "manifest": str(manifest_path)}
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    manifest = commit_set({per_question_path: _text_writer(csv_text(records)),
                           summary_path: _text_writer(json.dumps(summary, indent=2, ensure_ascii=False))},
                          manifest_path, {"command": "drzero evaluate", "created": summary["created"], "setup": setup})
    return EvaluationResult(out_dir, summary_path, per_question_path, summary, records, manifest_path, manifest)


def main(cfg: EvaluateConfig) -> int:
    """`drzero evaluate`: score the QA set and print the summary."""
    print(summary_lines(run_evaluate(cfg)))
    return 0


def plan_in_run(run, iteration: int) -> StagePlan:
    """The merged solver of this iteration on the run's QA set and benchmarks (``run``: drzero.pipeline.EvolveConfig),
    iteration 0 being the base model before any training (the report's baseline row); SGLang is started by the
    evaluation itself."""
    layout = run.layout
    services, retriever_url = run.retriever()
    base = resolve_model(run.model)
    model = layout.merged("solver", iteration) if iteration > 0 else Path(base.path)
    out = layout.checkpoints / "eval" / f"iter{iteration}"
    thinking = run.thinking_setting()
    asked = {"data": run.eval_data, "benchmark": run.eval_benchmarks, "benchmark_dir": run.eval_benchmark_dir,
             "limit": run.eval_limit}

    def evaluate():  # configured when it runs: the model is written by the merge before it
        return run_evaluate(EvaluateConfig(model=str(model), out=str(out), retriever_url=retriever_url,
                                           dp=run.sglang_dp or 4, tp=run.sglang_tp or 2, thinking=bool(thinking),
                                           **asked))

    options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in asked.items() if value)
    # a base model named on the hub is fetched by the evaluation's SGLang: not a file to wait for
    inputs = ([model] if iteration > 0 or base.local else []) + ([Path(run.eval_data)] if run.eval_data else [])
    if run.eval_benchmarks and hub_offline():  # nothing will fetch them: the preflight checks they are there
        inputs += [benchmark_path(run.eval_benchmark_dir, b) for b in resolve_benchmarks(run.eval_benchmarks)]
    return StagePlan(name=f"evaluate (iteration {iteration})", run=evaluate, services=services,
                     run_label=f"drzero evaluate --model {model} {options} --out {out} (thinking "
                               f"{thinking_word(thinking)})",
                     inputs=inputs, outputs=[out / SUMMARY_FILE, out / MANIFEST_FILE])
