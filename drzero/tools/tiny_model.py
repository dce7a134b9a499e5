"""`drzero tiny-model`: a tiny ChatML chat model built offline, for CPU dry runs, tests and the demo.

    drzero tiny-model --db .drzero/demo-db --out .drzero/tiny-model
    drzero tiny-model --trained --out .drzero/tiny-agent      # taught to search: drzero.tools.tiny_agent

It writes a byte-level BPE tokenizer trained on the corpus, with ChatML special tokens and a
chat template that renders tools and tool turns the way Qwen-family templates do
(``<tools>`` block in the system turn, ``<tool_call>`` in assistant turns, tool results as
``<tool_response>`` in user turns), and a 2-layer Qwen2 model with random weights. Nothing here is
trained to be useful: it exists so that every code path that needs a real tokenizer and a real
model — token budgets, verl's dataset, the agent loop — runs on a machine with no model hub.
``--trained`` instead trains it for a few CPU minutes to call the search tool and answer (see
``drzero.tools.tiny_agent``), for runs that must really search and earn rewards (the GPU smoke).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from drzero.config import option, require
from drzero.tools.tiny_agent import AgentTrainingConfig, build_trained_agent
from drzero.tools.tiny_chatml import CHAT_TEMPLATES, build_chatml_tokenizer, build_tiny_model, corpus_texts

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TinyModelConfig:
    out: str = option(help="directory to write the tokenizer and model to", metavar="DIR")
    db: str | None = option(None, metavar="DIR|URL", help=(
        "train the tokenizer on this corpus store, a directory or a Chroma server's http://host:port (default: "
        "the built-in demo world)"))
    collection: str = option("corpus", help="collection name (with --db)")
    vocab_size: int = option(4096, help="BPE vocabulary size")
    hidden_size: int = option(64, help="model width")
    layers: int = option(2, help="transformer layers")
    seed: int = option(0, help="seed for the random weights")
    no_weights: bool = option(False, help="write the tokenizer only")
    chat_template: str = option("chatml", choices=sorted(CHAT_TEMPLATES), help=(
        "chat template: 'chatml' (Qwen2.5 style, default system turn) or 'qwen3' (honours enable_thinking)"))
    trained: bool = option(False, help=(
        "teach the model to search and answer (a few CPU minutes on scripted demo-world trajectories; "
        "drzero.tools.tiny_agent) instead of leaving its weights random"))

    def __post_init__(self) -> None:
        require(self.vocab_size >= 512, "vocab_size", self.vocab_size, "an integer >= 512")
        require(self.hidden_size >= 16 and self.hidden_size % 4 == 0, "hidden_size", self.hidden_size,
                "a multiple of 4, at least 16")
        require(self.layers >= 1, "layers", self.layers, "an integer >= 1")
        require(not (self.trained and (self.db or self.no_weights)), "trained", self.trained,
                "no --db or --no-weights with --trained (it trains on the built-in demo world)")


def run_tiny_model(cfg: TinyModelConfig) -> Path:
    out = Path(cfg.out)
    if cfg.trained:
        build_trained_agent(out, AgentTrainingConfig(seed=cfg.seed), vocab_size=cfg.vocab_size)
        return out
    tokenizer = build_chatml_tokenizer(corpus_texts(cfg.db, cfg.collection), cfg.vocab_size,
                                       CHAT_TEMPLATES[cfg.chat_template])
    tokenizer.save_pretrained(out)
    if not cfg.no_weights:
        build_tiny_model(tokenizer, cfg.hidden_size, cfg.layers, cfg.seed).save_pretrained(out)
    log.info("wrote tiny ChatML %s (vocab %d) to %s", "tokenizer" if cfg.no_weights else "model and tokenizer",
             len(tokenizer), out)
    return out
