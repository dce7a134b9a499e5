"""Model shapes and GPU sizes: the numbers `drzero memory` plans with.

A model's shape comes from its config.json (a local directory) or, for the models drzero's
registry lists and the calibration sizes, from a table of their published config.json values,
so a plan can be made before the weights are on disk. Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = float(1 << 30)  # memory is counted in GiB throughout, as CUDA and torch report it

# -- model shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The config.json numbers that memory depends on (Qwen2 / Qwen3 / Llama-style decoders)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0          # 0: hidden // heads (Qwen2.5); Qwen3 sets it explicitly
    qkv_bias: bool = False     # Qwen2 has q/k/v biases
    qk_norm: bool = False      # Qwen3 normalizes q and k per head

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * h * self.intermediate + norms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The lm_head's own parameters: none when tied to the embedding."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embed_params + self.head_params + self.layers * self.layer_params + self.hidden

    @property
    def linear_params(self) -> int:
        """Weights that go through a matmul (what bf16 autocast casts): every layer's linears and the head."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return self.layers * per_layer + self.vocab * self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA A and B on every linear of every layer (PEFT's ``all-linear``, verl's default target)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(rank * (a + b) for a, b in shapes)

    def kv_bytes_per_token(self, tp: int) -> float:
        """bf16 K and V of every layer on one GPU of a ``tp``-way engine (KV heads replicate when tp > kv_heads)."""
        heads_per_gpu = max(1, self.kv_heads // tp) if tp <= self.kv_heads else 1
        return 2 * self.layers * heads_per_gpu * self.head_dim * 2

    def weights_per_gpu(self, tp: int) -> float:
        """bf16 weights of one ``tp``-way SGLang rank, in GiB (KV projections replicate past kv_heads)."""
        kv_weights = self.layers * 2 * self.hidden * self.kv_dim
        replication = max(1.0, tp / self.kv_heads)
        return 2 * ((self.params - kv_weights) / tp + kv_weights * replication / tp) / GIB

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelShape":
        """From a Hugging Face config.json dict; names the missing key when it is not a decoder we know."""
        config = config.get("text_config", config)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in config]
        if missing:
            raise ValueError(f"{name}: config.json has no {', '.join(missing)}; drzero memory knows decoder-only "
                             f"models with the Hugging Face Llama/Qwen keys")
        model_type = str(config.get("model_type", ""))
        return cls(name=name, hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                   heads=int(config["num_attention_heads"]),
                   kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                   intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", False)), head_dim=int(config.get("head_dim") or 0),
                   qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                   qk_norm=model_type.startswith("qwen3"))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelShape":
        path = Path(path)
        return cls.from_config(path.name, json.loads((path / "config.json").read_text()))


def _qwen3(name, hidden, layers, heads, intermediate, tied):
    return ModelShape(name, hidden, layers, heads, 8, intermediate, 151936, tied, head_dim=128, qk_norm=True)


def _qwen25(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied):
    return ModelShape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, qkv_bias=True)


# The published config.json values of the models the registry lists (and the calibration sizes),
# for planning before the weights are on disk: hidden, layers, heads, (kv heads), intermediate,
# (vocab), tied embeddings. A local config.json always wins over this table.
KNOWN_SHAPES = {s.name: s for s in [
    _qwen3("Qwen/Qwen3-0.6B", 1024, 28, 16, 3072, True),
    _qwen3("Qwen/Qwen3-1.7B", 2048, 28, 16, 6144, True),
    _qwen3("Qwen/Qwen3-4B", 2560, 36, 32, 9728, True),
    _qwen3("Qwen/Qwen3-8B", 4096, 36, 32, 12288, False),
    _qwen3("Qwen/Qwen3-14B", 5120, 40, 40, 17408, False),
    _qwen3("Qwen/Qwen3-32B", 5120, 64, 64, 25600, False),
    _qwen25("Qwen/Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 4864, 151936, True),
    _qwen25("Qwen/Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, 151936, True),
    _qwen25("Qwen/Qwen2.5-3B-Instruct", 2048, 36, 16, 2, 11008, 151936, True),
    _qwen25("Qwen/Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False),
]}

# -- GPUs -------------------------------------------------------------------------------------------

# Memory per GPU as CUDA reports it (torch.cuda.mem_get_info total), in GiB; the marketing
# "80 GB" is 80e9 bytes minus what the driver keeps. H200: measured on the lent machine.
GPU_MEMORY_GIB = {
    "H100": 79.1, "H200": 139.8, "B200": 178.4, "A100-80GB": 79.2, "A100-40GB": 39.4, "L40S": 44.4,
    "A10G": 22.0, "L4": 22.0,
}


@dataclass(frozen=True)
class EncoderShape:
    """A BERT-style sentence encoder, as the retriever's search worker holds it on a GPU."""

    name: str
    params: int
    hidden: int
    intermediate: int
    dimension: int          # the embedding's size (mean pooling: the hidden size)
    max_tokens: int = 512   # the longest input it encodes (BERT's position table)


# Published configs (config.json of each model on the hub); the retriever's memory is planned from these.
ENCODER_SHAPES = {s.name: s for s in [
    EncoderShape("intfloat/e5-large-v2", 335_141_888, 1024, 4096, 1024),
    EncoderShape("intfloat/e5-base-v2", 109_482_240, 768, 3072, 768),
    EncoderShape("intfloat/e5-small-v2", 33_360_000, 384, 1536, 384),
    EncoderShape("sentence-transformers/all-MiniLM-L6-v2", 22_713_216, 384, 1536, 384, max_tokens=256),
]}
DEFAULT_ENCODER = "intfloat/e5-large-v2"
