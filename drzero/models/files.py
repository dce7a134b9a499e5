"""Finding model files (weights, tokenizers) without a model hub whenever possible.

Order: the name as a local directory; ``$DRZERO_MODELS_DIR/<name>`` and
``$DRZERO_MODELS_DIR/<basename>`` (the ``/corpus/models`` volume on Modal and in compose);
then the caller's own fallbacks (the Hugging Face cache, a hub download unless
``HF_HUB_OFFLINE=1`` or the hub does not answer within seconds). When nothing has the files, ``ModelNotFound`` says where to put them.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

Loaded = TypeVar("Loaded")

MODEL_FILES = ("config.json", "modules.json", "tokenizer_config.json", "tokenizer.json")


class ModelNotFound(RuntimeError):
    """No files for a configured model could be found; the message says where to put them."""


def local_candidates(name: str) -> list[Path]:
    candidates = [Path(name).expanduser()]
    models_dir = os.environ.get("DRZERO_MODELS_DIR")
    if models_dir:
        candidates += [Path(models_dir) / name, Path(models_dir) / Path(name).name]
    return candidates


def find_local_model(name: str, extra: list[Path] = ()) -> Path | None:
    """The first candidate directory that holds model files, or None."""
    for path in [*local_candidates(name), *extra]:
        if path.is_dir() and any((path / f).is_file() for f in MODEL_FILES):
            return path
    return None


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0")


def in_hf_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds anything for ``name`` (bare names as sentence-transformers/NAME too)."""
    from huggingface_hub import constants

    repos = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    return any((Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}").is_dir() for repo in repos)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (one HEAD request, proxies honoured), or None when it answers.

    Asked before a download because huggingface_hub retries an unreachable hub for about a minute
    (dozens of warnings) before giving up; this answers in seconds.
    """
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        reason = getattr(error, "reason", error)
        return f"the model hub at {endpoint} could not be reached ({reason})"
    return None


def where_to_put(name: str, what: str = "weights", flag: str = "--model") -> str:
    models_dir = os.environ.get("DRZERO_MODELS_DIR", "<models dir>")
    return (
        f"no {what} found for {name!r}: put the model files in a directory and pass it as {flag} DIR, "
        f"or place them at {models_dir}/{Path(name).name} with DRZERO_MODELS_DIR set, or fill the "
        f"Hugging Face cache (huggingface-cli download {name}) on a machine with hub access and copy "
        f"$HF_HOME/hub here."
    )


def load_model_files(name: str, load: Callable[..., Loaded], *, what: str = "weights", flag: str = "--model",
                     extra: list[Path] = ()) -> Loaded:
    """``load(path_or_name, **kwargs)`` from local files, else the HF cache, else the hub (when allowed)."""
    local = find_local_model(name, list(extra))
    if local is not None:
        log.info("loading %s for %s from %s", what, name, local)
        return load(str(local))
    if not in_hf_cache(name):
        # nothing cached: without a hub there is nothing to load, so say so before importing any model code
        unreachable = "HF_HUB_OFFLINE is set" if not hub_allowed() else hub_unreachable()
        if unreachable:
            raise ModelNotFound(f"{where_to_put(name, what, flag)} ({unreachable})")
    try:
        loaded = load(name, local_files_only=True)
        log.info("loading %s for %s from the Hugging Face cache", what, name)
        return loaded
    except Exception as cache_miss:  # transformers/sentence-transformers raise OSError/ValueError variants
        if not hub_allowed():
            raise ModelNotFound(where_to_put(name, what, flag)) from cache_miss
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelNotFound(f"{where_to_put(name, what, flag)} ({unreachable})")
    try:
        log.info("%s for %s not cached; downloading from the hub", what, name)
        return load(name)
    except Exception as download_error:
        raise ModelNotFound(where_to_put(name, what, flag)) from download_error


def load_tokenizer(name: str):
    """A Hugging Face tokenizer (with its chat template) by name or directory."""
    def load(path: str, **kwargs):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kwargs)

    return load_model_files(name, load, what="tokenizer", flag="--tokenizer")


# Dr. Zero's base model; its tokenizer sets the seed prompts' token budgets.
DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-3B-Instruct"
