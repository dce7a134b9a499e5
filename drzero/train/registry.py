"""`drzero list-models`: the models a stage can name, where their weights live, how to serve them.

    drzero list-models

A stage takes ``--model NAME`` with a key from this table, a hub name or a local directory.
Weights are read from ``$DRZERO_MODELS_DIR/<dir>`` (``/corpus/models`` on Modal and in compose)
when present, so a training run never waits on a hub download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from drzero.config import option


@dataclass(frozen=True)
class ModelEntry:
    key: str
    hub_name: str
    local_dir: str            # directory name under $DRZERO_MODELS_DIR
    tool_call_parser: str     # SGLang --tool-call-parser for this family
    suggested_tp: int         # tensor parallel size that fits an H100 80 GB comfortably
    note: str = ""
    thinking: bool | None = None  # Qwen3's enable_thinking default (off: see drzero.rollout.render); None: no switch


REGISTRY = {e.key: e for e in [
    ModelEntry("qwen3-32b", "Qwen/Qwen3-32B", "Qwen3-32B", "qwen25", 4, "the production run; cached on the volume",
               thinking=False),
    ModelEntry("qwen3-14b", "Qwen/Qwen3-14B", "Qwen3-14B", "qwen25", 2, thinking=False),
    ModelEntry("qwen3-8b", "Qwen/Qwen3-8B", "Qwen3-8B", "qwen25", 1, thinking=False),
    ModelEntry("qwen2.5-3b-instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct", "qwen25", 1,
               "Dr. Zero's base model"),
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
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return ResolvedModel(name, str(candidate.resolve()), True,
                                 entry.tool_call_parser if entry else "qwen25", entry)
    return ResolvedModel(name, hub, False, entry.tool_call_parser if entry else "qwen25", entry)


@dataclass(kw_only=True)
class ListModelsConfig:
    json: bool = option(False, help="print the registry as JSON")


def render_registry() -> str:
    root = models_dir()
    rows = [("key", "hub name", "local weights", "parser", "tp", "note")]
    for entry in REGISTRY.values():
        local = root / entry.local_dir if root else None
        where = f"{local} ({'present' if (local / 'config.json').is_file() else 'missing'})" if local else \
            "set DRZERO_MODELS_DIR"
        rows.append((entry.key + (" *" if entry.key == DEFAULT_MODEL else ""), entry.hub_name, where,
                     entry.tool_call_parser, str(entry.suggested_tp), entry.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["* default for every stage (--model)"])
