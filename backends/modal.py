"""# Dr. Zero on Modal: the real run, on 8×H100, detached and resumable

    python -m backends.modal smoke                       # the whole stack on one H100, in minutes
    python -m backends.modal train                       # the whole loop on 8×H100, detached (about a day)
    python -m backends.modal train --nodes 2             # the same on a cluster of 2 nodes of 8×H100 (gated, below)
    python -m backends.modal status                      # each stage, its verl step, cost so far, what to do next
    python -m backends.modal download-model qwen3-32b    # weights fetched on Modal into the corpus volume, verified
    python -m backends.modal logs --errors               # the latest run's known failures, each with its fix
    python -m backends.modal stop / resume               # stop the latest run; start it again as it was launched

This file only prepares the place (the image, two volumes, GPUs, secrets) and then runs the
same `drzero` command that a laptop or `docker compose` runs. Each action has one Modal Function
that starts `python -m drzero.cli <command>` as a child process and streams its output, each line
prefixed with the command's name. Nothing here is Dr. Zero logic, and nothing in `drzero/`
imports Modal.

Run this file in module mode only (`python -m backends.modal ...` or `modal run -m backends.modal ...`).
Run as a plain file, `backends/` would be on `sys.path` and `import modal` would import this file.

    python -m backends.modal ACTION [MODEL|APP_ID] [--iteration K] [--model NAME] [--gpu H100:8] [--nodes N]
                                    [--detach/--no-detach]
                                    [--stage-args "..."] [-- hydra overrides]
    modal run [--detach] -m backends.modal --action ACTION [--iteration K] ...   # the seed guide's form
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import modal

from backends import modal_run
from backends.modal_run import now_iso, parse_time

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

# Each Function gets only the secrets it uses: the W&B key where verl logs (and where the
# preflight checks the key is there), the Hugging Face token where weights or the embedder may
# be downloaded. `drzero` passes neither to the retriever or SGLang (drzero.services).
WANDB = modal.Secret.from_name("wandb-secret", required_keys=["WANDB_API_KEY"])
HUGGING_FACE = modal.Secret.from_name("huggingface-secret", required_keys=["HF_TOKEN"])
TRAINING_SECRETS = [WANDB]          # challenger, solver, train, preflight
DOWNLOAD_SECRETS = [HUGGING_FACE]   # download_model, ingest

app = modal.App("dr-zero")

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
COMMIT_EVERY = 10 * MINUTES
USAGE_ERROR = 2  # drzero's exit code for a wrong option or config: a retry cannot fix it


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


# ## Running a drzero command in a container
#
# The Function's own process starts the command, prints its output line by line, commits both
# volumes every few minutes from a background thread (child processes have no Modal client) and
# once more on the way out, and records its GPU time. A SIGTERM or SIGINT (preemption, `modal app
# stop`) is passed on to the command, which stops its services and verl before the last commit.


def visible_gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuTimeRecord:
    """One container's GPU time in `runs/<start>-<command>-<task>.json` on the checkpoints volume."""

    def __init__(self, command: str, argv: Sequence[str]):
        gpus = visible_gpus()
        task = os.environ.get("MODAL_TASK_ID") or uuid.uuid4().hex[:12]
        started = now_iso()
        self.path = Path(CHECKPOINTS_DIR) / RUNS_DIR / f"{started.replace(':', '')}-{command}-{task}.json"
        self.data = {"command": command, "argv": list(argv), "gpu_type": gpus[0] if gpus else "",
                     "gpus": len(gpus), "started": started, "last_seen": started, "ended": None,
                     "exit_code": None, "task_id": task}
        self._lock = threading.Lock()  # the commit thread saves too
        self.save()

    def save(self, **updates) -> None:
        with self._lock:
            self.data.update(updates, last_seen=now_iso())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=2))
            os.replace(temporary, self.path)


def commit_volumes() -> None:
    for volume in (checkpoints_volume, corpus_volume):
        try:
            volume.commit()
        except Exception as error:  # the next commit tries again; a failed commit must not end the run
            print(f"[modal] volume commit failed ({error}); trying again at the next one", flush=True)


def reload_volumes() -> None:
    for volume in (checkpoints_volume, corpus_volume):
        try:
            volume.reload()
        except Exception:  # files open on the volume (a server reading weights): the next round tries again
            pass


@contextlib.contextmanager
def committing_volumes(record: GpuTimeRecord | None = None, every: float = COMMIT_EVERY, reload: bool = False):
    """Commit both volumes every ``every`` seconds and on the way out; with ``reload``, also take in what other
    containers committed (the nodes of a cluster, backends/modal_cluster.py)."""
    stop = threading.Event()

    def commit_now_and_then() -> None:
        while not stop.wait(every):
            if record:
                record.save()
            commit_volumes()
            if reload:
                reload_volumes()

    thread = threading.Thread(target=commit_now_and_then, name="volume-commit", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5 * MINUTES)
        if record:
            record.save(ended=now_iso())
        commit_volumes()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def stream(command: Sequence[str], prefix: str, env: dict[str, str] | None = None) -> int:
    """Run ``command``, print its output live with ``prefix``; stop its whole process group if we are stopped."""
    print(f"[modal] running {shlex.join(command)}", flush=True)
    process = subprocess.Popen(list(command), env=env, cwd=CODE_DIR if Path(CODE_DIR).is_dir() else None,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        for raw in iter(process.stdout.readline, b""):
            print(prefix + raw.decode(errors="replace").rstrip(), flush=True)
        return process.wait()
    finally:
        if process.poll() is None:  # we were stopped: drzero stops its services and verl on SIGTERM
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=2 * MINUTES)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def copy_tree(source: str, target: str) -> bool:
    if not Path(source).is_dir():
        return False
    started = time.monotonic()
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    print(f"[modal] copied {source} to {target} in {time.monotonic() - started:.1f} s", flush=True)
    return True


def run_drzero(command: str, argv: Sequence[str], *, local_corpus: bool = False, gpu_time: bool = False) -> dict:
    """`drzero <command> <argv>` in this container; raise on failure so that Modal retries it."""
    env = dict(os.environ)
    if local_corpus and copy_tree(CORPUS_DB, LOCAL_DB):
        env["DRZERO_DB"] = LOCAL_DB  # the stages start the retriever on $DRZERO_DB themselves
    record = GpuTimeRecord(command, argv) if gpu_time else None
    with committing_volumes(record):
        code = stream([sys.executable, "-m", "drzero.cli", command, *argv], f"[{command}] ", env)
        if record:
            record.save(exit_code=code)
    return outcome(command, code)


def outcome(command: str, code: int) -> dict:
    """A finished drzero command's result; an exception when Modal should retry it."""
    if code == 0:
        return {"command": command, "exit_code": 0}
    if code == USAGE_ERROR:
        print(f"[modal] drzero {command} refused its options or config (exit 2); not retried: fix the message "
              f"above and launch again", flush=True)
        return {"command": command, "exit_code": code}
    raise RuntimeError(f"drzero {command} exited with {code}; Modal retries it (when the Function has retries) and "
                       f"it resumes from the checkpoint volume")


# ## The Functions
#
# One per action. GPU stages get the full day, retries, and a fresh container per attempt.

GPU_STAGE = dict(image=image, gpu=GPU, **resources(GPU), ephemeral_disk=512 * 1024, volumes=VOLUMES,
                 timeout=DAY, retries=RETRIES, single_use_containers=True)
CPU_TASK = dict(image=image, volumes=VOLUMES)


@app.function(image=image, gpu=SMOKE_GPU, **resources(SMOKE_GPU), volumes=VOLUMES,
              timeout=30 * MINUTES)  # the first image build is slow: the seed guide's 30 minutes
def smoke(*argv: str) -> dict:
    """`drzero smoke`: imports, retriever, search, SGLang, one agent rollout and one verl step on one GPU."""
    return run_drzero("smoke", argv, gpu_time=True)


@app.function(**CPU_TASK, secrets=DOWNLOAD_SECRETS, cpu=8.0, memory=32 * 1024, timeout=12 * HOURS)
def ingest(*argv: str) -> dict:
    """`drzero ingest` of the uploaded documents into a local copy of the store, then back onto the volume."""
    copy_tree(CORPUS_DB, LOCAL_DB)
    sources = [SOURCES_DIR] if Path(SOURCES_DIR).is_dir() and any(Path(SOURCES_DIR).iterdir()) else []
    result = run_drzero("ingest", [*sources, "--db", LOCAL_DB, *argv])
    if result["exit_code"] == 0:
        copy_tree(LOCAL_DB, CORPUS_DB)
        corpus_volume.commit()
    return result


@app.function(**CPU_TASK, cpu=8.0, memory=32 * 1024, timeout=2 * HOURS)
def prepare_data(*argv: str) -> dict:
    """`drzero prepare-data`: the proposer's seed parquet in /corpus/data."""
    copy_tree(CORPUS_DB, LOCAL_DB)
    return run_drzero("prepare-data", ["--db", LOCAL_DB, "--out", SEEDS, *argv])


@app.function(**GPU_STAGE, secrets=TRAINING_SECRETS)
def challenger(*argv: str) -> dict:
    """`drzero challenger`: HRPO proposer training for one iteration."""
    return run_drzero("challenger", argv, local_corpus=True, gpu_time=True)


@app.function(**GPU_STAGE)
def gen_data(*argv: str) -> dict:
    """`drzero gen-data`: the solver's data, sampled from the merged proposer."""
    return run_drzero("gen-data", argv, local_corpus=True, gpu_time=True)


@app.function(**GPU_STAGE, secrets=TRAINING_SECRETS)
def solver(*argv: str) -> dict:
    """`drzero solver`: GRPO solver training for one iteration."""
    return run_drzero("solver", argv, local_corpus=True, gpu_time=True)


@app.function(**GPU_STAGE)
def merge(*argv: str) -> dict:
    """`drzero merge`: an FSDP checkpoint into a Hugging Face model directory."""
    return run_drzero("merge", argv, gpu_time=True)


@app.function(**GPU_STAGE)
def evaluate(*argv: str) -> dict:
    """`drzero evaluate`: a model against an evaluation set."""
    return run_drzero("evaluate", argv, local_corpus=True, gpu_time=True)


@app.function(**GPU_STAGE, secrets=TRAINING_SECRETS)
def train(*argv: str) -> dict:
    """`drzero evolve`: the whole loop; a retry continues where state.json says the run stopped."""
    return run_drzero("evolve", argv, local_corpus=True, gpu_time=True)


@app.function(**CPU_TASK, cpu=2.0, memory=8 * 1024, timeout=10 * MINUTES)
def list_models(*argv: str) -> dict:
    """`drzero list-models`, with the weights present on the corpus volume."""
    return run_drzero("list-models", argv)


# A download runs where the bandwidth is, on a CPU container: drzero.models.download fetches the
# files in batches with Hugging Face's accelerators, commits the volume after each batch, and
# verifies every file against the hub's hashes. A preempted or timed-out attempt is retried and
# continues from what the last commit kept; a model already verified on the volume is skipped.
@app.function(**CPU_TASK, secrets=DOWNLOAD_SECRETS, cpu=8.0, memory=16 * 1024, timeout=6 * HOURS, retries=RETRIES)
def download_model(hub_name: str, local_dir: str) -> dict:
    """Weights from the Hugging Face hub into /corpus/models/<local_dir>, so no GPU ever waits on a download."""
    from drzero.models.download import download_from_hub

    result = download_from_hub(hub_name, Path(MODELS_DIR) / local_dir, commit=corpus_volume.commit,
                               log=lambda line: print(f"[download-model] {line}", flush=True))
    return {"command": "download-model", "exit_code": 0, **result}


# ## Preflight: refuse before a GPU starts
#
# A cheap CPU container with the same image and volumes checks that the stage's inputs are on the
# volumes (each missing one with the action that makes it) and runs the stage's own checks:
# `drzero preflight STAGE ...` (config composes and validates, model and data present, batch sizes,
# W&B key) or the stage's `--dry-run`.


@app.function(**CPU_TASK, secrets=TRAINING_SECRETS, cpu=4.0, memory=16 * 1024, timeout=30 * MINUTES)
def preflight(command: list, required: list) -> dict:
    problems = [f"{path} is missing: {fix}" for path, fix in required if not Path(path).exists()]
    if command:
        code = stream([sys.executable, "-m", "drzero.cli", *command], "[preflight] ")
        if code != 0:
            problems.append(f"`drzero {shlex.join(command)}` found problems (exit {code}); its report is above")
    return {"ok": not problems, "problems": problems}


# ## From the command line to a Function call
#
# Everything below runs on your machine. `plan_launch` turns the command line into one `Launch`:
# which Function, with which `drzero` arguments, on which GPUs, after which preflight. It is a pure
# function, so the tests check every action's mapping without a Modal account.

ACTIONS = ("smoke", "ingest", "prepare-data", "challenger", "gen-data", "solver", "merge", "evaluate", "train",
           "list-models", "status", "download-model", "upload-model", "upload-corpus", "download-checkpoints",
           "logs", "stop", "resume")
GPU_STAGES = ("challenger", "gen-data", "solver", "merge", "evaluate", "train")
SIZED_BY_GPUS = ("challenger", "gen-data", "solver", "train")      # take --gpus
WITH_SGLANG = ("challenger", "gen-data", "train")                  # start SGLang servers: dp x tp = GPUs
TAKES_OVERRIDES = ("challenger", "solver", "train")                # pass Hydra overrides to verl
# Rough wall-clock hours for the cost estimate (Dr. Zero's three iterations take about a day on 8×H100).
EXPECTED_HOURS = {"smoke": 0.5, "challenger": 4.0, "gen-data": 1.0, "solver": 2.5, "merge": 0.25,
                  "evaluate": 0.5, "train": 24.0}


@dataclass
class Request:
    """What the user asked for."""

    action: str
    iteration: int = 1
    model: str | None = None
    gpu: str | None = None                  # default: $DRZERO_MODAL_GPU / H100:8; smoke: H100:1
    stage: str = "solver"                   # merge, download-checkpoints
    data: str | None = None                 # evaluate
    path: str | None = None                 # upload-model, upload-corpus, download-checkpoints
    stage_args: list[str] = field(default_factory=list)   # more `drzero <command>` options
    overrides: list[str] = field(default_factory=list)    # Hydra overrides after `--`
    detach: bool | None = None              # default: detached for the GPU stages
    hours: float | None = None
    price_per_gpu_hour: float = PRICE_PER_GPU_HOUR
    app_id: str | None = None               # logs, stop, resume: default the latest launch
    errors: bool = False                    # logs: only the known failures
    since: str | None = None                # logs: e.g. 2h
    follow: bool = False                    # logs: keep streaming
    nodes: int = 1                          # > 1: a Modal cluster of that many nodes (backends/modal_cluster.py)


@dataclass
class Launch:
    """One Function call and the checks before it."""

    action: str
    function: str                           # the Modal Function's name in this module
    argv: list[str]                         # its arguments: `drzero <command>` options, as given to it
    gpu: str | None = None                  # None: a CPU Function
    detach: bool = False
    preflight: list[str] | None = None      # `drzero` argv the CPU preflight runs
    required: list[tuple[str, str]] = field(default_factory=list)   # (volume path, how to make it)
    nodes: int = 1                          # > 1: a clustered Function, `gpu` on each node

    @property
    def checked(self) -> bool:
        return self.preflight is not None or bool(self.required)


def hub_name(model: str) -> str:
    """A `drzero list-models` key -> its hub name (whose last part is its directory under /corpus/models)."""
    from drzero.models.registry import REGISTRY

    entry = REGISTRY.get(model.lower())
    return entry.hub_name if entry else model


def model_directory(model: str) -> str:
    """A `drzero list-models` key or hub name -> its directory under /corpus/models, where the stages look."""
    from drzero.models.registry import REGISTRY

    entry = REGISTRY.get(model.lower())
    return entry.local_dir if entry else PurePosixPath(model).name


def gpu_kind(spec: str) -> str | None:
    """The `drzero --gpu` kind of a Modal GPU spec ("H100!:8" -> "H100"), or None when drzero has no recipes for it.

    The stage picks the model's recipe by it ($DRZERO_GPU otherwise defaults to H100, and an H200 run would
    get the H100 recipe). An `H100` that Modal serves as an H200 keeps the H100 recipe: it fits there too."""
    from drzero.models.shapes import GPU_MEMORY_GIB

    kind = parse_gpu(spec)[0].rstrip("!")
    return kind if kind in GPU_MEMORY_GIB else None


def gpu_args(action: str, gpus: int, kind: str | None = None) -> list[str]:
    """`--gpus`, `--gpu KIND` and, off a full node, the SGLang servers' dp x tp for one node of ``gpus`` GPUs.

    On 8 GPUs the stage's own default applies (the model's recipe for the reward server, else 4 x 2): passing
    dp x tp here would override the recipe."""
    if action not in SIZED_BY_GPUS:
        return []
    tp = 2 if gpus % 2 == 0 else 1
    args = ["--gpus", str(gpus)] + (["--gpu", kind] if kind else []) + (["--rollout-tp", "1"] if tp == 1 else [])
    if action in WITH_SGLANG and gpus != 8:
        args += ["--sglang-dp", str(gpus // tp), "--sglang-tp", str(tp)]
    return args


def required_paths(action: str, k: int, stage: str = "solver", model: str = "", data: str = "") -> list[tuple[str, str]]:
    """The volume paths a stage reads, each with the action that writes it."""
    run = "python -m backends.modal"
    corpus = (CORPUS_DB, f"`{run} upload-corpus --path DIR` (a Chroma store, or documents followed by `{run} ingest`)")
    seeds = (SEEDS, f"`{run} prepare-data`")
    solver_before = [(f"{CHECKPOINTS_DIR}/solver_iter{k - 1}_hf", f"`{run} solver --iteration {k - 1}`, then "
                      f"`{run} merge --stage solver --iteration {k - 1}`")] if k > 1 else []
    return {
        "challenger": [corpus, seeds] + solver_before,
        "gen-data": [corpus, seeds, (f"{CHECKPOINTS_DIR}/challenger_iter{k}_hf", f"`{run} challenger --iteration {k}`"
                                     f", then `{run} merge --stage challenger --iteration {k}`")],
        "solver": [corpus, (f"{DATA_DIR}/solver_iter{k}.parquet", f"`{run} gen-data --iteration {k}`")] + solver_before,
        "merge": [(f"{CHECKPOINTS_DIR}/{stage}_iter{k}", f"`{run} {stage} --iteration {k}`")],
        "evaluate": [corpus, (data, f"`{run} gen-data --iteration {k}` writes the default; or upload your own with "
                                    f"`modal volume put dr-zero-corpus FILE /data/`")]
                    + ([(model, f"`{run} merge --iteration {k}` or `{run} upload-model`")] if model.startswith("/")
                       else []),
        "train": [corpus],
        "prepare-data": [corpus],
    }.get(action, [])


def plan_launch(request: Request) -> Launch:
    """The Function call for a Modal action (not for status, upload-corpus, download-checkpoints)."""
    if request.nodes != 1:
        return plan_cluster_launch(request)
    action, k = request.action, request.iteration
    if request.overrides and action not in TAKES_OVERRIDES:
        raise ValueError(f"Hydra overrides after `--` go to verl, which only {', '.join(TAKES_OVERRIDES)} run; "
                         f"drop them for {action}")
    model = ["--model", request.model] if request.model else []
    extra = list(request.stage_args) + (["--", *request.overrides] if request.overrides else [])
    detach = request.detach if request.detach is not None else action in GPU_STAGES
    if action in GPU_STAGES:
        gpu = request.gpu or GPU
        gpus = parse_gpu(gpu)[1]
    if action == "smoke":
        gpu = request.gpu or SMOKE_GPU
        parse_gpu(gpu)
        return Launch(action, "smoke", ["--require-gpu", *model, *extra], gpu=gpu, detach=bool(request.detach))
    if action in ("ingest", "list-models"):
        return Launch(action, action.replace("-", "_"), extra, detach=detach)
    if action == "prepare-data":
        tokenizer = ["--tokenizer", hub_name(request.model)] if request.model else []
        return Launch(action, "prepare_data", tokenizer + extra, detach=detach,
                      required=required_paths(action, k))
    if action in ("download-model", "upload-model"):  # upload-model without --path: the same download on Modal
        if not request.model or request.model.count("/") > 1 or request.model.startswith((".", "/")):
            raise ValueError(f"model {request.model!r} is not a `drzero list-models` key or a hub name like "
                             f"Qwen/Qwen3-8B; to upload weights from this machine use `upload-model --model NAME "
                             f"--path DIR`")
        return Launch(action, "download_model", [hub_name(request.model), model_directory(request.model)],
                      detach=detach)
    if action in ("challenger", "solver"):
        argv = ["--iteration", str(k), *model, *gpu_args(action, gpus, gpu_kind(gpu)), *extra]
        return Launch(action, action, argv, gpu, detach, ["preflight", action, *argv], required_paths(action, k))
    if action == "gen-data":
        argv = ["--iteration", str(k), *model, *gpu_args(action, gpus, gpu_kind(gpu)), *extra]
        return Launch(action, "gen_data", argv, gpu, detach, ["gen-data", "--dry-run", *argv],
                      required_paths(action, k))
    if action == "merge":
        argv = ["--stage", request.stage, "--iteration", str(k), *extra]
        return Launch(action, "merge", argv, gpu, detach, ["merge", "--dry-run", *argv],
                      required_paths(action, k, stage=request.stage))
    if action == "evaluate":
        target = request.model or f"{CHECKPOINTS_DIR}/solver_iter{k}_hf"
        data = request.data or f"{DATA_DIR}/solver_iter{k}_val.parquet"
        argv = ["--model", target, "--data", data, *extra]
        return Launch(action, "evaluate", argv, gpu, detach, None, required_paths(action, k, model=target, data=data))
    if action == "train":
        argv = [*model, *gpu_args(action, gpus, gpu_kind(gpu)), *extra]
        return Launch(action, "train", argv, gpu, detach, ["evolve", "--dry-run", *argv], required_paths(action, k))
    raise ValueError(f"{action} is not an action that calls a Function; expected one of {', '.join(ACTIONS)}")


CLUSTER_ACTIONS = ("challenger", "solver", "train")  # the verl stages: what more nodes speed up
CLUSTER_SIZES = (2, 4, 8)                            # one clustered Function each (backends/modal_cluster.py)


def plan_cluster_launch(request: Request) -> Launch:
    """``--nodes N``: the single-node launch's arguments, on the clustered Function of N nodes.

    Its preflight plans the same command with ``--nnodes N``, so the memory check shards over every node."""
    if request.action not in CLUSTER_ACTIONS:
        raise ValueError(f"--nodes {request.nodes}: only {', '.join(CLUSTER_ACTIONS)} run on more than one node; "
                         f"drop --nodes for {request.action}")
    if request.nodes not in CLUSTER_SIZES:
        raise ValueError(f"--nodes {request.nodes} is not valid: expected 1 (one node) or a cluster of "
                         f"{', '.join(map(str, CLUSTER_SIZES))} nodes")
    single = plan_launch(Request(**{**asdict(request), "nodes": 1}))
    argv = single.argv[:]
    split = argv.index("--") if "--" in argv else len(argv)
    argv[split:split] = ["--nnodes", str(request.nodes)]
    command = "evolve" if request.action == "train" else request.action
    preflight = [*single.preflight[:len(single.preflight) - len(single.argv)], *argv]
    return Launch(single.action, f"cluster_{request.nodes}", [command, *argv], single.gpu, single.detach, preflight,
                  single.required, nodes=request.nodes)


# ## Cost
#
# Before a launch: the estimate, from rough hours per action (`--hours` to change them) and the
# price per GPU-hour. After: `status` adds up what each GPU container recorded in `runs/` on the
# checkpoints volume: its GPUs (from nvidia-smi), its start and its last heartbeat (refreshed with
# every volume commit, so a running or killed container is counted up to 10 minutes short). That
# counts retries and preemptions as well; state.json could not, it holds only each stage's last
# change. Image builds, cold starts and the CPU Functions are not counted: Modal's billing page is
# the bill.


@dataclass
class Estimate:
    gpu_type: str
    gpus: int
    hours: float
    price_per_gpu_hour: float
    attempts: int = RETRIES.max_retries + 1
    hours_per_attempt: float = DAY / HOURS
    nodes: int = 1                  # each with ``gpus`` GPUs

    @property
    def gpu_hours(self) -> float:
        return self.nodes * self.gpus * self.hours

    @property
    def dollars(self) -> float:
        return self.gpu_hours * self.price_per_gpu_hour

    @property
    def dollars_per_attempt_cap(self) -> float:
        return self.nodes * self.gpus * self.hours_per_attempt * self.price_per_gpu_hour

    def lines(self) -> list[str]:
        where = f"{self.gpus} x {self.gpu_type}" + (f" on each of {self.nodes} nodes" if self.nodes > 1 else "")
        return [f"  estimate  ~{self.hours:g} h on {where} = {self.gpu_hours:g} GPU-hours "
                f"~ ${self.dollars:,.0f} at ${self.price_per_gpu_hour:.2f}/GPU-hour (--hours, "
                f"--price-per-gpu-hour; CPU and memory are billed on top)",
                f"  limit     {self.hours_per_attempt:g} h per attempt (${self.dollars_per_attempt_cap:,.0f}), up to "
                f"{self.attempts} attempts; stop it any time with `modal app stop`"]


def estimate(launch: Launch, request: Request) -> Estimate | None:
    if launch.gpu is None:
        return None
    gpu_type, gpus = parse_gpu(launch.gpu)
    hours = request.hours or EXPECTED_HOURS.get(launch.action, 1.0)
    attempts = 1 if launch.action == "smoke" else RETRIES.max_retries + 1
    per_attempt = 0.5 if launch.action == "smoke" else DAY / HOURS
    return Estimate(gpu_type, gpus, hours, request.price_per_gpu_hour, attempts, per_attempt, launch.nodes)


def gpu_hours_of(run: dict) -> float:
    end = run.get("ended") or run.get("last_seen") or run["started"]
    seconds = max((parse_time(end) - parse_time(run["started"])).total_seconds(), 0.0)
    return run.get("gpus", 0) * seconds / HOURS


def render_status(state_text: str | None, runs: list[dict], price_per_gpu_hour: float,
                  steps: dict[str, int] | None = None, metrics: dict[str, str] | None = None) -> str:
    lines = []
    stages = json.loads(state_text).get("stages", {}) if state_text is not None else {}
    if state_text is None:
        lines.append("state.json: none yet on dr-zero-checkpoints (no stage has run)")
    else:
        lines.append(f"stages (dr-zero-checkpoints/state.json): {sum(s.get('status') == 'done' for s in stages.values())}"
                     f" of {len(stages)} recorded are done")
        lines += modal_run.stage_lines(stages, runs, steps or {}, metrics)
    total = 0.0
    lines.append(f"GPU time (dr-zero-checkpoints/{RUNS_DIR}/, one record per container):")
    for run in sorted(runs, key=lambda r: r["started"]):
        hours = gpu_hours_of(run)
        total += hours
        if run.get("ended"):
            code = run.get("exit_code")
            state = f"ended {run['ended']}, " + (f"exit {code}" if code is not None else "stopped")
        else:
            state = f"running, last seen {run.get('last_seen')}"
        lines.append(f"  {run['started']}  {run['command']:<12} {run.get('gpus', 0)} x {run.get('gpu_type') or '?'}"
                     f"  {hours:7.1f} GPU-h  ${hours * price_per_gpu_hour:9,.2f}  {state}")
    lines.append(f"cost so far: {total:.1f} GPU-hours ~ ${total * price_per_gpu_hour:,.2f} at "
                 f"${price_per_gpu_hour:.2f}/GPU-hour (GPU time only; Modal's billing page is the bill)")
    lines.append(f"next: {modal_run.next_action(stages, runs)}")
    return "\n".join(lines)


# ## Volumes from your machine: status, uploads, downloads


def read_volume_text(volume, path: str) -> str | None:
    try:
        return b"".join(volume.read_file(path)).decode()
    except modal.exception.NotFoundError:
        return None


def show_status(request: Request) -> int:
    try:
        entries = checkpoints_volume.listdir(RUNS_DIR)
    except modal.exception.NotFoundError:
        entries = []
    runs = [json.loads(text) for entry in entries if entry.path.endswith(".json")
            if (text := read_volume_text(checkpoints_volume, entry.path)) is not None]
    state_text = read_volume_text(checkpoints_volume, "state.json")
    steps, metrics = {}, {}
    for key in (json.loads(state_text).get("stages", {}) if state_text else {}):
        where = modal_run.step_file(key)
        text = read_volume_text(checkpoints_volume, where) if where else None
        if text and text.strip().isdigit():
            steps[key] = int(text)
        where = modal_run.summary_file(key)
        text = read_volume_text(checkpoints_volume, where) if where else None
        if text:
            metrics[key] = modal_run.summary_text(json.loads(text))
    print(render_status(state_text, runs, request.price_per_gpu_hour, steps, metrics))
    from drzero.models.registry import REGISTRY

    print("models on dr-zero-corpus (`python -m backends.modal download-model KEY` fetches one):")
    print("\n".join(modal_run.model_lines(corpus_volume, REGISTRY)))
    return 0


def upload_corpus(request: Request) -> int:
    """A Chroma store goes to /corpus/chromadb; documents go to /corpus/sources for `ingest`."""
    local = Path(request.path or "").expanduser()
    if not request.path or not local.exists():
        print(f"upload-corpus: --path {request.path!r} does not exist; give a Chroma store directory (from "
              f"`drzero ingest`) or a file or directory of documents", file=sys.stderr)
        return 2
    is_store = (local / "chroma.sqlite3").is_file()
    remote = "/chromadb" if is_store else f"/sources/{local.name}"
    print(f"uploading {local} to dr-zero-corpus:{remote} (files of the same name are replaced)")
    with corpus_volume.batch_upload(force=True) as batch:
        if local.is_dir():
            batch.put_directory(str(local), remote)
        else:
            batch.put_file(str(local), remote)
    print("done; next: " + ("python -m backends.modal prepare-data" if is_store else
                            "python -m backends.modal ingest   (embeds /corpus/sources into /corpus/chromadb)"))
    return 0


def upload_model_from_disk(request: Request) -> int:
    name = PurePosixPath(hub_name(request.model or Path(request.path).name)).name
    remote = f"/models/{name}"
    print(f"uploading {request.path} to dr-zero-corpus:{remote}")
    with corpus_volume.batch_upload(force=True) as batch:
        batch.put_directory(str(Path(request.path).expanduser()), remote)
    return 0


def download_checkpoints(request: Request) -> int:
    """The merged model `<stage>_iter<K>_hf` and state.json into --path (default ./checkpoints)."""
    from modal.volume import FileEntryType

    target = Path(request.path or "checkpoints")
    remote = f"{request.stage}_iter{request.iteration}_hf"
    try:
        entries = checkpoints_volume.listdir(remote, recursive=True)
    except modal.exception.NotFoundError:
        print(f"download-checkpoints: {remote} is not on dr-zero-checkpoints yet; run `python -m backends.modal "
              f"merge --stage {request.stage} --iteration {request.iteration}` first", file=sys.stderr)
        return 1
    print(f"downloading dr-zero-checkpoints:{remote} and state.json to {target}/")
    for path in [e.path for e in entries if e.type == FileEntryType.FILE] + ["state.json"]:
        local = target / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with local.open("wb") as handle:
                checkpoints_volume.read_file_into_fileobj(path, handle)
        except modal.exception.NotFoundError:
            local.unlink()
            continue
        print(f"  {local}")
    return 0


# ## Launching


# What each Function runs, for the launch summary (ingest and prepare-data add --db and --out themselves).
WHAT_RUNS = {"train": "drzero evolve", "upload-model": "download into /corpus/models:",
             "download-model": "download (resumable, verified) into /corpus/models:", "ingest": "drzero ingest "
        "[/corpus/sources] --db <local copy>", "prepare-data": f"drzero prepare-data --db <local copy> --out {SEEDS}"}


def describe(launch: Launch, request: Request) -> str:
    # a cluster's arguments start with the drzero command itself
    runs = "drzero" if launch.nodes > 1 else WHAT_RUNS.get(launch.action, f"drzero {launch.action}")
    lines = [f"{launch.action} on Modal: {runs} {shlex.join(launch.argv)}".rstrip()]
    if launch.gpu:
        pin = "; Modal may serve H100 as H200, write H100! to pin it" if parse_gpu(launch.gpu)[0] == "H100" else ""
        lines.append(f"  GPUs      {launch.gpu} (--gpu or $DRZERO_MODAL_GPU{pin})"
                     + (f" on each of {launch.nodes} nodes: a Modal cluster (a feature Modal enables per workspace)"
                        if launch.nodes > 1 else ""))
        lines += estimate(launch, request).lines()
    if launch.checked:
        lines.append(f"  preflight on a CPU first: {len(launch.required)} input(s) on the volumes"
                     + (f", then drzero {shlex.join(launch.preflight)}" if launch.preflight else ""))
    return "\n".join(lines)


def _function(name: str):
    if name.startswith("cluster_"):  # the clustered Functions live in their own app (backends/modal_cluster.py)
        from backends import modal_cluster

        return getattr(modal_cluster, name)
    return globals()[name]  # looked up per call, so that tests can put fakes in place


def _app_for(plan: Launch):
    if plan.nodes > 1:
        from backends import modal_cluster

        return modal_cluster.app
    return app


_running_app = app  # the app of the current launch: this one, or the cluster app for --nodes N


def _app_id() -> str:
    return _running_app.app_id


def _started(launch: Launch, call, detached: bool) -> None:
    app_id = _app_id()
    print(f"started {launch.action}: app {app_id}, call {call.object_id}")
    print(f"  logs:    python -m backends.modal logs {app_id} --follow   (--errors: only the known failures)")
    print(f"  stop:    python -m backends.modal stop {app_id}   (then `resume`)")
    print("  status:  python -m backends.modal status")
    if detached:
        print("it keeps running after this command exits; a crash or preemption is retried and resumes from the "
              "checkpoint volume")


def record_launch(launch: Launch, call) -> None:
    """The launch, for `logs`, `stop` and `resume` (backends.modal_run); a failure to record stops nothing."""
    record = modal_run.launch_record(asdict(launch), _app_id(), call.object_id)
    try:
        modal_run.save_launch(checkpoints_volume, record)
    except Exception as error:
        print(f"[modal] could not record the launch on dr-zero-checkpoints ({error}); `resume` will not know it",
              file=sys.stderr)


def _call(launch: Launch, wait: bool) -> int:
    if launch.checked:
        checker = _function("cluster_preflight" if launch.nodes > 1 else "preflight")  # a Function of the running app
        verdict = checker.remote(launch.preflight or [], launch.required)
        if not verdict["ok"]:
            print(f"preflight refused {launch.action}; no GPU was started:", file=sys.stderr)
            for problem in verdict["problems"]:
                print(f"  - {problem}", file=sys.stderr)
            return 1
    function = _function(launch.function)
    if launch.gpu:
        function = function.with_options(gpu=launch.gpu, **resources(launch.gpu))
    call = function.spawn(*launch.argv)
    _started(launch, call, detached=not wait)
    if launch.action in GPU_STAGES:
        record_launch(launch, call)
    if not wait:
        return 0
    try:
        result = call.get()
    except Exception as error:  # the remote exception: its log is above
        print(f"{launch.action} failed: {error}", file=sys.stderr)
        return 1
    return int((result or {}).get("exit_code", 0))


def launch(plan: Launch, request: Request, *, app_running: bool = False) -> int:
    print(describe(plan, request))
    if app_running and plan.nodes > 1:
        print("--nodes runs the clustered Functions of their own app: launch it with `python -m backends.modal "
              f"{plan.action} --nodes {plan.nodes}`, not `modal run`", file=sys.stderr)
        return 2
    if app_running:  # under `modal run`: the app is already up; `modal run --detach` keeps it up
        return _call(plan, wait=True)
    global _running_app
    _running_app = _app_for(plan)
    try:
        with modal.enable_output(), _running_app.run(detach=plan.detach):
            return _call(plan, wait=not plan.detach)
    except (modal.exception.AuthError, modal.exception.ConnectionError):
        raise
    except modal.exception.Error as error:
        if plan.nodes == 1:
            raise
        from backends.modal_cluster import refusal

        print(refusal(plan.nodes, error), file=sys.stderr)
        return 1


def run_request(request: Request, *, app_running: bool = False) -> int:
    if request.action not in ACTIONS:
        print(f"unknown action {request.action!r}; expected one of {', '.join(ACTIONS)}", file=sys.stderr)
        return 2
    if request.action == "status":
        return show_status(request)
    if request.action in ("logs", "stop", "resume"):
        return operate(request, app_running=app_running)
    if request.action == "upload-corpus":
        return upload_corpus(request)
    if request.action == "download-checkpoints":
        return download_checkpoints(request)
    if request.action == "upload-model" and not request.model and not request.path:
        print("upload-model: give --model NAME (a `drzero list-models` key or hub name), and --path DIR to upload "
              "weights from this machine instead of downloading them on Modal", file=sys.stderr)
        return 2
    if request.action == "upload-model" and request.path:
        return upload_model_from_disk(request)
    try:
        plan = plan_launch(request)
    except ValueError as error:
        print(f"{request.action}: {error}", file=sys.stderr)
        return 2
    return launch(plan, request, app_running=app_running)


def operate(request: Request, *, app_running: bool = False) -> int:
    """logs, stop, resume of a launched run (default: the latest launch recorded on dr-zero-checkpoints)."""
    try:
        modal_run.check_since(request.since)
    except ValueError as error:
        print(f"{request.action}: {error}", file=sys.stderr)
        return 2
    record = modal_run.find_launch(checkpoints_volume, request.app_id)
    app_id = request.app_id or (record or {}).get("app_id")
    if request.action == "resume" and record is None or app_id is None:
        which = f"of app {request.app_id} " if request.app_id else ""
        print(f"{request.action}: no launch {which}is recorded on dr-zero-checkpoints/{modal_run.LAUNCHES_DIR}/ "
              f"(runs launched by this version record one); give the app id from `modal app list`"
              + ("" if request.action == "resume" else f" as `python -m backends.modal {request.action} APP_ID`"),
              file=sys.stderr)
        return 2
    if request.action == "logs":
        return modal_run.show_logs(app_id, errors=request.errors, since=request.since, follow=request.follow)
    if request.action == "stop":
        return modal_run.stop(app_id)
    plan = Launch(**{**record["launch"], "detach": True,
                     "required": [tuple(pair) for pair in record["launch"]["required"]]})
    print(f"resuming {plan.action} launched {record['started']} (app {record['app_id']}) with the same arguments:")
    print("\n".join(modal_run.resume_lines(record, read_volume_text(checkpoints_volume, "state.json"))))
    return launch(plan, request, app_running=app_running)


# ## Entry points


@app.local_entrypoint()
def main(action: str = "smoke", iteration: int = 1, model: str = "", gpu: str = "", stage: str = "solver",
         data: str = "", path: str = "", stage_args: str = "", overrides: str = "", hours: float = 0.0,
         price_per_gpu_hour: float = PRICE_PER_GPU_HOUR):
    """`modal run [--detach] -m backends.modal --action ACTION ...`: the same actions, in the app `modal run` started."""
    request = Request(action, iteration, model or None, gpu or None, stage, data or None, path or None,
                      shlex.split(stage_args), shlex.split(overrides), hours=hours or None,
                      price_per_gpu_hour=price_per_gpu_hour)
    code = run_request(request, app_running=True)
    if code:
        raise SystemExit(code)


def parse_request(argv: Sequence[str]) -> Request:
    argv = list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m backends.modal", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Hydra overrides after `--` go to verl (challenger, solver, train).")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("subject", nargs="?", metavar="MODEL|APP_ID",
                        help="download-model: the model (a `drzero list-models` key or hub name); logs, stop, "
                             "resume: the app id (default: the latest launch)")
    parser.add_argument("--iteration", type=int, default=1, help="iteration K of the loop (default: 1)")
    parser.add_argument("--model", help="base model: a `drzero list-models` key, a hub name or a volume path; "
                                        "evaluate: the model to evaluate (default: /checkpoints/solver_iterK_hf)")
    parser.add_argument("--gpu", help=f"GPUs of the stage, TYPE:COUNT on one node (default: {GPU}, from "
                                      f"$DRZERO_MODAL_GPU; smoke: {SMOKE_GPU})")
    parser.add_argument("--nodes", type=int, default=1,
                        help="challenger, solver, train: run on a Modal cluster of N nodes of --gpu each (2, 4 or 8; "
                             "default 1, one node). Multi-node clusters are a feature Modal enables per workspace: "
                             "ask Modal for it first (see README: More than one node)")
    parser.add_argument("--stage", choices=["challenger", "solver"], default="solver",
                        help="merge, download-checkpoints: which stage's checkpoint (default: solver)")
    parser.add_argument("--data", help="evaluate: the evaluation parquet on the volume "
                                       "(default: /corpus/data/solver_iterK_val.parquet)")
    parser.add_argument("--path", help="upload-corpus, upload-model: what to upload; download-checkpoints: "
                                       "where to (default: ./checkpoints)")
    parser.add_argument("--stage-args", default="", metavar="'ARGS'",
                        help="more options for the drzero command; write it with '=': "
                             "--stage-args='--iterations 2 --steps 10'")
    parser.add_argument("--detach", action=argparse.BooleanOptionalAction, default=None,
                        help="return once started and keep running (default for the GPU stages)")
    parser.add_argument("--hours", type=float, help="expected hours, for the cost estimate")
    parser.add_argument("--errors", action="store_true", help="logs: only the known failures, with context and fix")
    parser.add_argument("--since", help="logs: from this long ago (30m, 2h, 1d) or an ISO date")
    parser.add_argument("--follow", "-f", action="store_true", help="logs: keep streaming until the app stops")
    parser.add_argument("--price-per-gpu-hour", type=float, default=PRICE_PER_GPU_HOUR,
                        help=f"for estimates and status (default: {PRICE_PER_GPU_HOUR:.2f}, from "
                             f"$DRZERO_MODAL_PRICE_PER_GPU_HOUR)")
    args = parser.parse_args(argv)
    if args.subject and args.action not in ("download-model", "logs", "stop", "resume"):
        parser.error(f"{args.action} takes no positional argument (got {args.subject!r}); options start with --")
    if args.action == "download-model":  # `download-model MODEL`
        args.model, args.subject = args.model or args.subject, None
    return Request(args.action, args.iteration, args.model, args.gpu, args.stage, args.data, args.path,
                   shlex.split(args.stage_args), overrides, args.detach, args.hours, args.price_per_gpu_hour,
                   args.subject, args.errors, args.since, args.follow, args.nodes)


def cli(argv: Sequence[str] | None = None) -> int:
    try:
        return run_request(parse_request(sys.argv[1:] if argv is None else argv))
    except modal.exception.AuthError as error:
        print(f"Modal refused the request ({str(error).splitlines()[0]}); log in with `modal token new`",
              file=sys.stderr)
        return 1
    except modal.exception.ConnectionError as error:
        print(f"{error} Check this machine's network, then run the same command again.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
