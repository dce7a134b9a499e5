"""Weights from the hub into a models directory, against a local directory that plays the hub.

The fake hub is a directory of files and the manifest the hub would give for it (sizes, sha256 for the
large files, git's blob sha1 for the small ones); ``fetch`` copies the asked-for files as snapshot_download
would. The download logic, resume and verification are drzero's own code path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from drzero.models import download as md

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(root: Path) -> md.Manifest:
    files = {"config.json": b'{"architectures": ["Qwen2ForCausalLM"]}\n', "tokenizer.json": b'{"model": {}}\n' * 50,
             "model-00001-of-00002.safetensors": bytes(range(256)) * 400,
             "model-00002-of-00002.safetensors": bytes(reversed(range(256))) * 300}
    entries = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name.endswith(".safetensors"):  # LFS/xet files carry a sha256
            entries.append(md.HubFile(name, len(data), sha256=hashlib.sha256(data).hexdigest()))
        else:                              # the others git's blob id
            entries.append(md.HubFile(name, len(data), git_sha1=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()))
    return md.Manifest("Qwen/Fake-1B", REVISION, tuple(entries))


class Hub:
    def __init__(self, root: Path, target: Path, corrupt: set[str] = frozenset()):
        self.root, self.target, self.corrupt, self.calls = root, target, set(corrupt), []

    def fetch(self, paths):
        self.calls.append(sorted(paths))
        for path in paths:
            (self.target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / path, self.target / path)
            if path in self.corrupt:  # same size, one byte flipped: only the hash can tell
                data = bytearray((self.target / path).read_bytes())
                data[10] ^= 0xFF
                (self.target / path).write_bytes(bytes(data))


@pytest.fixture
def hub(tmp_path):
    (tmp_path / "hub").mkdir()
    manifest = _fake_hub(tmp_path / "hub")
    return manifest, Hub(tmp_path / "hub", tmp_path / "models" / "Fake-1B")


def test_a_fresh_download_fetches_in_batches_commits_after_each_and_records_the_revision(hub):
    manifest, fake = hub
    commits, lines = [], []
    result = md.download(manifest, fake.target, fake.fetch, commit=lambda: commits.append(1), log=lines.append,
                         batch_bytes=50_000)
    assert result == {"path": str(fake.target), "size": manifest.size, "fetched": manifest.size, "skipped": False}
    # small files first, then one batch per ~50 kB: config and tokenizer are usable before the weights
    assert fake.calls == [["config.json", "tokenizer.json"], ["model-00002-of-00002.safetensors"],
                          ["model-00001-of-00002.safetensors"]]
    assert len(commits) == 4  # after each batch, and once more with the verified marker
    assert md.local_state(fake.target) == "verified" and md.recorded_revision(fake.target) == REVISION
    assert not md.verify(fake.target, manifest)
    assert any("100%" in line for line in lines) and lines[-1].endswith(f"{md.human(manifest.size)} verified")


def test_a_stopped_download_continues_with_only_the_missing_and_truncated_files(hub):
    manifest, fake = hub
    fake.target.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        shutil.copyfile(fake.root / name, fake.target / name)
    truncated = fake.target / "model-00001-of-00002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])   # the container was stopped mid-file
    md.write_marker(fake.target, manifest, complete=False)
    assert md.local_state(fake.target) == "incomplete"
    lines = []
    md.download(manifest, fake.target, fake.fetch, log=lines.append)
    assert fake.calls == [["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]]
    assert "2 already here" in lines[0] and md.local_state(fake.target) == "verified"


def test_a_file_whose_hash_differs_is_fetched_again_and_a_second_mismatch_fails_naming_it(hub):
    manifest, fake = hub
    name = "model-00002-of-00002.safetensors"
    fake.corrupt = {name}
    with pytest.raises(md.DownloadError, match=f"{name}: sha256 .* the hub has {manifest.files[3].sha256[:12]}"):
        md.download(manifest, fake.target, fake.fetch, log=lambda line: None)
    assert fake.calls[-1] == [name] and md.local_state(fake.target) == "incomplete"

    fake.corrupt = set()  # the next run continues and the second fetch heals it
    fake.calls.clear()
    md.download(manifest, fake.target, fake.fetch, log=lambda line: None)
    assert fake.calls == [[name]]  # the sizes agree: only the hash check finds it
    assert md.local_state(fake.target) == "verified"


def test_a_small_file_is_checked_against_gits_blob_id(hub):
    manifest, fake = hub
    md.download(manifest, fake.target, fake.fetch, log=lambda line: None)
    (fake.target / "config.json").write_bytes(b'{"architectures": ["Qwen2ForCausalLX"]}\n')  # same size
    assert md.verify(fake.target, manifest) == [
        f"config.json: git sha1 {md.file_hashes(fake.target / 'config.json', git=True)[1][:12]}..., the hub has "
        f"{manifest.files[0].git_sha1[:12]}..."]


@pytest.mark.skipif(shutil.which("git") is None, reason="git checks our blob id against its own")
def test_the_blob_id_is_gits(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"weights and biases\n" * 3)
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert md.file_hashes(path, git=True)[1] == git


def test_a_complete_model_is_skipped_and_a_new_revision_fetches_what_changed(hub):
    manifest, fake = hub
    md.download(manifest, fake.target, fake.fetch, log=lambda line: None)
    fake.calls.clear()
    lines = []
    assert md.download(manifest, fake.target, fake.fetch, log=lines.append)["skipped"]
    assert fake.calls == [] and "already complete" in lines[0]

    (fake.root / "tokenizer.json").write_bytes(b'{"model": {"v": 2}}\n' * 60)
    data = (fake.root / "tokenizer.json").read_bytes()
    files = tuple(md.HubFile(f.path, len(data), git_sha1=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
                  if f.path == "tokenizer.json" else f for f in manifest.files)
    md.download(md.Manifest(manifest.repo_id, "f" * 40, files), fake.target, fake.fetch, log=lambda line: None)
    assert fake.calls == [["tokenizer.json"]] and md.recorded_revision(fake.target) == "f" * 40


def test_local_state_tells_missing_present_incomplete_and_verified(tmp_path, hub):
    manifest, _ = hub
    assert md.local_state(tmp_path / "none") == "missing"
    (tmp_path / "uploaded").mkdir()
    (tmp_path / "uploaded" / "config.json").write_text("{}")
    assert md.local_state(tmp_path / "uploaded") == "present"
    md.write_marker(tmp_path / "partial", manifest, complete=False)
    assert md.local_state(tmp_path / "partial") == "incomplete"
    assert json.loads((tmp_path / "partial" / md.MARKER).read_text())["size"] == manifest.size


def test_list_models_shows_each_models_state_and_stages_do_not_load_a_download_under_way(tmp_path, hub, monkeypatch):
    from drzero.models.registry import render_registry, resolve_model

    manifest, _ = hub
    monkeypatch.setenv("DRZERO_MODELS_DIR", str(tmp_path / "models"))
    for name in ("Qwen3-8B", "Qwen3-14B"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    md.write_marker(tmp_path / "models" / "Qwen3-8B", manifest, complete=True)
    md.write_marker(tmp_path / "models" / "Qwen3-14B", manifest, complete=False)
    table = {line.split()[0]: line for line in render_registry().splitlines()[1:-1]}
    assert "Qwen3-8B (verified)" in table["qwen3-8b"] and "Qwen3-14B (incomplete)" in table["qwen3-14b"]
    assert "Qwen3-32B (missing)" in table["qwen3-32b"]
    assert resolve_model("qwen3-8b").local and not resolve_model("qwen3-14b").local


def test_the_manifest_reads_the_hubs_model_info(monkeypatch):
    """huggingface_hub's own ModelInfo, built from an API answer shaped as the hub sends it."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import ModelInfo

    answer = {"id": "Qwen/Fake-1B", "sha": REVISION, "siblings": [
        {"rfilename": ".gitattributes", "size": 1519, "blobId": "a" * 40},
        {"rfilename": "config.json", "size": 41, "blobId": "b" * 40},
        {"rfilename": "model.safetensors", "size": 1000, "blobId": "c" * 40,
         "lfs": {"sha256": "d" * 64, "size": 1000, "pointerSize": 134}}]}
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, revision=None, files_metadata=False: ModelInfo(**answer))
    manifest = md.hub_manifest("Qwen/Fake-1B")
    assert manifest.revision == REVISION and manifest.size == 1041
    assert manifest.files == (md.HubFile("config.json", 41, git_sha1="b" * 40),
                              md.HubFile("model.safetensors", 1000, sha256="d" * 64))


@pytest.mark.parametrize("record", ['"x"', "[]", '{"revision": 5, "complete": true}',
                                    '{"repo_id": "Qwen/Fake-1B", "rev', ""])
def test_a_damaged_download_record_is_set_aside_and_every_file_checked_again(hub, record):
    """A record that is not an object once crashed `status`, `list-models` and the download (AttributeError)."""
    manifest, fake = hub
    md.download(manifest, fake.target, fake.fetch, log=lambda line: None)
    (fake.target / md.MARKER).write_text(record)
    assert md.recorded_revision(fake.target) is None and md.local_state(fake.target) == "incomplete"
    fake.calls.clear()
    said = []
    md.download(manifest, fake.target, fake.fetch, log=said.append)
    aside = [p.name for p in fake.target.glob(f"{md.MARKER}.damaged-*")]
    assert len(aside) == 1 and (fake.target / aside[0]).read_text() == record
    assert said[0].startswith(f"{fake.target / md.MARKER} is damaged: it ")
    assert said[0].endswith(f"moved it to {aside[0]} and every file is checked against the hub's sizes and hashes, "
                            f"and what does not match is fetched again")
    assert fake.calls == [] and any("verifying 4 files" in line for line in said)  # all were there: none fetched
    assert md.local_state(fake.target) == "verified" and md.recorded_revision(fake.target) == REVISION
