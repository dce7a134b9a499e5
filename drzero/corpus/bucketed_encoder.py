"""The retriever's query encoder on a GPU: the embedder's own tokenizer, transformer and pooling, run in fixed
padded shapes, each shape's forward pass captured once as a CUDA graph and replayed.

    encoder = BucketedEncoder.of(embedder)                # an Embedder on cuda (sentence-transformers loaded it)
    vectors = encoder.encode(["query: who proposed iO?"])  # (n, d) fp32, L2-normalized, on the GPU

Why: a query is a handful of tokens, so the forward pass is short and its cost is Python and kernel launches.
On an H100, sentence-transformers' ``encode`` of one e5-large query took ~16 ms of which the GPU was busy a
fraction (benchmarks/results/search-step-h100-2026-12-07.md). Padding every batch to one of a few lengths and
batch sizes gives fixed shapes; a CUDA graph per shape replays the whole forward pass with one launch.

The pooling is the model's own (sentence-transformers' ``Pooling`` module: mean over the attention mask, or
the CLS token), and vectors are normalized in fp32 as ``Embedder.encode`` does; ``check_against`` compares
the two on real text (cosine >= 0.999 is required before the server uses this path). A model with another
pooling, or a shape whose capture fails, runs through ``Embedder.encode`` instead.
"""

from __future__ import annotations

import bisect
import logging
import threading

log = logging.getLogger(__name__)

LENGTHS = (16, 32, 64, 128, 256, 512)           # padded token lengths (queries are short; passages are not here)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)    # padded batch sizes, up to the server's --max-batch default
MIN_COSINE = 0.999


class Unsupported(RuntimeError):
    """This model's pooling or layout is not one this encoder reproduces exactly."""


def _pooling_mode(pooling) -> str | None:
    """The pooling's mode across sentence-transformers versions: ``pooling_mode`` (5.x, 6.x) or
    ``get_pooling_mode_str()`` (earlier); several modes at once come back as a list and are not reproduced."""
    if pooling is None:
        return None
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None and hasattr(pooling, "get_pooling_mode_str"):
        mode = pooling.get_pooling_mode_str()
    return mode if isinstance(mode, str) else None


def _bucket(sizes: tuple[int, ...], n: int) -> int:
    return sizes[min(bisect.bisect_left(sizes, n), len(sizes) - 1)]


class BucketedEncoder:
    """Fixed-shape forward passes of a sentence-transformers BERT-style model, replayed as CUDA graphs."""

    def __init__(self, model, max_tokens: int, graphs: bool = True):
        import torch  # lazy: seconds to import; only a GPU retriever builds this

        modules = list(model)
        pooling = modules[1] if len(modules) > 1 else None
        mode = _pooling_mode(pooling)
        if mode not in ("mean", "cls") or not getattr(pooling, "include_prompt", True):
            raise Unsupported(f"pooling {mode!r}: only mean (prompt included) and CLS pooling are reproduced")
        self.mode = mode
        self.transformer = modules[0].auto_model
        self.tokenizer = model.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise Unsupported("a slow (Python) tokenizer")
        self.device = next(self.transformer.parameters()).device
        self.max_tokens = min(max_tokens, LENGTHS[-1])
        self.lengths = tuple(n for n in LENGTHS if n < self.max_tokens) + (self.max_tokens,)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.use_graphs = graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, embedder, graphs: bool = True) -> "BucketedEncoder":
        return cls(embedder.model, embedder.max_tokens or LENGTHS[-1], graphs=graphs)

    def _forward(self, ids, mask):
        hidden = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.mode == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)

    def _graph(self, batch: int, length: int):
        import torch  # see __init__

        key = (batch, length)
        if key not in self._graphs:
            ids = torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.zeros((batch, length), dtype=torch.long, device=self.device)
            mask[:, 0] = 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():  # warm-up outside the capture, as torch requires
                for _ in range(2):
                    self._forward(ids, mask)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(ids, mask)
            self._graphs[key] = (graph, ids, mask, out)
        return self._graphs[key]

    def warm(self, lengths: tuple[int, ...] = (16, 32, 64)) -> int:
        """Capture the shapes queries use most (short lengths, every batch size) before serving; the count."""
        with self._lock:
            for length in lengths:
                if length in self.lengths:
                    for batch in BATCHES:
                        self._graph(batch, length)
        return len(self._graphs)

    def encode(self, texts: list[str]):
        """``texts`` (prefixes included) -> (n, d) fp32 L2-normalized vectors on the encoder's device."""
        import torch  # see __init__

        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens,
                                 padding=False, return_attention_mask=False)["input_ids"]
        parts = []
        with self._lock:
            for start in range(0, len(encoded), BATCHES[-1]):
                chunk = encoded[start:start + BATCHES[-1]]
                length = _bucket(self.lengths, max(map(len, chunk)))
                batch = _bucket(BATCHES, len(chunk))
                ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
                mask = torch.zeros((batch, length), dtype=torch.long)
                mask[:, 0] = 1  # padded rows: one token each, discarded below
                for row, tokens in enumerate(chunk):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                    mask[row, :len(tokens)] = 1
                if self.use_graphs:
                    graph, static_ids, static_mask, out = self._graph(batch, length)
                    static_ids.copy_(ids, non_blocking=True)
                    static_mask.copy_(mask, non_blocking=True)
                    graph.replay()
                    vectors = out[:len(chunk)].float()
                else:
                    with torch.inference_mode():
                        vectors = self._forward(ids.to(self.device), mask.to(self.device))[:len(chunk)].float()
                parts.append(vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def check_against(self, embedder, texts: list[str]) -> float:
        """The lowest cosine between this encoder's vectors and ``Embedder.encode``'s on ``texts``."""
        ours = self.encode(texts)
        theirs = embedder.encode(texts, "", as_tensor=True).to(ours.device)
        return float((ours * theirs).sum(dim=1).min())
