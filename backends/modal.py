"""# Dr. Zero on Modal: the real run, on 8×H100, detached and resumable

    python -m backends.modal smoke                       # the whole stack on one H100, in minutes
    python -m backends.modal train                       # the whole loop on 8×H100, detached (about a day)
    python -m backends.modal train --nodes 2             # the same on a cluster of 2 nodes of 8×H100 (gated, below)
    python -m backends.modal status                      # each stage, its verl step, cost so far, what to do next
    python -m backends.modal download-model qwen3-32b    # weights fetched on Modal into the corpus volume, verified
    python -m backends.modal download-corpus URL --to wiki18   # a corpus or index file, fetched on Modal likewise
    python -m backends.modal logs --errors               # the latest run's known failures, each with its fix
    python -m backends.modal stop / resume               # stop the latest run; start it again as it was launched

This backend only prepares the place (the image, two volumes, GPUs, secrets) and then runs the
same `drzero` command that a laptop or `docker compose` runs. Each action has one Modal Function
that starts `python -m drzero.cli <command>` as a child process and streams its output, each line
prefixed with the command's name. Nothing here is Dr. Zero logic, and nothing in `drzero/`
imports Modal. It reads top to bottom: the app, the Functions, the launch, the entry points; the
rest is beside it, and imported one way only (none of these imports this file):

    backends/modal_image.py      the image, the volumes, the secrets, the GPUs: what every Function is given
    backends/modal_container.py  a `drzero` command in a container: streamed, volumes committed, GPU time
    backends/modal_plan.py       the command line -> one Function call (`plan_launch`), from the stage registry
    backends/modal_ops.py        estimates, logs, stop, resume, uploads, downloads, launch records
    backends/modal_status.py     status: each stage, its verl step, the cost so far, the next step
    backends/modal_cluster.py    the verl stages on a Modal cluster (`--nodes N`), in an app of its own
    backends/secrets_rule.py     what is never uploaded: secret files, and files that hold a key

Run this file in module mode only (`python -m backends.modal ...` or `modal run -m backends.modal ...`).
Run as a plain file, `backends/` would be on `sys.path` and `import modal` would import this file.

    python -m backends.modal ACTION [MODEL|APP_ID|URL] [--iteration K] [--model NAME] [--gpu H100:8] [--nodes N]
                                    [--detach/--no-detach] [--to DIR] [--sha256 HEX] [--hub-dataset N --files P...]
                                    [--stage-args "..."] [-- hydra overrides]
    modal run [--detach] -m backends.modal --action ACTION [--iteration K] ...   # the seed guide's form
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import modal

from backends import modal_cluster, secrets_rule
from backends.modal_container import check_inputs, copy_tree, ingest_sources, run_drzero, run_on_local_store
from backends.modal_image import (CODE_RULE, CONTEXT_RULE, CORPUS_DB, CPU_TASK, FILES_DIR, HOURS, LOCAL_DB, MINUTES,
                                  MODELS_DIR, PRICE_PER_GPU_HOUR, RETRIES, SEEDS, SMOKE_GPU, VOLUMES, MissingSecret,
                                  attach_secrets, checkpoints_volume, corpus_volume, image, resources, stage_options)
from backends.modal_ops import (LAUNCHES_DIR, check_logs_options, describe, download_checkpoints, failure,
                                find_launch, launch_record, read_volume_text, resume_lines, save_launch, show_logs,
                                stop, upload_corpus, upload_model_from_disk)
from backends.modal_plan import ACTIONS, GPU_STAGES, Launch, Request, parse_request, plan_launch, secrets_for
from backends.modal_status import show_status
from drzero.corpus import fetch as corpus_fetch
from drzero.models import download as model_download
from drzero.stages.registry import EVOLVE, STAGES

# ## The app, its image and its volumes
#
# One app holds every single-node Function; the clustered ones (`--nodes N`) are in an app of their
# own, backends/modal_cluster.py. The image is `docker/Dockerfile`, the image `docker compose` runs,
# with the working tree added last, so a code change needs no rebuild. Two volumes: `dr-zero-corpus`
# at /corpus (Chroma store, data, model weights) and `dr-zero-checkpoints` at /checkpoints (verl
# checkpoints, merged models, state.json). The GPUs default to `$DRZERO_MODAL_GPU` (H100:8). All of
# that is in backends/modal_image.py, which the cluster app shares.

app = modal.App("dr-zero")

# ## The Functions
#
# One per action. Each runs its `drzero` command in the container (backends/modal_container.py):
# output streamed, volumes committed as it goes, GPU time recorded. What a stage's Function is
# given, GPUs for a day with retries or a CPU container, is read from the stage registry
# (drzero/stages/registry.py); its secrets come with each launch (backends/modal_image.py says
# why). Each is written out rather than made in a loop over the registry: a container finds its
# Function by name in this module (Modal looks up the function's `__qualname__`), which a Function
# made in a loop lacks unless it is pickled (`serialized=True`, which needs the same Python here as
# in the image).


@app.function(image=image, gpu=SMOKE_GPU, **resources(SMOKE_GPU), volumes=VOLUMES,
              timeout=30 * MINUTES)  # the first image build is slow: the seed guide's 30 minutes
def smoke(*argv: str) -> dict:
    """`drzero smoke`: imports, retriever, search, SGLang, one agent rollout and one verl step on one GPU."""
    return run_drzero("smoke", argv, gpu_time=True)


# The store's writers work on a copy of /corpus/chromadb on the container's disk, copied back when they succeed.
@app.function(**CPU_TASK, cpu=8.0, memory=32 * 1024, timeout=12 * HOURS)
def ingest(*argv: str) -> dict:
    """`drzero ingest` of the uploaded documents (or the SOURCEs it names, e.g. /corpus/files/wiki18)."""
    return run_on_local_store("ingest", argv, sources=ingest_sources(argv))


@app.function(**CPU_TASK, cpu=8.0, memory=32 * 1024, timeout=12 * HOURS)
def adopt(*argv: str) -> dict:
    """`drzero adopt`: a collection (or an index and its corpus, e.g. in /corpus/files) another system built."""
    return run_on_local_store("adopt", argv)


@app.function(**stage_options(STAGES["prepare-data"]), cpu=8.0, memory=32 * 1024, timeout=2 * HOURS)
def prepare_data(*argv: str) -> dict:
    """`drzero prepare-data`: the proposer's seed parquet in /corpus/data."""
    copy_tree(CORPUS_DB, LOCAL_DB)
    return run_drzero("prepare-data", ["--db", LOCAL_DB, "--out", SEEDS, *argv])


@app.function(**stage_options(STAGES["challenger"]))
def challenger(*argv: str) -> dict:
    """`drzero challenger`: HRPO proposer training for one iteration."""
    return run_drzero("challenger", argv, local_corpus=True, gpu_time=True)


@app.function(**stage_options(STAGES["gen-data"]))
def gen_data(*argv: str) -> dict:
    """`drzero gen-data`: the solver's data, sampled from the merged proposer."""
    return run_drzero("gen-data", argv, local_corpus=True, gpu_time=True)


@app.function(**stage_options(STAGES["solver"]))
def solver(*argv: str) -> dict:
    """`drzero solver`: GRPO solver training for one iteration."""
    return run_drzero("solver", argv, local_corpus=True, gpu_time=True)


@app.function(**stage_options(STAGES["merge"]))
def merge(*argv: str) -> dict:
    """`drzero merge`: an FSDP checkpoint into a Hugging Face model directory."""
    return run_drzero("merge", argv, gpu_time=True)


@app.function(**stage_options(STAGES["evaluate"]))
def evaluate(*argv: str) -> dict:
    """`drzero evaluate`: a model against an evaluation set."""
    return run_drzero("evaluate", argv, local_corpus=True, gpu_time=True)


@app.function(**stage_options(EVOLVE))
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
@app.function(**CPU_TASK, cpu=8.0, memory=16 * 1024, timeout=6 * HOURS, retries=RETRIES)
def download_model(hub_name: str, local_dir: str) -> dict:
    """Weights from the Hugging Face hub into /corpus/models/<local_dir>, so no GPU ever waits on a download."""
    result = model_download.download_from_hub(hub_name, Path(MODELS_DIR) / local_dir, commit=corpus_volume.commit,
                                              log=lambda line: print(f"[download-model] {line}", flush=True))
    return {"command": "download-model", "exit_code": 0, **result}


# A corpus or an index comes the same way, from a URL or a hub dataset into /corpus/files/<to>: nothing
# large passes through your machine. drzero.corpus.fetch resumes a URL with HTTP Range requests, commits
# as it goes and checks the size (and the sha256 given); a refusal (a 404, a mismatch) is not retried.
@app.function(**CPU_TASK, cpu=4.0, memory=8 * 1024, timeout=6 * HOURS, retries=RETRIES)
def download_corpus(source: str, to: str, *files: str) -> dict:
    """A URL (`#sha256=HEX` pins it) or `hf://datasets/OWNER/NAME` and its files, into /corpus/files/<to>."""
    try:
        result = corpus_fetch.fetch_corpus(source, Path(FILES_DIR) / to, files, commit=corpus_volume.commit,
                                           log=lambda line: print(f"[download-corpus] {line}", flush=True))
    except corpus_fetch.FetchInterrupted:
        raise  # Modal retries it, and the next attempt continues from what was fetched
    except corpus_fetch.FetchError as error:
        print(f"[download-corpus] {error}", flush=True)
        return {"command": "download-corpus", "exit_code": 1, "error": str(error)}
    return {"command": "download-corpus", "exit_code": 0, **result}


# Before a GPU starts, a cheap CPU container checks the stage's inputs on the volumes and runs its own
# check (`drzero preflight STAGE` or its `--dry-run`, the registry's `check`); it gets the stage's secrets,
# the W&B key among them, to check them.
@app.function(**CPU_TASK, cpu=4.0, memory=16 * 1024, timeout=30 * MINUTES)
def preflight(command: list, required: list) -> dict:
    return check_inputs(command, required)


# ## Launching
#
# Everything below runs on your machine. backends/modal_plan.py turns the command line into one
# `Launch` (which Function, its `drzero` arguments, GPUs, preflight); here it is called, on this app
# or, for `--nodes N`, on the cluster app. Status, logs, stop, resume and the uploads are
# backends/modal_ops.py's, given this module's volumes.


def _function(name: str):
    if name.startswith("cluster_"):  # the clustered Functions live in their own app (backends/modal_cluster.py)
        return getattr(modal_cluster, name)
    return globals()[name]  # looked up per call, so that tests can put fakes in place


def _app_for(plan: Launch):
    return modal_cluster.app if plan.nodes > 1 else app


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
    """The launch, for `logs`, `stop` and `resume` (backends/modal_ops.py); a failure to record stops nothing."""
    record = launch_record(asdict(launch), _app_id(), call.object_id)
    try:
        save_launch(checkpoints_volume, record)
    except Exception as error:
        print(f"[modal] could not record the launch on dr-zero-checkpoints ({error}); `resume` will not know it",
              file=sys.stderr)


def _call(launch: Launch, wait: bool, secrets: list) -> int:
    given = {"secrets": secrets} if secrets else {}
    if launch.checked:
        checker = _function("cluster_preflight" if launch.nodes > 1 else "preflight")  # a Function of the running app
        checker = checker.with_options(**given) if given else checker
        verdict = checker.remote(launch.preflight or [], launch.required)
        if not verdict["ok"]:
            print(f"preflight refused {launch.action}; no GPU was started:", file=sys.stderr)
            for problem in verdict["problems"]:
                print(f"  - {problem}", file=sys.stderr)
            return 1
    function = _function(launch.function)
    options = {**({"gpu": launch.gpu, **resources(launch.gpu)} if launch.gpu else {}), **given}
    if options:
        function = function.with_options(**options)
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
    try:  # before anything starts: no key leaves this machine, and every secret the command needs is there
        if not app_running:  # under `modal run` the code is uploaded already, through the same rule
            secrets_rule.check([CODE_RULE, CONTEXT_RULE])
        secrets = attach_secrets(plan.secrets, note=lambda line: print(line, file=sys.stderr))
    except (secrets_rule.KeyInUpload, MissingSecret) as error:
        print(f"{plan.action}: {error}", file=sys.stderr)
        return 1
    if app_running:  # under `modal run`: the app is already up; `modal run --detach` keeps it up
        return _call(plan, wait=True, secrets=secrets)
    global _running_app
    _running_app = _app_for(plan)
    try:
        with modal.enable_output(), _running_app.run(detach=plan.detach):
            return _call(plan, wait=not plan.detach, secrets=secrets)
    except (modal.exception.AuthError, modal.exception.ConnectionError):
        raise
    except modal.exception.Error as error:  # only a refusal that speaks of clusters is one (modal_cluster.py)
        refused = plan.nodes > 1 and modal_cluster.is_refusal(error)
        print(modal_cluster.refusal(plan.nodes, error) if refused else failure(plan.action, error), file=sys.stderr)
        return 1


def run_request(request: Request, *, app_running: bool = False) -> int:
    if request.action not in ACTIONS:
        print(f"unknown action {request.action!r}; expected one of {', '.join(ACTIONS)}", file=sys.stderr)
        return 2
    if request.action == "status":
        return show_status(request, checkpoints_volume, corpus_volume)
    if request.action in ("logs", "stop", "resume"):
        return operate(request, app_running=app_running)
    if request.action == "upload-corpus":
        return upload_corpus(request, corpus_volume)
    if request.action == "download-checkpoints":
        return download_checkpoints(request, checkpoints_volume)
    if request.action == "upload-model" and not request.model and not request.path:
        print("upload-model: give --model NAME (a `drzero list-models` key or hub name), and --path DIR to upload "
              "weights from this machine instead of downloading them on Modal", file=sys.stderr)
        return 2
    if request.action == "upload-model" and request.path:
        return upload_model_from_disk(request, corpus_volume)
    try:
        plan = plan_launch(request)
    except ValueError as error:
        print(f"{request.action}: {error}", file=sys.stderr)
        return 2
    return launch(plan, request, app_running=app_running)


def operate(request: Request, *, app_running: bool = False) -> int:
    """logs, stop, resume of a launched run (default: the latest launch recorded on dr-zero-checkpoints)."""
    try:
        check_logs_options(request.since, request.follow)
    except ValueError as error:
        print(f"{request.action}: {error}", file=sys.stderr)
        return 2
    record = find_launch(checkpoints_volume, request.app_id)
    app_id = request.app_id or (record or {}).get("app_id")
    if request.action == "resume" and record is None:
        which = f"of app {request.app_id} " if request.app_id else ""
        print(f"resume: nothing to resume: no launch {which}is recorded on dr-zero-checkpoints/{LAUNCHES_DIR}/ "
              f"(each GPU launch of this version records one); start a run with `python -m backends.modal train`, "
              f"and `python -m backends.modal status` shows what the volumes hold", file=sys.stderr)
        return 1
    if app_id is None:
        print(f"{request.action}: no launch is recorded on dr-zero-checkpoints/{LAUNCHES_DIR}/ (runs launched by "
              f"this version record one); give the app id from `modal app list` as `python -m backends.modal "
              f"{request.action} APP_ID`", file=sys.stderr)
        return 2
    if request.action == "logs":
        return show_logs(app_id, errors=request.errors, since=request.since, follow=request.follow,
                         started=(record or {}).get("started"))
    if request.action == "stop":
        return stop(app_id)
    recorded = record["launch"]
    plan = Launch(**{**recorded, "detach": True, "required": [tuple(pair) for pair in recorded.get("required", [])],
                     "secrets": recorded.get("secrets", secrets_for(recorded["action"], recorded["argv"]))})
    print(f"resuming {plan.action} launched {record['started']} (app {record['app_id']}) with the same arguments:")
    print("\n".join(resume_lines(record, read_volume_text(checkpoints_volume, "state.json"))))
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


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m backends.modal ACTION ...`: parse (backends/modal_plan.py), then run it."""
    try:
        return run_request(parse_request(sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0]))
    except modal.exception.AuthError as error:
        print(f"Modal refused the request ({str(error).splitlines()[0]}); log in with `modal token new`",
              file=sys.stderr)
        return 1
    except modal.exception.ConnectionError as error:
        print(f"{error} Check this machine's network, then run the same command again.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
