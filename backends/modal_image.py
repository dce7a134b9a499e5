"""# Where Dr. Zero runs on Modal: the image, the two volumes, the secrets, the GPUs

    python -m backends.modal smoke      # the first call builds this image (slow once), later calls start from it

Every Modal Function of this project runs in the place described here: the single-node Functions of
backends/modal.py and the clustered ones of backends/modal_cluster.py import it, and it imports
neither. Nothing here runs anything; Modal objects are lazy, so importing it makes no network call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import modal

from backends.secrets_rule import SecretsRule, docker_context_rule
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
# The upload is the code, never what sits beside it: local checkpoints, Chroma stores, corpora,
# weights and data files stay on this machine (`CODE_IGNORE`, Modal's dockerignore syntax matched
# from the repository root), and so do keys: backends/secrets_rule.py adds the secret file names
# (`.env` and its kind) to both the upload and the build context (`.dockerignore`), and refuses a
# file that would be shipped but holds a key. Modal's own upload code applies both rules; a launch
# runs them first (`secrets_rule.check`) so that a refusal comes before anything starts.

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
CODE_DIR = "/opt/drzero-src"
CODE_IGNORE = [
    ".git", ".github", ".venv", "venv", ".drzero", "**/__pycache__", ".pytest_cache", "*.egg-info", "build", "dist",
    "**/checkpoints", "**/chromadb", "**/wandb", "corpus", "models", "outputs",  # run data (drzero/corpus/ is code)
    "**/*.parquet", "**/*.sqlite3", "**/*.safetensors", "**/*.bin", "**/*.pt", "**/*.pth", "**/*.gguf",
]
CODE_RULE = SecretsRule(REPO_ROOT, *CODE_IGNORE)
CONTEXT_RULE = docker_context_rule(REPO_ROOT)

image = (
    modal.Image.from_dockerfile(DOCKERFILE, context_dir=REPO_ROOT, ignore=CONTEXT_RULE)
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
    .add_local_dir(REPO_ROOT, CODE_DIR, ignore=CODE_RULE)
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
FILES_DIR = f"{CORPUS_DIR}/files"      # what `download-corpus` fetches: corpus and index files for ingest and adopt
SOURCES_DIR = f"{CORPUS_DIR}/sources"  # what `upload-corpus` puts there when it is not a Chroma store
SEEDS = f"{DATA_DIR}/zero_ratio4321.parquet"  # drzero.layout's seed file name
RUNS_DIR = "runs"  # on the checkpoints volume
# ChromaDB keeps its index in SQLite, which is unreliable on a network file system: every Function
# that reads the corpus works on a copy on the container's local disk.
LOCAL_DB = "/tmp/chromadb"

corpus_volume = modal.Volume.from_name("dr-zero-corpus", create_if_missing=True)
checkpoints_volume = modal.Volume.from_name("dr-zero-checkpoints", create_if_missing=True)
VOLUMES = {CORPUS_DIR: corpus_volume, CHECKPOINTS_DIR: checkpoints_volume}

# No Function is defined with a secret: Modal creates every Function of an app when it starts, so a
# secret named in any definition would stop every action, `smoke` and `status` included, in a
# workspace without it. A launch attaches the secrets its command uses instead
# (`Function.with_options(secrets=...)`), once it has looked them up: the W&B key where verl logs to
# W&B (the stages whose registry entry says `logs_to_wandb`, and their preflight, which checks the
# key), the Hugging Face token where weights or the embedder may be downloaded (optional: public
# models need none). `drzero` passes neither to the retriever or SGLang (drzero.services).


@dataclass(frozen=True)
class NamedSecret:
    name: str           # the Modal secret
    key: str            # the variable it must hold
    value: str          # what the user puts there, for `modal secret create`
    otherwise: str = ""  # what to do instead of creating it

    @property
    def create(self) -> str:
        return f"modal secret create {self.name} {self.key}=<{self.value}>"


W_AND_B = NamedSecret("wandb-secret", "WANDB_API_KEY", "your W&B key",
                      "or train without W&B with --stage-args='--logger console'")
HUGGING_FACE = NamedSecret("huggingface-secret", "HF_TOKEN", "your Hugging Face token")
SECRETS = {secret.name: secret for secret in (W_AND_B, HUGGING_FACE)}


class MissingSecret(Exception):
    """A secret a launch needs is not in the Modal workspace: one sentence, which one and the command to make it."""

    def __init__(self, secret: NamedSecret, reason: str):
        self.secret, self.reason = secret, reason
        super().__init__(f"Modal has no secret {secret.name!r} holding {secret.key} in this workspace ({reason}): "
                         f"create it with `{secret.create}`, then run the same command again"
                         + (f", {secret.otherwise}" if secret.otherwise else ""))


def lookup_secret(secret: NamedSecret, client=None) -> modal.Secret:
    """The secret, hydrated (one call to Modal); `MissingSecret` when the workspace has none with its key."""
    try:
        return modal.Secret.from_name(secret.name, required_keys=[secret.key]).hydrate(client=client)
    except (modal.exception.NotFoundError, modal.exception.InvalidError) as error:
        raise MissingSecret(secret, (str(error).strip().splitlines() or [type(error).__name__])[0]) from None


def attach_secrets(wanted: dict[str, bool], client=None, note=print) -> list[modal.Secret]:
    """The secrets a launch asked for (name -> whether it needs it): a missing one it needs raises `MissingSecret`,
    a missing optional one is left out with a note."""
    found = []
    for name, required in wanted.items():
        try:
            found.append(lookup_secret(SECRETS[name], client))
        except MissingSecret as missing:
            if required:
                raise
            note(f"note: Modal has no secret {name!r} holding {missing.secret.key} ({missing.reason}), so this "
                 f"launch runs without one (public models need none; for gated ones: `{missing.secret.create}`)")
    return found


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
# the other is the stage registry's (drzero/stages/registry.py).

GPU_STAGE = dict(image=image, gpu=GPU, **resources(GPU), ephemeral_disk=512 * 1024, volumes=VOLUMES,
                 timeout=DAY, retries=RETRIES, single_use_containers=True)
CPU_TASK = dict(image=image, volumes=VOLUMES)


def stage_options(stage: Stage) -> dict:
    """The `app.function` options of a stage's Function: GPU or CPU (its secrets come with each launch)."""
    return GPU_STAGE if stage.gpu else CPU_TASK
