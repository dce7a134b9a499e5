"""The gen-data engine: the solver's training data for iteration K, sampled from the trained proposer.

    run_gen_data(GenDataJob(iteration=1, seeds="/corpus/data/zero_ratio4321.parquet", tokenizer=..., ...))
    drzero gen-data --iteration 1            # the stage (drzero.stages.gen_data) starts the servers and runs this

Runs after the proposer of iteration K was trained and merged; the stage starts an SGLang
server with that proposer and passes its URL here (``proposer_url``). For every seed row of
partition K-1 (the seed manifest beside the seed parquet lists each partition's row range) it
samples ``samples`` proposer rollouts of the row's prompt (T=1.0, <= 5 turns, the same search
tool the proposer was trained with), scores each with the proposer format score on the text
verl would have decoded, keeps the best-formatted valid one (ties: the first), drops seeds with
none, and cuts the question to ``max_question_words``. With ``verify`` it asks the solver
server ``verify_probes`` times per question and rejects questions answered correctly without a
single search (the answer leaks, or it is common knowledge) and questions no probe answers
(unsolvable or wrong).

It writes the solver parquet (verl RLHFDataset format: solver prompt, EM ground truth,
``data_source`` kept so the reward routes by hop count), a validation parquet made the same way
from the first ``val_rows`` held-out seed rows, and a JSON manifest of counts and timings, written
last as the commit marker (drzero.atomic.commit_set). When no question survives, it writes nothing.
Finished seeds are kept in shards beside the output (``solver_iterK.shards/``) as they finish, so
a run killed part way resumes with the seeds it had not finished; the shards go once the output
is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from drzero import __version__
from drzero.atomic import (check_writable, commit_set, parquet_writer, read_manifest, remove_temporaries,
                           verify_set)
from drzero.config import DEFAULT_RETRIEVER_URL, ROLLOUT_APIS, ConfigError, require
from drzero.data.journal import ShardJournal
from drzero.data.seed import SEED_MANIFEST
from drzero.data.questions import (DROPPED_NO_VALID, KEPT, OUTCOME_RECORD, PROBE_TEMPERATURE, REJECTED_NO_SEARCH,
                                   REJECTED_PROBES_FAILED, REJECTED_UNSOLVED, VERDICTS, SeedOutcome, best_candidate,
                                   generate_calls, outcome_from_record, outcome_record, response_text, seed_document,
                                   solver_row, split_counts, verification_verdict)
from drzero.layout import Layout
from drzero.models.files import load_tokenizer
from drzero.plan import FileSet
from drzero.prompts import MAX_QUESTION_WORDS, SOLVER_TEMPLATE_ID, cut_question, solver_messages
from drzero.rewards.proposer import REASONS, FormatScore, format_score, hops_of
from drzero.rewards.solver import exact_match
from drzero.rollout.client import AgentRolloutClient, GenerationSettings
from drzero.rollout.render import SOLVER_PROMPT_LENGTH, RolloutLimits, template_thinking_kwargs
from drzero.rollout import search
from drzero.rollout.search import SearchSettings

log = logging.getLogger(__name__)


class NoQuestionsKept(ConfigError):
    """No seed of a split yielded a question; a ConfigError so that the CLI reports it in one line."""


@dataclass(kw_only=True)
class GenDataJob:
    """One gen-data run, as `drzero gen-data` (drzero.stages.gen_data) resolves it: paths, servers, limits."""

    iteration: int                     # K >= 1: reads seed partition K-1 and names the outputs solver_iterK
    seeds: str                         # seed parquet of `drzero prepare-data`; its _val.parquet and manifest beside it
    out: str | None = None             # solver train parquet (default: solver_iter<K>.parquet beside the seeds)
    samples: int = 5                   # proposer rollouts per seed; the best-formatted valid one is kept (Dr. Zero: 5)
    max_question_words: int = MAX_QUESTION_WORDS  # every kept question cut to this (Dr. Zero: 50)
    verify: bool = False               # probe each question with the solver; reject the unsearched and the unsolved
    verify_probes: int = 5             # solver rollouts per question when verifying
    val_rows: int = 64                 # first rows of the seed validation parquet turned into solver validation data
    proposer_url: str = "http://127.0.0.1:8001"
    proposer_model: str = "proposer"   # the served model name of the proposer server
    solver_url: str | None = None      # the solver server, for verify
    solver_model: str = "solver"
    api: str = "generate"              # drzero.config.ROLLOUT_APIS
    tokenizer: str | None = None       # the proposer's tokenizer (needed by api='generate')
    thinking: bool = False             # render with Qwen3 thinking on, as a proposer trained with --thinking
    retriever_url: str = DEFAULT_RETRIEVER_URL
    concurrency: int = 64              # generate requests in flight at once, per server
    max_turns: int = 5                 # assistant turns per rollout (Dr. Zero: 5)
    max_response_tokens: int | None = None  # default: data.max_response_length of our verl config
    temperature: float = 1.0           # proposer sampling temperature (solver probes always use 1.0)
    timeout: float = 300.0             # seconds one generate request may take before it is retried
    retries: int = 4                   # extra attempts of a generate request after a 5xx, timeout or connection error
    limit: int | None = None           # only the first N seeds of the partition and of validation (smoke runs)
    shard_seeds: int = 64              # finished seeds per shard kept on disk while it runs (at most what a kill loses)

    def __post_init__(self) -> None:
        require(self.iteration >= 1, "iteration", self.iteration, "an integer >= 1 (iteration K reads partition K-1)")
        seeds = Path(self.seeds).expanduser()
        require(seeds.is_file(), "seeds", self.seeds, "an existing seed parquet written by `drzero prepare-data`")
        require(self.samples >= 1, "samples", self.samples, "an integer >= 1")
        require(self.max_question_words >= 1, "max_question_words", self.max_question_words, "an integer >= 1")
        require(self.verify_probes >= 1, "verify_probes", self.verify_probes, "an integer >= 1")
        require(self.val_rows >= 1, "val_rows", self.val_rows, "an integer >= 1 (verl always loads data.val_files)")
        for name in ("proposer_url", "solver_url", "retriever_url"):
            url = getattr(self, name)
            require(url is None or url.startswith(("http://", "https://")), name, url, "an http:// or https:// URL")
        require(not self.verify or bool(self.solver_url), "solver_url", self.solver_url,
                "the solver server's URL when verify is on (the probes need a server)")
        require(self.api in ROLLOUT_APIS, "api", self.api, " or ".join(repr(a) for a in ROLLOUT_APIS))
        require(self.api != "generate" or bool(self.tokenizer), "tokenizer", self.tokenizer,
                "a tokenizer name or directory when api='generate' (prompts are rendered as verl renders them)")
        require(self.concurrency >= 1, "concurrency", self.concurrency, "an integer >= 1")
        require(self.max_turns >= 1, "max_turns", self.max_turns, "an integer >= 1")
        require(self.max_response_tokens is None or self.max_response_tokens >= 1, "max_response_tokens",
                self.max_response_tokens, "an integer >= 1")
        require(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        require(self.timeout > 0, "timeout", self.timeout, "a number of seconds > 0")
        require(self.retries >= 0, "retries", self.retries, "an integer >= 0")
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "an integer >= 1, or unset for all seeds")
        require(self.shard_seeds >= 1, "shard_seeds", self.shard_seeds, "an integer >= 1")

    @property
    def partition(self) -> int:
        return self.iteration - 1

    def seed_paths(self) -> tuple[Path, Path]:
        """(seed validation parquet, seed manifest): `drzero prepare-data` writes them beside the seeds."""
        seeds = Path(self.seeds).expanduser()
        stem = _stem(seeds)
        return seeds.with_name(f"{stem}_val.parquet"), seeds.with_name(f"{stem}.manifest.json")

    def output_paths(self) -> tuple[Path, Path, Path]:
        out = (Path(self.out).expanduser() if self.out
               else Path(self.seeds).expanduser().parent / f"solver_iter{self.iteration}.parquet")
        stem = _stem(out)
        return out, out.with_name(f"{stem}_val.parquet"), out.with_name(f"{stem}.manifest.json")


def solver_set(layout: Layout, iteration: int) -> FileSet:
    """Iteration K's solver data and its validation parquet, committed with their manifest by `drzero gen-data`."""
    return FileSet(layout.solver_manifest(iteration), (layout.solver_data(iteration), layout.solver_val(iteration)),
                   writer=f"drzero gen-data --iteration {iteration}")


def _stem(path: Path) -> str:
    return path.name[:-len(".parquet")] if path.name.endswith(".parquet") else path.name


@dataclass
class GenDataResult:
    train_path: Path
    val_path: Path
    manifest_path: Path
    manifest: dict = field(default_factory=dict)


async def _process_seed(seed: dict, cfg: GenDataJob, proposer: AgentRolloutClient,
                        solver: AgentRolloutClient | None) -> SeedOutcome:
    hops = hops_of(seed["data_source"], seed.get("extra_info"))
    samples = await asyncio.gather(*(proposer.run(seed["prompt"]) for _ in range(cfg.samples)))
    document = seed_document(seed)
    outcome = SeedOutcome(seed=seed, verdict=DROPPED_NO_VALID, calls=generate_calls(samples))
    scores = []
    for trajectory in samples:
        outcome.stop_reasons[trajectory.stop_reason] += 1
        if trajectory.stop_reason == "error":
            # the text of a rollout cut short by the server is not a proposal, whatever it holds
            outcome.rollout_errors += 1
            outcome.first_error = outcome.first_error or trajectory.error
            scores.append(FormatScore(0.0))
            continue
        score = format_score(response_text(trajectory), hops, document)
        if score.score <= 0:
            outcome.invalid_reasons[REASONS[score.reason]] += 1
        scores.append(score)
    best = best_candidate(scores)
    if best is None:
        return outcome
    outcome.question, outcome.question_cut = cut_question(scores[best].question_text, cfg.max_question_words)
    outcome.answer, outcome.proposer_format = scores[best].answer_text, scores[best].score
    outcome.verdict = KEPT
    if solver is not None:
        probes = await asyncio.gather(*(solver.run(solver_messages(outcome.question))
                                        for _ in range(cfg.verify_probes)))
        outcome.probes = len(probes)
        outcome.calls += generate_calls(probes)
        outcome.probe_errors = sum(probe.stop_reason == "error" for probe in probes)
        outcome.probes_correct = sum(exact_match(probe.final_answer, [outcome.answer]) for probe in probes)
        outcome.verdict = verification_verdict(probes, outcome.answer)
        if outcome.verdict == REJECTED_PROBES_FAILED:
            outcome.first_error = outcome.first_error or next(p.error for p in probes if p.error)
    return outcome



def _client(cfg: GenDataJob, base_url: str, model: str, temperature: float, tokenizer,
            max_prompt_tokens: int | None = None) -> AgentRolloutClient:
    """A client under the limits the proposer (or, for verification, the solver) trains under."""
    limits = RolloutLimits.from_training_config(max_prompt_tokens, cfg.thinking)
    kwargs = (template_thinking_kwargs(tokenizer, cfg.thinking) if tokenizer is not None
              else {"enable_thinking": cfg.thinking})
    generation = GenerationSettings(base_url=base_url, model=model, api=cfg.api, temperature=temperature,
                                    max_turns=cfg.max_turns, max_prompt_tokens=limits.max_prompt_tokens,
                                    max_response_tokens=cfg.max_response_tokens or limits.max_response_tokens,
                                    tool_output=limits.tool_output, chat_template_kwargs=kwargs,
                                    timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency)
    search_settings = SearchSettings(url=cfg.retriever_url, max_chars=limits.tool_output.max_length)
    return AgentRolloutClient(generation, search_settings, tokenizer=tokenizer)


async def _generate(cfg: GenDataJob, splits: dict[str, list[dict]], tokenizer,
                    on_done: Callable[[str, int, SeedOutcome], None] | None = None) -> dict[str, list[SeedOutcome]]:
    """Every seed of every split at once, through one client per server (each bounds its own requests);
    ``on_done(split, index, outcome)`` hears of each seed as it finishes."""
    proposer = _client(cfg, cfg.proposer_url, cfg.proposer_model, cfg.temperature, tokenizer)
    solver = _client(cfg, cfg.solver_url, cfg.solver_model, PROBE_TEMPERATURE, tokenizer,
                     SOLVER_PROMPT_LENGTH) if cfg.verify else None
    total = sum(len(seeds) for seeds in splits.values())
    try:
        with tqdm(total=total, desc="gen-data seeds", unit="seed", mininterval=1.0) as bar:
            async def tracked(split: str, index: int, seed: dict) -> SeedOutcome:
                try:
                    outcome = await _process_seed(seed, cfg, proposer, solver)
                finally:
                    bar.update(1)
                if on_done is not None:
                    on_done(split, index, outcome)
                return outcome

            gathered = await asyncio.gather(*(tracked(split, index, seed) for split, seeds in splits.items()
                                              for index, seed in enumerate(seeds)))
    finally:
        await proposer.aclose()
        if solver is not None:
            await solver.aclose()
        await search.close_sessions()
    outcomes, start = {}, 0
    for split, seeds in splits.items():
        outcomes[split] = gathered[start:start + len(seeds)]
        start += len(seeds)
    return outcomes


# -- reading the seeds and writing the data ------------------------------------------------------


def _read_seed_manifest(cfg: GenDataJob) -> dict:
    """The seed manifest, once its files are the ones it committed and it holds what gen-data reads of it."""
    _, manifest_path = cfg.seed_paths()
    if not manifest_path.is_file():
        raise ConfigError(f"seeds={cfg.seeds!r} has no manifest {manifest_path.name} beside it; run `drzero "
                          f"prepare-data` again to write the seed parquet with its manifest.")
    check_seed_set(cfg)
    return read_manifest(manifest_path, SEED_MANIFEST)


def check_seed_set(cfg: GenDataJob) -> None:
    """The seed parquet files are the ones their manifest committed (not a half-replaced set), and the manifest
    holds what gen-data and preflight read of it (drzero.data.seed.SEED_MANIFEST)."""
    _, manifest_path = cfg.seed_paths()
    problem = verify_set(manifest_path, SEED_MANIFEST)
    if problem is not None:
        raise ConfigError(f"seeds={cfg.seeds!r}: the seed files and their manifest do not agree ({problem}); "
                          f"a `drzero prepare-data` run was interrupted, or the files were changed by hand. Run "
                          f"`drzero prepare-data` again.")


def _partition_range(cfg: GenDataJob, seed_manifest: dict) -> tuple[int, int]:
    partitions = {p["partition"]: p["rows"] for p in seed_manifest["partitions"]}
    require(cfg.partition in partitions, "iteration", cfg.iteration,
            f"an integer from 1 to {len(partitions)}: the seed parquet has {len(partitions)} partition(s), "
            f"one per iteration")
    start, end = partitions[cfg.partition]
    return int(start), int(end)


def _read_rows(path: Path, start: int, end: int | None, what: str) -> list[dict]:
    """Rows [start, end) of a seed parquet; ``end=None`` reads to the end."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ConfigError(f"seeds: the {what} {path} is missing; `drzero prepare-data` writes it beside the seed "
                          f"parquet, so run it again or copy the file there.")
    table = pq.read_table(path)
    if end is not None and end > table.num_rows:
        raise ConfigError(f"seeds: {path} has {table.num_rows} rows but its manifest names rows up to {end}; the "
                          f"parquet and manifest come from different runs of `drzero prepare-data`.")
    end = table.num_rows if end is None else end
    return table.slice(start, end - start).to_pylist()


def _nothing_kept_message(cfg: GenDataJob, split: str, counts: dict, outcomes: list[SeedOutcome]) -> str:
    first_error = next((o.first_error for o in outcomes if o.first_error), None)
    if counts["rollout_errors"] == counts["candidates"]:
        check = (f"the proposer server failed every request ({first_error}): check that --proposer-url "
                 f"{cfg.proposer_url} serves --proposer-model {cfg.proposer_model!r}")
    elif counts[DROPPED_NO_VALID] == counts["seeds"]:
        invalid = Counter(counts["invalid_candidate_reasons"]).most_common()
        reasons = ", ".join(f"{reason}: {n}" for reason, n in invalid)
        check = (f"no sample passed the format gate ({reasons or 'no proposal at all'}): check that "
                 f"--proposer-url {cfg.proposer_url} serves the proposer trained in iteration {cfg.iteration}")
    elif counts[REJECTED_PROBES_FAILED] and counts["probe_errors"] == counts["probes"]:
        check = (f"the solver server failed every probe ({first_error}): check --solver-url {cfg.solver_url} "
                 f"and --solver-model {cfg.solver_model!r}")
    else:
        check = ("the solver probes rejected every valid question: check --solver-url and --solver-model, or run "
                 "without --verify")
    return (f"gen-data kept no question from the {counts['seeds']} {split} seeds of iteration {cfg.iteration} "
            f"({counts[DROPPED_NO_VALID]} without a valid candidate among {cfg.samples} samples, "
            f"{counts[REJECTED_NO_SEARCH]} answered without searching, {counts[REJECTED_UNSOLVED]} never answered, "
            f"{counts[REJECTED_PROBES_FAILED]} not verifiable); {check}. Nothing was written.")


def run_gen_data(cfg: GenDataJob) -> GenDataResult:
    started = time.perf_counter()
    train_path, val_path, manifest_path = cfg.output_paths()
    check_writable(train_path.parent)  # before any server time is spent
    remove_temporaries(train_path.parent, [path.name for path in cfg.output_paths()])  # left by a killed run
    seed_val_path, _ = cfg.seed_paths()
    seed_manifest = _read_seed_manifest(cfg)
    start, end = _partition_range(cfg, seed_manifest)
    if cfg.limit is not None:
        end = min(end, start + cfg.limit)
    # the first val_rows held-out rows (fewer when the seed validation parquet is smaller)
    val_seeds = _read_rows(seed_val_path, 0, None, "seed validation parquet")[:min(cfg.val_rows,
                                                                                   cfg.limit or cfg.val_rows)]
    seed_rows = {"train": _read_rows(Path(cfg.seeds).expanduser(), start, end, "seed parquet"), "val": val_seeds}
    tokenizer = None
    if cfg.api == "generate":
        tokenizer = load_tokenizer(cfg.tokenizer)
    loaded = time.perf_counter()

    journal = ShardJournal(shards_dir(train_path), journal_key(cfg, seed_manifest, start, end, len(val_seeds)),
                           every=cfg.shard_seeds, record_shape=OUTCOME_RECORD)
    outcomes, resumed = resume_generate(cfg, seed_rows, tokenizer, journal)
    generated = time.perf_counter()

    all_hops = [hops_of(r["data_source"], r.get("extra_info")) for rows in seed_rows.values() for r in rows]
    hop_levels = max([len(seed_manifest.get("hop_ratio", "")), *all_hops])
    counts = {split: split_counts(split_outcomes, cfg.samples, hop_levels)
              for split, split_outcomes in outcomes.items()}
    for split, split_outcomes in outcomes.items():
        log.info("gen-data %s: %s", split, {k: counts[split][k] for k in ("seeds", *VERDICTS)})
        if counts[split][KEPT] == 0:
            journal.remove()  # nothing usable came out: a rerun (with the cause fixed) starts over
            raise NoQuestionsKept(_nothing_kept_message(cfg, split, counts[split], split_outcomes))

    rows = {split: [solver_row(o, index, split, cfg.iteration)
                    for index, o in enumerate(o for o in split_outcomes if o.verdict == KEPT)]
            for split, split_outcomes in outcomes.items()}
    manifest = {
        "drzero_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "iteration": cfg.iteration,
        "train_file": str(train_path),
        "val_file": str(val_path),
        "seed_file": str(Path(cfg.seeds).expanduser()),
        "seed_partition": {"partition": cfg.partition, "rows": [start, end]},
        "seed_val_rows": [0, len(val_seeds)],
        "template_id": SOLVER_TEMPLATE_ID,
        "proposer": {"url": cfg.proposer_url, "model": cfg.proposer_model},
        "solver": {"url": cfg.solver_url, "model": cfg.solver_model} if cfg.verify else None,
        "train": counts["train"],
        "val": counts["val"],
        "resumed_seeds": resumed,
        "config": asdict(cfg),
    }
    manifest["timings"] = {"load_seconds": round(loaded - started, 2),
                           "rollout_seconds": round(generated - loaded, 2),
                           "total_seconds": round(time.perf_counter() - started, 2)}
    # both parquet files, then the manifest as the commit marker (drzero.atomic.commit_set)
    manifest = commit_set({train_path: parquet_writer(rows["train"]), val_path: parquet_writer(rows["val"])},
                          manifest_path, manifest)
    journal.remove()
    return GenDataResult(train_path, val_path, manifest_path, manifest)


# -- resuming: finished seeds in shards beside the output -----------------------------------------


def shards_dir(train_path: Path) -> Path:
    return train_path.with_name(f"{_stem(train_path)}.shards")


def journal_key(cfg: GenDataJob, seed_manifest: dict, start: int, end: int, val_count: int) -> dict:
    """What a finished seed's outcome depends on; shards written under another key are not reused."""
    return {"seed_files": seed_manifest.get("files"), "iteration": cfg.iteration, "rows": [start, end],
            "val_rows": val_count, **{name: getattr(cfg, name) for name in (
                "samples", "max_question_words", "verify", "verify_probes", "proposer_model", "solver_model",
                "api", "max_turns", "max_response_tokens", "temperature", "thinking", "tokenizer")}}


def _transient(outcome: SeedOutcome, cfg: GenDataJob) -> bool:
    """Server failures, not verdicts on the seed: a resumed run asks again instead of keeping them."""
    return outcome.rollout_errors == cfg.samples or outcome.verdict == REJECTED_PROBES_FAILED


def resume_generate(cfg: GenDataJob, seed_rows: dict[str, list[dict]], tokenizer,
                    journal: ShardJournal) -> tuple[dict[str, list[SeedOutcome]], dict[str, int]]:
    """Outcomes of every seed: those a killed run finished come from its shards, the rest are generated
    (and recorded in shards as they finish). Returns (outcomes by split, seeds resumed by split)."""
    done = journal.load()
    outcomes: dict[str, list[SeedOutcome | None]] = {}
    todo: dict[str, list[tuple[int, dict]]] = {}
    for split, rows in seed_rows.items():
        outcomes[split] = [None] * len(rows)
        for position, seed in enumerate(rows):
            record = done.get(f"{split}/{position}")
            if record is not None and record.get("seed_id") == seed["extra_info"]["seed_id"]:
                outcomes[split][position] = outcome_from_record(record, seed)
            else:
                todo.setdefault(split, []).append((position, seed))
    resumed = {split: sum(o is not None for o in split_outcomes) for split, split_outcomes in outcomes.items()}
    if any(resumed.values()):
        log.info("gen-data resumes: %s seeds finished by an earlier run (from %s)", resumed, journal.directory)

    def finished(split: str, index: int, outcome: SeedOutcome) -> None:
        position = todo[split][index][0]
        if not _transient(outcome, cfg):
            journal.record(f"{split}/{position}", outcome_record(outcome))

    generated = asyncio.run(_generate(cfg, {split: [seed for _, seed in pending] for split, pending in todo.items()},
                                      tokenizer, finished)) if todo else {}
    journal.flush()
    for split, pending in todo.items():
        for (position, _), outcome in zip(pending, generated[split]):
            outcomes[split][position] = outcome
    return outcomes, resumed


def summary_lines(result: GenDataResult) -> str:
    m = result.manifest
    train, val = m["train"], m["val"]

    def verdicts(counts: dict) -> str:
        dropped = "  ".join(f"{v}: {counts[v]}" for v in VERDICTS[1:] if counts[v])
        return f"{counts[KEPT]} of {counts['seeds']} seeds kept" + (f"  ({dropped})" if dropped else "")

    partition, (first, end) = m["seed_partition"]["partition"], m["seed_partition"]["rows"]
    lines = [
        f"gen-data summary (iteration {m['iteration']})",
        f"  train          {result.train_path}  ({verdicts(train)})",
        f"  validation     {result.val_path}  ({verdicts(val)})",
        f"  manifest       {result.manifest_path}",
        f"  seeds          partition {partition} (rows {first}-{end - 1}) of {m['seed_file']}",
        "  hops           " + "  ".join(f"{h}: {c}" for h, c in train["hop_histogram"].items()),
        f"  proposer       mean format {train['mean_proposer_format']:.3f} of kept, {train['candidates']} samples, "
        f"{train['rollout_errors']} failed",
        f"  questions      {train['questions_cut']} cut to {m['config']['max_question_words']} words",
    ]
    if m["solver"]:
        lines.append(f"  verification   {train['probes']} probes, {train['probes_correct']} correct, "
                     f"{train['probe_errors']} failed")
    resumed = sum((m.get("resumed_seeds") or {}).values())
    lines.append(f"  calls          {train['generate_calls'] + val['generate_calls']} generate requests"
                 + (f" ({resumed} seeds resumed from an earlier run's shards)" if resumed else ""))
    lines.append(f"  took           {m['timings']['total_seconds']}s")
    return "\n".join(lines)
