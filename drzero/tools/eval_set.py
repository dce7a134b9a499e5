"""`drzero make-eval-set`: a QA set with known answers from the demo world.

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
the same file works for ``drzero evaluate`` (which reads it with ``drzero.data.qa.read_qa_file``)
and as verl's ``data.val_files``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from drzero.atomic import check_writable, write_parquet_atomically
from drzero.config import env_default, option, require
from drzero.corpus.demo import build_demo_world
from drzero.corpus.ingest import DEMO_FACTS_FILE, load_demo_world
from drzero.data.seed import ABILITY, AGENT_NAME
from drzero.prompts import SEARCH_TOOL_NAME, SOLVER_TEMPLATE_ID, solver_messages

EVAL_SET_NAME = "eval_demo.parquet"


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
    if cfg.demo_db is None:
        world = build_demo_world(seed=cfg.world_seed, papers=cfg.papers)
        return world, f"fresh demo world (seed {cfg.world_seed}, {cfg.papers} papers)"
    world = load_demo_world(cfg.demo_db)
    return world, f"{Path(cfg.demo_db).expanduser() / DEMO_FACTS_FILE} (seed {world.seed}, {len(world.papers)} papers)"


def demo_rows(questions: list, split: str = "test") -> list[dict]:
    """Verl rows in our solver-data format, with the Search-R1 columns beside them, for demo-world questions."""
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
