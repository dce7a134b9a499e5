"""Outputs replaced as a set: drzero.atomic, and prepare-data killed with SIGKILL between its renames."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from conftest import drzero_command
from drzero.atomic import (commit_set, parquet_writer, remove_temporaries, verify_set, write_json_atomically,
                           write_text_atomically)
from drzero.config import ConfigError
from drzero.data.gen_data import GenDataJob, check_seed_set
from drzero.pipeline import EvolveConfig, RunState
from drzero.stages.prepare_data import plan_in_run as plan_prepare_data

# Runs a drzero command and SIGKILLs it right after it renames a file to the name in $KILL_AFTER_RENAME:
# a real kill -9 at the one point a set of renames can be interrupted.
KILL_AFTER_RENAME = textwrap.dedent("""
    import os, signal, sys
    target, real = os.environ["KILL_AFTER_RENAME"], os.replace
    def replace(source, destination, *args, **kwargs):
        real(source, destination, *args, **kwargs)
        if os.path.basename(str(destination)) == target:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from drzero.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _rows(path) -> int:
    return pq.read_metadata(path).num_rows


def test_a_committed_set_verifies_and_any_change_is_caught(tmp_path):
    manifest = tmp_path / "set.manifest.json"
    written = commit_set({tmp_path / "a.parquet": parquet_writer([{"x": 1}, {"x": 2}]),
                          tmp_path / "b.txt": lambda t: t.write_text("hello")}, manifest, {"what": "test"})
    assert written["files"]["a.parquet"]["rows"] == 2 and written["what"] == "test"
    assert json.loads(manifest.read_text()) == written
    assert verify_set(manifest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.txt", "set.manifest.json"]

    (tmp_path / "b.txt").write_text("HELLO")  # same size, other bytes
    assert "SHA-256" in verify_set(manifest)
    (tmp_path / "b.txt").unlink()
    assert verify_set(manifest) == "b.txt is missing"
    manifest.write_text("")
    assert verify_set(manifest) == "set.manifest.json is damaged: it is empty"
    manifest.write_text(json.dumps({"rows": 2}))
    assert verify_set(manifest) == 'set.manifest.json is damaged: it has no "files"'
    manifest.write_text(json.dumps({"files": {"a.parquet": 5}}))  # once an AttributeError
    assert verify_set(manifest) == 'set.manifest.json is damaged: files["a.parquet"] is an integer (5), not an object'


def test_a_failed_writer_leaves_the_old_set_untouched_and_no_temporary(tmp_path):
    manifest = tmp_path / "set.manifest.json"
    commit_set({tmp_path / "a.txt": lambda t: t.write_text("old")}, manifest, {})

    def broken(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit_set({tmp_path / "a.txt": lambda t: t.write_text("new"), tmp_path / "b.txt": broken}, manifest, {})
    assert (tmp_path / "a.txt").read_text() == "old" and verify_set(manifest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "set.manifest.json"]


def test_leftover_temporaries_are_removed_by_name(tmp_path):
    (tmp_path / ".a.parquet.x1.tmp").write_text("left by a kill")
    (tmp_path / ".other.parquet.x2.tmp").write_text("someone else's")
    assert [p.name for p in remove_temporaries(tmp_path, ["a.parquet"])] == [".a.parquet.x1.tmp"]
    assert (tmp_path / ".other.parquet.x2.tmp").exists()


def test_single_writes_are_durable(tmp_path, monkeypatch):
    """The file and then its directory are fsync'd: a power loss cannot lose a rename that returned."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_json_atomically({"a": 1}, tmp_path / "s.json")
    assert synced == ["file", "dir"]
    write_text_atomically("x", tmp_path / "t.txt")
    assert synced[2:] == ["file", "dir"]


def test_prepare_data_killed_between_renames_is_never_taken_for_done(demo_db, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "data" / "zero_ratio4321.parquet"
    val, manifest = out.with_name("zero_ratio4321_val.parquet"), out.with_name("zero_ratio4321.manifest.json")
    args = ["prepare-data", "--db", str(demo_db), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out),
            "--val-rows", "8"]
    first = subprocess.run(drzero_command(*args, "--rows", "40"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert verify_set(manifest) is None and _rows(out) == 40

    # A second run with other rows, SIGKILLed right after the train parquet is renamed into place.
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, *args, "--rows", "60", "--val-rows", "9"],
                            env={**os.environ, "KILL_AFTER_RENAME": out.name}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _rows(out) == 60 and _rows(val) == 8           # a new train file beside the old validation file ...
    assert not manifest.exists()                           # ... but no manifest claims them as a set
    assert verify_set(manifest) is not None
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(name.startswith(".zero_ratio4321_val.parquet.") for name in leftovers)

    # gen-data refuses the seeds, and evolve does not count prepare-data as done
    with pytest.raises(ConfigError, match="seed files and their manifest do not agree.*prepare-data"):
        check_seed_set(GenDataJob(iteration=1, seeds=str(out), tokenizer=str(tiny_tokenizer_dir)))
    evolve = EvolveConfig(db=str(demo_db), data_dir=str(out.parent), checkpoints=str(tmp_path / "ckpt"),
                          model=str(tiny_tokenizer_dir), logger="console")
    assert not RunState(tmp_path / "ckpt" / "state.json").is_done("prepare-data", plan_prepare_data(evolve))

    again = subprocess.run(drzero_command(*args, "--rows", "60", "--val-rows", "9"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert verify_set(manifest) is None and _rows(out) == 60 and _rows(val) == 9
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # the killed run's temporaries
    assert RunState(tmp_path / "ckpt" / "state.json").is_done("prepare-data", plan_prepare_data(evolve))
