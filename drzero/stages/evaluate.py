"""`drzero evaluate`: the solver with the search tool, greedy, over a QA file; EM, token F1 and cover-EM.

    drzero evaluate --model http://127.0.0.1:8001 --data /corpus/data/eval_demo.parquet
    drzero evaluate --model /checkpoints/solver_iter2_hf --data /corpus/data/eval_demo.parquet \\
        --out /checkpoints/eval/iter2 --dp 4 --tp 2        # starts SGLang for the run; `drzero report` reads it
    drzero evaluate --model qwen2.5-3b-instruct --data search_r1/test.parquet --limit 1000

``--model`` is either the URL of a running SGLang server (answering to ``--served-model-name``)
or a model - a directory, a `drzero list-models` key or a hub name - for which the command
starts SGLang on ``--port`` (8001) and stops it at the end. Every question is asked with our
solver prompt (the prompt stored in the file is not used: the model was trained on ours) through
the same agent loop as training (``drzero.rollout.client``), at temperature 0, with at most
``--max-turns`` assistant turns. The data file is read by ``drzero.data.qa.read_qa_file``:
Search-R1 benchmark files, verl rows, our solver data and `drzero make-eval-set` output.

Scores, all after SQuAD normalization of the last ``<answer>``: EM (equals a gold answer), token
F1 (best over the golds) and cover-EM (a gold answer appears in the prediction as whole words).
A question whose rollout failed (server errors after retries) scores 0 and is counted under
``rollout_errors``; it never stops the run. They are reported overall, per ``data_source``, per
hop count, with the agent's turns and searches. ``--out DIR`` gets ``summary.json`` and
``per_question.csv``, each written through a temporary file renamed at the end.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from drzero import __version__
from drzero.atomic import check_writable, write_text_atomically
from drzero.config import RETRIEVER_URL_ENV, RolloutOptions, option, require
from drzero.data.qa import QA_SUFFIXES, QaItem, read_qa_file
from drzero.models.files import load_tokenizer
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.prompts import solver_messages
from drzero.rewards.solver import exact_match, normalize_answer
from drzero.rollout import search
from drzero.rollout.client import AgentRolloutClient, GenerationSettings, Trajectory
from drzero.rollout.render import SOLVER_PROMPT_LENGTH, RolloutLimits, template_thinking_kwargs
from drzero.rollout.search import SearchSettings
from drzero.services.specs import ServiceError, sglang_service
from drzero.services.supervisor import Supervisor, wait_for_health
from drzero.stages.base import thinking_word

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PER_QUESTION_FILE = "per_question.csv"
CSV_COLUMNS = ("index", "question", "golden_answers", "prediction", "em", "f1", "cover_em", "hops", "data_source",
               "turns", "searches", "stop_reason", "error")
URL_HEALTH_WAIT = 60.0      # a server someone else runs is up already, or it is not coming
SERVED_HEALTH_WAIT = 1800.0  # a first model load from a cold volume takes many minutes (drzero.services)


# -- metrics -------------------------------------------------------------------------------------

def em(prediction: str | None, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer (the solver reward's test)."""
    return float(exact_match(prediction, list(golds)))


def f1(prediction: str | None, golds: Sequence[str]) -> float:
    """SQuAD token F1 of the normalized prediction, best over the gold answers; 0.0 without a prediction."""
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        expected = normalize_answer(gold).split()
        if not predicted or not expected:
            score = float(predicted == expected)  # SQuAD: two empty answers agree
        else:
            common = sum((Counter(predicted) & Counter(expected)).values())
            precision, recall = common / len(predicted), common / len(expected)
            score = 2 * precision * recall / (precision + recall) if common else 0.0
        best = max(best, score)
    return best


def cover_em(prediction: str | None, golds: Sequence[str]) -> float:
    """1.0 when a normalized gold answer appears in the normalized prediction as whole words (so >= EM)."""
    if prediction is None:
        return 0.0
    normalized = normalize_answer(prediction)
    padded = f" {normalized} "
    return float(any(gold == normalized or (gold and f" {gold} " in padded)
                     for gold in map(normalize_answer, golds)))


# -- config --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class EvaluateConfig(RolloutOptions):
    model: str = option(metavar="PATH_OR_URL", help=(
        "http(s) URL of a running SGLang server, or a model (directory, `drzero list-models` key or hub name) "
        "to serve with SGLang for the run"))
    data: str = option(metavar="FILE", help=(
        "QA file, parquet or JSONL: Search-R1 format (question, golden_answers, data_source), verl rows (question "
        "after 'Question:' in the prompt, answers in reward_model.ground_truth.target), or `drzero make-eval-set` "
        "output"))
    out: str | None = option(None, metavar="DIR", help=(
        "directory for summary.json and per_question.csv. Default: eval_<data stem>/ beside the data file; "
        "`drzero report` reads CHECKPOINTS/eval/iter<K>/"))
    served_model_name: str = option("solver", help="model name the SGLang server answers to")
    topk: int = option(3, help="passages per search query")
    limit: int | None = option(None, help="only the first N questions of the file")
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
        data = Path(self.data).expanduser()
        require(data.is_file(), "data", self.data, "an existing parquet or JSONL file of questions and answers")
        require(data.suffix in QA_SUFFIXES, "data", self.data, f"a file ending in {', '.join(QA_SUFFIXES)}")
        require(self.api != "generate" or bool(self.tokenizer) or self.serves_model, "tokenizer", self.tokenizer,
                "a tokenizer name or directory when api='generate' and --model is a URL")
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

    def output_dir(self) -> Path:
        data = Path(self.data).expanduser()
        return Path(self.out).expanduser() if self.out else data.parent / f"eval_{data.stem}"


# -- results -------------------------------------------------------------------------------------

@dataclass
class QuestionResult:
    index: int
    question: str
    golden_answers: list[str]
    prediction: str | None
    em: float
    f1: float
    cover_em: float
    hops: str
    data_source: str
    turns: int
    searches: int
    stop_reason: str
    error: str | None
    search_failures: int = 0
    seconds: float = 0.0


@dataclass
class EvaluationResult:
    out_dir: Path
    summary_path: Path
    per_question_path: Path
    summary: dict = field(default_factory=dict)
    records: list[QuestionResult] = field(default_factory=list)


def score(item: QaItem, trajectory: Trajectory) -> QuestionResult:
    golds, prediction = list(item.golden_answers), trajectory.final_answer
    return QuestionResult(
        index=item.index, question=item.question, golden_answers=golds, prediction=prediction,
        em=em(prediction, golds), f1=f1(prediction, golds), cover_em=cover_em(prediction, golds),
        hops=item.hops, data_source=item.data_source, turns=len(trajectory.assistant_turns),
        searches=trajectory.valid_tool_calls, stop_reason=trajectory.stop_reason, error=trajectory.error,
        search_failures=trajectory.search_failures, seconds=round(trajectory.seconds, 3))


def aggregate(records: Sequence[QuestionResult]) -> dict:
    """The metrics of a group of questions (means; 0.0 for an empty group)."""
    n = len(records)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return {"questions": n, "em": mean(r.em for r in records), "f1": mean(r.f1 for r in records),
            "cover_em": mean(r.cover_em for r in records),
            "answered": mean(float(r.prediction is not None) for r in records),
            "mean_turns": mean(r.turns for r in records), "mean_searches": mean(r.searches for r in records),
            "rollout_errors": sum(r.stop_reason == "error" for r in records)}


def hop_sort_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _grouped(records: Sequence[QuestionResult], key, order=None) -> dict[str, dict]:
    groups: dict[str, list[QuestionResult]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return {name: aggregate(groups[name]) for name in sorted(groups, key=order)}


def build_summary(cfg: EvaluateConfig, records: list[QuestionResult], rows_in_file: int, timings: dict) -> dict:
    by_source = _grouped(records, lambda r: r.data_source)
    errors = [r.error for r in records if r.error]
    return {
        "drzero_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(Path(cfg.data).expanduser().resolve()),
        "model": cfg.model,
        "served_model_name": cfg.served_model_name,
        "overall": aggregate(records),
        # Search-R1 reports the unweighted mean over its benchmarks ("Avg")
        "macro_average": {m: sum(g[m] for g in by_source.values()) / len(by_source) for m in ("em", "f1", "cover_em")},
        "by_data_source": by_source,
        "by_hops": _grouped(records, lambda r: r.hops, hop_sort_key),
        "counts": {
            "rows_in_file": rows_in_file,
            "questions": len(records),
            "answered": sum(r.prediction is not None for r in records),
            "rollout_errors": len([r for r in records if r.stop_reason == "error"]),
            "search_failures": sum(r.search_failures for r in records),
            "stop_reasons": dict(Counter(r.stop_reason for r in records)),
        },
        "first_error": errors[0] if errors else None,
        "config": asdict(cfg),
        "timings": timings,
    }


# -- running -------------------------------------------------------------------------------------

def _check_retriever(url: str) -> None:
    """One real search, so a wrong --retriever-url fails now rather than as N silently bad answers."""
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


def _check_served_name(base_url: str, name: str) -> None:
    """A wrong --served-model-name would fail every request with a 404; say so once, up front."""
    import httpx  # lazy: see _check_retriever

    try:
        response = httpx.get(f"{base_url}/v1/models", timeout=10, trust_env=False)
        served = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return  # not every server lists its models; the requests themselves will tell
    require(not served or name in served, "served_model_name", name,
            f"a model the server at {base_url} serves: {', '.join(map(str, served))}")


async def _rollouts(cfg: EvaluateConfig, base_url: str, items: list[QaItem], tokenizer) -> list[Trajectory]:
    limits = RolloutLimits.from_training_config(SOLVER_PROMPT_LENGTH, cfg.thinking)
    kwargs = (template_thinking_kwargs(tokenizer, cfg.thinking) if tokenizer is not None
              else {"enable_thinking": cfg.thinking})
    generation = GenerationSettings(base_url=base_url, model=cfg.served_model_name, api=cfg.api,
                                    temperature=0.0,  # greedy: evaluation, not exploration
                                    max_turns=cfg.max_turns, max_prompt_tokens=limits.max_prompt_tokens,
                                    max_response_tokens=cfg.max_response_tokens or limits.max_response_tokens,
                                    tool_output=limits.tool_output, chat_template_kwargs=kwargs,
                                    timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency)
    client = AgentRolloutClient(generation, SearchSettings(url=cfg.retriever_url, topk=cfg.topk,
                                                           max_chars=limits.tool_output.max_length),
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


def _serve_and_roll_out(cfg: EvaluateConfig, items: list[QaItem], tokenizer, timings: dict) -> list[Trajectory]:
    started = time.perf_counter()
    if not cfg.serves_model:
        base_url = cfg.model.rstrip("/").removesuffix("/v1")
        wait_for_health(base_url, timeout=URL_HEALTH_WAIT if cfg.wait is None else cfg.wait)
        _check_served_name(base_url, cfg.served_model_name)
        timings["startup_seconds"] = round(time.perf_counter() - started, 2)
        return asyncio.run(_rollouts(cfg, base_url, items, tokenizer))
    model = resolve_model(cfg.model)
    spec = sglang_service(model.path, port=cfg.port, dp=cfg.dp, tp=cfg.tp, mem_fraction=cfg.mem_fraction,
                          tool_call_parser=cfg.tool_call_parser or model.tool_call_parser,
                          served_model_name=cfg.served_model_name,
                          startup_timeout=SERVED_HEALTH_WAIT if cfg.wait is None else cfg.wait)
    with Supervisor([spec]) as services:
        timings["startup_seconds"] = round(time.perf_counter() - started, 2)
        trajectories = asyncio.run(_rollouts(cfg, spec.url, items, tokenizer))
        try:
            services.check_alive()
        except ServiceError as died:  # the rows are still written; this says why the late ones failed
            log.error("%s", died)
    return trajectories


def _csv_text(records: Sequence[QuestionResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([r.index, r.question, json.dumps(r.golden_answers, ensure_ascii=False),
                         "" if r.prediction is None else r.prediction, int(r.em), round(r.f1, 4), int(r.cover_em),
                         r.hops, r.data_source, r.turns, r.searches, r.stop_reason, r.error or ""])
    return buffer.getvalue()


def run_evaluate(cfg: EvaluateConfig) -> EvaluationResult:
    started = time.perf_counter()
    items, rows_in_file = read_qa_file(cfg.data, cfg.limit)
    out_dir = cfg.output_dir()
    check_writable(out_dir)  # before any server time is spent
    tokenizer = None
    if cfg.api == "generate":
        tokenizer = load_tokenizer(cfg.tokenizer or resolve_model(cfg.model).path)
    _check_retriever(cfg.retriever_url)
    timings = {"load_seconds": round(time.perf_counter() - started, 2)}

    rolled = time.perf_counter()
    trajectories = _serve_and_roll_out(cfg, items, tokenizer, timings)
    timings["rollout_seconds"] = round(time.perf_counter() - rolled - timings["startup_seconds"], 2)
    records = [score(item, trajectory) for item, trajectory in zip(items, trajectories)]

    summary_path, per_question_path = out_dir / SUMMARY_FILE, out_dir / PER_QUESTION_FILE
    summary = build_summary(cfg, records, rows_in_file, timings)
    summary["files"] = {"summary": str(summary_path), "per_question": str(per_question_path)}
    write_text_atomically(_csv_text(records), per_question_path)
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    write_text_atomically(json.dumps(summary, indent=2, ensure_ascii=False), summary_path)
    return EvaluationResult(out_dir, summary_path, per_question_path, summary, records)


def _metrics(group: dict) -> str:
    return f"EM {group['em']:.3f}  F1 {group['f1']:.3f}  cover-EM {group['cover_em']:.3f}  ({group['questions']} questions)"


def summary_lines(result: EvaluationResult) -> str:
    s = result.summary
    overall, counts = s["overall"], s["counts"]
    lines = [
        f"evaluate summary ({Path(s['data']).name}, {counts['questions']} of {counts['rows_in_file']} questions)",
        f"  model          {s['model']}  (served as {s['served_model_name']!r})",
        f"  overall        {_metrics(overall)}, answered {100 * overall['answered']:.1f}%",
    ]
    lines += [f"  {'by hops' if i == 0 else '':<14} {hops} hop(s): {_metrics(g)}"
              for i, (hops, g) in enumerate(s["by_hops"].items())]
    # our own sets name their sources search_zero_{hops}: the hop lines above already say it all
    benchmarks = any(not source.startswith("search_zero_") for source in s["by_data_source"])
    lines += [f"  {'by source' if i == 0 else '':<14} {source}: {_metrics(g)}"
              for i, (source, g) in enumerate(s["by_data_source"].items()) if benchmarks]
    if benchmarks and len(s["by_data_source"]) > 1:
        macro = s["macro_average"]
        lines.append(f"  {'macro average':<14} EM {macro['em']:.3f}  F1 {macro['f1']:.3f}  "
                     f"cover-EM {macro['cover_em']:.3f}")
    lines.append(f"  agent          {overall['mean_turns']:.2f} turns and {overall['mean_searches']:.2f} searches "
                 f"per question; {counts['rollout_errors']} rollout errors, {counts['search_failures']} failed "
                 f"searches")
    if counts["rollout_errors"]:
        lines.append(f"  first error    {s['first_error']}")
    lines += [f"  wrote          {result.summary_path}", f"                 {result.per_question_path}",
              f"  took           {s['timings']['total_seconds']}s"]
    return "\n".join(lines)


def main(cfg: EvaluateConfig) -> int:
    """`drzero evaluate`: score the QA set and print the summary."""
    print(summary_lines(run_evaluate(cfg)))
    return 0


def plan_in_run(run, iteration: int) -> StagePlan:
    """The merged solver of this iteration on the run's QA set (``run``: drzero.pipeline.EvolveConfig); SGLang is
    started by the evaluation itself."""
    layout = run.layout
    services, retriever_url = run.retriever()
    model = layout.merged("solver", iteration)
    out = layout.checkpoints / "eval" / f"iter{iteration}"
    thinking = run.thinking_setting()

    def evaluate():  # configured when it runs: the model is written by the merge before it
        return run_evaluate(EvaluateConfig(model=str(model), data=run.eval_data, out=str(out),
                                           retriever_url=retriever_url, dp=run.sglang_dp or 4, tp=run.sglang_tp or 2,
                                           thinking=bool(thinking)))

    return StagePlan(name=f"evaluate (iteration {iteration})", run=evaluate, services=services,
                     run_label=f"drzero evaluate --model {model} --data {run.eval_data} --out {out} (thinking "
                               f"{thinking_word(thinking)})",
                     inputs=[model, Path(run.eval_data)], outputs=[out / "summary.json"])
