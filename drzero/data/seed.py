"""Seed rows for the proposer: which documents, in which order, cut to the token budget, as verl rows.

    order, held_out = document_order(len(ids), rows, val_rows, rng)
    row = seed_row(index, "train", hops, load_seed_documents(store, ids, tokenizer, 256)[doc_id], partition)

`drzero prepare-data` (drzero.stages.prepare_data) lays the rows out per iteration and writes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from drzero.corpus.store import CorpusStore
from drzero.layout import Layout
from drzero.plan import FileSet
from drzero.prompts import PROPOSER_TEMPLATE_ID, SEARCH_TOOL_NAME, proposer_messages, render_document
from drzero.records import Optional

log = logging.getLogger(__name__)

ABILITY = "fact-reasoning"
AGENT_NAME = "tool_agent"  # verl >= 0.7 runs the tool loop only for rows that name it

# What the seed set's readers read of its manifest: gen-data its partitions, preflight the hop ratio and, when
# recorded, the longest prompt (else it measures them), the tokenizer and the corpus density. A manifest without the
# required ones, or with any of the wrong type, is damaged: prepare-data runs again.
SEED_MANIFEST = {
    "rows": int,
    "hop_ratio": str,
    "partitions": [{"partition": int, "rows": [int, int]}],
    "prompt_tokens": Optional({"max": int}),
    "tokenizer": Optional(str),
    "search_results": Optional({"chars_per_token": Optional({"min": float, "samples": Optional(int)})}),
}


def seed_set(layout: Layout) -> FileSet:
    """The seed parquet and its validation parquet, committed with their manifest by `drzero prepare-data`."""
    return FileSet(layout.seeds_manifest, (layout.seeds, layout.seeds_val), SEED_MANIFEST, "drzero prepare-data")


@dataclass
class SeedDocument:
    id: str
    title: str
    rendered: str  # "(Title: …) text", cut to the token budget
    tokens: int
    truncated: bool


def document_order(count: int, needed: int, held_out: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(train indices, val indices): val takes the first ``held_out`` of a shuffle; train cycles
    through the rest, reshuffled each pass, so every document is used once before any repeats."""
    first = rng.permutation(count)
    if count > held_out:
        val, pool = first[:held_out].tolist(), first[held_out:]
    else:  # a tiny corpus cannot hold documents out; validation reuses them
        log.warning("the collection has only %d documents: validation rows reuse train documents", count)
        val, pool = [int(first[i % count]) for i in range(held_out)], first
    train: list[int] = []
    order = pool
    while len(train) < needed:
        train.extend(order[:needed - len(train)].tolist())
        order = rng.permutation(pool)
    return train, val


def load_seed_documents(store: CorpusStore, ids: list[str], tokenizer, max_tokens: int) -> dict[str, SeedDocument]:
    """Fetch, render and cut to ``max_tokens`` each distinct document, in batches."""
    documents: dict[str, SeedDocument] = {}
    unique = list(dict.fromkeys(ids))
    with tqdm(total=len(unique), desc="seed documents", unit="doc", mininterval=1.0) as bar:
        for start in range(0, len(unique), 2000):
            batch = unique[start:start + 2000]
            got = store.collection.get(ids=batch, include=["documents", "metadatas"])
            by_id = {i: (c, m or {}) for i, c, m in zip(got["ids"], got["documents"], got["metadatas"])}
            rendered = []
            for doc_id in batch:
                contents, metadata = by_id[doc_id]
                title, _, text = contents.partition("\n")
                rendered.append((doc_id, metadata.get("title") or title, render_document(metadata.get("title") or title,
                                                                                          text.strip())))
            encoded = tokenizer([r for _, _, r in rendered], add_special_tokens=False, return_offsets_mapping=True)
            cut = []
            for (doc_id, title, text), offsets in zip(rendered, encoded["offset_mapping"]):
                truncated = len(offsets) > max_tokens
                cut.append((doc_id, title, text[:offsets[max_tokens - 1][1]] if truncated else text, truncated))
            # a cut can fall inside a word; count the cut text again rather than assume max_tokens
            counts = tokenizer([text for _, _, text, _ in cut], add_special_tokens=False)["input_ids"]
            for (doc_id, title, text, truncated), ids in zip(cut, counts):
                documents[doc_id] = SeedDocument(doc_id, title, text, len(ids), truncated)
            bar.update(len(batch))
    return documents


def sample_passages(store: CorpusStore, ids: list[str], rng: np.random.Generator,
                     count: int = 300) -> list[tuple[str, str]]:
    """(title, text) of up to ``count`` random passages, for the search-result density in the manifest."""
    chosen = [ids[i] for i in rng.choice(len(ids), size=min(count, len(ids)), replace=False)]
    got = store.collection.get(ids=chosen, include=["documents"])
    return [tuple(contents.partition("\n")[::2]) for contents in got["documents"]]


def seed_row(index: int, split: str, hops: int, document: SeedDocument, partition: int | None) -> dict:
    """One proposer row (the prepare-data format) for ``document`` at ``hops``."""
    data_source = f"search_zero_{hops}"
    extra_info = {
        "index": index,
        "split": split,
        "need_tools_kwargs": True,
        # never an empty struct (parquet cannot store one); the same keys on every row
        "tools_kwargs": {SEARCH_TOOL_NAME: {"create_kwargs": {"data_source": data_source, "seed_id": document.id}}},
        "hops": hops,
        "seed_id": document.id,
        "seed_title": document.title,
        "seed_document": document.rendered,  # the proposer reward grounds answers in it
        "template_id": PROPOSER_TEMPLATE_ID,
        "partition": -1 if partition is None else partition,
    }
    return {
        "data_source": data_source,
        "prompt": proposer_messages(hops, document.rendered),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": {"target": None}},
        "extra_info": extra_info,
        "agent_name": AGENT_NAME,
    }


def hop_histogram_of(hops: list[int], levels: int) -> dict[str, int]:
    """How many of ``hops`` are 1, 2, … ``levels`` (keys are strings: the manifest is JSON)."""
    counts = np.bincount(np.asarray(hops, dtype=int), minlength=levels + 1)
    return {str(h): int(counts[h]) for h in range(1, levels + 1)}


