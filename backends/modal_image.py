"""# Where Dr. Zero runs on Modal: the image, the two volumes, the secrets, the GPUs

    python -m backends.modal smoke      # the first call builds this image (slow once), later calls start from it

Every Modal Function of this project runs in the place described here: the single-node Functions of
backends/modal.py and the clustered ones of backends/modal_cluster.py import it, and it imports
neither. Nothing here runs anything; Modal objects are lazy, so importing it makes no network call.
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

from drzero.stages.registry import Stage

MINUTES = 60
HOURS = 60 * MINUTES
DAY = 24 * HOURS  # Modal's limit for one attempt of a Function call

# ## The image
#
# The GPU image is the one `docker compose` runs: `docker/Dockerfile` pins the SGLang base image,
# verl 0.7.1 and the prebuilt flash-attn wheel, and installs drzero in /opt/drzero. Modal builds it
# from the repository as the build context (`.dockerignore` keeps data out). The working tree is
# added last, mounted when a container starts, so a code change needs no rebuild; `PYTHONPATH`
# puts it ahead of the copy installed in the image. The variables repeat the image's own so that
# this file does not depend on them.
#
# The upload is the code, never what sits beside it: `.env` (the README's place for W&B and HF
# keys), local checkpoints, Chroma stores, corpora, weights and data files stay on this machine.
# The patterns are Modal's (dockerignore syntax, matched from the repository root); the tests run
# them through Modal's own matcher.

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
CODE_DIR = "/opt/drzero-src"
CODE_IGNORE = [
    ".git", ".github", ".venv", "venv", ".drzero", "**/__pycache__", ".pytest_cache", "*.egg-info", "build", "dist",
    "**/.env", "**/.env.*",                                         # secrets
    "**/checkpoints", "**/chromadb", "**/wandb", "corpus", "models", "outputs",  # run data (drzero/corpus/ is code)
    "**/*.parquet", "**/*.sqlite3", "**/*.safetensors", "**/*.bin", "**/*.pt", "**/*.pth", "**/*.gguf",
]

image = (
    modal.Image.from_dockerfile(DOCKERFILE, context_dir=REPO_ROOT)
    .entrypoint([])  # the image's own entrypoint (if any) is for compose; Modal runs our Functions
    .env({
        "PYTHONPATH": CODE_DIR,
        "PYTHONUNBUFFERED": "1",
        "DRZERO_CONFIG_DIR": f"{CODE_DIR}/config",
        "DRZERO_MODELS_DIR": "/corpus/models",
        "DRZERO_DATA_DIR": "/corpus/data",
        "DRZERO_CHECKPOINTS": "/checkpoints",
        "NCCL_NVLS_ENABLE": "0",  # no NVLink multicast (SHARP) collectives
    })
    .add_local_dir(REPO_ROOT, CODE_DIR, ignore=CODE_IGNORE)
)

# ## Volumes and secrets
#
# Two volumes, laid out as in DESIGN.md: the corpus (ChromaDB store, parquet data, model weights,
# raw documents for `ingest`) and the checkpoints (verl checkpoints, merged models, `state.json`,
# and `runs/`, where each GPU container records its own running time for `status`).

CORPUS_DIR, CHECKPOINTS_DIR = "/corpus", "/checkpoints"
CORPUS_DB = f"{CORPUS_DIR}/chromadb"
DATA_DIR = f"{CORPUS_DIR}/data"
MODELS_DIR = f"{CORPUS_DIR}/models"
SOURCES_DIR = f"{CORPUS_DIR}/sources"  # what `upload-corpus` puts there when it is not a Chroma store
SEEDS = f"{DATA_DIR}/zero_ratio4321.parquet"  # drzero.layout's seed file name
RUNS_DIR = "runs"  # on the checkpoints volume
# ChromaDB keeps its index in SQLite, which is unreliable on a network file system: every Function
# that reads the corpus works on a copy on the container's local disk.
LOCAL_DB = "/tmp/chromadb"

corpus_volume = modal.Volume.from_name("dr-zero-corpus", create_if_missing=True)
checkpoints_volume = modal.Volume.from_name("dr-zero-checkpoints", create_if_missing=True)
VOLUMES = {CORPUS_DIR: corpus_volume, CHECKPOINTS_DIR: checkpoints_volume}

# Each Function gets only the secrets it uses: the W&B key where verl logs (the stages whose
# registry entry says `logs_to_wandb`, and the preflight that checks the key is there), the Hugging
# Face token where weights or the embedder may be downloaded. `drzero` passes neither to the
# retriever or SGLang (drzero.services).
WANDB = modal.Secret.from_name("wandb-secret", required_keys=["WANDB_API_KEY"])
HUGGING_FACE = modal.Secret.from_name("huggingface-secret", required_keys=["HF_TOKEN"])
TRAINING_SECRETS = [WANDB]          # challenger, solver, train, preflight
DOWNLOAD_SECRETS = [HUGGING_FACE]   # download_model, ingest

# ## GPUs and what they cost
#
# A Function's GPU is fixed where it is defined, so the stages are defined on `$DRZERO_MODAL_GPU`
# (default `H100:8`), and `--gpu` overrides it per launch with `Function.with_options(gpu=...)`,
# CPU and memory scaled to match. The stage commands get `--gpus N` and `--gpu KIND` (which picks the model's
# recipe), and off a full node of 8 SGLang's dp x tp to fit.
# `H100` may be served on an H200; write `H100!:8` to get exactly H100s.
#
# The price is only for the estimates printed here (Modal lists an H100 near $4 per hour, so 8×H100
# is about $32 an hour; check modal.com/pricing, and pass `--price-per-gpu-hour` for H200s). CPU
# and memory are billed on top.

GPU = os.environ.get("DRZERO_MODAL_GPU", "H100:8")
SMOKE_GPU = "H100:1"
PRICE_PER_GPU_HOUR = float(os.environ.get("DRZERO_MODAL_PRICE_PER_GPU_HOUR", "4.0"))
CPU_PER_GPU, MEMORY_PER_GPU_MIB = 8.0, 64 * 1024

# A day-long run survives preemptions (Modal restarts those itself) and a few crashes or 24-hour
# cutoffs: each retry runs the same command in a fresh container, and the command resumes from the
# checkpoint volume (state.json skips finished stages, verl's resume_mode=auto the finished steps).
RETRIES = modal.Retries(max_retries=5, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0)


def parse_gpu(spec: str) -> tuple[str, int]:
    """"H100:8" -> ("H100", 8); "H200" -> ("H200", 1). One node: 1 to 8 GPUs."""
    kind, _, count = spec.strip().partition(":")
    if not kind or (count and not count.isdigit()) or not 1 <= int(count or 1) <= 8:
        raise ValueError(f"--gpu {spec!r} is not valid: expected TYPE or TYPE:COUNT with 1 to 8 GPUs, "
                         f"e.g. H100:8, H200:8 or H100!:8")
    return kind.upper(), int(count or 1)


def resources(gpu: str) -> dict:
    """CPU cores and memory (MiB) for a container with these GPUs: 8 cores and 64 GiB per GPU."""
    count = parse_gpu(gpu)[1]
    return {"cpu": CPU_PER_GPU * count, "memory": MEMORY_PER_GPU_MIB * count}


# ## What a Function is given
#
# A GPU stage gets the full day, retries, and a fresh container per attempt; a CPU task only the
# image and the volumes (each sets its own cores, memory and timeout). Whether a stage is one or
# the other, and whether it gets the W&B key, is the stage registry's (drzero/stages/registry.py).

GPU_STAGE = dict(image=image, gpu=GPU, **resources(GPU), ephemeral_disk=512 * 1024, volumes=VOLUMES,
                 timeout=DAY, retries=RETRIES, single_use_containers=True)
CPU_TASK = dict(image=image, volumes=VOLUMES)


def stage_options(stage: Stage) -> dict:
    """The `app.function` options of a stage's Function: GPU or CPU, and the W&B key if verl logs there."""
    return {**(GPU_STAGE if stage.gpu else CPU_TASK), **({"secrets": TRAINING_SECRETS} if stage.logs_to_wandb else {})}
