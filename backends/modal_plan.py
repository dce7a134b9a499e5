"""# From the command line to a Function call: one `Launch` per action, checked before a GPU starts

    python -m backends.modal solver --iteration 2 --gpu H200:8    # parse_request, then plan_launch
    python -m backends.modal train --nodes 2                      # plan_cluster_launch: the clustered Function

Everything here runs on your machine and is pure: `plan_launch` turns a `Request` into which
Function, with which `drzero` arguments, on which GPUs, after which preflight, so the tests check
every action's mapping without a Modal account. What each stage needs (GPUs, SGLang, Hydra
overrides, its preflight) is read from the stage registry, drzero/stages/registry.py.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Sequence

from backends.modal_image import (CHECKPOINTS_DIR, CORPUS_DB, DATA_DIR, FILES_DIR, GPU, HUGGING_FACE,
                                  PRICE_PER_GPU_HOUR, SEEDS, SMOKE_GPU, W_AND_B, parse_gpu)
from drzero.corpus.fetch import HUB_PREFIX, SHA256
from drzero.models.registry import REGISTRY
from drzero.models.shapes import GPU_MEMORY_GIB
from drzero.stages.registry import EVOLVE, STAGES

# Modal's actions name the stages as `drzero` does, except `train`: the whole loop, `drzero evolve`.
STAGE_OF = {**STAGES, "train": EVOLVE}
ACTIONS = ("smoke", "ingest", "adopt", *STAGES, "train", "list-models", "status", "download-model", "upload-model",
           "download-corpus", "upload-corpus", "download-checkpoints", "logs", "stop", "resume")
GPU_STAGES = tuple(action for action, stage in STAGE_OF.items() if stage.gpu)
TAKES_OVERRIDES = tuple(action for action, stage in STAGE_OF.items() if stage.takes_overrides)  # verl's stages
CLUSTER_ACTIONS = TAKES_OVERRIDES   # the verl stages: what more nodes speed up
CLUSTER_SIZES = (2, 4, 8)           # one clustered Function each (backends/modal_cluster.py)
# `modal.clustered`: "Each container must request all GPUs on its host (for example, gpu="H100:8")"; Modal's
# H100, H200 and B200 hosts have 8.
GPUS_PER_HOST = 8


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
    url: str | None = None                  # download-corpus: a file's http(s) URL ...
    hub_dataset: str | None = None          # ... or a hub dataset's name, with
    files: list[str] = field(default_factory=list)   # its files (names or patterns)
    to: str = ""                            # download-corpus: the directory under /corpus/files
    sha256: str | None = None               # download-corpus: the URL's expected sha256


@dataclass
class Launch:
    """One Function call and the checks before it."""

    action: str
    function: str                           # the Modal Function's name in backends/modal.py (or modal_cluster.py)
    argv: list[str]                         # its arguments: `drzero <command>` options, as given to it
    gpu: str | None = None                  # None: a CPU Function
    detach: bool = False
    preflight: list[str] | None = None      # `drzero` argv the CPU preflight runs
    required: list[tuple[str, str]] = field(default_factory=list)   # (volume path, how to make it)
    nodes: int = 1                          # > 1: a clustered Function, `gpu` on each node
    secrets: dict[str, bool] = field(default_factory=dict)   # Modal secret -> whether the command needs it

    @property
    def checked(self) -> bool:
        return self.preflight is not None or bool(self.required)


def option(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
    """The value of ``name`` in a `drzero` command line (before `--`), the last one winning as with argparse."""
    argv = list(argv[:argv.index("--")] if "--" in argv else argv)
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            continue
        default = value
    return default


def secrets_for(action: str, argv: Sequence[str]) -> dict[str, bool]:
    """The Modal secrets a launch attaches: the W&B key where verl logs to W&B (needed unless `--logger` leaves
    W&B out), the Hugging Face token where weights or the embedder may be downloaded (public ones need none)."""
    stage = STAGE_OF.get(action)
    if stage is not None and stage.logs_to_wandb:
        return {W_AND_B.name: "wandb" in (option(argv, "--logger") or "wandb")}
    if action in ("ingest", "adopt", "download-model", "upload-model") or (
            action == "download-corpus" and argv[:1] and argv[0].startswith(HUB_PREFIX)):
        return {HUGGING_FACE.name: False}
    return {}


def hub_name(model: str) -> str:
    """A `drzero list-models` key -> its hub name (whose last part is its directory under /corpus/models)."""
    entry = REGISTRY.get(model.lower())
    return entry.hub_name if entry else model


def model_directory(model: str) -> str:
    """A `drzero list-models` key or hub name -> its directory under /corpus/models, where the stages look."""
    entry = REGISTRY.get(model.lower())
    return entry.local_dir if entry else PurePosixPath(model).name


def gpu_kind(spec: str) -> str | None:
    """The `drzero --gpu` kind of a Modal GPU spec ("H100!:8" -> "H100"), or None when drzero has no recipes for it.

    The stage picks the model's recipe by it ($DRZERO_GPU otherwise defaults to H100, and an H200 run would
    get the H100 recipe). An `H100` that Modal serves as an H200 keeps the H100 recipe: it fits there too."""
    kind = parse_gpu(spec)[0].rstrip("!")
    return kind if kind in GPU_MEMORY_GIB else None


def gpu_args(action: str, gpus: int, kind: str | None = None) -> list[str]:
    """`--gpus`, `--gpu KIND` and, off a full node, the SGLang servers' dp x tp for one node of ``gpus`` GPUs.

    On 8 GPUs the stage's own default applies (the model's recipe for the reward server, else 4 x 2): passing
    dp x tp here would override the recipe."""
    stage = STAGE_OF.get(action)
    if stage is None or not stage.sized_by_gpus:
        return []
    tp = 2 if gpus % 2 == 0 else 1
    args = ["--gpus", str(gpus)] + (["--gpu", kind] if kind else []) + (["--rollout-tp", "1"] if tp == 1 else [])
    if stage.sglang and gpus != 8:
        args += ["--sglang-dp", str(gpus // tp), "--sglang-tp", str(tp)]
    return args


def corpus_source(request: Request) -> list[str]:
    """download-corpus: the Function's arguments, ``[URL (#sha256=HEX when given), TO]`` or
    ``[hf://datasets/NAME, TO, FILE...]`` (drzero.corpus.fetch.fetch_corpus reads them)."""
    if bool(request.url) == bool(request.hub_dataset):
        raise ValueError("give the file's URL (`download-corpus https://host/wiki-18.jsonl.gz --to wiki18`) or a hub "
                         "dataset with its files (`--hub-dataset OWNER/NAME --files PATH...`), one of the two")
    to = PurePosixPath(request.to or ".")
    if to.is_absolute() or ".." in to.parts:
        raise ValueError(f"--to {request.to!r} is not valid: give a directory under {FILES_DIR}, such as wiki18")
    to = "" if str(to) == "." else str(to)
    if request.hub_dataset:
        if request.sha256:
            raise ValueError("--sha256 is for a URL; a hub dataset's files are checked against the hub's own hashes")
        if not request.files:
            raise ValueError(f"--hub-dataset {request.hub_dataset} needs --files: the paths (or patterns such as "
                             f"'retrieval-corpus/*.jsonl.gz') of the files to fetch, as the dataset's page lists them")
        if request.hub_dataset.count("/") > 1 or request.hub_dataset.startswith((".", "/")):
            raise ValueError(f"--hub-dataset {request.hub_dataset!r} is not a hub dataset name like OWNER/NAME")
        return [HUB_PREFIX + request.hub_dataset, to, *request.files]
    if request.files:
        raise ValueError("--files names files of a --hub-dataset; a URL is one file")
    if not request.url.startswith(("http://", "https://")):
        raise ValueError(f"{request.url!r} is not an http(s) URL")
    if request.sha256 and not SHA256.fullmatch(request.sha256.lower()):
        raise ValueError(f"--sha256 {request.sha256!r} is not 64 hexadecimal digits")
    return [request.url + (f"#sha256={request.sha256.lower()}" if request.sha256 else ""), to]


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
    """The Function call for a Modal action (not for status, upload-corpus, download-checkpoints), with the
    secrets its command uses."""
    launch = plan_cluster_launch(request) if request.nodes != 1 else plan_one_node(request)
    argv = launch.argv[1:] if launch.nodes > 1 else launch.argv  # a cluster's arguments start with the command
    launch.secrets = secrets_for(launch.action, argv)
    return launch


def plan_one_node(request: Request) -> Launch:
    action, k = request.action, request.iteration
    if request.overrides and action not in TAKES_OVERRIDES:
        raise ValueError(f"Hydra overrides after `--` go to verl, which only {', '.join(TAKES_OVERRIDES)} run; "
                         f"drop them for {action}")
    model = ["--model", request.model] if request.model else []
    extra = list(request.stage_args) + (["--", *request.overrides] if request.overrides else [])
    detach = request.detach if request.detach is not None else action in GPU_STAGES
    if action == "smoke":
        gpu = request.gpu or SMOKE_GPU
        parse_gpu(gpu)
        return Launch(action, "smoke", ["--require-gpu", *model, *extra], gpu=gpu, detach=bool(request.detach))
    if action == "download-corpus":
        return Launch(action, "download_corpus", corpus_source(request), detach=detach)
    if action in ("ingest", "adopt") and request.gpu:  # e.g. embedding wiki-18 on every GPU of a node
        parse_gpu(request.gpu)
        device = ["--device", "cuda"] if option(extra, "--device") is None else []
        return Launch(action, action, device + extra, gpu=request.gpu, detach=detach)
    if action in ("ingest", "adopt", "list-models"):
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
    if action not in GPU_STAGES:
        raise ValueError(f"{action} is not an action that calls a Function; expected one of {', '.join(ACTIONS)}")
    # The GPU stages: each runs after its registry check (`drzero preflight STAGE` or its `--dry-run`), if it has one.
    gpu = request.gpu or GPU
    gpus = parse_gpu(gpu)[1]
    if action == "merge":
        argv = ["--stage", request.stage, "--iteration", str(k), *extra]
        required = required_paths(action, k, stage=request.stage)
    elif action == "evaluate":
        target = request.model or f"{CHECKPOINTS_DIR}/solver_iter{k}_hf"
        data = request.data or f"{DATA_DIR}/solver_iter{k}_val.parquet"
        argv = ["--model", target, "--data", data, *extra]
        required = required_paths(action, k, model=target, data=data)
    else:  # challenger, gen-data, solver, train: sized by the GPUs; the whole loop counts its own iterations
        iteration = [] if action == "train" else ["--iteration", str(k)]
        argv = [*iteration, *model, *gpu_args(action, gpus, gpu_kind(gpu)), *extra]
        required = required_paths(action, k)
    check = STAGE_OF[action].check
    return Launch(action, action.replace("-", "_"), argv, gpu, detach, [*check, *argv] if check else None, required)


def plan_cluster_launch(request: Request) -> Launch:
    """``--nodes N``: the single-node launch's arguments, on the clustered Function of N nodes.

    Its preflight plans the same command with ``--nnodes N``, so the memory check shards over every node."""
    if request.action not in CLUSTER_ACTIONS:
        raise ValueError(f"--nodes {request.nodes}: only {', '.join(CLUSTER_ACTIONS)} run on more than one node; "
                         f"drop --nodes for {request.action}")
    if request.nodes not in CLUSTER_SIZES:
        raise ValueError(f"--nodes {request.nodes} is not valid: expected 1 (one node) or a cluster of "
                         f"{', '.join(map(str, CLUSTER_SIZES))} nodes")
    single = plan_one_node(Request(**{**asdict(request), "nodes": 1}))
    if parse_gpu(single.gpu)[1] != GPUS_PER_HOST:
        raise ValueError(f"--gpu {single.gpu} on {request.nodes} nodes is not valid: each node of a Modal cluster "
                         f"takes all {GPUS_PER_HOST} GPUs of its host (e.g. --gpu H100:8); for fewer GPUs, run on "
                         f"one node without --nodes")
    argv = single.argv[:]
    split = argv.index("--") if "--" in argv else len(argv)
    argv[split:split] = ["--nnodes", str(request.nodes)]
    command = STAGE_OF[request.action].name
    preflight = [*single.preflight[:len(single.preflight) - len(single.argv)], *argv]
    return Launch(single.action, f"cluster_{request.nodes}", [command, *argv], single.gpu, single.detach, preflight,
                  single.required, nodes=request.nodes)


def parse_request(argv: Sequence[str], description: str = "") -> Request:
    """`python -m backends.modal ACTION ...` -> a Request (Hydra overrides after `--`)."""
    argv = list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m backends.modal", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Hydra overrides after `--` go to verl (challenger, solver, train).")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("subject", nargs="?", metavar="MODEL|APP_ID|URL",
                        help="download-model: the model (a `drzero list-models` key or hub name); logs, stop, "
                             "resume: the app id (default: the latest launch); download-corpus: the file's URL")
    parser.add_argument("--iteration", type=int, default=1, help="iteration K of the loop (default: 1)")
    parser.add_argument("--model", help="base model: a `drzero list-models` key, a hub name or a volume path; "
                                        "evaluate: the model to evaluate (default: /checkpoints/solver_iterK_hf)")
    parser.add_argument("--gpu", help=f"GPUs of the stage, TYPE:COUNT on one node (default: {GPU}, from "
                                      f"$DRZERO_MODAL_GPU; smoke: {SMOKE_GPU})")
    parser.add_argument("--nodes", type=int, default=1,
                        help="challenger, solver, train: run on a Modal cluster of N nodes (2, 4 or 8; default 1, one "
                             "node), each with all 8 GPUs of its host (--gpu H100:8 or H200:8). Multi-node clusters "
                             "are a feature Modal enables per workspace: ask Modal for it first (see README: More "
                             "than one node)")
    parser.add_argument("--stage", choices=["challenger", "solver"], default="solver",
                        help="merge, download-checkpoints: which stage's checkpoint (default: solver)")
    parser.add_argument("--data", help="evaluate: the evaluation parquet on the volume "
                                       "(default: /corpus/data/solver_iterK_val.parquet)")
    parser.add_argument("--path", help="upload-corpus, upload-model: what to upload; download-checkpoints: "
                                       "where to (default: ./checkpoints)")
    parser.add_argument("--to", default="", metavar="DIR",
                        help=f"download-corpus: the directory under {FILES_DIR} the files land in (e.g. wiki18)")
    parser.add_argument("--sha256", help="download-corpus: the URL's file's sha256, checked before it is kept")
    parser.add_argument("--hub-dataset", metavar="OWNER/NAME",
                        help="download-corpus: a Hugging Face dataset instead of a URL, with --files")
    parser.add_argument("--files", nargs="+", default=[], metavar="PATH",
                        help="download-corpus: the hub dataset's files, paths or patterns (retrieval-corpus/*.gz)")
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
    if args.subject and args.action not in ("download-model", "download-corpus", "logs", "stop", "resume"):
        parser.error(f"{args.action} takes no positional argument (got {args.subject!r}); options start with --")
    if args.action == "download-model":  # `download-model MODEL`
        args.model, args.subject = args.model or args.subject, None
    url = args.subject if args.action == "download-corpus" else None
    return Request(args.action, args.iteration, args.model, args.gpu, args.stage, args.data, args.path,
                   shlex.split(args.stage_args), overrides, args.detach, args.hours, args.price_per_gpu_hour,
                   None if url else args.subject, args.errors, args.since, args.follow, args.nodes, url=url,
                   hub_dataset=args.hub_dataset, files=args.files, to=args.to, sha256=args.sha256)
