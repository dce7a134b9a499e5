"""`drzero make-eval-set`: a QA set with known answers from the demo world, and the reader for every QA file.

    drzero make-eval-set --demo-db .drzero/demo-db --out .drzero/data            # -> .drzero/data/eval_demo.parquet
    drzero make-eval-set --papers 400 --world-seed 0 --per-hop 100 --out /corpus/data/eval_demo.parquet

The demo world (``drzero ingest --demo``) keeps its facts as structured data, so it can ask 1- to
4-hop questions whose answers are known. With ``--demo-db DIR`` the world is rebuilt from the
``demo_world.json`` that ingest saved beside the collection (its seed and paper count), so the
questions are about exactly the passages the retriever serves; without it the world is built fresh
from ``--papers`` and ``--world-seed`` (the same defaults as ``drzero ingest --demo``).

The parquet has the verl row format of our solver data (``data_source="search_zero_{h}"``, solver
prompt, ``reward_model.ground_truth.target=[answer]``, ``extra_info`` with the hop count and tool
kwargs, ``agent_name="tool_agent"``) plus the Search-R1 columns ``question`` and ``golden_answers``:
the same file works for ``drzero evaluate`` and as verl's ``data.val_files``.

``read_qa_file`` reads what ``drzero evaluate`` accepts: parquet or JSONL (or a JSON list) with
either Search-R1/FlashRAG columns (``question``, ``golden_answers``, ``data_source``) or verl rows
whose question sits in the prompt after ``Question:`` and whose answers are
``reward_model.ground_truth.target`` (Search-R1's test.parquet has both; so do our files).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from drzero.config import ConfigError, option, require
from drzero.prompts import SEARCH_TOOL_NAME, SOLVER_TEMPLATE_ID, solver_messages
from drzero.config import env_default

EVAL_SET_NAME = "eval_demo.parquet"
UNKNOWN_HOPS = "unknown"
QUESTION_MARKER = "Question:"  # our solver prompt and Search-R1's both end with "Question: <question>"
QA_SUFFIXES = (".parquet", ".jsonl", ".json")
_SEARCH_ZERO = re.compile(r"search_zero_(\d+)")


# -- reading QA files ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QaItem:
    index: int                         # row number in the file, from 0
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    hops: str                          # "1".."4" (from extra_info.hops, a hops column or search_zero_{h}) or "unknown"


def _text_answers(value) -> list[str]:
    """Gold answers from a list, a string, a number or ``{"target": ...}``; blanks dropped."""
    if isinstance(value, dict):
        value = value.get("target")
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def question_from_prompt(prompt) -> str | None:
    """The text after the last ``Question:`` of the last user message that has one (or of a plain string)."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        texts = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    else:
        return None
    for text in reversed([t for t in texts if isinstance(t, str)]):
        _, marker, question = text.rpartition(QUESTION_MARKER)
        if marker and question.strip():
            return question.strip()
    return None


def question_of(row: dict) -> str | None:
    for value in (row.get("question"), _as_dict(row.get("extra_info")).get("question")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return question_from_prompt(row.get("prompt"))


def golden_answers_of(row: dict) -> list[str]:
    """``golden_answers`` (Search-R1), else ``reward_model.ground_truth`` (verl), else an ``answer`` field."""
    candidates = (row.get("golden_answers"), _as_dict(row.get("reward_model")).get("ground_truth"),
                  row.get("answers"), row.get("answer"), _as_dict(row.get("extra_info")).get("answer"))
    for value in candidates:
        answers = _text_answers(value)
        if answers:
            return answers
    return []


def hops_label(row: dict, data_source: str) -> str:
    for value in (_as_dict(row.get("extra_info")).get("hops"), row.get("hops")):
        if value is not None and str(value).strip().isdigit():
            return str(int(str(value).strip()))
    match = _SEARCH_ZERO.fullmatch(data_source)
    return match.group(1) if match else UNKNOWN_HOPS


def _load_rows(path: Path, limit: int | None) -> tuple[list[dict], int]:
    """(the first ``limit`` rows, rows in the file)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise ConfigError(f"data={str(path)!r} is not a readable parquet file ({error}).") from error
        return table.slice(0, limit).to_pylist(), table.num_rows
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ConfigError(f"data={str(path)!r} is not JSON lines or a JSON list (line {error.lineno}: "
                          f"{error.msg}).") from error
    if not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"data={str(path)!r}: every record must be a JSON object with a question and its answers.")
    return rows[:limit], len(rows)


def read_qa_file(path: str | Path, limit: int | None = None) -> tuple[list[QaItem], int]:
    """(QA items of the first ``limit`` rows, rows in the file); ConfigError naming the file on bad input."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data={str(path)!r} is not valid: expected an existing parquet or JSONL file.")
    rows, total = _load_rows(path, limit)
    if not rows:
        raise ConfigError(f"data={str(path)!r} holds no rows; expected one question per row "
                          f"(Search-R1 format: question, golden_answers, data_source).")
    default_source = path.stem  # FlashRAG files carry no data_source: name them after the file
    items = []
    for index, row in enumerate(rows):
        question = question_of(row)
        if question is None:
            columns = ", ".join(sorted(row)) or "none"
            raise ConfigError(
                f"data={str(path)!r}: row {index} has no question (columns: {columns}); expected a 'question' "
                f"column, extra_info.question, or a user prompt that ends with '{QUESTION_MARKER} ...'.")
        answers = golden_answers_of(row)
        if not answers:
            raise ConfigError(
                f"data={str(path)!r}: row {index} ({question[:60]!r}) has no gold answer; expected "
                f"'golden_answers' or reward_model.ground_truth.target (a proposer seed parquet has none: "
                f"evaluate on solver data or an eval set).")
        source = str(row.get("data_source") or default_source)
        items.append(QaItem(index, question, tuple(answers), source, hops_label(row, source)))
    return items, total


# -- make-eval-set -------------------------------------------------------------------------------

@dataclass(kw_only=True)
class MakeEvalSetConfig:
    demo_db: str | None = option(None, metavar="DIR", help=(
        "collection built by `drzero ingest --demo`: the world is rebuilt from its demo_world.json, so the "
        "questions match the passages the retriever serves"))
    papers: int = option(400, help="size of a freshly built demo world, in papers (without --demo-db)")
    world_seed: int = option(0, help="seed of a freshly built demo world (without --demo-db)")
    hops: list[int] = option([1, 2, 3, 4], help="hop counts to ask")
    per_hop: int = option(50, help="questions per hop count")
    seed: int = option(0, help="seed for picking the questions")
    out: str = option(env_default("DRZERO_DATA_DIR", "/corpus/data"), metavar="DIR_OR_FILE", help=(
        f"data directory to write {EVAL_SET_NAME} into, or a .parquet path ($DRZERO_DATA_DIR)"))

    def __post_init__(self) -> None:
        require(self.per_hop >= 1, "per_hop", self.per_hop, "an integer >= 1")
        require(self.papers >= 20, "papers", self.papers, "an integer >= 20")
        require(bool(self.hops) and all(1 <= h <= 4 for h in self.hops), "hops", self.hops,
                "hop counts from 1 to 4")
        if self.demo_db is not None:
            from drzero.corpus.ingest import DEMO_FACTS_FILE

            require((Path(self.demo_db).expanduser() / DEMO_FACTS_FILE).is_file(), "demo_db", self.demo_db,
                    f"a directory holding {DEMO_FACTS_FILE}; build it with `drzero ingest --demo --db DIR`")

    def output_path(self) -> Path:
        out = Path(self.out).expanduser()
        return out if out.suffix == ".parquet" else out / EVAL_SET_NAME


@dataclass
class MakeEvalSetResult:
    path: Path
    rows: int
    per_hop: dict[str, int] = field(default_factory=dict)
    world: str = ""                    # where the world came from


def demo_world_for(cfg: MakeEvalSetConfig):
    """(world, description): rebuilt from ``demo_world.json`` as ingest built it, or built fresh."""
    from drzero.corpus.demo import build_demo_world

    if cfg.demo_db is None:
        world = build_demo_world(seed=cfg.world_seed, papers=cfg.papers)
        return world, f"fresh demo world (seed {cfg.world_seed}, {cfg.papers} papers)"
    from drzero.corpus.ingest import DEMO_FACTS_FILE, load_demo_world

    world = load_demo_world(cfg.demo_db)
    return world, f"{Path(cfg.demo_db).expanduser() / DEMO_FACTS_FILE} (seed {world.seed}, {len(world.papers)} papers)"


def demo_rows(questions: list, split: str = "test") -> list[dict]:
    """Verl rows in our solver-data format, with the Search-R1 columns beside them, for demo-world questions."""
    from drzero.data.seed import ABILITY, AGENT_NAME

    rows = []
    for index, question in enumerate(questions):
        data_source = f"search_zero_{question.hops}"
        rows.append({
            "data_source": data_source,
            "prompt": solver_messages(question.question),
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": {"target": [question.answer]}},
            "extra_info": {
                "index": index,
                "split": split,
                "need_tools_kwargs": True,
                # the keys gen-data rows carry (never an empty struct: parquet cannot store one)
                "tools_kwargs": {SEARCH_TOOL_NAME: {"create_kwargs": {"data_source": data_source,
                                                                      "seed_id": question.seed_source}}},
                "hops": question.hops,
                "question": question.question,
                "answer": question.answer,
                "relation": question.relation,
                "seed_source": question.seed_source,
                "chain": list(question.chain),
                "template_id": SOLVER_TEMPLATE_ID,
            },
            "agent_name": AGENT_NAME,
            "question": question.question,
            "golden_answers": [question.answer],
        })
    return rows


def run_make_eval_set(cfg: MakeEvalSetConfig) -> MakeEvalSetResult:
    from drzero.atomic import check_writable, write_parquet_atomically

    path = cfg.output_path()
    check_writable(path.parent)
    world, described = demo_world_for(cfg)
    questions = [q for hops in sorted(set(cfg.hops)) for q in world.questions(hops, cfg.per_hop, seed=cfg.seed)]
    rows = demo_rows(questions)
    write_parquet_atomically(rows, path)
    counts = Counter(str(q.hops) for q in questions)
    return MakeEvalSetResult(path, len(rows), {str(h): counts[str(h)] for h in sorted(set(cfg.hops))}, described)


def summary_lines(result: MakeEvalSetResult) -> str:
    return "\n".join([
        "make-eval-set summary",
        f"  eval set       {result.path}  ({result.rows} questions)",
        "  hops           " + "  ".join(f"{h}: {n}" for h, n in result.per_hop.items()),
        f"  world          {result.world}",
        f"  next           drzero evaluate --model URL_OR_PATH --data {result.path}",
    ])
