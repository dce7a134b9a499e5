"""`drzero prepare-data`: the proposer's seed parquet, one prompt per seed document.

    drzero prepare-data --db /corpus/chromadb --tokenizer /corpus/models/Qwen2.5-3B-Instruct
    drzero prepare-data --db .drzero/demo-db --tokenizer .drzero/tiny-model --rows 2000

Seed documents are drawn from the collection so that every document is used once before any
is used again (shuffled by --seed); each row's hop count is drawn from --hop-ratio (``4321``:
P(1..4 hops) = .4/.3/.2/.1); each document is cut to --max-doc-tokens with the model's
tokenizer.

Rows are laid out so that every iteration sees seeds no earlier iteration saw. The proposer
reads the parquet from the top (``data.shuffle=False``, its dataloader resumed across
iterations), ``--challenger-rows`` per iteration (50 steps x 256 prompts); gen-data of iteration
K reads partition K-1 of the region after that, ``--gen-rows`` seeds (Dr. Zero's gen-data
partitions are a fifth of ~169.6k rows, ~33.9k seeds, for the solver's 50 x 256 = 12,800 prompts;
ours default to 2.5 x 12,800 = 32,000, so that after filtering the solver still sees each
question once). So gen-data never samples the proposer on seeds it trained on, and the manifest
lists both regions. It writes the train parquet (verl RLHFDataset format) and a separate
held-out validation parquet under temporary names, renames them, and writes the JSON manifest
last (each file's rows and SHA-256): the manifest is the commit marker that gen-data and evolve
check, so a run killed half way is never taken for a finished one. Every prompt, rendered through the chat template with the search tool's schema,
must fit --max-prompt-length: verl 0.7.1 neither truncates nor drops an overlong prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drzero import __version__
from drzero.atomic import check_writable, commit_set, parquet_writer, remove_temporaries
from drzero.config import ConfigError, CorpusOptions, option, require
from drzero.corpus.store import CorpusStore
from drzero.data.budget import PromptBudget, TokenBudgetError, chars_per_token_of_results
from drzero.data.seed import (document_order, hop_histogram_of, load_seed_documents, sample_passages, seed_row,
                              seed_set)
from drzero.models.files import DEFAULT_BASE_MODEL, load_tokenizer
from drzero.models.registry import resolve_model
from drzero.plan import StagePlan
from drzero.prompts import PROPOSER_TEMPLATE_ID
from drzero.rollout.render import template_thinking_kwargs
from drzero.stages.base import thinking_word
from drzero.store_location import is_server_address, resolved_db

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PrepareDataConfig(CorpusOptions):
    out: str | None = option(None, metavar="FILE", help=(
        "train parquet to write; the validation parquet and manifest go beside it. Default: "
        "data/zero_ratio<RATIO>.parquet beside the store (/corpus/chromadb -> /corpus/data/)"))
    rows: int | None = option(None, help=(
        "train rows; default partitions x (challenger_rows + gen_rows) = 224,000. A smaller number shrinks "
        "both regions in proportion"))
    challenger_rows: int = option(12800, help="rows the proposer trains on per iteration (50 steps x 256 prompts)")
    gen_rows: int = option(32000, help="seeds gen-data samples per iteration, after the proposer's region")
    val_rows: int = option(128, help="rows of the held-out validation parquet (documents not in train)")
    hop_ratio: str = option("4321", help="relative weights of 1, 2, 3, ... hops; '4321' = 40/30/20/10%%")
    seed: int = option(42, help="seed for the document order and the hop draws")
    tokenizer: str = option(DEFAULT_BASE_MODEL, metavar="PATH", help=(
        "tokenizer of the proposer model (name or directory; it must have a chat template)"))
    max_doc_tokens: int = option(256, help="cut each seed document to this many tokens (Dr. Zero: 256)")
    max_prompt_length: int = option(1536, help="token budget of a rendered proposer prompt, tools included")
    solver_max_prompt_length: int = option(512, help="token budget of a rendered solver prompt (checked here "
                                                     "for a 50-word question)")
    partitions: int = option(5, help="iterations the seeds are laid out for (Dr. Zero: 5 partitions)")
    thinking: bool = option(False, help="render prompts with Qwen3 thinking on, as a --thinking run trains")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.hop_ratio.isdigit() and any(c != "0" for c in self.hop_ratio), "hop_ratio", self.hop_ratio,
                "a string of digits, not all zero, weighting 1, 2, 3, ... hops (e.g. '4321')")
        require(self.rows is None or self.rows > 0, "rows", self.rows, "an integer > 0")
        require(self.challenger_rows >= 1, "challenger_rows", self.challenger_rows, "an integer >= 1")
        require(self.gen_rows >= 1, "gen_rows", self.gen_rows, "an integer >= 1")
        require(self.val_rows > 0, "val_rows", self.val_rows, "an integer > 0 (verl always loads data.val_files)")
        require(self.out is not None or not is_server_address(self.db), "out", self.out,
                "a FILE when --db is a Chroma server (there is no store directory to put data/ beside)")
        require(self.partitions >= 1 and 2 * self.partitions <= self.total_rows, "partitions", self.partitions,
                f"an integer from 1 to rows/2 = {self.total_rows // 2} (each iteration needs a proposer row and a "
                f"gen-data row)")
        require(self.max_doc_tokens >= 16, "max_doc_tokens", self.max_doc_tokens, "an integer >= 16")
        require(self.max_prompt_length > self.max_doc_tokens, "max_prompt_length", self.max_prompt_length,
                f"an integer > max_doc_tokens={self.max_doc_tokens}")
        tokenizer_path = Path(self.tokenizer).expanduser()
        looks_like_path = self.tokenizer.startswith((".", "/", "~")) or tokenizer_path.exists()
        require(not looks_like_path or tokenizer_path.is_dir(), "tokenizer", self.tokenizer,
                "an existing tokenizer directory or a model name")

    @property
    def total_rows(self) -> int:
        return self.rows if self.rows is not None else self.partitions * (self.challenger_rows + self.gen_rows)

    def regions(self) -> tuple[list[list[int]], list[list[int]]]:
        """([start, end) of each iteration's proposer rows], [start, end) of each gen-data partition]).

        The proposer's rows come first and in order, because verl reads them from the top."""
        per_iteration = self.total_rows // self.partitions
        if self.rows is None:
            challenger = self.challenger_rows
        else:  # shrink both in proportion, at least one row each
            share = self.challenger_rows / (self.challenger_rows + self.gen_rows)
            challenger = min(max(1, round(per_iteration * share)), per_iteration - 1)
        top = challenger * self.partitions
        gen = (self.total_rows - top) // self.partitions
        return ([[i * challenger, (i + 1) * challenger] for i in range(self.partitions)],
                [[top + i * gen, top + (i + 1) * gen] for i in range(self.partitions)])

    @property
    def hop_weights(self) -> np.ndarray:
        weights = np.array([int(c) for c in self.hop_ratio], dtype=float)
        return weights / weights.sum()

    def output_paths(self) -> tuple[Path, Path, Path]:
        out = Path(self.out) if self.out else Path(self.db).resolve().parent / "data" / f"zero_ratio{self.hop_ratio}.parquet"
        stem = out.name[:-len(".parquet")] if out.name.endswith(".parquet") else out.name
        return out, out.with_name(f"{stem}_val.parquet"), out.with_name(f"{stem}.manifest.json")


@dataclass
class PrepareDataResult:
    train_path: Path
    val_path: Path
    manifest_path: Path
    manifest: dict = field(default_factory=dict)


def run_prepare_data(cfg: PrepareDataConfig) -> PrepareDataResult:
    started = time.perf_counter()
    train_path, val_path, manifest_path = cfg.output_paths()
    check_writable(train_path.parent)
    remove_temporaries(train_path.parent, [path.name for path in cfg.output_paths()])  # left by a killed run
    store = CorpusStore.open_existing(cfg.db, cfg.collection)
    tokenizer = load_tokenizer(cfg.tokenizer)
    try:
        budget = PromptBudget(tokenizer, template_thinking_kwargs(tokenizer, cfg.thinking))
    except ValueError as error:
        raise ConfigError(f"thinking: {error}") from None
    solver_length = budget.check_solver_template(cfg.solver_max_prompt_length)

    rng = np.random.default_rng(cfg.seed)
    all_ids = store.all_ids()
    rows = cfg.total_rows
    challenger_regions, gen_regions = cfg.regions()
    train_order, val_order = document_order(len(all_ids), rows, cfg.val_rows, rng)
    levels = len(cfg.hop_ratio)
    train_hops = (rng.choice(levels, size=rows, p=cfg.hop_weights) + 1).tolist()
    val_hops = (rng.choice(levels, size=cfg.val_rows, p=cfg.hop_weights) + 1).tolist()
    documents = load_seed_documents(store, [all_ids[i] for i in train_order + val_order], tokenizer,
                                    cfg.max_doc_tokens)

    partition_of = np.full(rows, -1)
    for p, (start, end) in enumerate(challenger_regions):
        partition_of[start:end] = p
    for p, (start, end) in enumerate(gen_regions):
        partition_of[start:end] = p
    train_rows = [seed_row(i, "train", h, documents[all_ids[d]], int(partition_of[i]))
                  for i, (d, h) in enumerate(zip(tqdm(train_order, desc="train rows", unit="row", mininterval=1.0),
                                                 train_hops))]
    val_rows = [seed_row(i, "val", h, documents[all_ids[d]], None) for i, (d, h) in enumerate(zip(val_order, val_hops))]
    lengths = budget.proposer_lengths(train_rows + val_rows, {d.id: d.tokens for d in documents.values()})
    over = np.flatnonzero(lengths > cfg.max_prompt_length)
    if over.size:
        worst = int(over[np.argmax(lengths[over])])
        row = (train_rows + val_rows)[worst]
        raise TokenBudgetError(
            f"{over.size} prompt(s) exceed max_prompt_length={cfg.max_prompt_length} once rendered with the search "
            f"tool (longest: {int(lengths[worst])} tokens, seed document {row['extra_info']['seed_id']}, "
            f"{row['extra_info']['hops']} hops); lower --max-doc-tokens (now {cfg.max_doc_tokens}) or raise "
            f"--max-prompt-length and data.max_prompt_length together. Nothing was written.")

    results = chars_per_token_of_results(budget.renderer, sample_passages(store, all_ids, rng))
    manifest = {
        "drzero_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_file": str(train_path),
        "val_file": str(val_path),
        "rows": rows,
        "val_rows": cfg.val_rows,
        "hop_ratio": cfg.hop_ratio,
        "hop_histogram": hop_histogram_of(train_hops, levels),
        "val_hop_histogram": hop_histogram_of(val_hops, levels),
        "seed": cfg.seed,
        "template_id": PROPOSER_TEMPLATE_ID,
        "tokenizer": cfg.tokenizer,
        "collection": {"name": cfg.collection, "path": str(resolved_db(cfg.db)), "size": len(all_ids)},
        "documents_used": len({all_ids[i] for i in train_order}),
        "documents_truncated": sum(d.truncated for d in documents.values()),
        "max_doc_tokens": cfg.max_doc_tokens,
        "prompt_tokens": {"max": int(lengths.max()), "p99": float(np.percentile(lengths, 99)),
                          "mean": float(lengths.mean()), "budget": cfg.max_prompt_length,
                          "tools_included": True, "exact_check": budget.last_check},
        "solver_prompt_tokens": {"max_for_50_words": solver_length, "budget": cfg.solver_max_prompt_length},
        "chat_template_kwargs": budget.renderer.chat_template_kwargs,
        # the densest search results of this corpus with this tokenizer: preflight's response budget
        "search_results": {"chars_per_token": results, "topk": 3},
        # the proposer's rows per iteration (read from the top by verl) and gen-data's partitions after them
        "challenger_rows": [{"iteration": p + 1, "rows": r} for p, r in enumerate(challenger_regions)],
        "partitions": [{"partition": p, "rows": r} for p, r in enumerate(gen_regions)],
        "config": asdict(cfg),
    }
    manifest = commit_prepared_data(train_rows, val_rows, cfg.output_paths(), manifest, started)
    return PrepareDataResult(train_path, val_path, manifest_path, manifest)


def _width(region: dict) -> int:
    return region["rows"][1] - region["rows"][0]


def commit_prepared_data(train_rows: list[dict], val_rows: list[dict], paths: tuple[Path, Path, Path],
                         manifest: dict, started: float) -> dict:
    """Both parquet files, then the manifest as the commit marker (see drzero.atomic.commit_set):
    a run killed in between leaves no manifest, so neither gen-data nor evolve takes the files."""
    train_path, val_path, manifest_path = paths
    writers = {train_path: parquet_writer(train_rows), val_path: parquet_writer(val_rows)}
    return commit_set(writers, manifest_path, {**manifest, "seconds": round(time.perf_counter() - started, 2)})


def summary_lines(result: PrepareDataResult) -> str:
    m = result.manifest
    shares = {h: f"{100 * c / m['rows']:.1f}%" for h, c in m["hop_histogram"].items()}
    return "\n".join([
        "prepare-data summary",
        f"  train          {result.train_path}  ({m['rows']} rows: {len(m['partitions'])} iterations of "
        f"{_width(m['challenger_rows'][0])} proposer + {_width(m['partitions'][0])} gen-data seeds)",
        f"  validation     {result.val_path}  ({m['val_rows']} rows)",
        f"  manifest       {result.manifest_path}",
        "  hops           " + "  ".join(f"{h}: {c} ({shares[h]})" for h, c in m["hop_histogram"].items()),
        f"  documents      {m['documents_used']} of {m['collection']['size']} used, "
        f"{m['documents_truncated']} cut to {m['max_doc_tokens']} tokens",
        f"  prompt tokens  max {m['prompt_tokens']['max']}, p99 {m['prompt_tokens']['p99']:.0f}, "
        f"mean {m['prompt_tokens']['mean']:.0f} (budget {m['prompt_tokens']['budget']}, tools included)",
        f"  solver prompt  {m['solver_prompt_tokens']['max_for_50_words']} tokens for a 50-word question "
        f"(budget {m['solver_prompt_tokens']['budget']})",
        f"  search results >= {m['search_results']['chars_per_token']['min']:.2f} characters per token (densest of "
        f"{m['search_results']['chars_per_token']['samples']} sampled; preflight's response budget uses it)",
        f"  took           {m['seconds']}s",
    ])


def main(cfg: PrepareDataConfig) -> int:
    """`drzero prepare-data`: write the seed set and print what it holds."""
    print(summary_lines(run_prepare_data(cfg)))
    return 0


def plan_in_run(run) -> StagePlan:
    """prepare-data as the first stage of `drzero evolve` (``run``: its drzero.pipeline.EvolveConfig), when the
    seed set is missing: the seed parquet of the run's data directory, tokenized as the run's model."""
    layout = run.layout
    thinking = run.thinking_setting()

    def prepare():  # configured when it runs: planning must not fail on a model that a later step provides
        run_prepare_data(PrepareDataConfig(db=run.db, collection=run.collection, out=str(layout.seeds),
                                           rows=run.seed_rows, tokenizer=run.tokenizer or resolve_model(run.model).path,
                                           thinking=bool(thinking)))

    rows = f" --rows {run.seed_rows}" if run.seed_rows else ""
    return StagePlan(name="prepare-data", run=prepare, inputs=[layout.db] if isinstance(layout.db, Path) else [],
                     run_label=f"drzero prepare-data --db {layout.db} --out {layout.seeds}{rows} (thinking "
                               f"{thinking_word(thinking)})",
                     outputs=[layout.seeds, layout.seeds_val], writes_set=seed_set(layout),
                     done_when_outputs_exist=True)
