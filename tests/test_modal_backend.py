"""The Modal adapter, offline and without a Modal account.

Modal objects are lazy: importing `backends.modal` builds the app, image, volumes and Functions
without a network call, and `Function.info()` returns each Function's resolved spec. Launches run
against fakes put in place of the Functions, `app.run` and the volumes, so no test reaches Modal.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

modal = pytest.importorskip("modal")
from modal.volume import FileEntry, FileEntryType  # noqa: E402

from backends import modal as mb  # noqa: E402
from backends import modal_image as mi  # noqa: E402
from backends import modal_ops as mo  # noqa: E402
from backends import modal_plan as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOLUME_NAMES = {"/corpus": "dr-zero-corpus", "/checkpoints": "dr-zero-checkpoints"}
GPU_STAGES = ["challenger", "gen_data", "solver", "merge", "evaluate", "train"]
CPU_FUNCTIONS = ["ingest", "adopt", "prepare_data", "list_models", "download_model", "download_corpus", "preflight"]
RETRIED_CPU_FUNCTIONS = ["download_model", "download_corpus"]  # resumable: a preempted download continues


# -- the Functions' specs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_STAGES)
def test_gpu_stages_run_a_day_on_8_h100_with_retries_and_fresh_containers(name):
    info = getattr(mb, name).info()
    assert mi.GPU == os.environ.get("DRZERO_MODAL_GPU", "H100:8")
    assert info.gpus == [mi.parse_gpu(mi.GPU)]
    assert info.timeout == 24 * 60 * 60 and info.max_retries == 5 and info.single_use_containers
    assert (info.cpu, info.memory_mib) == (8.0 * info.gpus[0][1], 64 * 1024 * info.gpus[0][1])
    assert {path: mount.name for path, mount in info.volumes.items()} == VOLUME_NAMES
    # which secrets each Function gets: tests/test_secrets.py


def test_smoke_gets_one_h100_for_30_minutes_and_no_retries():
    info = mb.smoke.info()
    assert info.gpus == [("H100", 1)] and info.timeout == 30 * 60 and not info.max_retries
    assert {path: mount.name for path, mount in info.volumes.items()} == VOLUME_NAMES


@pytest.mark.parametrize("name", CPU_FUNCTIONS)
def test_cpu_functions_have_no_gpu_and_the_same_volumes(name):
    info = getattr(mb, name).info()
    assert info.gpus == [] and info.timeout <= 12 * 60 * 60
    assert info.max_retries == (5 if name in RETRIED_CPU_FUNCTIONS else None) or not info.max_retries
    assert {path: mount.name for path, mount in info.volumes.items()} == VOLUME_NAMES


def test_gpu_type_and_count_are_chosen_per_launch_with_with_options():
    assert mb.train.with_options(gpu="H200:8", **mb.resources("H200:8")).info().gpus == [("H200", 8)]
    four = mb.solver.with_options(gpu="H100!:4", **mb.resources("H100!:4")).info()
    assert four.gpus == [("H100!", 4)] and four.cpu == 32.0 and four.memory_mib == 4 * 64 * 1024
    assert mi.parse_gpu("h200") == ("H200", 1)
    for bad in ("H100:eight", "H100:0", "H100:16", ""):
        with pytest.raises(ValueError, match="TYPE:COUNT"):
            mi.parse_gpu(bad)
    assert mp.gpu_args("train", 8) == ["--gpus", "8"]  # the stage's recipe shapes its SGLang servers
    assert mp.gpu_args("train", 8, "H200") == ["--gpus", "8", "--gpu", "H200"]
    assert mp.gpu_args("challenger", 4) == ["--gpus", "4", "--sglang-dp", "2", "--sglang-tp", "2"]
    assert mp.gpu_args("solver", 1) == ["--gpus", "1", "--rollout-tp", "1"]
    assert [mp.gpu_kind(spec) for spec in ("H100!:8", "h200:8", "A100-80GB:8", "T4:1")] == ["H100", "H200",
                                                                                            "A100-80GB", None]
    assert mp.gpu_args("merge", 8) == []


@pytest.mark.parametrize("gpu, reward_server", [("H200:8", (2, 4, 0.2)), ("H100:8", (2, 4, 0.3)),
                                                 ("H100:4", (2, 2, 0.5))])
def test_the_challenger_on_modal_gets_the_models_recipe_for_the_gpu_it_runs_on(gpu, reward_server):
    """What the Function runs, parsed by drzero itself: on a full node the registry's recipe for that GPU shapes
    the reward server (qwen3-32b: dp 2 x tp 4); off it the launch sizes dp x tp to the GPUs."""
    from drzero.config import add_config_arguments, config_from_args
    from drzero.stages.challenger import ChallengerConfig
    import argparse

    plan = mb.plan_launch(mb.Request("challenger", model="qwen3-32b", gpu=gpu))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ChallengerConfig)
    cfg = config_from_args(ChallengerConfig, parser.parse_args(plan.argv))
    assert cfg.reward_server() == reward_server and cfg.gpu == mp.gpu_kind(gpu)


def test_the_image_is_docker_Dockerfile_with_the_code_added_last():
    """Spy on the Image chain in a fresh interpreter: the image is built lazily, so only the calls show it."""
    spy = r"""
import json, modal
calls = []
def recording(name, original):
    def record(*args, **kwargs):
        calls.append([name, [a if isinstance(a, (list, dict)) else str(a) for a in args if not isinstance(a, modal.Image)],
                      {k: (v if isinstance(v, (list, dict)) else str(v)) for k, v in kwargs.items()}])
        return original(*args, **kwargs)
    return record
for name in ("from_dockerfile", "entrypoint", "env", "add_local_dir", "add_local_python_source"):
    setattr(modal.Image, name, recording(name, getattr(modal.Image, name)))
import backends.modal
print(json.dumps(calls))
"""
    done = subprocess.run([sys.executable, "-c", spy], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout.strip().splitlines()[-1])
    names = [name for name, _, _ in calls]
    assert names[0] == "from_dockerfile" and names[-1] == "add_local_dir"   # local files last (Modal's rule)
    _, args, kwargs = calls[0]
    assert args == [str(REPO / "docker" / "Dockerfile")] and kwargs["context_dir"] == str(REPO)
    assert kwargs["ignore"] == repr(mi.CONTEXT_RULE) and "<.dockerignore>" in kwargs["ignore"]  # + the secrets rule
    (_, add_args, add_kwargs) = calls[-1]
    assert add_args == [str(REPO), "/opt/drzero-src"]
    assert add_kwargs["ignore"] == repr(mi.CODE_RULE) and {".venv", ".git", ".drzero"} <= set(mi.CODE_IGNORE)
    (env,) = next(args for name, args, _ in calls if name == "env")
    assert env["DRZERO_MODELS_DIR"] == "/corpus/models" and env["DRZERO_CONFIG_DIR"] == "/opt/drzero-src/config"
    assert env["PYTHONPATH"] == "/opt/drzero-src"
    assert (REPO / "docker" / "Dockerfile").is_file(), "docker/Dockerfile is the image Modal builds"


def test_no_module_under_drzero_imports_modal():
    offenders = []
    for path in sorted((REPO / "drzero").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for name in names
                          if name == "modal" or name.startswith("modal.")]
    assert offenders == []


# -- the command line -> Function calls ----------------------------------------------------------


# Fakes of modal's objects: each method has the name and parameters of modal 1.6.4's own and raises what modal's
# raises (tests/test_modal_fakes.py holds them to the installed modal).


class FakeCall:
    object_id = "fc-test"

    def __init__(self, log, name, result):
        self.log, self.name, self.result = log, name, result

    def get(self, timeout=None, *, index=0):
        self.log.append(("get", self.name))
        return self.result


class FakeFunction:
    def __init__(self, name, log, result):
        self.name, self.log, self.result = name, log, result

    def with_options(self, *, cpu=None, memory=None, gpu=None, secrets=None):
        given = {"cpu": cpu, "memory": memory, "gpu": gpu, "secrets": [s.name for s in secrets or []] or None}
        self.log.append(("with_options", self.name, {k: v for k, v in given.items() if v is not None}))
        return self

    def spawn(self, *args, **kwargs):
        self.log.append(("spawn", self.name, args))
        return FakeCall(self.log, self.name, self.result)

    def remote(self, *args, **kwargs):
        self.log.append(("remote", self.name, args))
        return self.result


class FakeSecret:
    """`modal.Secret.from_name(...)`; `hydrate` raises NotFoundError, as modal does, for a name in ``missing``."""

    missing: set = set()

    def __init__(self, name, required_keys):
        self.name, self.required_keys = name, required_keys

    @staticmethod
    def from_name(name, *, environment_name=None, required_keys=[], client=None):
        return FakeSecret(name, list(required_keys))

    def hydrate(self, client=None):
        if self.name in FakeSecret.missing:
            raise modal.exception.NotFoundError(f"Secret '{self.name}' not found in environment 'main'")
        return self


@pytest.fixture
def modal_calls(monkeypatch):
    return fake_modal(monkeypatch)


def fake_modal(monkeypatch) -> list:
    """Every Function replaced by a fake, `app.run` recorded, every secret in the workspace; the preflight passes
    unless a test says otherwise. Returns the log of calls."""
    log = []
    for name in GPU_STAGES + CPU_FUNCTIONS + ["smoke"]:
        result = {"ok": True, "problems": []} if name == "preflight" else {"exit_code": 0}
        monkeypatch.setattr(mb, name, FakeFunction(name, log, result))

    @contextlib.contextmanager
    def run(**kwargs):
        log.append(("app.run", kwargs))
        yield mb.app

    monkeypatch.setattr(mb.app, "run", run)
    monkeypatch.setattr(mb, "_app_id", lambda: "ap-test")
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume({}))  # where launches are recorded
    monkeypatch.setattr(modal.Secret, "from_name", FakeSecret.from_name)  # every secret there unless a test says
    monkeypatch.setattr(FakeSecret, "missing", set())
    return log


def _calls(log, kind):
    return [entry for entry in log if entry[0] == kind]


H100 = {"gpu": "H100:8", "cpu": 64.0, "memory": 8 * 64 * 1024}
W_AND_B = {"secrets": ["wandb-secret"]}          # where verl logs to W&B, and its preflight
HF = {"secrets": ["huggingface-secret"]}         # where weights or the embedder may be downloaded
SGLANG_8 = ["--gpus", "8", "--gpu", "H100"]

CASES = [
    # (command line, Function, its arguments, with_options, preflight `drzero` argv or None, detached)
    (["smoke"], "smoke", ("--require-gpu",), {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024}, None, False),
    (["smoke", "--model", "qwen3-0.6b"], "smoke", ("--require-gpu", "--model", "qwen3-0.6b"),
     {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024}, None, False),
    (["ingest", "--stage-args=--demo"], "ingest", ("--demo",), HF, None, False),
    (["ingest", "--stage-args=/corpus/files/wiki18 --encoders 8", "--gpu", "H100:8"], "ingest",
     ("--device", "cuda", "/corpus/files/wiki18", "--encoders", "8"), {**H100, **HF}, None, False),
    (["adopt", "--stage-args=--faiss-index /corpus/files/w/e5_Flat.index --corpus /corpus/files/w/wiki18.jsonl"],
     "adopt", ("--faiss-index", "/corpus/files/w/e5_Flat.index", "--corpus", "/corpus/files/w/wiki18.jsonl"), HF,
     None, False),
    (["download-corpus", "https://host/dumps/wiki-18.jsonl.gz", "--to", "wiki18/"], "download_corpus",
     ("https://host/dumps/wiki-18.jsonl.gz", "wiki18"), None, None, False),
    (["download-corpus", "https://host/e5_Flat.index", "--sha256", "AB" * 32], "download_corpus",
     ("https://host/e5_Flat.index#sha256=" + "ab" * 32, ""), None, None, False),
    (["download-corpus", "--hub-dataset", "RUC-NLPIR/FlashRAG_datasets", "--files",
      "retrieval-corpus/wiki18_100w.jsonl.gz", "nq/*", "--to", "wiki18"], "download_corpus",
     ("hf://datasets/RUC-NLPIR/FlashRAG_datasets", "wiki18", "retrieval-corpus/wiki18_100w.jsonl.gz", "nq/*"), HF,
     None, False),
    (["prepare-data", "--model", "qwen2.5-3b-instruct"], "prepare_data",
     ("--tokenizer", "Qwen/Qwen2.5-3B-Instruct"), None, [], False),
    (["challenger", "--iteration", "2", "--model", "qwen3-32b", "--", "trainer.total_training_steps=5"],
     "challenger", ("--iteration", "2", "--model", "qwen3-32b", *SGLANG_8, "--", "trainer.total_training_steps=5"),
     {**H100, **W_AND_B}, ["preflight", "challenger"], True),
    (["gen-data", "--gpu", "H200:4"], "gen_data",
     ("--iteration", "1", "--gpus", "4", "--gpu", "H200", "--sglang-dp", "2", "--sglang-tp", "2"),
     {"gpu": "H200:4", "cpu": 32.0, "memory": 4 * 64 * 1024}, ["gen-data", "--dry-run"], True),
    (["solver", "--iteration", "3", "--gpu", "H100:1", "--no-detach"], "solver",
     ("--iteration", "3", "--gpus", "1", "--gpu", "H100", "--rollout-tp", "1"),
     {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024, **W_AND_B}, ["preflight", "solver"], False),
    (["merge", "--stage", "challenger", "--iteration", "2"], "merge", ("--stage", "challenger", "--iteration", "2"),
     H100, ["merge", "--dry-run"], True),
    (["evaluate", "--iteration", "2"], "evaluate",
     ("--model", "/checkpoints/solver_iter2_hf", "--data", "/corpus/data/solver_iter2_val.parquet"), H100, [], True),
    (["train", "--model", "qwen3-32b", "--stage-args=--iterations 2", "--", "trainer.save_freq=10"], "train",
     ("--model", "qwen3-32b", *SGLANG_8, "--iterations", "2", "--", "trainer.save_freq=10"), {**H100, **W_AND_B},
     ["evolve", "--dry-run"], True),
    (["list-models"], "list_models", (), None, None, False),
    (["upload-model", "--model", "qwen3-32b"], "download_model", ("Qwen/Qwen3-32B", "Qwen3-32B"), HF, None, False),
    (["download-model", "qwen3-32b"], "download_model", ("Qwen/Qwen3-32B", "Qwen3-32B"), HF, None, False),
    (["download-model", "someorg/Tiny-Model"], "download_model", ("someorg/Tiny-Model", "Tiny-Model"), HF, None,
     False),
]


@pytest.mark.parametrize("argv, function, args, options, preflight, detached", CASES,
                         ids=[" ".join(case[0]) for case in CASES])
def test_every_action_calls_its_function_with_the_right_arguments(modal_calls, capsys, argv, function, args, options,
                                                                   preflight, detached, monkeypatch):
    monkeypatch.delenv("DRZERO_MODAL_GPU", raising=False)
    monkeypatch.setattr(mp, "GPU", "H100:8")
    assert mb.cli(argv) == 0
    log = modal_calls
    assert _calls(log, "app.run") == [("app.run", {"detach": detached})]
    assert _calls(log, "spawn") == [("spawn", function, args)]
    secrets = {"secrets": options["secrets"]} if options and "secrets" in options else None
    assert _calls(log, "with_options") == ([("with_options", "preflight", secrets)] if secrets and preflight is not None
                                           else []) + ([("with_options", function, options)] if options else [])
    checks = _calls(log, "remote")
    if preflight is None:
        assert checks == []
    else:
        (_, name, (command, required)), = checks
        assert name == "preflight" and command[:len(preflight)] == preflight
        assert command[len(preflight):] == ([] if not command else list(args))   # the stage's own arguments
        assert required and log.index(checks[0]) < log.index(_calls(log, "spawn")[0])   # before any GPU
    assert _calls(log, "get") == ([] if detached else [("get", function)])
    out = capsys.readouterr().out
    if detached:
        assert "backends.modal logs ap-test --follow" in out and "backends.modal stop ap-test" in out
        assert "app ap-test" in out


def test_a_failed_preflight_starts_no_gpu(modal_calls, capsys):
    mb.preflight.result = {"ok": False, "problems": ["/corpus/data/solver_iter1.parquet is missing: `gen-data`"]}
    assert mb.cli(["solver"]) == 1
    assert _calls(modal_calls, "spawn") == []
    assert "no GPU was started" in capsys.readouterr().err


def test_the_required_inputs_name_the_action_that_makes_them():
    required = dict(mp.required_paths("challenger", 2))
    assert "prepare-data" in required["/corpus/data/zero_ratio4321.parquet"]
    assert "merge --stage solver --iteration 1" in required["/checkpoints/solver_iter1_hf"]
    assert "challenger --iteration 1" in dict(mp.required_paths("gen-data", 1))["/checkpoints/challenger_iter1_hf"]
    assert list(dict(mp.required_paths("merge", 3, stage="solver"))) == ["/checkpoints/solver_iter3"]


def test_hydra_overrides_only_for_verl_stages(modal_calls, capsys):
    assert mb.cli(["gen-data", "--", "x=1"]) == 2
    assert "only challenger, solver, train" in capsys.readouterr().err and modal_calls == []


def test_the_seed_guides_modal_run_form_uses_the_running_app(modal_calls):
    mb.main(action="solver", iteration=2, model="qwen3-8b", gpu="H200:8", overrides="trainer.save_freq=5")
    assert _calls(modal_calls, "app.run") == []          # `modal run` started the app already
    (_, _, args), = _calls(modal_calls, "spawn")
    assert args == ("--iteration", "2", "--model", "qwen3-8b", "--gpus", "8", "--gpu", "H200", "--",
                    "trainer.save_freq=5")
    assert [o for _, name, o in _calls(modal_calls, "with_options") if name == "solver"][0]["gpu"] == "H200:8"
    assert _calls(modal_calls, "get") == [("get", "solver")]   # waits: `modal run --detach` keeps it alive


def test_modal_run_parses_the_entrypoint_offline(tmp_path):
    done = subprocess.run([sys.executable, "-m", "modal", "run", "-m", "backends.modal", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    for flag in ("--action", "--iteration", "--model", "--gpu", "--stage-args", "--overrides"):
        assert flag in done.stdout


# -- cost ------------------------------------------------------------------------------------------


def test_the_estimate_of_a_day_on_8_h100_is_about_32_dollars_an_hour():
    request = mb.Request("train", price_per_gpu_hour=4.0)
    estimate = mo.estimate(mb.plan_launch(request), request)
    assert (estimate.gpus, estimate.hours, estimate.gpu_hours) == (8, 24.0, 192.0)
    assert estimate.dollars == 768.0 and estimate.dollars / estimate.hours == 32.0
    assert estimate.dollars_per_attempt_cap == 768.0 and estimate.attempts == 6
    request = mb.Request("solver", gpu="H200:4", hours=10, price_per_gpu_hour=5.5)
    estimate = mo.estimate(mb.plan_launch(request), request)
    assert estimate.gpu_hours == 40.0 and estimate.dollars == 220.0
    assert "40 GPU-hours ~ $220 at $5.50/GPU-hour" in "\n".join(estimate.lines())
    assert mo.estimate(mb.plan_launch(mb.Request("list-models")), mb.Request("list-models")) is None


STATE = {"version": 1, "stages": {
    "prepare-data": {"status": "done", "outputs": ["/corpus/data/zero_ratio4321.parquet"],
                     "updated": "2026-11-26T10:05:00Z"},
    "iter1/challenger": {"status": "done", "outputs": ["/checkpoints/challenger_iter1"], "updated": "2026-11-26T14:00:00Z"},
    "iter1/merge-challenger": {"status": "running", "outputs": [], "updated": "2026-11-26T14:01:00Z"},
}}
RUNS = {
    "runs/2026-11-26T100000Z-evolve-ta-1.json": {
        "command": "evolve", "argv": [], "gpu_type": "NVIDIA H100 80GB HBM3", "gpus": 8, "started": "2026-11-26T10:00:00Z",
        "last_seen": "2026-11-26T12:30:00Z", "ended": "2026-11-26T12:30:00Z", "exit_code": 1, "task_id": "ta-1"},
    "runs/2026-11-26T123100Z-evolve-ta-2.json": {
        "command": "evolve", "argv": [], "gpu_type": "NVIDIA H100 80GB HBM3", "gpus": 8, "started": "2026-11-26T12:31:00Z",
        "last_seen": "2026-11-26T14:01:00Z", "ended": None, "exit_code": None, "task_id": "ta-2"},
}


class FakeVolume:
    """A volume as modal 1.6.4's `Volume` sees it from outside a container: a missing file raises FileNotFoundError
    (read_file, read_file_into_fileobj), a missing directory modal.exception.NotFoundError (listdir)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.uploads = []
        self.commits = 0

    def read_file(self, path):
        if path.lstrip("/") not in self.files:
            raise FileNotFoundError(f"No such file: {path}")
        yield self.files[path.lstrip("/")]

    def read_file_into_fileobj(self, path, fileobj, progress_cb=None):
        data = b"".join(self.read_file(path))  # modal looks the file up before it writes a byte
        fileobj.write(data)
        return len(data)

    def listdir(self, path, *, recursive=False):
        prefix = path.strip("/") + "/"
        found = [FileEntry(name, FileEntryType.FILE, 0, len(data)) for name, data in self.files.items()
                 if name.startswith(prefix)]
        if not recursive:  # Modal lists the direct children only, directories as one entry each
            children = {prefix + e.path[len(prefix):].split("/")[0]: "/" in e.path[len(prefix):] for e in found}
            found = [FileEntry(name, FileEntryType.DIRECTORY if is_dir else FileEntryType.FILE, 0, 0)
                     for name, is_dir in children.items()]
        if not found:
            raise modal.exception.NotFoundError(f"No such file or directory: {path}")
        return found

    @contextlib.contextmanager
    def batch_upload(self, force=False):
        yield FakeUpload(self)

    def commit(self):
        self.commits += 1

    def reload(self):
        pass


class FakeUpload:
    """What `Volume.batch_upload()` yields."""

    def __init__(self, volume):
        self.volume = volume

    def put_file(self, local_file, remote_path, mode=None):
        self.volume.uploads.append(("file", local_file, remote_path))
        if hasattr(local_file, "read"):  # a file object: its bytes land on the volume
            self.volume.files[str(remote_path).lstrip("/")] = local_file.read()

    def put_directory(self, local_path, remote_path, recursive=True):
        self.volume.uploads.append(("dir", local_path, remote_path))


def test_status_reads_state_json_and_adds_up_the_recorded_gpu_time(monkeypatch, capsys):
    files = {"state.json": json.dumps(STATE).encode(), **{k: json.dumps(v).encode() for k, v in RUNS.items()}}
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume(files))
    monkeypatch.setattr(mb, "corpus_volume", FakeVolume({}))
    assert mb.cli(["status", "--price-per-gpu-hour", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 recorded are done" in out
    assert "iter1/merge-challenger  running" in out
    assert "20.0 GPU-h  $    80.00" in out                       # 2.5 h x 8 GPUs
    assert "12.0 GPU-h  $    48.00  running, last seen 2026-11-26T14:01:00Z" in out
    assert "cost so far: 32.0 GPU-hours ~ $128.00 at $4.00/GPU-hour" in out


def test_status_before_any_run(monkeypatch, capsys):
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume({}))
    monkeypatch.setattr(mb, "corpus_volume", FakeVolume({}))
    assert mb.cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "no stage has run" in out and "cost so far: 0.0 GPU-hours" in out
    assert "next: python -m backends.modal train" in out and "qwen3-32b" in out and "missing" in out


def test_status_tells_a_failed_stage_its_verl_step_the_next_action_and_the_models_on_the_volume(monkeypatch, capsys):
    state = {"stages": {**STATE["stages"], "iter1/merge-challenger": {"status": "done", "updated": "2026-11-26T14:05:00Z"},
                        "iter1/gen-data": {"status": "done", "updated": "2026-11-26T15:00:00Z"},
                        "iter1/solver": {"status": "running", "updated": "2026-11-26T15:01:00Z"},
                        "iter1/evaluate": {"status": "done", "updated": "2026-11-26T19:00:00Z"}}}
    crashed = {**RUNS["runs/2026-11-26T123100Z-evolve-ta-2.json"], "ended": "2026-11-26T16:00:00Z", "exit_code": 1}
    files = {"state.json": json.dumps(state).encode(), "runs/a.json": json.dumps(crashed).encode(),
             "solver_iter1/latest_checkpointed_iteration.txt": b"30\n",
             "challenger_iter1/latest_checkpointed_iteration.txt": b"50",
             "eval/iter1/summary.json": json.dumps({"overall": {"questions": 500, "em": 0.4123, "f1": 0.5}}).encode()}
    models = {"models/Qwen3-8B/config.json": b"{}",
              "models/Qwen3-8B/.drzero-download.json": json.dumps({"complete": True}).encode(),
              "models/Qwen3-14B/.drzero-download.json": json.dumps({"complete": False}).encode(),
              "models/Qwen2.5-3B-Instruct/config.json": b"{}"}
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume(files))
    monkeypatch.setattr(mb, "corpus_volume", FakeVolume(models))
    assert mb.cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "iter1/challenger        done" in out and "verl step 50" in out
    assert "iter1/solver            failed (exit 1)" in out and "verl step 30" in out
    assert "iter1/evaluate          done" in out and "EM 0.412, F1 0.500" in out
    assert "next: python -m backends.modal logs --errors   then fix what it names and `python -m backends.modal resume`" in out
    lines = {line.split()[0]: line for line in out.splitlines() if "/corpus/models/" in line}
    assert lines["qwen3-8b"].endswith("verified") and lines["qwen3-14b"].endswith("incomplete: run download-model again")
    assert lines["qwen2.5-3b-instruct"].endswith("present") and lines["qwen3-32b"].endswith("missing")


def test_upload_corpus_tells_a_chroma_store_from_documents(monkeypatch, tmp_path, capsys):
    volume = FakeVolume({})
    monkeypatch.setattr(mb, "corpus_volume", volume)
    store, papers = tmp_path / "chromadb", tmp_path / "papers"
    store.mkdir(), papers.mkdir()
    (store / "chroma.sqlite3").write_bytes(b"")
    assert mb.cli(["upload-corpus", "--path", str(store)]) == 0
    assert mb.cli(["upload-corpus", "--path", str(papers)]) == 0
    assert volume.uploads == [("dir", str(store), "/chromadb"), ("dir", str(papers), "/sources/papers")]
    assert "backends.modal ingest" in capsys.readouterr().out
    assert mb.cli(["upload-corpus", "--path", str(tmp_path / "missing")]) == 2


def test_download_checkpoints_fetches_the_merged_model_and_state(monkeypatch, tmp_path):
    files = {"solver_iter2_hf/config.json": b"{}", "solver_iter2_hf/model.safetensors": b"w", "state.json": b"{}",
             "solver_iter2/global_step_50/actor/shard.pt": b"big"}
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume(files))
    assert mb.cli(["download-checkpoints", "--iteration", "2", "--path", str(tmp_path)]) == 0
    got = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert got == ["solver_iter2_hf/config.json", "solver_iter2_hf/model.safetensors", "state.json"]
    assert mb.cli(["download-checkpoints", "--iteration", "3", "--path", str(tmp_path)]) == 1


# -- download-model --------------------------------------------------------------------------------


def test_download_model_is_a_retried_cpu_function_with_the_hub_token_and_the_corpus_volume():
    info = mb.download_model.info()
    assert info.gpus == [] and info.max_retries == 5 and info.timeout == 6 * 60 * 60 and info.cpu == 8.0
    assert info.secrets == []  # the hub token comes with the launch, when the workspace has it (tests/test_secrets.py)
    assert mb.plan_launch(mb.Request("download-model", model="qwen3-8b")).secrets == {"huggingface-secret": False}
    assert info.volumes["/corpus"].name == "dr-zero-corpus"


def test_download_model_downloads_into_the_models_directory_and_commits_the_corpus_volume(monkeypatch):
    from drzero.models import download as model_download

    seen = {}

    def download_from_hub(repo_id, target, *, commit, log):
        seen.update(repo_id=repo_id, target=str(target), commit=commit)
        log("done")
        return {"path": str(target), "size": 3, "fetched": 3, "skipped": False}

    volume = SimpleNamespace(commit=lambda: None)
    monkeypatch.setattr(model_download, "download_from_hub", download_from_hub)
    monkeypatch.setattr(mb, "corpus_volume", volume)
    result = mb.download_model.local("Qwen/Qwen3-8B", "Qwen3-8B")
    assert seen == {"repo_id": "Qwen/Qwen3-8B", "target": "/corpus/models/Qwen3-8B", "commit": volume.commit}
    assert result["exit_code"] == 0 and result["size"] == 3


@pytest.mark.parametrize("model", ["", "./weights", "/abs/dir", "a/b/c"])
def test_download_model_refuses_what_is_not_a_key_or_hub_name(modal_calls, capsys, model):
    assert mb.cli(["download-model", *([model] if model else [])]) == 2
    assert "not a `drzero list-models` key or a hub name" in capsys.readouterr().err and modal_calls == []


# -- logs, stop, resume ----------------------------------------------------------------------------


def _launched(modal_calls, argv):
    assert mb.cli(argv) == 0
    volume = mb.checkpoints_volume
    (path,) = [name for name in volume.files if name.startswith("launches/")]
    return volume, json.loads(volume.files[path])


def test_a_gpu_launch_is_recorded_on_the_checkpoints_volume(modal_calls):
    volume, record = _launched(modal_calls, ["train", "--model", "qwen3-8b", "--gpu", "H200:8",
                                             "--stage-args=--iterations 2"])
    assert record["app_id"] == "ap-test" and record["call_id"] == "fc-test"
    assert record["launch"]["function"] == "train" and record["launch"]["gpu"] == "H200:8"
    assert record["launch"]["argv"] == ["--model", "qwen3-8b", "--gpus", "8", "--gpu", "H200", "--iterations", "2"]
    assert mb.cli(["list-models"]) == 0 and len([n for n in volume.files if n.startswith("launches/")]) == 1


def test_resume_makes_the_recorded_call_again_and_says_what_it_skips(modal_calls, capsys):
    volume, record = _launched(modal_calls, ["train", "--model", "qwen3-8b", "--gpu", "H200:8",
                                             "--stage-args=--iterations 2", "--", "trainer.save_freq=10"])
    volume.files["state.json"] = json.dumps({"stages": {
        "prepare-data": {"status": "done", "updated": "2026-11-30T10:00:00Z"},
        "iter1/challenger": {"status": "done", "updated": "2026-11-30T14:00:00Z"},
        "iter1/merge-challenger": {"status": "running"}}}).encode()
    first = list(modal_calls)
    modal_calls.clear()
    capsys.readouterr()
    assert mb.cli(["resume"]) == 0
    assert _calls(modal_calls, "spawn") == _calls(first, "spawn")          # the same Function, the same arguments
    assert _calls(modal_calls, "with_options") == _calls(first, "with_options")   # on the same GPUs
    assert _calls(modal_calls, "remote")[0][2] == _calls(first, "remote")[0][2]   # and the same preflight
    out = capsys.readouterr().out
    assert "resuming train launched" in out and "(app ap-test)" in out
    assert "  skip    iter1/challenger  (done 2026-11-30T14:00:00Z)" in out
    assert "  resume  iter1/merge-challenger" in out and "  run     iter2/merge-solver" in out
    assert "iter1/evaluate" not in out  # evolve evaluates only with --eval-data


def test_logs_read_the_latest_launch_with_the_fixes_and_errors_only(modal_calls, monkeypatch, capsys):
    _launched(modal_calls, ["solver", "--iteration", "2"])
    commands = []

    def fake_log_lines(command):
        commands.append(command)
        return iter(["[solver] step:3 - critic/score/mean:0.4\n",
                     "[solver] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"])

    monkeypatch.setattr(mo, "log_lines", fake_log_lines)
    capsys.readouterr()
    assert mb.cli(["logs", "--since", "2h"]) == 0
    assert commands[-1][-5:] == ["app", "logs", "ap-test", "--since", "2h"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[solver] step:3 - critic/score/mean:0.4" and out[2].startswith(">>> CUDA out of memory: run `drzero memory")
    assert mb.cli(["logs", "ap-other", "--errors", "-f"]) == 0
    assert commands[-1][-3:] == ["logs", "ap-other", "-f"]
    assert capsys.readouterr().out.startswith("== CUDA out of memory (line 2)")
    assert mb.cli(["logs", "--since", "yesterday"]) == 2


def test_stop_stops_the_latest_app_through_modals_cli(modal_calls, monkeypatch, capsys):
    _launched(modal_calls, ["challenger"])
    calls = []
    monkeypatch.setattr(mo.subprocess, "call", lambda command: calls.append(command) or 0)
    assert mb.cli(["stop"]) == 0
    assert calls == [[sys.executable, "-m", "modal", "app", "stop", "ap-test", "--yes"]]
    assert "python -m backends.modal resume" in capsys.readouterr().out


def test_without_a_recorded_launch_logs_asks_for_the_app_id_and_resume_has_nothing_to_resume(modal_calls, capsys):
    assert mb.cli(["logs"]) == 2
    assert "give the app id from `modal app list`" in capsys.readouterr().err
    assert mb.cli(["resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert _calls(modal_calls, "spawn") == []
