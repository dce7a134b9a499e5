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
from backends import modal as mb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOLUME_NAMES = {"/corpus": "dr-zero-corpus", "/checkpoints": "dr-zero-checkpoints"}
GPU_STAGES = ["challenger", "gen_data", "solver", "merge", "evaluate", "train"]
CPU_FUNCTIONS = ["ingest", "prepare_data", "list_models", "download_model", "preflight"]


# -- the Functions' specs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_STAGES)
def test_gpu_stages_run_a_day_on_8_h100_with_retries_and_fresh_containers(name):
    info = getattr(mb, name).info()
    assert mb.GPU == os.environ.get("DRZERO_MODAL_GPU", "H100:8")
    assert info.gpus == [mb.parse_gpu(mb.GPU)]
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
    assert info.gpus == [] and info.timeout <= 12 * 60 * 60 and not info.max_retries
    assert {path: mount.name for path, mount in info.volumes.items()} == VOLUME_NAMES


def test_gpu_type_and_count_are_chosen_per_launch_with_with_options():
    assert mb.train.with_options(gpu="H200:8", **mb.resources("H200:8")).info().gpus == [("H200", 8)]
    four = mb.solver.with_options(gpu="H100!:4", **mb.resources("H100!:4")).info()
    assert four.gpus == [("H100!", 4)] and four.cpu == 32.0 and four.memory_mib == 4 * 64 * 1024
    assert mb.parse_gpu("h200") == ("H200", 1)
    for bad in ("H100:eight", "H100:0", "H100:16", ""):
        with pytest.raises(ValueError, match="TYPE:COUNT"):
            mb.parse_gpu(bad)
    assert mb.gpu_args("train", 8) == ["--gpus", "8", "--sglang-dp", "4", "--sglang-tp", "2"]
    assert mb.gpu_args("solver", 1) == ["--gpus", "1", "--rollout-tp", "1"]
    assert mb.gpu_args("merge", 8) == []


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
    (_, add_args, add_kwargs) = calls[-1]
    assert add_args == [str(REPO), "/opt/drzero-src"]
    assert {".venv", ".git", ".drzero"} <= set(add_kwargs["ignore"])
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


class FakeCall:
    object_id = "fc-test"

    def __init__(self, log, name, result):
        self.log, self.name, self.result = log, name, result

    def get(self):
        self.log.append(("get", self.name))
        return self.result


class FakeFunction:
    def __init__(self, name, log, result):
        self.name, self.log, self.result = name, log, result

    def with_options(self, **options):
        self.log.append(("with_options", self.name, options))
        return self

    def spawn(self, *args):
        self.log.append(("spawn", self.name, args))
        return FakeCall(self.log, self.name, self.result)

    def remote(self, *args):
        self.log.append(("remote", self.name, args))
        return self.result


@pytest.fixture
def modal_calls(monkeypatch):
    """Every Function replaced by a fake, `app.run` recorded; the preflight passes unless a test says otherwise."""
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
    return log


def _calls(log, kind):
    return [entry for entry in log if entry[0] == kind]


H100 = {"gpu": "H100:8", "cpu": 64.0, "memory": 8 * 64 * 1024}
SGLANG_8 = ["--gpus", "8", "--sglang-dp", "4", "--sglang-tp", "2"]

CASES = [
    # (command line, Function, its arguments, with_options, preflight `drzero` argv or None, detached)
    (["smoke"], "smoke", ("--require-gpu",), {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024}, None, False),
    (["smoke", "--model", "qwen3-0.6b"], "smoke", ("--require-gpu", "--model", "qwen3-0.6b"),
     {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024}, None, False),
    (["ingest", "--stage-args=--demo"], "ingest", ("--demo",), None, None, False),
    (["prepare-data", "--model", "qwen2.5-3b-instruct"], "prepare_data",
     ("--tokenizer", "Qwen/Qwen2.5-3B-Instruct"), None, [], False),
    (["challenger", "--iteration", "2", "--model", "qwen3-32b", "--", "trainer.total_training_steps=5"],
     "challenger", ("--iteration", "2", "--model", "qwen3-32b", *SGLANG_8, "--", "trainer.total_training_steps=5"),
     H100, ["preflight", "challenger"], True),
    (["gen-data", "--gpu", "H200:4"], "gen_data",
     ("--iteration", "1", "--gpus", "4", "--sglang-dp", "2", "--sglang-tp", "2"),
     {"gpu": "H200:4", "cpu": 32.0, "memory": 4 * 64 * 1024}, ["gen-data", "--dry-run"], True),
    (["solver", "--iteration", "3", "--gpu", "H100:1", "--no-detach"], "solver",
     ("--iteration", "3", "--gpus", "1", "--rollout-tp", "1"), {"gpu": "H100:1", "cpu": 8.0, "memory": 64 * 1024},
     ["preflight", "solver"], False),
    (["merge", "--stage", "challenger", "--iteration", "2"], "merge", ("--stage", "challenger", "--iteration", "2"),
     H100, ["merge", "--dry-run"], True),
    (["evaluate", "--iteration", "2"], "evaluate",
     ("--model", "/checkpoints/solver_iter2_hf", "--data", "/corpus/data/solver_iter2_val.parquet"), H100, [], True),
    (["train", "--model", "qwen3-32b", "--stage-args=--iterations 2", "--", "trainer.save_freq=10"], "train",
     ("--model", "qwen3-32b", *SGLANG_8, "--iterations", "2", "--", "trainer.save_freq=10"), H100,
     ["evolve", "--dry-run"], True),
    (["list-models"], "list_models", (), None, None, False),
    (["upload-model", "--model", "qwen3-32b"], "download_model", ("Qwen/Qwen3-32B", "Qwen3-32B"), None, None, False),
]


@pytest.mark.parametrize("argv, function, args, options, preflight, detached", CASES,
                         ids=[" ".join(case[0]) for case in CASES])
def test_every_action_calls_its_function_with_the_right_arguments(modal_calls, capsys, argv, function, args, options,
                                                                   preflight, detached, monkeypatch):
    monkeypatch.delenv("DRZERO_MODAL_GPU", raising=False)
    monkeypatch.setattr(mb, "GPU", "H100:8")
    assert mb.cli(argv) == 0
    log = modal_calls
    assert _calls(log, "app.run") == [("app.run", {"detach": detached})]
    assert _calls(log, "spawn") == [("spawn", function, args)]
    assert _calls(log, "with_options") == ([("with_options", function, options)] if options else [])
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
        assert "modal app logs ap-test -f" in out and "modal app stop ap-test" in out and "app ap-test" in out


def test_a_failed_preflight_starts_no_gpu(modal_calls, capsys):
    mb.preflight.result = {"ok": False, "problems": ["/corpus/data/solver_iter1.parquet is missing: `gen-data`"]}
    assert mb.cli(["solver"]) == 1
    assert _calls(modal_calls, "spawn") == []
    assert "no GPU was started" in capsys.readouterr().err


def test_the_required_inputs_name_the_action_that_makes_them():
    required = dict(mb.required_paths("challenger", 2))
    assert "prepare-data" in required["/corpus/data/zero_ratio4321.parquet"]
    assert "merge --stage solver --iteration 1" in required["/checkpoints/solver_iter1_hf"]
    assert "challenger --iteration 1" in dict(mb.required_paths("gen-data", 1))["/checkpoints/challenger_iter1_hf"]
    assert list(dict(mb.required_paths("merge", 3, stage="solver"))) == ["/checkpoints/solver_iter3"]


def test_hydra_overrides_only_for_verl_stages(modal_calls, capsys):
    assert mb.cli(["gen-data", "--", "x=1"]) == 2
    assert "only challenger, solver, train" in capsys.readouterr().err and modal_calls == []


def test_the_seed_guides_modal_run_form_uses_the_running_app(modal_calls):
    mb.main(action="solver", iteration=2, model="qwen3-8b", gpu="H200:8", overrides="trainer.save_freq=5")
    assert _calls(modal_calls, "app.run") == []          # `modal run` started the app already
    (_, _, args), = _calls(modal_calls, "spawn")
    assert args == ("--iteration", "2", "--model", "qwen3-8b", *SGLANG_8[:2], "--", "trainer.save_freq=5")
    assert _calls(modal_calls, "with_options")[0][2]["gpu"] == "H200:8"
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
    estimate = mb.estimate(mb.plan_launch(request), request)
    assert (estimate.gpus, estimate.hours, estimate.gpu_hours) == (8, 24.0, 192.0)
    assert estimate.dollars == 768.0 and estimate.dollars / estimate.hours == 32.0
    assert estimate.dollars_per_attempt_cap == 768.0 and estimate.attempts == 6
    request = mb.Request("solver", gpu="H200:4", hours=10, price_per_gpu_hour=5.5)
    estimate = mb.estimate(mb.plan_launch(request), request)
    assert estimate.gpu_hours == 40.0 and estimate.dollars == 220.0
    assert "40 GPU-hours ~ $220 at $5.50/GPU-hour" in "\n".join(estimate.lines())
    assert mb.estimate(mb.plan_launch(mb.Request("list-models")), mb.Request("list-models")) is None


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
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.uploads = []

    def read_file(self, path):
        if path.lstrip("/") not in self.files:
            raise modal.exception.NotFoundError(f"{path} not found")
        yield self.files[path.lstrip("/")]

    def read_file_into_fileobj(self, path, handle):
        handle.write(b"".join(self.read_file(path)))

    def listdir(self, path, recursive=False):
        from modal.volume import FileEntryType

        found = [SimpleNamespace(path=name, type=FileEntryType.FILE) for name in self.files
                 if name.startswith(path.strip("/") + "/")]
        if not found:
            raise modal.exception.NotFoundError(f"{path} not found")
        return found

    @contextlib.contextmanager
    def batch_upload(self, force=False):
        batch = SimpleNamespace(put_directory=lambda local, remote: self.uploads.append(("dir", local, remote)),
                                put_file=lambda local, remote: self.uploads.append(("file", local, remote)))
        yield batch


def test_status_reads_state_json_and_adds_up_the_recorded_gpu_time(monkeypatch, capsys):
    files = {"state.json": json.dumps(STATE).encode(), **{k: json.dumps(v).encode() for k, v in RUNS.items()}}
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume(files))
    assert mb.cli(["status", "--price-per-gpu-hour", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 recorded are done" in out
    assert "iter1/merge-challenger  running" in out
    assert "20.0 GPU-h  $    80.00" in out                       # 2.5 h x 8 GPUs
    assert "12.0 GPU-h  $    48.00  running, last seen 2026-11-26T14:01:00Z" in out
    assert "cost so far: 32.0 GPU-hours ~ $128.00 at $4.00/GPU-hour" in out


def test_status_before_any_run(monkeypatch, capsys):
    monkeypatch.setattr(mb, "checkpoints_volume", FakeVolume({}))
    assert mb.cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "no stage has run" in out and "cost so far: 0.0 GPU-hours" in out


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
