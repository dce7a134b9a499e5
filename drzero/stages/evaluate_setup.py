"""The setup of an evaluation, written as ``manifest.json`` beside its results, and what differs between two.

    setup = evaluation_setup(cfg, generation, retriever_health, model_info, sources)   # by drzero.stages.evaluate
    for key, ours, theirs in setup_differences(manifest_a["setup"], manifest_b["setup"]): ...

Reproductions in this field mostly fail on setups that differed silently (another retriever, corpus, prompt,
number of turns, answer normalization, split), so every evaluation records them: the model and a hash of its
checkpoint, the corpus (collection, passage count, a fingerprint of the store, embedder) as the retriever reports
it on ``/health``, top-k, turns, the response budget, a hash of the prompt template (our solver prompt, the tool
schema and the chat template), thinking, the decoding settings, and for each question source its file, split,
hash and subset (seed, size). `drzero report --compare` lists the differences before it compares scores.

The checkpoint hash is SHA-256 over every file's name and size and, of each file over 3 MiB, its first,
middle and last MiB (whole files below): a 15 GB checkpoint is not read through, and any real change of the
weights shows. A model served at a URL is hashed when the server names a directory that exists here
(SGLang's ``/get_model_info``), else recorded by name only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from drzero import __version__
from drzero.prompts import SEARCH_TOOL_SCHEMA, SOLVER_TEMPLATE, SOLVER_TEMPLATE_ID

SAMPLE_BYTES = 1 << 20
# What must agree for two runs' scores to be compared at all (the papers' setting: wiki-18, e5, top-3, EM).
MUST_MATCH = ("corpus.collection", "corpus.passages", "corpus.fingerprint", "corpus.embedder", "retrieval.topk",
              "scoring", "questions")
SCORING = ("EM and token F1 of the last <answer> after SQuAD normalization (lower case, ASCII punctuation and "
           "a/an/the removed, spaces collapsed), best over the golden answers")


def checkpoint_hash(directory: Path) -> str | None:
    """The sampled SHA-256 of a model directory (see the module docstring); None when it is not a directory."""
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory)}\0{size}\0".encode())
        with open(path, "rb") as stream:
            if size <= 3 * SAMPLE_BYTES:
                digest.update(stream.read())
                continue
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                stream.seek(offset)
                digest.update(stream.read(SAMPLE_BYTES))
    return digest.hexdigest()


def prompt_template_hash(chat_template: str | None) -> str:
    """SHA-256 of what the model is shown besides the question: our solver prompt, the tool schema, the chat
    template of the tokenizer used (none with --api chat: the server applies its own)."""
    # the schema as we declare it: verl renders it unchanged (drzero.rollout.render), and importing verl takes seconds
    shown = {"template_id": SOLVER_TEMPLATE_ID, "template": SOLVER_TEMPLATE, "tools": [SEARCH_TOOL_SCHEMA],
             "chat_template": chat_template}
    return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()


def model_setup(model: str, served_name: str, local_path: str | None, tokenizer: str | None) -> dict:
    """The model as the manifest records it: what was asked for, where its weights are and their hash."""
    path = Path(local_path).expanduser() if local_path else None
    return {"model": model, "served_model_name": served_name, "path": local_path, "tokenizer": tokenizer,
            "checkpoint_sha256": checkpoint_hash(path) if path is not None else None}


def corpus_setup(retriever_url: str, health: dict | None) -> dict:
    """The corpus as the retriever's ``/health`` describes it (a retriever that is not drzero's gives nulls)."""
    health = health or {}
    return {"retriever_url": retriever_url, "collection": health.get("collection"),
            "passages": health.get("passages"), "fingerprint": health.get("fingerprint"),
            "embedder": health.get("embedder"), "dimension": health.get("dimension"),
            "precision": health.get("precision"), "index": health.get("index")}


def evaluation_setup(*, model: dict, corpus: dict, topk: int, generation: dict, thinking: bool,
                     chat_template: str | None, questions: list[dict]) -> dict:
    """Everything an evaluation's numbers depend on, in the manifest's shape."""
    return {
        "drzero_version": __version__,
        "model": model,
        "corpus": corpus,
        "retrieval": {"topk": topk},
        "agent": {"max_turns": generation["max_turns"], "max_prompt_tokens": generation["max_prompt_tokens"],
                  "max_response_tokens": generation["max_response_tokens"], "tool_output": generation["tool_output"],
                  "thinking": thinking, "api": generation["api"],
                  "prompt_template_sha256": prompt_template_hash(chat_template)},
        "decoding": {"temperature": generation["temperature"], "top_p": generation["top_p"],
                     "chat_template_kwargs": dict(generation["chat_template_kwargs"])},
        "scoring": SCORING,
        "questions": questions,
    }


def _flat(value, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values; a list of question sources is keyed by each source's name."""
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return _flat({v["name"]: {k: x for k, x in v.items() if k != "name"} for v in value}, prefix)
    return {prefix.rstrip("."): value}


def setup_differences(ours: dict, theirs: dict) -> list[tuple[str, object, object]]:
    """(dotted key, our value, their value) for every setting that differs; a key only one side has differs too."""
    a, b = _flat(ours or {}), _flat(theirs or {})
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def breaks_comparison(key: str) -> bool:
    """True for a difference that makes the two runs' scores incomparable (corpus, retriever, top-k, scoring,
    the questions asked), as opposed to one that is the point of the comparison (the model) or a path that differs
    from machine to machine (a file's hash says whether it is the same file)."""
    if key.endswith(".file"):
        return False
    return any(key == root or key.startswith(root + ".") for root in MUST_MATCH)

