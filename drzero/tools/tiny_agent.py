"""`drzero tiny-model --trained`: the tiny ChatML model, taught on CPU to use the search tool.

    drzero tiny-model --trained --out .drzero/tiny-agent     # seconds on a GPU; ~20 min on a busy 2-core CPU

`drzero tiny-model` alone writes random weights: fine for token budgets and the agent loop's plumbing, but
such a model almost never writes ``<tool_call>``, so a training step on it never searches and never earns a
reward. ``--trained`` then runs a short supervised pass on scripted trajectories from the built-in demo world
(one-hop questions, whose answer is in the passage the question names):

* solver turns — the question in our solver prompt with the search tool rendered; the assistant calls
  ``search`` with ``{"query_list": [<the question>]}``, reads the ``<tool_response>`` (the named passage
  among two others, at a random rank, in the search tool's own ``{"result": "Doc i (Title: …) …"}`` text)
  and answers ``<answer>…</answer>``;
* proposer turns — our proposer prompt for one hop over a passage; the assistant writes
  ``<question>…</question><answer>…</answer>`` about that passage.

The loss covers assistant tokens only, each turn ending with ``<|im_end|>`` as verl's agent loop sees it. The
model stays tiny (2 layers, width 128, ~5 MB): it learns the format (every episode searches with a valid
``query_list`` and answers), but not to copy names: held-out exact match stays 0 (1,000 steps of 16 on an
H200, benchmarks/results/gpu-smoke-2026-12-01.md); the answers it gets right are of questions it trained on.
That is what a GPU smoke needs: real search calls, and a reward that is non-zero on those questions.
``keyword_search`` is the ranking the scripted turns use; a retriever with the same ranking serves the
demo corpus where the real one cannot run (the GPU smoke).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from drzero.corpus.demo import build_demo_world
from drzero.prompts import (SEARCH_TOOL_SCHEMA, last_tag, parse_tool_calls, proposer_messages, render_document,
                            solver_messages)
from drzero.rollout.search import format_hits
from drzero.tools.tiny_chatml import build_chatml_tokenizer, build_tiny_model, corpus_texts

log = logging.getLogger(__name__)

TRAINED_HIDDEN, TRAINED_LAYERS = 128, 2
TOPK = 3            # config/search_tool_config.yaml: topk 3


@dataclass(frozen=True)
class AgentTrainingConfig:
    steps: int = 600
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    time_limit_s: float = 600.0


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def keyword_search(passages: list, query: str, k: int = TOPK) -> list:
    """The ``k`` passages (``Document``-like: ``title``, ``text``) sharing most words with ``query``; titles
    count double. Deterministic: ties keep corpus order."""
    words = _words(query)
    scored = [(-(2 * len(words & _words(p.title)) + len(words & _words(p.text))), i) for i, p in enumerate(passages)]
    return [passages[i] for _, i in sorted(scored)[:k]]


def hits_text(hits: list) -> str:
    """What the search tool hands the model for ``hits`` (drzero.rollout.search's own formatting)."""
    text = format_hits([[{"document": {"title": p.title, "contents": f"{p.title}\n{p.text}"}} for p in hits]])
    return json.dumps({"result": text}, ensure_ascii=False)


def tool_call_text(queries: list[str]) -> str:
    payload = {"name": "search", "arguments": {"query_list": queries}}
    return f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"


def solver_conversation(question, passages: list, by_source: dict, rng: random.Random) -> list[dict]:
    """A scripted solver trajectory for a one-hop demo question: search with the question, then answer."""
    seed = by_source[question.seed_source]
    others = [p for p in keyword_search(passages, question.question, TOPK + 1) if p is not seed][:TOPK - 1]
    hits = others[:]
    hits.insert(rng.randrange(len(hits) + 1), seed)
    return solver_messages(question.question) + [
        {"role": "assistant", "content": tool_call_text([question.question])},
        {"role": "tool", "content": hits_text(hits)},
        {"role": "assistant", "content": f"<answer>{question.answer}</answer>"},
    ]


def proposer_conversation(question, by_source: dict, passages: list | None = None) -> list[dict]:
    """A scripted proposer trajectory: for a multi-hop question, one search per further hop for the title of
    the next document in its chain (the entity the seed passage names), then the question and its answer."""
    seed = by_source[question.seed_source]
    turns = []
    for source in question.chain[1:]:
        title = by_source[source].title
        turns += [{"role": "assistant", "content": tool_call_text([title])},
                  {"role": "tool", "content": hits_text(keyword_search(passages or [], title))}]
    return proposer_messages(question.hops, render_document(seed.title, seed.text)) + turns + [
        {"role": "assistant", "content": f"<question>{question.question}</question>\n<answer>{question.answer}</answer>"},
    ]


def encode_conversation(tokenizer, messages: list[dict], tools: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, loss mask): turn by turn as verl's agent loop builds them, loss on assistant turns only."""
    ids: list[int] = []
    mask: list[int] = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the context before this assistant turn, as the chat template renders it with a generation prompt
        context = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                                tokenize=False)
        rendered = tokenizer.decode(ids) if ids else ""
        new_context = tokenizer(context[len(rendered):] if context.startswith(rendered) else context,
                                add_special_tokens=False)["input_ids"]
        if not context.startswith(rendered):
            ids, mask = [], []
        ids += new_context
        mask += [0] * len(new_context)
        turn = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [end]
        ids += turn
        mask += [1] * len(turn)
        # the template's newline after <|im_end|> belongs to the next context
        ids += tokenizer("\n", add_special_tokens=False)["input_ids"]
        mask += [0]
    return ids, mask


HELD_OUT = 24


def split_questions(seed: int = 0, rng: random.Random | None = None) -> tuple[list, list]:
    """(train, held-out) one-hop demo questions: the split ``scripted_examples`` trains and evaluates on, shuffled
    by ``rng`` (default: a fresh one seeded with ``seed``, the state ``scripted_examples`` starts from)."""
    questions = build_demo_world().questions(1, count=400, seed=seed)
    (rng or random.Random(seed)).shuffle(questions)
    return questions[HELD_OUT:], questions[:HELD_OUT]


def scripted_examples(tokenizer, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) encoded trajectories from the demo world: solver one-hop questions, proposer one- and
    two-hop questions (the two-hop ones search, so a proposer step really calls the tool)."""
    world = build_demo_world()
    passages = world.passages()
    by_source = {p.source: p for p in passages}
    rng = random.Random(seed)
    train, held_out = split_questions(seed, rng)
    tools = [SEARCH_TOOL_SCHEMA]
    examples = []
    for q in train:
        examples.append(encode_conversation(tokenizer, solver_conversation(q, passages, by_source, rng), tools))
        if rng.random() < 0.3:
            examples.append(encode_conversation(tokenizer, proposer_conversation(q, by_source), tools))
    for q in world.questions(2, count=120, seed=seed):
        examples.append(encode_conversation(tokenizer, proposer_conversation(q, by_source, passages), tools))
    return examples, held_out


def train_agent(model, tokenizer, cfg: AgentTrainingConfig = AgentTrainingConfig(),
                extra_conversations: list[list[dict]] = ()) -> dict:
    """Supervised pass over scripted trajectories (and ``extra_conversations``, chat messages trained the same
    way); returns loss and held-out answer accuracy."""
    import torch  # seconds to import; `drzero --help` imports this module (through tiny_model)

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"   # a GPU does the CPU minutes in seconds
    model.to(device)
    examples, held_out = scripted_examples(tokenizer, cfg.seed)
    examples += [encode_conversation(tokenizer, messages, [SEARCH_TOOL_SCHEMA]) for messages in extra_conversations]
    rng = random.Random(cfg.seed)
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    started, losses = time.monotonic(), []
    for step in range(cfg.steps):
        if time.monotonic() - started > cfg.time_limit_s:
            log.info("tiny agent: time limit reached after %d steps", step)
            break
        batch = rng.sample(examples, cfg.batch_size)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            labels[row, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        for group in optimizer.param_groups:   # cosine decay to 10 %
            group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        loss = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                     labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0:
            log.info("tiny agent step %d loss %.3f", step, losses[-1])
    model.eval()
    stats = evaluate_agent(model, tokenizer, held_out)
    model.to("cpu")
    stats.update(steps=len(losses), final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
                 seconds=round(time.monotonic() - started, 1))
    return stats


def episode(model, tokenizer, question: str, passages: list, max_new_tokens: int = 96) -> tuple[bool, str | None]:
    """One greedy solver episode with the scripted search: (called the tool, final answer or None)."""
    import torch  # as in train_agent: only a training or evaluating caller pays for it

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    device = next(model.parameters()).device

    def reply(messages) -> str:
        ids = tokenizer.apply_chat_template(messages, tools=[SEARCH_TOOL_SCHEMA], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    messages = solver_messages(question)
    first = reply(messages)
    calls = [c for c in parse_tool_calls(first) if c.valid]
    if not calls:
        return False, None
    hits = keyword_search(passages, calls[0].queries[0])
    messages += [{"role": "assistant", "content": first}, {"role": "tool", "content": hits_text(hits)}]
    return True, last_tag(reply(messages), "answer")


def evaluate_agent(model, tokenizer, questions: list) -> dict:
    """Greedy episodes over ``questions``: how often it calls the tool and answers exactly right."""
    passages = build_demo_world().passages()
    calls = correct = 0
    for q in questions:
        called, answer = episode(model, tokenizer, q.question, passages)
        calls += called
        correct += int(answer is not None and answer.strip().lower() == q.answer.lower())
    n = max(1, len(questions))
    return {"tool_call_rate": calls / n, "exact_match": correct / n, "held_out": len(questions)}


def build_trained_agent(out: str | Path, cfg: AgentTrainingConfig = AgentTrainingConfig(),
                        vocab_size: int = 4096, extra_conversations: list[list[dict]] = ()) -> dict:
    """Tokenizer + tiny model from the demo world, trained on scripted trajectories (and
    ``extra_conversations``), saved to ``out``."""
    out = Path(out)
    tokenizer = build_chatml_tokenizer(corpus_texts(None, "corpus"), vocab_size)
    model = build_tiny_model(tokenizer, TRAINED_HIDDEN, TRAINED_LAYERS, cfg.seed)
    stats = train_agent(model, tokenizer, cfg, extra_conversations)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / "tiny_agent.json").write_text(json.dumps(stats, indent=1) + "\n")
    log.info("tiny agent written to %s: %s", out, stats)
    return stats
