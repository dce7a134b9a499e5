"""Files that a crash never leaves half written, and sets of files that are replaced together.

One file: ``write_atomically`` writes a temporary file beside the target, flushes it to disk,
renames it over the target and flushes the directory, so a reader (or a run after a kill -9 or a
power loss) sees the old file or the new one, never a mix.

A set of files (a train parquet, its validation parquet and their manifest) cannot be renamed in
one step, so the manifest is the commit marker: ``commit_set`` writes every file under a
temporary name, removes the old manifest, renames the files into place, and writes the manifest
last, recording each file's size, rows and SHA-256. ``verify_set`` says whether a manifest exists,
has the shape its readers need (drzero.records) and agrees with the files beside it; a stage is done
only when it does. A run killed anywhere in
between leaves either the old committed set or no manifest at all, and ``remove_temporaries``
clears what it left behind on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from drzero.config import ConfigError
from drzero.records import DamagedRecord, Each, Optional, read_record

MANIFEST_FILES = "files"  # the manifest key that lists the committed files
# what verify_set reads of every manifest; a set's own readers add their keys (drzero.data.seed.SEED_MANIFEST)
COMMITTED_SET = {MANIFEST_FILES: Each({"bytes": int, "sha256": str, "rows": Optional(int)})}


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems (and Windows) refuse fsync on a directory; the rename still happened
    finally:
        os.close(handle)


def temporary_beside(path: Path) -> Path:
    """A new empty file in ``path``'s directory (so the rename is atomic), with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return Path(temporary)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def write_atomically(path: Path | str, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename it to ``path``; ``path`` is untouched if anything fails."""
    path = Path(path)
    temporary = temporary_beside(path)
    try:
        write(temporary)
        _fsync_file(temporary)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(text: str, path: Path | str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json_atomically(data: object, path: Path | str) -> None:
    write_text_atomically(json.dumps(data, indent=2, ensure_ascii=False), path)


def parquet_writer(rows: list[dict]) -> Callable[[Path], None]:
    """A ``write`` for ``write_atomically``/``commit_set`` that stores ``rows`` as one parquet table."""
    def write(temporary: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), temporary, row_group_size=8192)
    return write


def write_parquet_atomically(rows: list[dict], path: Path | str) -> None:
    write_atomically(path, parquet_writer(rows))


def check_writable(directory: Path) -> None:
    """Fail early, with a message naming ``--out``, when nothing can be written in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".drzero-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"out: cannot write to directory {directory} ({error.strerror or error}); "
                          f"pass --out in a writable place.") from error


def remove_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed writer of ``names`` left in ``directory``; return them."""
    removed = []
    if not directory.is_dir():
        return removed
    for name in names:
        for leftover in directory.glob(f".{name}.*.tmp"):
            try:
                leftover.unlink()
                removed.append(leftover)
            except FileNotFoundError:
                pass
    return removed


# -- sets -----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(path: Path, name: str | None = None) -> int | None:
    """Rows of a parquet file (by the name it has or will have), else None."""
    if not (name or path.name).endswith(".parquet"):
        return None
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def describe_file(path: Path, name: str | None = None) -> dict:
    """What a manifest records of one file (``path``, to be called ``name``): size, rows (parquet), SHA-256."""
    entry = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    rows = _rows(path, name)
    if rows is not None:
        entry["rows"] = rows
    return entry


def commit_set(files: dict[Path, Callable[[Path], None]], manifest_path: Path, manifest: dict) -> dict:
    """Write every file of ``files`` (target -> writer), then ``manifest`` as the commit marker.

    All files must lie in the manifest's directory. Returns the manifest as written, with the
    ``files`` entry added. On any error before the manifest is written, the old manifest (if it
    was already removed) is gone, so the set reads as not committed, never as half old, half new.
    """
    directory = manifest_path.parent
    for target in files:
        if target.parent.resolve() != directory.resolve():
            raise ValueError(f"{target} is not in {directory}, the directory of its manifest")
    remove_temporaries(directory, [manifest_path.name, *(target.name for target in files)])
    staged: dict[Path, Path] = {}
    try:
        for target, write in files.items():
            temporary = temporary_beside(target)
            staged[target] = temporary
            write(temporary)
            _fsync_file(temporary)
        described = {target.name: describe_file(temporary, target.name) for target, temporary in staged.items()}
        # From here until the new manifest lands the set is uncommitted: no manifest, no claim.
        manifest_path.unlink(missing_ok=True)
        fsync_directory(directory)
        for target, temporary in staged.items():
            os.replace(temporary, target)
        fsync_directory(directory)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    manifest = {**manifest, MANIFEST_FILES: described}
    write_json_atomically(manifest, manifest_path)
    return manifest


_VERIFIED: dict[tuple, None] = {}  # (path, size, mtime) of files already hashed and found to agree


def read_manifest(manifest_path: Path, shape: dict | None = None) -> dict | None:
    """The manifest when it has ``COMMITTED_SET``'s shape and ``shape``'s; None when there is none; DamagedRecord
    (what is wrong) otherwise."""
    return read_record(manifest_path, {**COMMITTED_SET, **(shape or {})})


def manifest_damage(manifest_path: Path, shape: dict | None = None) -> str | None:
    """What is wrong with the manifest itself (it does not parse, or lacks what its readers need); None when it is
    missing or sound."""
    try:
        read_manifest(manifest_path, shape)
    except DamagedRecord as damage:
        return str(damage)
    return None


def verify_set(manifest_path: Path, shape: dict | None = None) -> str | None:
    """None when ``manifest_path`` exists, has the shape its readers need (``shape``, beyond the files' records)
    and every file it lists is there with its recorded size, rows and hash; otherwise why not, in a few words."""
    try:
        manifest = read_manifest(manifest_path, shape)
    except DamagedRecord as damage:
        return f"{manifest_path.name} is damaged: {damage}"
    if manifest is None:
        return f"{manifest_path.name} is missing"
    files = manifest[MANIFEST_FILES]
    if not files:
        return f"{manifest_path.name} lists no files"
    for name, recorded in files.items():
        path = manifest_path.parent / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != recorded["bytes"]:
            return f"{name} has {stat.st_size} bytes, the manifest says {recorded['bytes']}"
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, recorded["sha256"])
        if key in _VERIFIED:
            continue
        if _sha256(path) != recorded["sha256"]:
            return f"{name} is not the file the manifest records (its SHA-256 differs)"
        if recorded.get("rows") is not None and _rows(path) != recorded["rows"]:
            return f"{name} has {_rows(path)} rows, the manifest says {recorded['rows']}"
        _VERIFIED[key] = None
    return None
