"""Per-GPU memory of a training stage, estimated from the model's shape before any GPU starts.

    drzero memory --model qwen3-32b --gpus 8 --gpu H100

This module is the arithmetic only (stdlib; no torch, verl or Hydra), so the calibration
benchmark can import it anywhere. Shapes and GPU sizes live in ``drzero.models.shapes``; verl's
config becomes a ``StageSetup`` in ``drzero.verl.memory_plan``. Three things share a GPU in a
drzero stage —

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

Units: GiB (2**30 bytes) throughout, as CUDA and torch report memory. The actor's terms were
checked against ``torch.cuda.max_memory_allocated`` on an H200 within 1%
(``benchmarks/results/memory-calibration-h200-2026-12-01.md``); the overheads below are not
measured here and err on the large side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drzero.models.shapes import GIB, EncoderShape, ModelShape

# -- constants ---------------------------------------------------------------------------------------

# Overheads, estimated (one GPU cannot measure them): not calibrated, chosen large
TRAINER_OVERHEAD_GIB = 2.5   # the trainer process's CUDA context, NCCL buffers and cuBLAS workspaces
SGLANG_CONTEXT_GIB = 1.0     # an SGLang rank's CUDA context and NCCL buffers, taken before it measures free memory
SGLANG_RUNTIME_GIB = 3.0     # outside its static pool: CUDA graphs and the forward's activations (SGLang docs)
SGLANG_ASLEEP_GIB = 2.0      # a slept verl engine keeps its context and CUDA graphs (only weights and KV are freed)
ALLOCATOR_SLACK = 1.05       # torch's caching allocator reserves more than it hands out
# Measured: per token x vocabulary entry at the forward's end, bf16 logits + the fp32 log-softmax
# rows verl's path without flash-attn keeps for backward (calibration: within 0.2%)
LOGIT_BYTES = 6.0
RETRIEVER_CONTEXT_GIB = 0.6  # the search worker's CUDA context and cuBLAS workspace (torch, one process)
MIN_KV_SEQUENCES = 1         # an engine that cannot hold one full trajectory cannot serve at all
TIGHT_KV_SEQUENCES = 32      # below this many full trajectories per engine, generation is slow
TIGHT_HEADROOM = 0.05        # a phase within 5% of the GPU's memory fits on paper only


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


# -- SGLang engines and the stage's phases -----------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """One SGLang engine's rank on a GPU: ``tp``-way weights and the KV cache ``fraction`` buys."""

    role: str                  # "rollout" (verl's), "reward server", "gen-data server", "evaluate server"
    shape: ModelShape
    tp: int
    fraction: float            # gpu_memory_utilization / --mem-fraction-static
    sequence_tokens: int       # one full trajectory, the least a useful KV cache holds
    dp: int = 1

    def pool(self, free_at_start: float) -> tuple[float, float]:
        """(weights, KV cache) in GiB for an engine that finds ``free_at_start`` GiB free after its context."""
        weights = self.shape.weights_per_gpu(self.tp)
        return weights, self.fraction * free_at_start - weights

    def kv_sequences(self, kv_gib: float) -> float:
        return max(0.0, kv_gib) * GIB / self.shape.kv_bytes_per_token(self.tp) / self.sequence_tokens


@dataclass(frozen=True)
class RetrieverLoad:
    """The retriever's search worker on a GPU (GPU 0, started before SGLang and the trainer): the fp16 encoder,
    the exact index when it fits its cap (this GPU's shard of it), and the activations of its largest batch."""

    encoder: EncoderShape
    passages: int | None = None   # vectors in the store; None until the store is read (the index is then not counted)
    max_batch: int = 256          # `drzero serve-retriever --max-batch`
    exact_max_gib: float = 8.0    # `--exact-max-gib`: a larger matrix stays in Chroma's HNSW on the CPU
    side_file: bool = False       # vectors in a side file (adopt or ingest of a side file): always exact, fp16 on cuda
    precision: str | None = None  # `--exact-precision`: None = auto (fp16 for a side file, fp32 otherwise)
    shards: int = 1               # GPUs the index is split over (`--exact-devices`); GPU 0 holds one shard

    def terms(self) -> list[Term]:
        e = self.encoder
        precision = self.precision or ("fp16" if self.side_file else "fp32")
        whole = (self.passages or 0) * e.dimension * (2 if precision == "fp16" else 4) / GIB
        index = whole / max(1, self.shards)
        on_gpu = self.side_file or whole <= self.exact_max_gib
        # inference keeps no activations between layers: the peak is one layer's widest tensors for the batch
        # (the MLP's intermediate and the q/k/v/output projections, fp16; SDPA's fused kernels hold no scores)
        batch = self.max_batch * e.max_tokens * (e.intermediate + 4 * e.hidden) * 2 / GIB
        shard = f", 1 of {self.shards} shards" if self.shards > 1 else ""
        where = (f"{self.passages:,} x {e.dimension} {precision}{shard}" + (
            "" if on_gpu else f" > {self.exact_max_gib:g} GiB: HNSW on the CPU") if self.passages is not None
            else "passages unknown: not counted")
        return [Term("retriever: CUDA context", RETRIEVER_CONTEXT_GIB, "its search worker, GPU 0"),
                Term("retriever: encoder weights (fp16)", e.params * 2 / GIB, e.name),
                Term("retriever: exact index", index if on_gpu else 0.0, where),
                Term("retriever: largest batch", batch, f"{self.max_batch} queries x {e.max_tokens} tokens")]


@dataclass(frozen=True)
class Placement:
    """What a stage's memory check needs beyond verl's config: the GPU, the model's shape (None when
    drzero does not know it), and an SGLang server sharing the GPUs as (role, dp, tp, fraction)."""

    gpu: str
    capacity: float
    shape: ModelShape | None
    server: tuple[str, int, int, float] | None = None
    retriever: RetrieverLoad | None = None   # the stage's own retriever, when it runs on this GPU


@dataclass(frozen=True)
class StageSetup:
    """Everything that shares one GPU during a stage."""

    stage: str
    capacity: float                    # GiB per GPU
    gpu: str = "custom"
    gpus_per_node: int = 8
    nodes: int = 1
    train: TrainSetup | None = None    # the FSDP actor (challenger, solver)
    rollout: Engine | None = None      # verl's SGLang engine, built after the actor
    server: Engine | None = None       # an SGLang server started before the trainer, or alone
    rollout_sleeps: bool = True        # free_cache_engine: verl releases the engine's weights and KV to train
    retriever: RetrieverLoad | None = None  # the retriever's search worker, started first (GPU 0)


@dataclass
class Phase:
    name: str
    terms: list[Term]

    @property
    def total(self) -> float:
        return sum(t.gib for t in self.terms)


@dataclass
class StageMemory:
    setup: StageSetup
    phases: list[Phase]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def peak(self) -> float:
        return max((p.total for p in self.phases), default=0.0)


def _engine_terms(engine: Engine, weights: float, kv: float) -> list[Term]:
    name = engine.role
    return [Term(f"{name}: CUDA context", SGLANG_CONTEXT_GIB),
            Term(f"{name}: weights (bf16, tp {engine.tp})", weights),
            Term(f"{name}: KV cache", max(0.0, kv), f"fraction {engine.fraction:g} of the memory free at its start"),
            Term(f"{name}: CUDA graphs + activations", SGLANG_RUNTIME_GIB, "outside its static pool")]


def _with_slack(terms: list[Term]) -> list[Term]:
    torch_bytes = sum(t.gib for t in terms)
    return terms + [Term("allocator slack", torch_bytes * (ALLOCATOR_SLACK - 1),
                         f"{ALLOCATOR_SLACK - 1:.0%} of the trainer's torch memory")] if torch_bytes else terms


def _check_engine(engine: Engine, weights: float, kv: float, free: float, problems: list[str],
                  notes: list[str]) -> None:
    sequences = engine.kv_sequences(kv)
    if sequences < MIN_KV_SEQUENCES:
        problems.append(
            f"{engine.role}: {engine.fraction:g} x {free:.1f} GiB free at its start = {engine.fraction * free:.1f} GiB "
            f"for weights + KV, but its tp-{engine.tp} weights alone are {weights:.1f} GiB, so its KV cache "
            f"({max(0.0, kv):.1f} GiB) cannot hold one {engine.sequence_tokens}-token trajectory")
    else:
        note = (f"{engine.role}: KV cache {kv:.1f} GiB = {sequences:.0f} full {engine.sequence_tokens}-token "
                f"trajectories per engine")
        notes.append(note + (" (tight: generation will queue)" if sequences < TIGHT_KV_SEQUENCES else ""))


def plan_memory(setup: StageSetup) -> StageMemory:
    """Every phase of the stage on one GPU, in the order the processes start."""
    cap = setup.capacity
    phases: list[Phase] = []
    problems: list[str] = []
    notes: list[str] = []
    # the services start before the trainer, the retriever first: what they hold, SGLang and FSDP cannot use
    before: list[Term] = setup.retriever.terms() if setup.retriever is not None else []
    if setup.server is not None:
        free = cap - sum(x.gib for x in before) - SGLANG_CONTEXT_GIB
        weights, kv = setup.server.pool(free)
        before = before + _engine_terms(setup.server, weights, kv)
        _check_engine(setup.server, weights, kv, free, problems, notes)
        if setup.train is None:
            phases.append(Phase(f"{setup.server.role} serving", before))
    t = setup.train
    if t is not None:
        trainer = [Term("trainer: CUDA context + NCCL", TRAINER_OVERHEAD_GIB)]
        if setup.rollout is not None:
            at_init = before + trainer + _with_slack(actor_resident(t, "init"))
            free = cap - sum(x.gib for x in at_init) - SGLANG_CONTEXT_GIB
            weights, kv = setup.rollout.pool(free)
            _check_engine(setup.rollout, weights, kv, free, problems, notes)
            engine = _engine_terms(setup.rollout, weights, kv)
            phases.append(Phase("rollout: verl's SGLang generates", before + trainer
                                + _with_slack(actor_resident(t, "rollout")) + engine))
            if t.param_offload and not t.weights_on_cpu:
                # verl loads the offloaded weights back to push them into the woken engine, before its KV returns
                sync = [x for x in actor_resident(t, "train") if "weights" in x.name] + \
                       [x for x in actor_resident(t, "rollout") if "weights" not in x.name]
                phases.append(Phase("weight sync: actor -> rollout (KV cache still released)",
                                    before + trainer + _with_slack(sync) + [x for x in engine if "KV" not in x.name]))
            trainer = trainer + ([Term("rollout engine asleep", SGLANG_ASLEEP_GIB, "weights and KV released; "
                                                                                    "context and CUDA graphs stay")]
                                 if setup.rollout_sleeps else engine)
        phases.append(Phase("training: actor update", before + trainer + _with_slack(actor_training(t))))
        host = host_memory_per_node(t, setup.gpus_per_node)
        if host:
            notes.append(f"host memory for the offloaded actor: {host:.0f} GiB per node")
        if t.lora_rank and setup.rollout is not None:
            problems.append("LoRA (actor_rollout_ref.model.lora_rank > 0) with verl 0.7.1's SGLang rollout: its "
                            "update_weights ignores peft_config and loads no adapter, so rollouts never see the "
                            "trained weights; train in full (this plan's offloads) or use vLLM")
    for phase in phases:
        if phase.total > cap:
            problems.append(f"{phase.name}: {phase.total:.1f} GiB per GPU > {cap:.1f} GiB")
        elif phase.total > cap * (1 - TIGHT_HEADROOM):
            notes.append(f"{phase.name}: tight, {cap - phase.total:.1f} GiB headroom (estimates err by a few GiB)")
    return StageMemory(setup, phases, problems, notes)


def render(memory: StageMemory) -> str:
    s = memory.setup
    lines = [f"{s.stage}: {s.gpus_per_node} x {s.gpu} ({s.capacity:.1f} GiB per GPU) x {s.nodes} node(s)"]
    width = max((len(t.name) for p in memory.phases for t in p.terms), default=20) + 2
    for phase in memory.phases:
        lines.append(f"  {phase.name}")
        lines.append(f"    {'term':<{width}}{'GiB/GPU':>8}  note")
        for term in phase.terms:
            lines.append(f"    {term.name:<{width}}{term.gib:>8.1f}  {term.note}".rstrip())
        headroom = s.capacity - phase.total
        lines.append(f"    {'total':<{width}}{phase.total:>8.1f}")
        lines.append(f"    {'headroom':<{width}}{headroom:>8.1f}  {'ok' if headroom >= 0 else 'DOES NOT FIT'}")
    lines += [f"  note: {n}" for n in memory.notes]
    verdict = (f"fits: peak {memory.peak:.1f} of {s.capacity:.1f} GiB per GPU" if memory.fits
               else "DOES NOT FIT: " + "; ".join(memory.problems))
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
