"""Token budget of search results with the Qwen2.5/Qwen3 vocabulary: do the worst cases fit?

    .venv/bin/python benchmarks/token_budget.py                                # the demo world
    .venv/bin/python benchmarks/token_budget.py --corpus abstracts.jsonl       # plus your own corpus

For each corpus: passages as `drzero ingest` cuts them (200 words, 30 overlap, sentence
boundaries); search results as the search tool returns them (3 passages, ``Doc i (Title: …)``,
JSON-wrapped) for 400 random passage triples; their characters per token with the real Qwen
vocabulary (``qwen_vocab.py``); the tokens one search costs once cut to the tool-output cap; and
the worst-case response table per hop (drzero.data.budget) for thinking off and on. A
``--corpus`` file is JSON lines with ``title`` and ``text``. The baseline, in the same run, is
the previous default: 4,096 characters per search.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _env

ROOT = _env.setup("benchmarks", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true")

from qwen_vocab import qwen_tokenizer  # noqa: E402

from drzero.corpus.chunking import split_text  # noqa: E402
from drzero.data.budget import ResponseBudget, chars_per_token_of_results, tool_turn_overhead  # noqa: E402
from drzero.rollout.render import THINKING_RESPONSE_LENGTH, ChatRenderer, ToolOutputLimit  # noqa: E402

PREVIOUS_CAP = 4096


def demo_passages() -> list[tuple[str, str]]:
    from drzero.corpus.demo import build_demo_world

    return [(d.title, d.text) for d in build_demo_world().passages()]


def file_passages(path: Path) -> list[tuple[str, str]]:
    passages = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            passages += [(record["title"], chunk) for chunk in split_text(record["text"], 200, 30)]
    return passages


def main() -> int:
    parser = _env.parser(__doc__)
    parser.add_argument("--corpus", type=Path, action="append", default=[], help="JSONL corpus (title, text)")
    parser.add_argument("--cap", type=int, default=None, help="tool-output cap in characters (default: config)")
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    import yaml

    base = yaml.safe_load((ROOT / "config" / "search_multiturn_grpo.yaml").read_text())
    multi_turn = base["actor_rollout_ref"]["rollout"]["multi_turn"]
    cap = args.cap or int(multi_turn["max_tool_response_length"])
    response = int(base["data"]["max_response_length"])
    tokenizer = qwen_tokenizer()
    renderer = ChatRenderer(tokenizer, chat_template_kwargs={"enable_thinking": False})
    overhead = tool_turn_overhead(renderer)
    corpora = [("demo world", demo_passages())] + [(p.name, file_passages(p)) for p in args.corpus]
    print(f"tool turn overhead (Qwen3 template, thinking off): {overhead} tokens")
    print(f"{'corpus':<20}{'passages':>9}{'words':>7}{'chars/tok min':>14}{'p1':>6}{'mean':>6}"
          f"{'search@cap':>11}{'search@4096':>12}")
    worst = None
    for name, passages in corpora:
        words = sum(len(t.split()) for _, t in passages) / len(passages)
        whole = chars_per_token_of_results(renderer, passages, samples=args.samples)
        capped = chars_per_token_of_results(renderer, passages, samples=args.samples, limit=ToolOutputLimit(cap))
        measured = {}
        for label, limit in (("cap", cap), ("old", PREVIOUS_CAP)):
            import random

            from drzero.rollout.search import format_hits

            rng = random.Random(1)
            most = 0
            for _ in range(args.samples):
                hits = [{"document": {"contents": f"{t}\n{x}"}} for t, x in (rng.choice(passages) for _ in range(3))]
                text = ToolOutputLimit(limit).apply(json.dumps({"result": format_hits([hits])}, ensure_ascii=False))
                most = max(most, len(renderer.tool_turn_ids([text])))
            measured[label] = most
        print(f"{name:<20}{len(passages):>9}{words:>7.0f}{whole['min']:>14.2f}{whole['p1']:>6.2f}{whole['mean']:>6.2f}"
              f"{measured['cap']:>11}{measured['old']:>12}")
        worst = min(worst or 99.0, capped["min"], whole["min"])
    print(f"\nmax tokens one search took (tool turn incl. wrapper), {args.samples} random 3-passage results; "
          f"cap {cap} chars vs the previous {PREVIOUS_CAP}")
    for thinking in (False, True):
        budget = ResponseBudget(max_response_length=THINKING_RESPONSE_LENGTH if thinking else response,
                                tool_output=ToolOutputLimit(cap), max_assistant_turns=int(multi_turn["max_assistant_turns"]),
                                thinking=thinking, chars_per_token=worst, tool_turn_overhead=overhead,
                                measured_with="Qwen vocabulary, worst corpus above")
        print()
        print(budget.table(budget.rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
