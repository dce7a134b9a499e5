"""`drzero list-models`: the models a stage can name, where their weights live, how to serve them.

    drzero list-models

A stage takes ``--model NAME`` with a key from this table, a hub name or a local directory.
Weights are read from ``$DRZERO_MODELS_DIR/<dir>`` (``/corpus/models`` on Modal and in compose)
when present, so a training run never waits on a hub download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from drzero.config import option, require
from drzero.models.download import local_state
from drzero.models.shapes import GPU_MEMORY_GIB, KNOWN_SHAPES, ModelShape

OFFLOAD = ("actor_rollout_ref.actor.fsdp_config.param_offload=True",
           "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True")
# FSDP2's CPUOffloadPolicy: weights, gradients and AdamW live in host memory and the step runs there
CPU_OFFLOAD_POLICY = ("actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.fsdp_config.offload_policy=True")


@dataclass(frozen=True)
class Recipe:
    """Settings that fit a model on ``nodes`` nodes of 8 GPUs of a kind, by `drzero memory`'s plan.

    Applied by default when the model is chosen; ``--rollout-tp``, ``--sglang-dp/-tp/-mem`` and
    ``-- key=value`` overrides win over it.
    """

    overrides: tuple[str, ...] = ()            # Hydra overrides for verl, placed before the user's
    rollout_tp: int | None = None              # verl's SGLang rollout tensor parallel size
    reward_server: tuple[int, int, float] | None = None  # the challenger's reward SGLang: dp, tp, mem fraction
    note: str = ""
    nodes: int = 1                             # the nodes it needs: FSDP shards the actor over all their GPUs


@dataclass(frozen=True)
class ModelEntry:
    key: str
    hub_name: str
    local_dir: str            # directory name under $DRZERO_MODELS_DIR
    tool_call_parser: str     # SGLang --tool-call-parser for this family
    suggested_tp: int         # tensor parallel size that fits an H100 80 GB comfortably
    note: str = ""
    recipes: dict[str, Recipe] = field(default_factory=dict)  # GPU kind -> settings for one node of 8 of them
    thinking: bool | None = None  # Qwen3's enable_thinking default (off: see drzero.rollout.render); None: no switch
    cluster_recipes: dict[str, Recipe] = field(default_factory=dict)  # GPU kind -> settings for recipe.nodes nodes

    def recipe(self, capacity: float, gpus: int, nodes: int = 1) -> Recipe | None:
        """The recipe for ``nodes`` nodes of 8 GPUs of ``capacity`` GiB each: that of the largest kind no bigger
        than it, the cluster recipe when there are at least the nodes it needs."""
        if gpus != 8:
            return None
        fitting = [k for k in self.recipes if GPU_MEMORY_GIB[k] <= capacity]
        if not fitting:
            return None
        kind = max(fitting, key=GPU_MEMORY_GIB.__getitem__)
        cluster = self.cluster_recipes.get(kind)
        return cluster if cluster is not None and nodes >= cluster.nodes else self.recipes[kind]


# Each recipe is the least change from config/search_multiturn_grpo.yaml (full fine-tuning, rollout
# tp 2 at 0.5, reward server dp4 x tp2 at 0.5) whose every phase fits with >= 8% headroom in
# `drzero memory --model KEY --gpu GPU`; the README's "Will it fit?" table is that command's output.
REGISTRY = {e.key: e for e in [
    ModelEntry("qwen3-32b", "Qwen/Qwen3-32B", "Qwen3-32B", "qwen25", 4,
               "the production run; cached on the volume; on H100, 4 nodes train it on the GPUs (--nnodes 4)",
               recipes={
                   # 16 B/param of FSDP state is 61 GiB per H100 before any activation: only host memory
                   # holds it (~490 GiB per node), and the CPU runs AdamW's step
                   "H100": Recipe(CPU_OFFLOAD_POLICY + ("actor_rollout_ref.rollout.gpu_memory_utilization=0.7",),
                                  rollout_tp=4, reward_server=(2, 4, 0.3),
                                  note="full fine-tuning with FSDP2 CPU offload: needs ~490 GiB host RAM per node"),
                   # the reward server at 0.2: GPU 0 also holds the retriever (~3 GiB: drzero.models.memory)
                   "H200": Recipe(OFFLOAD, rollout_tp=4, reward_server=(2, 4, 0.2),
                                  note="full fine-tuning, FSDP state on the GPUs, offloaded while the rollout runs"),
               }, thinking=False,
               # sharded over 32 H100s the FSDP state fits beside the rollout (peak 71.0 of 79.1 GiB in
               # `drzero memory --model qwen3-32b --nodes 4`); on 2 nodes the challenger's update does not
               cluster_recipes={
                   "H100": Recipe(OFFLOAD, rollout_tp=4, reward_server=(2, 4, 0.3), nodes=4,
                                  note="full fine-tuning on 4 nodes, FSDP state on the GPUs, offloaded while the "
                                       "rollout runs: no host-memory training"),
               }),
    ModelEntry("qwen3-14b", "Qwen/Qwen3-14B", "Qwen3-14B", "qwen25", 2, recipes={
        # the reward server at 0.2: GPU 0 also holds the retriever (~3 GiB: drzero.models.memory)
        "H100": Recipe(OFFLOAD, rollout_tp=4, reward_server=(2, 4, 0.2)),
        "H200": Recipe(OFFLOAD),
    }, thinking=False),
    ModelEntry("qwen3-8b", "Qwen/Qwen3-8B", "Qwen3-8B", "qwen25", 1, recipes={
        "H100": Recipe(OFFLOAD, reward_server=(4, 2, 0.3)),
        "H200": Recipe(note="the shipped settings fit"),
    }, thinking=False),
    ModelEntry("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", "qwen25", 1,
               "Dr. Zero's larger base model", recipes={
                   "H100": Recipe(OFFLOAD, reward_server=(4, 2, 0.3)),
                   "H200": Recipe(note="the shipped settings fit"),
               }),
    ModelEntry("qwen2.5-3b-instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct", "qwen25", 1,
               "Dr. Zero's base model", recipes={
                   "H100": Recipe(note="the shipped settings fit"),
                   "H200": Recipe(note="the shipped settings fit"),
               }),
    ModelEntry("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct", "qwen25", 1,
               "debugging on one GPU"),
    ModelEntry("qwen3-0.6b", "Qwen/Qwen3-0.6B", "Qwen3-0.6B", "qwen25", 1, "debugging on one GPU", thinking=False),
]}

DEFAULT_MODEL = "qwen2.5-3b-instruct"

# SGLang's tool-call parsers (sglang 0.5.x function_call registry) and verl 0.7.1's multi_turn.format values.
SGLANG_TOOL_PARSERS = {"qwen25", "qwen3_coder", "llama3", "mistral", "deepseekv3", "deepseekv31", "pythonic",
                       "kimi_k2", "glm45", "gpt-oss", "step3"}
VERL_TOOL_FORMATS = {"hermes", "gpt-oss", "qwen3_coder"}


def models_dir() -> Path | None:
    value = os.environ.get("DRZERO_MODELS_DIR")
    return Path(value) if value else None


@dataclass(frozen=True)
class ResolvedModel:
    name: str                 # what the user typed
    path: str                 # what verl / SGLang get: a local directory when one exists, else the hub name
    local: bool
    tool_call_parser: str
    entry: ModelEntry | None


def resolve_model(name: str) -> ResolvedModel:
    """A registry key, a local directory or a hub name -> the path verl and SGLang will load."""
    entry = REGISTRY.get(name.lower())
    if entry is None and Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser().resolve())
        return ResolvedModel(name, path, True, "qwen25", None)
    hub = entry.hub_name if entry else name
    candidates = []
    if models_dir():
        candidates += [models_dir() / (entry.local_dir if entry else Path(hub).name), models_dir() / hub]
    for candidate in candidates:  # a download still under way has its config.json first: not yet a model
        if (candidate / "config.json").is_file() and local_state(candidate) != "incomplete":
            return ResolvedModel(name, str(candidate.resolve()), True,
                                 entry.tool_call_parser if entry else "qwen25", entry)
    return ResolvedModel(name, hub, False, entry.tool_call_parser if entry else "qwen25", entry)


def model_shape(name: str) -> ModelShape | None:
    """The shape of a registry key, local directory or hub name: its config.json when on disk, else the
    published values drzero knows; None for a model that is neither."""
    resolved = resolve_model(name)
    if resolved.local:
        return ModelShape.from_dir(resolved.path)
    return KNOWN_SHAPES.get(resolved.entry.hub_name if resolved.entry else name)


def template_has_thinking(model_path: str) -> bool:
    """Whether a model directory's chat template takes ``enable_thinking`` (Qwen3-style)."""
    directory = Path(model_path)
    texts = [p.read_text(errors="ignore") for p in (directory / "chat_template.jinja",) if p.is_file()]
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template") or ""
        texts.append(template if isinstance(template, str) else json.dumps(template))
    return any("enable_thinking" in text for text in texts)


def thinking_switch(model_name: str, thinking: bool) -> bool | None:
    """True/False for a model whose template has the switch (the registry's, or a local template's); else None,
    refusing ``thinking`` on for a model without one."""
    model = resolve_model(model_name)
    applies = (model.entry.thinking is not None) if model.entry is not None else (
        model.local and template_has_thinking(model.path))
    if not applies:
        require(not thinking, "thinking", thinking,
                f"off: the chat template of {model_name} has no enable_thinking switch (Qwen3 models have one)")
        return None
    return bool(thinking)


@dataclass(kw_only=True)
class ListModelsConfig:
    json: bool = option(False, help="print the registry as JSON")


def render_registry() -> str:
    root = models_dir()
    rows = [("key", "hub name", "local weights", "parser", "tp", "note")]
    for entry in REGISTRY.values():
        local = root / entry.local_dir if root else None
        where = f"{local} ({local_state(local)})" if local else "set DRZERO_MODELS_DIR"
        rows.append((entry.key + (" *" if entry.key == DEFAULT_MODEL else ""), entry.hub_name, where,
                     entry.tool_call_parser, str(entry.suggested_tp), entry.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["* default for every stage (--model); local weights: verified (downloaded and checked), "
                              "present, incomplete (run the download again to continue) or missing"])
