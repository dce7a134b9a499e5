"""Per-GPU memory of a training stage, estimated from the model's shape before any GPU starts.

    drzero memory --model qwen3-32b --gpus 8 --gpu H100

This module is the arithmetic only (stdlib; no torch, verl or Hydra), so the calibration
benchmark can import it anywhere: model shapes, GPU sizes, and the memory of the three things
that share a GPU in a drzero stage —

* the FSDP actor while it trains: fp32 master weights, fp32 gradients and AdamW's two fp32
  moments (16 bytes per parameter, sharded over every GPU of every node), the temporary that
  torch's foreach AdamW allocates in ``step()`` (one fp32 tensor per parameter), the bf16
  layers FSDP gathers, activations of one micro batch (all layers, or one layer's inputs each
  with gradient checkpointing) and the log-probabilities at vocabulary size;
* verl's SGLang rollout engine, created after the FSDP actor (verl's order), sized by
  ``gpu_memory_utilization``;
* an SGLang server beside the trainer (the challenger's reward probes) or alone (gen-data,
  evaluate), sized by ``--mem-fraction-static``.

SGLang sizes its static pool (weights + KV cache) as a fraction of the memory that is *free
when it starts*: ``rest = free_after_weights - free_at_start * (1 - fraction)``
(``ModelRunner.profile_max_num_token`` in SGLang 0.5.x). So an engine that starts after other
allocations gets less KV cache, and none once its weights exceed ``fraction * free``.

Units: GiB (2**30 bytes) throughout, as CUDA and torch report memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = float(1 << 30)

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

# -- calibrated constants ---------------------------------------------------------------------------

TRAINER_OVERHEAD_GIB = 2.5   # the trainer process's CUDA context, NCCL buffers and cuBLAS workspaces
SGLANG_CONTEXT_GIB = 1.0     # an SGLang rank's CUDA context and NCCL buffers, taken before it measures free memory
SGLANG_RUNTIME_GIB = 3.0     # outside its static pool: CUDA graphs and the forward's activations (SGLang docs)
SGLANG_ASLEEP_GIB = 2.0      # a slept verl engine keeps its context and CUDA graphs (only weights and KV are freed)
ALLOCATOR_SLACK = 1.05       # torch's caching allocator reserves more than it hands out
LOGIT_BYTES = 6.0            # per token x vocab entry: bf16 logits + the fp32 log-softmax verl keeps for backward
MIN_KV_SEQUENCES = 1         # an engine that cannot hold one full trajectory cannot serve at all
TIGHT_KV_SEQUENCES = 32      # below this many full trajectories per engine, generation is slow


@dataclass(frozen=True)
class Activations:
    """Bytes per token per layer kept for backward, by where the residual stream lives.

    Counted from the tensors autograd saves in a Qwen/Llama decoder layer with flash/SDPA
    attention: RMSNorm keeps its fp32 input and the normalized bf16 copy; the q/k/v and MLP
    matmuls keep their bf16 inputs; attention keeps q, k, v and its output; SwiGLU keeps gate,
    up, their product's inputs and output (the attention output is the o_proj input: flash and
    SDPA write it token-major, so the transpose copies nothing). ``fp32`` is bf16 autocast over fp32 weights (the
    calibration harness), where the residual stream stays fp32 and each matmul keeps its own
    bf16 cast of the input; ``bf16`` is FSDP's mixed precision (verl), where weights are
    gathered in bf16 and so is everything between the norms.
    """

    residual: int          # bytes of the residual stream per hidden unit (a checkpointed layer's input)
    per_hidden: int
    per_q: int
    per_kv: int
    per_intermediate: int
    qk_norm_q: int = 6
    qk_norm_kv: int = 6
    workspace_hidden: int = 8        # gradients of one layer while it runs backward
    workspace_intermediate: int = 6

    def layer(self, s: ModelShape) -> float:
        norm = self.qk_norm_q * s.q_dim + self.qk_norm_kv * s.kv_dim if s.qk_norm else 0
        return (self.per_hidden * s.hidden + self.per_q * s.q_dim + self.per_kv * s.kv_dim
                + self.per_intermediate * s.intermediate + norm)

    def workspace(self, s: ModelShape) -> float:
        return self.workspace_hidden * s.hidden + self.workspace_intermediate * s.intermediate


BF16_ACTIVATIONS = Activations(residual=2, per_hidden=16, per_q=4, per_kv=4, per_intermediate=8)
AUTOCAST_ACTIVATIONS = Activations(residual=4, per_hidden=26, per_q=4, per_kv=4, per_intermediate=8)

# -- the FSDP actor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSetup:
    """What decides the actor's memory on one GPU while it trains."""

    shape: ModelShape
    world: int = 8                    # GPUs over all nodes: FSDP shards over all of them
    micro_batch: int = 2              # trajectories per micro batch (ppo_micro_batch_size_per_gpu)
    sequence_tokens: int = 4096       # prompt + response budget of one trajectory
    max_tokens: int | None = None     # use_dynamic_bsz: ppo_max_token_len_per_gpu instead of micro x sequence
    checkpointing: bool = True
    strategy: str = "fsdp"            # verl's actor.strategy: fsdp (FSDP1) or fsdp2
    param_offload: bool = False       # verl moves the weights to CPU while the rollout runs
    optimizer_offload: bool = False   # verl moves the AdamW moments to CPU while the rollout runs
    offload_policy: bool = False      # FSDP2 CPUOffloadPolicy: weights, grads, AdamW on CPU; the step runs there
    lora_rank: int = 0
    flash_cross_entropy: bool = True  # flash-attn's in-place cross entropy (the image has flash-attn)
    entropy: bool = False             # entropy_coeff != 0 or calculate_entropy: one more pass over the vocabulary

    @property
    def tokens(self) -> int:
        return self.max_tokens if self.max_tokens else self.micro_batch * self.sequence_tokens

    @property
    def trained_params(self) -> int:
        return self.shape.lora_params(self.lora_rank) if self.lora_rank else self.shape.params

    @property
    def weights_on_cpu(self) -> bool:
        return self.offload_policy and self.strategy == "fsdp2"

    def logit_bytes(self) -> float:
        """Per token x vocabulary entry, at the forward's end: flash-attn keeps the bf16 logits and writes
        their gradient in place; without it verl's row-wise log-softmax keeps fp32 rows beside the logits."""
        return (2.0 if self.flash_cross_entropy and not self.entropy else LOGIT_BYTES) + (12.0 if self.entropy else 0)


@dataclass
class Term:
    name: str
    gib: float
    note: str = ""


def actor_resident(t: TrainSetup, phase: str) -> list[Term]:
    """What the actor keeps on the GPU in ``phase``: "init" (before verl builds the rollout), "rollout", "train"."""
    if t.weights_on_cpu:
        return [Term("actor weights, grads, AdamW", 0.0, "on CPU (FSDP2 offload policy)")]
    s, w = t.shape, t.world
    trained = t.trained_params
    weights = 4 * s.params / w / GIB + (4 * trained / w / GIB if t.lora_rank else 0)
    grads, moments = 4 * trained / w / GIB, 8 * trained / w / GIB
    lora = " [LoRA: base frozen]" if t.lora_rank else ""
    weights_note = f"fp32, 4 B x {s.params / 1e9:.2f}B / {w} GPUs{lora}"
    if phase == "init":
        return [Term("actor weights (fp32, sharded)", 0.0 if t.param_offload else weights,
                     "offloaded after init" if t.param_offload else weights_note)]
    if phase == "rollout":
        # FSDP1's offload moves the flat parameters only: gradients of the last step stay on the GPU
        # (verl zeroes them at the next mini batch); FSDP2's ``model.cpu()`` takes them along
        grads_stay = not t.param_offload or t.strategy == "fsdp"
        return [Term("actor weights (fp32, sharded)", 0.0 if t.param_offload else weights,
                     "param_offload: on CPU" if t.param_offload else weights_note),
                Term("actor grads (fp32, sharded)", grads if grads_stay else 0.0,
                     "left from the last step" if grads_stay else "offloaded with the weights"),
                Term("AdamW moments (fp32, sharded)", 0.0 if t.optimizer_offload else moments,
                     "optimizer_offload: on CPU" if t.optimizer_offload else "8 B per trained param")]
    return [Term("actor weights (fp32, sharded)", weights, weights_note),
            Term("grads + AdamW moments (fp32, sharded)", grads + moments,
                 f"12 B x {trained / 1e9:.3g}B trained params / {w} GPUs")]


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool, acts: Activations) -> tuple[float, float]:
    """(kept for backward through the micro batch, transient while one layer runs backward), in bytes."""
    layer = acts.layer(shape) * tokens
    head = (acts.per_hidden // 2) * shape.hidden * tokens       # final norm and the head's input
    if checkpointing:
        return shape.layers * acts.residual * shape.hidden * tokens + head, layer + acts.workspace(shape) * tokens
    return shape.layers * layer + head, acts.workspace(shape) * tokens


def actor_training(t: TrainSetup) -> list[Term]:
    """The actor's peak while training: the larger of a micro batch's backward (gradients of earlier
    micro batches accumulated) and AdamW's step."""
    s, w = t.shape, t.world
    terms = actor_resident(t, "train")
    kept, running = activation_bytes(s, t.tokens, t.checkpointing, BF16_ACTIVATIONS)
    logits = t.logit_bytes() * t.tokens * s.vocab
    # FSDP gathers the root unit (embedding, final norm, lm_head) for the whole pass and decoder
    # layers one at a time in bf16; backward prefetches the next layer, and holds a layer's bf16
    # gradient and its fp32 copy for the reduce-scatter, and the head's gradient
    root = s.embed_params + s.head_params + s.hidden
    gathered = 2 * root + 2 * s.vocab * s.hidden + 10 * s.layer_params
    activations = max(kept + logits, kept + running)
    terms += [Term("gathered layers (bf16)", gathered / GIB, "root unit (embedding, lm_head) + 2 decoder layers "
                                                            "+ their unsharded gradients"),
              Term("activations + logits", activations / GIB,
                   f"{t.tokens} tokens per micro batch, checkpointing {'on' if t.checkpointing else 'off'}, "
                   f"{t.logit_bytes():g} B x {s.vocab} vocab per token")]
    # torch's foreach AdamW (verl's default optimizer) allocates sqrt(v) for every parameter in step()
    step = 0.0 if t.weights_on_cpu else 4 * t.trained_params / w
    if step > gathered + activations:
        terms.append(Term("AdamW step beyond backward", (step - gathered - activations) / GIB,
                          "foreach AdamW's fp32 sqrt(v) temporary for every trained param"))
    return terms


def host_memory_per_node(t: TrainSetup, gpus_per_node: int) -> float:
    """CPU memory the offloads need on one node (GiB): what moved off the GPUs of that node."""
    per_gpu = 0.0
    trained = t.trained_params
    if t.weights_on_cpu:
        per_gpu = 4 * t.shape.params / t.world + 12 * trained / t.world
    else:
        per_gpu += 4 * t.shape.params / t.world if t.param_offload else 0
        per_gpu += 8 * trained / t.world if t.optimizer_offload else 0
    return per_gpu * gpus_per_node / GIB


def single_gpu_peak(t: TrainSetup) -> dict[str, float]:
    """``torch.cuda.max_memory_allocated`` of one training step on one GPU without FSDP, as
    ``benchmarks/memory_calibration.py`` runs it: fp32 weights, bf16 autocast, foreach AdamW,
    log-probs by verl's row-wise log-softmax, after a warm-up step (moments exist, gradients None).

    ``forward_backward`` is the larger of the forward's end (every bf16 weight cast cached by
    autocast, activations, logits) and, with checkpointing, the backward's end (all gradients,
    layer 0 recomputed); ``optimizer_step`` adds foreach AdamW's fp32 temporary to the gradients.
    """
    s = t.shape
    tokens = t.tokens
    resident = 12 * s.params                                       # fp32 weights + two AdamW moments
    kept, running = activation_bytes(s, tokens, t.checkpointing, AUTOCAST_ACTIVATIONS)
    forward_end = resident + 2 * s.linear_params + kept + LOGIT_BYTES * tokens * s.vocab
    forward_backward = forward_end
    if t.checkpointing:
        layer_casts = 2 * (s.linear_params - s.vocab * s.hidden) / s.layers
        forward_backward = max(forward_end, resident + 4 * s.params + running + layer_casts)
    step = resident + 8 * s.params                                 # gradients + sqrt(v)
    return {"forward_backward": forward_backward / GIB, "optimizer_step": step / GIB,
            "peak": max(forward_backward, step) / GIB}
