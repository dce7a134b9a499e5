"""Seed sets that a kill or a damaged manifest left behind: the dry runs say so, evolve does prepare-data again.

Issue 29, items 9 and 10: a seed manifest that is truncated, empty, not an object or missing what its readers read
once crashed preflight (JSONDecodeError, AttributeError) and blocked `drzero evolve`; a kill between prepare-data's
new train file and its manifest left a set that `challenger --dry-run` called ok and `gen-data --dry-run` passed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import drzero_command
from drzero import pipeline
from drzero.checks import Check
from drzero.cli import main
from drzero.pipeline import EvolveConfig, evolve
from test_atomic import KILL_AFTER_RENAME
from test_pipeline import GPUStandIn

DAMAGED_MANIFESTS = {
    "truncated": ('{"rows": 22', "it is not JSON (Expecting ',' delimiter"),
    "empty": ("", "it is empty"),
    "a string": ('"x"', 'it is a string ("x"), not an object'),
    "missing keys": ('{"prompt_tokens": 5}', 'it has no "files"'),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    return run_tiny_model(TinyModelConfig(out=str(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture(scope="module")
def seed_data(demo_db, tiny_model, tmp_path_factory) -> Path:
    """A data directory holding a committed seed set (`drzero prepare-data`, 40 rows)."""
    from drzero.stages.prepare_data import PrepareDataConfig, run_prepare_data

    data = tmp_path_factory.mktemp("seeds") / "data"
    run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(data / "zero_ratio4321.parquet"), rows=40, val_rows=8,
                                       tokenizer=str(tiny_model)))
    return data


def _run_options(demo_db, data: Path, checkpoints: Path, model: Path) -> list[str]:
    return ["--db", str(demo_db), "--data-dir", str(data), "--checkpoints", str(checkpoints), "--model", str(model),
            "--logger", "console", "--retriever-url", "http://127.0.0.1:8000/retrieve"]


def _copy(seed_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(seed_data, data)
    return data


@pytest.mark.parametrize("case", sorted(DAMAGED_MANIFESTS))
def test_challenger_dry_run_reports_a_damaged_seed_manifest_as_one_failed_check(case, demo_db, tiny_model, seed_data,
                                                                                tmp_path, capsys):
    text, damage = DAMAGED_MANIFESTS[case]
    data = _copy(seed_data, tmp_path)
    (data / "zero_ratio4321.manifest.json").write_text(text)
    assert main(["challenger", "--dry-run", *_run_options(demo_db, data, tmp_path / "ckpt", tiny_model)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "[FAIL]" in line]
    assert failed[0].startswith("  [FAIL] data.train_files: zero_ratio4321.parquet, zero_ratio4321_val.parquet in ")
    assert f"(zero_ratio4321.manifest.json is damaged: {damage}" in failed[0]
    assert failed[0].endswith("run `drzero prepare-data` again (`drzero evolve` does it by itself)")
    assert failed[1:] == ["  [FAIL] data.val_files: part of the same set as data.train_files (above)"]
    assert (data / "zero_ratio4321.manifest.json").read_text() == text  # a dry run moves nothing


@pytest.mark.parametrize("dry", [False, True], ids=["real", "dry"])
@pytest.mark.parametrize("case", ["truncated", "missing keys"])
def test_evolve_prepares_the_data_again_when_the_seed_manifest_is_damaged(case, dry, demo_db, tiny_model, seed_data,
                                                                          tmp_path, monkeypatch, capsys):
    """The manifest is the commit marker: a damaged one means the set is not committed, so prepare-data runs again
    (its manifest moved aside with one sentence) instead of preflight crashing or blocking the run."""
    text, damage = DAMAGED_MANIFESTS[case]
    data = _copy(seed_data, tmp_path)
    manifest = data / "zero_ratio4321.manifest.json"
    manifest.write_text(text)
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    monkeypatch.setattr(pipeline, "machine_check", lambda plans: Check("machine", True))  # no GPU here
    monkeypatch.setattr(pipeline, "resolved_config", lambda plan: "{}")  # the dry run's `verl --cfg job`
    cfg = EvolveConfig(iterations=1, db=str(demo_db), data_dir=str(data), checkpoints=str(tmp_path / "ckpt"),
                       model=str(tiny_model), logger="console", retriever_url="http://127.0.0.1:8000/retrieve",
                       dry_run=dry)
    assert evolve(cfg) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("evolve: warning:")]
    assert len(warnings) == 1 and f"zero_ratio4321.manifest.json is damaged: {damage}" in warnings[0], out
    assert "Traceback" not in out and "preflight found" not in out
    if dry:
        assert warnings[0].endswith("a real run moves it aside and prepare-data runs again to write it")
        assert f"data.train_files: {data / 'zero_ratio4321.parquet'} will be written by an earlier stage" in out
        assert manifest.read_text() == text and runner.ran == []
    else:
        aside = [p.name for p in data.glob("zero_ratio4321.manifest.json.damaged-*")]
        assert len(aside) == 1 and warnings[0].endswith(f"moved it to {aside[0]} and prepare-data runs again to "
                                                        f"write it")
        assert runner.ran[0] == "prepare-data" and "challenger (iteration 1)" in runner.ran


def test_dry_runs_refuse_the_half_replaced_seed_set_a_kill_left(demo_db, tiny_model, tmp_path, capsys):
    """prepare-data SIGKILLed right after its new train file is renamed into place: no manifest, old val file."""
    data = tmp_path / "data"
    out = data / "zero_ratio4321.parquet"
    args = ["prepare-data", "--db", str(demo_db), "--tokenizer", str(tiny_model), "--out", str(out)]
    first = subprocess.run(drzero_command(*args, "--rows", "40", "--val-rows", "8"), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, *args, "--rows", "60", "--val-rows", "9"],
                            env={**os.environ, "KILL_AFTER_RENAME": out.name}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (data / "zero_ratio4321.manifest.json").exists()
    options = _run_options(demo_db, data, tmp_path / "ckpt", tiny_model)

    assert main(["challenger", "--dry-run", *options]) == 1
    said = capsys.readouterr().out
    assert "[  ok] data.train_files" not in said and "[  ok] data.val_files" not in said
    assert ("[FAIL] data.train_files: zero_ratio4321.parquet, zero_ratio4321_val.parquet in " + str(data) + " are not "
            "a committed set (zero_ratio4321.manifest.json is missing: a `drzero prepare-data` was interrupted, or the "
            "files were changed by hand); run `drzero prepare-data` again") in said

    (tmp_path / "ckpt" / "challenger_iter1_hf").mkdir(parents=True)  # the merged proposer gen-data would serve
    with pytest.raises(SystemExit) as refused:
        main(["gen-data", "--dry-run", *options, "--sglang-url", "http://127.0.0.1:8001"])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gen-data (iteration 1) refused: zero_ratio4321.parquet, " in error
    assert "zero_ratio4321.manifest.json is missing" in error and "run `drzero prepare-data` again" in error
