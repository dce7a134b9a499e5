"""`serve-retriever --copy-to-local DIR` copies the store and never deletes what it did not make."""

import shutil
import subprocess

import pytest

from conftest import drzero_command
from drzero.corpus.store import StoreError
from drzero.retrieval.local_copy import copy_store_to_local


def _tree(directory):
    """Every file under ``directory`` with its bytes: what must survive a refused copy unchanged."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture
def store(tmp_path):
    """A directory shaped like a Chroma store (the copy never opens it)."""
    db = tmp_path / "volume" / "db"
    (db / "3f2a-segment").mkdir(parents=True)
    (db / "chroma.sqlite3").write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 40)
    (db / "3f2a-segment" / "data_level0.bin").write_bytes(b"\1" * 5000)
    return db


@pytest.mark.parametrize("where", ["the store", "the store's parent", "inside the store", "the volume"])
def test_refuses_a_target_that_is_contains_or_lies_in_the_store(store, where):
    target = {"the store": store, "the store's parent": store.parent, "inside the store": store / "local",
              "the volume": store.parent.parent}[where]
    before, volume_before = _tree(store), _tree(store.parent.parent)
    with pytest.raises(StoreError, match="--copy-to-local") as refused:
        copy_store_to_local(store, target)
    assert "\n" not in str(refused.value)
    assert _tree(store) == before and _tree(store.parent.parent) == volume_before
    assert not (store / "local").exists()


def test_refuses_a_target_reached_through_a_symlink_to_the_store(store, tmp_path):
    link = tmp_path / "link-to-db"
    link.symlink_to(store)
    before = _tree(store)
    with pytest.raises(StoreError, match="is the store itself"):
        copy_store_to_local(store, link)
    assert _tree(store) == before


def test_an_unrelated_non_empty_directory_survives_untouched(store, tmp_path):
    unrelated = tmp_path / "home" / "notes"
    unrelated.mkdir(parents=True)
    (unrelated / "thesis.tex").write_text("chapter 1")
    (unrelated / "figures").mkdir()
    (unrelated / "figures" / "plot.png").write_bytes(b"\x89PNG")
    before = _tree(unrelated)
    with pytest.raises(StoreError, match="non-empty directory that no earlier") as refused:
        copy_store_to_local(store, unrelated)
    assert "\n" not in str(refused.value)
    assert _tree(unrelated) == before
    assert sorted(path.name for path in unrelated.parent.iterdir()) == ["notes"]  # no staging left beside it


def test_refuses_a_file(store, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    with pytest.raises(StoreError, match="is a file"):
        copy_store_to_local(store, target)
    assert target.read_text() == "keep me"


def test_copies_into_a_fresh_or_empty_directory(store, tmp_path):
    fresh = tmp_path / "local" / "corpus"
    assert copy_store_to_local(store, fresh) == fresh
    assert {k: v for k, v in _tree(fresh).items() if not k.startswith(".drzero")} == _tree(store)
    empty = tmp_path / "empty"
    empty.mkdir()
    copy_store_to_local(store, empty)
    assert (empty / "chroma.sqlite3").read_bytes() == (store / "chroma.sqlite3").read_bytes()
    assert [p.name for p in (tmp_path / "local").iterdir()] == ["corpus"]  # no staging directory left


def test_an_earlier_copy_is_replaced_whole(store, tmp_path):
    target = tmp_path / "local"
    copy_store_to_local(store, target)
    (target / "stale-from-an-old-corpus.bin").write_bytes(b"old")
    (store / "chroma.sqlite3").write_bytes(b"SQLite format 3\0 the new corpus")
    copy_store_to_local(store, target)
    assert not (target / "stale-from-an-old-corpus.bin").exists()
    assert (target / "chroma.sqlite3").read_bytes() == b"SQLite format 3\0 the new corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "volume"]


def test_a_staging_directory_left_by_a_killed_run_is_cleared(store, tmp_path):
    target = tmp_path / "local"
    copy_store_to_local(store, target)
    leftover = tmp_path / ".local.drzero-copy-abc123"  # what a kill -9 during the copy leaves
    shutil.copytree(target, leftover)
    lookalike = tmp_path / ".local.drzero-copy-not-ours"  # same pattern, no marker: not ours, kept
    lookalike.mkdir()
    (lookalike / "keep").write_text("x")
    copy_store_to_local(store, target)
    assert not leftover.exists() and (lookalike / "keep").read_text() == "x"


def test_the_cli_refuses_copying_the_store_onto_itself_in_one_line(demo_db, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(demo_db, db)
    before = _tree(db)
    result = subprocess.run(drzero_command("serve-retriever", "--db", str(db), "--copy-to-local", str(db),
                                           "--port", "1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is the store itself" in errors[0] and "Traceback" not in result.stderr
    assert _tree(db) == before
