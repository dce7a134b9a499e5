"""`serve-retriever --copy-to-local DIR`: copy the store to local disk without ever deleting what is not ours.

SQLite on a network volume is unreliable, so the retriever can serve a local copy. The target is
a path a user typed, so the copy never removes anything it did not make: it refuses a target
that is, contains or lies inside the store, and a non-empty directory that lacks the marker file
an earlier copy left. The copy is written into a fresh directory beside the target and renamed
into place, so the final name holds the old copy or the new one, never half of either; only a
directory carrying the marker (an earlier copy, or a staging directory a killed run left) is
ever removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from drzero.atomic import fsync_directory
from drzero.corpus.store import StoreError

log = logging.getLogger(__name__)

COPY_MARKER = ".drzero-local-copy.json"  # in every directory this module writes; nothing else is removed
_STAGING = "drzero-copy"  # staging and set-aside directories are named `.{target}.drzero-copy-*`


def _is_inside(path: Path, other: Path) -> bool:
    return path == other or path.is_relative_to(other)


def _is_our_copy(directory: Path) -> bool:
    return (directory / COPY_MARKER).is_file()


def _check_target(source: Path, target: Path) -> None:
    """Raise StoreError (one sentence) unless ``target`` may receive a copy of ``source``."""
    real_source, real_target = source.resolve(), target.resolve()
    advice = "pass --copy-to-local a new directory outside the store (e.g. /tmp/drzero-corpus)"
    if real_target == real_source:
        raise StoreError(f"--copy-to-local {target} is the store itself (--db {source}); {advice}.")
    if _is_inside(real_target, real_source):
        raise StoreError(f"--copy-to-local {target} lies inside the store --db {source}; {advice}.")
    if _is_inside(real_source, real_target):
        raise StoreError(f"--copy-to-local {target} contains the store --db {source}, and replacing it would "
                         f"delete the store; {advice}.")
    if target.exists() and not target.is_dir():
        raise StoreError(f"--copy-to-local {target} is a file, not a directory; {advice}.")
    if target.is_dir() and any(target.iterdir()) and not _is_our_copy(target):
        raise StoreError(f"--copy-to-local {target} is a non-empty directory that no earlier `drzero "
                         f"serve-retriever --copy-to-local` made (it has no {COPY_MARKER}), so it is left as it is; "
                         f"{advice}, or empty this one yourself.")


def _remove_leftovers(target: Path) -> None:
    """Staging or set-aside directories a killed run left beside ``target`` (only ones carrying the marker)."""
    for leftover in target.parent.glob(f".{target.name}.{_STAGING}-*"):
        if leftover.is_dir() and _is_our_copy(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def copy_store_to_local(source: Path, target: Path) -> Path:
    """Copy the store at ``source`` to ``target`` (fresh, empty, or an earlier copy) and return ``target``."""
    if not source.is_dir():
        raise StoreError(f"no corpus at {source}: the directory does not exist; nothing to copy to {target}.")
    _check_target(source, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    size = _size(source)
    free = shutil.disk_usage(target.parent).free
    if size > free:
        raise StoreError(f"--copy-to-local {target}: the store is {size / 1e6:.0f} MB but only {free / 1e6:.0f} MB "
                         f"are free there; free space or pick a larger disk.")
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{_STAGING}-"))
    aside = None
    try:
        # The marker goes in first, so a run killed mid-copy leaves a directory the next run may remove.
        (staging / COPY_MARKER).write_text(json.dumps({"source": str(source.resolve()), "copied_at": time.time()}))
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COPY_MARKER))
        if target.exists():  # empty, or an earlier copy: set it aside, then rename the new copy in
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{_STAGING}-old-"))
            (aside / COPY_MARKER).touch()
            os.replace(target, aside / "copy")
        os.replace(staging, target)
        fsync_directory(target.parent)
    except BaseException:
        if aside is not None and not target.exists() and (aside / "copy").exists():
            os.replace(aside / "copy", target)  # put the earlier copy back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    log.info("copied %s to %s (%.1f MB) in %.1fs", source, target, size / 1e6, time.perf_counter() - started)
    return target
