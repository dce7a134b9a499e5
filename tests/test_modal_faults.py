"""Issue 29, the Modal items: what a new user hits against modal 1.6.4's real client, each answered in one sentence
with the next step, never a traceback. The fakes raise what modal raises (tests/test_modal_fakes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

modal = pytest.importorskip("modal")
from backends import modal as mb  # noqa: E402
from backends import modal_cluster as mc  # noqa: E402
from backends import modal_ops as mo  # noqa: E402
from backends import modal_plan as mp  # noqa: E402
from test_modal_backend import REPO, FakeSecret, FakeVolume, _calls, _launched, fake_modal  # noqa: E402


@pytest.fixture
def modal_calls(monkeypatch):
    return fake_modal(monkeypatch)


@pytest.fixture
def volumes(monkeypatch):
    """Fresh volumes, as after `modal volume create`: nothing on them yet."""
    checkpoints, corpus = FakeVolume({}), FakeVolume({})
    monkeypatch.setattr(mb, "checkpoints_volume", checkpoints)
    monkeypatch.setattr(mb, "corpus_volume", corpus)
    return checkpoints, corpus


# -- 1. a missing file on a volume -----------------------------------------------------------------


def test_status_on_a_fresh_volume_says_what_to_do_first(volumes, capsys):
    assert mb.cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "state.json: none yet on dr-zero-checkpoints (no stage has run)" in out
    assert "next: python -m backends.modal train   (after upload-corpus and download-model" in out


def test_resume_on_a_fresh_volume_has_nothing_to_resume(modal_calls, volumes, capsys):
    assert mb.cli(["resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resume: nothing to resume") and "backends.modal train" in err[0]
    assert _calls(modal_calls, "spawn") == []


def test_resume_before_any_state_json_runs_every_stage(modal_calls, capsys):
    volume, _ = _launched(modal_calls, ["train", "--stage-args=--iterations 1"])   # launched, no stage ran yet
    assert "state.json" not in volume.files
    modal_calls.clear()
    capsys.readouterr()
    assert mb.cli(["resume"]) == 0
    out = capsys.readouterr().out
    assert "  run     prepare-data" in out and "  run     iter1/merge-solver" in out
    assert len(_calls(modal_calls, "spawn")) == 1


def test_status_of_a_model_uploaded_with_path_has_no_download_record(volumes, capsys):
    _, corpus = volumes
    corpus.files.update({"models/Qwen3-8B/config.json": b"{}", "models/Qwen3-8B/model.safetensors": b"w"})
    assert mb.cli(["status"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["qwen3-8b"])
    assert line.endswith("present")


def test_download_checkpoints_of_a_missing_file_says_so_and_leaves_no_empty_file(volumes, tmp_path, capsys):
    checkpoints, _ = volumes
    checkpoints.files.update({"solver_iter2_hf/config.json": b"{}", "solver_iter2_hf/model.safetensors": b"w"})
    assert mb.cli(["download-checkpoints", "--iteration", "2", "--path", str(tmp_path)]) == 0   # no state.json yet
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "solver_iter2_hf", "solver_iter2_hf/config.json", "solver_iter2_hf/model.safetensors"]
    assert "state.json: not on dr-zero-checkpoints" in capsys.readouterr().err

    class Vanishing(FakeVolume):  # listed, then gone when read (a run still writing, or a file removed meanwhile)
        def listdir(self, path, *, recursive=False):
            return super().listdir(path, recursive=recursive) + [
                modal.volume.FileEntry("solver_iter2_hf/shard-2.safetensors", modal.volume.FileEntryType.FILE, 0, 9)]

    target = tmp_path / "again"
    volume = Vanishing(dict(checkpoints.files))
    assert mo.download_checkpoints(mb.Request("download-checkpoints", iteration=2, path=str(target)), volume) == 1
    assert not (target / "solver_iter2_hf" / "shard-2.safetensors").exists()
    assert not list(target.rglob("*.part")) and (target / "solver_iter2_hf" / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("name, text", [
    ("state.json", b'{"stages": {"iter1/challenger": "done", "iter1/solver": null, "prepare-data": {"status": 5}}}'),
    ("state.json", b'{"stages": '), ("state.json", b'"x"'), ("runs/a.json", b'{"command": 5}'),
    ("runs/b.json", b"not json"), ("launches/2026-01-01T000000Z-train.json", b'{"launch": []}'),
    ("eval/iter1/summary.json", b'{"overall": {"em": "high"}}'),
])
def test_a_damaged_file_on_the_volume_is_named_not_a_traceback(volumes, capsys, name, text):
    checkpoints, _ = volumes
    checkpoints.files.update({"state.json": json.dumps({"stages": {"iter1/evaluate": {"status": "done"}}}).encode(),
                              name: text})
    assert mb.cli(["status"]) == 0
    out, err = capsys.readouterr()
    assert "cost so far" in out
    if name == "state.json":
        assert "state.json" in out and ("damaged" in out or "not valid JSON" in out or "no `stages`" in out)
    if name.startswith("runs/"):
        assert f"{name} on dr-zero-checkpoints is not a GPU time record" in err
    assert mb.cli(["resume"]) in (0, 1)  # no launch recorded (or only a damaged one): nothing to resume


# -- 2. and 3. logs ------------------------------------------------------------------------------------


def test_logs_since_with_follow_is_refused_in_one_sentence(modal_calls, monkeypatch, capsys):
    _launched(modal_calls, ["solver"])
    monkeypatch.setattr(mo, "log_lines", lambda command: pytest.fail("modal's CLI must not be called"))
    capsys.readouterr()
    assert mb.cli(["logs", "--since", "2h", "--follow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot combine it with --since: drop one" in err[0]


def test_logs_do_not_exit_0_when_modals_cli_fails(modal_calls, monkeypatch, tmp_path, capsys):
    """The real `modal app logs`, run without credentials: it fails, and so must we."""
    for variable in [v for v in os.environ if v.startswith("MODAL_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / ".modal.toml"))
    assert mb.cli(["logs", "ap-test"]) == 1
    assert mb.cli(["logs", "ap-test", "--errors"]) == 1
    err = capsys.readouterr().err
    assert "logs: `modal app logs` failed (exit 1): Error: Token missing." in err


def test_logs_without_since_read_the_whole_run_not_modals_last_100_entries(modal_calls, monkeypatch, capsys):
    _, record = _launched(modal_calls, ["solver"])
    commands = []
    monkeypatch.setattr(mo, "log_lines", lambda command: commands.append(command) or iter(["[solver] step:1\n"]))
    for argv in (["logs"], ["logs", "--errors"]):
        assert mb.cli(argv) == 0
        started = datetime.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        assert commands[-1][-5:] == ["app", "logs", "ap-test", "--since",
                                     (started - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert mb.cli(["logs", "ap-unrecorded"]) == 0   # an app we have no record of: as far back as modal tails
    assert commands[-1][-5:] == ["app", "logs", "ap-unrecorded", "--tail", "20000"]
    assert mb.cli(["logs", "--follow"]) == 0 and commands[-1][-2:] == ["ap-test", "-f"]


@pytest.mark.parametrize("since", ["2026-11-26T10:00:00.5Z", "2026-11-26T10:00:00.250+00:00", "0s", "36d", "2h30m",
                                   "yesterday", "2099-01-01"])
def test_since_refuses_what_modal_refuses(modal_calls, capsys, since):
    _launched(modal_calls, ["solver"])
    capsys.readouterr()
    assert mb.cli(["logs", "--since", since]) == 2
    assert capsys.readouterr().err.startswith(f"logs: --since {since!r}")


def test_since_takes_what_modal_takes():
    now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    for since in ("30m", "2h", "1d", "35d", "2026-11-26", "2026-11-26T10:00:00Z", "2026-11-26T10:00:00+01:00"):
        assert mo.since_time(since, now) < now


# -- 4. and 5. clusters --------------------------------------------------------------------------------


@pytest.fixture
def cluster_run(modal_calls, monkeypatch):
    """The cluster app's run replaced: what it raises is the test's."""
    outcome = {}

    def run(**kwargs):
        raise outcome["error"]

    monkeypatch.setattr(mc.app, "run", run)
    monkeypatch.setattr(mp, "GPU", "H100:8")
    return outcome


@pytest.mark.parametrize("gpu", ["H100:4", "H200:1", "H100!:2"])
def test_a_cluster_node_takes_all_8_gpus_of_its_host(cluster_run, capsys, gpu):
    cluster_run["error"] = AssertionError("nothing may start")
    assert mb.cli(["train", "--nodes", "2", "--gpu", gpu]) == 2
    err = capsys.readouterr().err
    assert f"--gpu {gpu} on 2 nodes is not valid: each node of a Modal cluster takes all 8 GPUs of its host" in err


@pytest.mark.parametrize("error, says", [
    (modal.exception.InvalidError("Function cluster_2 requests a cluster, which is not available"),
     "multi-node clusters are a feature Modal enables per workspace"),
    (modal.exception.PermissionDeniedError("Multi-node clusters are not enabled for this workspace"),
     "multi-node clusters are a feature Modal enables per workspace"),
    (modal.exception.ImageBuildError("Image build for im-123 failed. See build logs for more details.", "im-123"),
     "train: Modal stopped the launch (ImageBuildError: Image build for im-123 failed. See build logs for more "
     "details.); the image build's log is above"),
    (modal.exception.NotFoundError("Volume 'dr-zero-corpus' not found in environment 'main'"),
     "train: Modal stopped the launch (NotFoundError: Volume 'dr-zero-corpus' not found"),
    (modal.exception.InvalidError("ephemeral_disk must be at most 3145728 MiB"),
     "train: Modal stopped the launch (InvalidError: ephemeral_disk must be at most"),
    (modal.exception.ResourceExhaustedError("no capacity for 2 x 8 H100 in a cluster right now"),
     "train: Modal stopped the launch (ResourceExhaustedError: no capacity"),
])
def test_only_a_cluster_refusal_reads_as_one(cluster_run, capsys, error, says):
    cluster_run["error"] = error
    assert mb.cli(["train", "--nodes", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert ("enables per workspace" in err[0]) == mc.is_refusal(error)


# -- 6. secrets, the SINCE pattern, the estimate --------------------------------------------------------


def test_a_missing_wandb_secret_stops_training_in_one_sentence(modal_calls, capsys):
    FakeSecret.missing = {"wandb-secret"}
    assert mb.cli(["train"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: Modal has no secret 'wandb-secret' holding WANDB_API_KEY")
    assert "`modal secret create wandb-secret WANDB_API_KEY=<your W&B key>`" in err[0]
    assert _calls(modal_calls, "app.run") == [] and _calls(modal_calls, "spawn") == []


def test_actions_that_do_not_train_need_no_secret(modal_calls, capsys):
    FakeSecret.missing = {"wandb-secret", "huggingface-secret"}
    for argv in (["smoke"], ["list-models"], ["merge"], ["gen-data"]):
        assert mb.cli(argv) == 0, argv
    assert mb.cli(["download-model", "qwen3-8b"]) == 0   # public weights need no token: a note, not a refusal
    assert "note: Modal has no secret 'huggingface-secret'" in capsys.readouterr().err
    assert all("secrets" not in options for _, _, options in _calls(modal_calls, "with_options"))
    assert mb.cli(["train", "--stage-args=--logger console"]) == 0   # training without W&B needs no W&B key


def test_the_estimate_names_the_gpu_without_the_pin_mark():
    request = mb.Request("train", gpu="H100!:8", price_per_gpu_hour=4.0)
    text = "\n".join(mo.estimate(mb.plan_launch(request), request).lines())
    assert "on 8 x H100 = 192 GPU-hours" in text and "H100!" not in text


def test_cli_subprocess_status_on_an_unreachable_modal_is_one_sentence(tmp_path):
    """No credentials at all: the real client refuses at once, and the user reads one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / ".modal.toml"))
    done = subprocess.run([sys.executable, "-m", "backends.modal", "status"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("log in with `modal token new`")
