"""Model weights from the Hugging Face hub into a models directory: resumable, committed as it goes, verified.

    python -m backends.modal download-model qwen3-32b      # on Modal, into dr-zero-corpus:/models/Qwen3-32B

The files of a hub dataset (a corpus, an index) take the same path: drzero.corpus.fetch.

The hub's file list (sizes, and a hash for every file) is the manifest. Files already on disk at
their full size are not fetched again, so a download that was stopped (a preemption, a timeout)
continues where it stopped; the rest are fetched in batches, and ``commit`` (the Modal volume's
commit) runs after each, so a new container sees what the last one wrote. At the end every file is
hashed and compared with the manifest; a file that does not match is fetched once more, then the
download fails naming it. A verified model gets ``.drzero-download.json`` with the hub revision,
and a later download of that revision only checks the sizes. A record that is damaged (not JSON, or
not of ``DOWNLOAD_RECORD``'s shape) proves nothing: the download moves it aside, says so, and checks
every file against the hub again.

Nothing here imports Modal; the hub calls are the default ``fetch``/``manifest``, and the tests
replace them with a local directory that plays the hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from drzero.atomic import write_json_atomically
from drzero.records import DamagedRecord, read_record, set_aside

MARKER = ".drzero-download.json"
DOWNLOAD_RECORD = {"repo_id": str, "revision": str, "complete": bool, "size": int, "files": [dict]}  # write_marker
BATCH_BYTES = 8 * 1024**3   # commit the volume after about this much: a lost container costs at most one batch
CHUNK = 8 * 1024**2


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository: its path, size and hash (sha256 for LFS/xet files, else git's blob sha1)."""

    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None


@dataclass(frozen=True)
class Manifest:
    repo_id: str
    revision: str      # the commit the files belong to
    files: tuple[HubFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class DownloadError(RuntimeError):
    """The download could not be completed or verified; the message names the files and what to do."""


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def file_hashes(path: Path, git: bool) -> tuple[str, str | None]:
    """sha256 of the file and, when ``git``, git's blob sha1 (``blob <size>\\0`` + content), in one read."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git:
        sha1 = hashlib.sha1()
        sha1.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha256.update(chunk)
            if sha1:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def file_problem(root: Path, entry: HubFile, *, hash_it: bool = True) -> str | None:
    """What is wrong with ``root/entry.path`` against the manifest, or None."""
    local = root / entry.path
    if not local.is_file():
        return f"{entry.path}: missing"
    size = local.stat().st_size
    if size != entry.size:
        return f"{entry.path}: {size} bytes, the hub has {entry.size}"
    if not hash_it or (entry.sha256 is None and entry.git_sha1 is None):
        return None
    sha256, sha1 = file_hashes(local, git=entry.sha256 is None)
    if entry.sha256 is not None and sha256 != entry.sha256:
        return f"{entry.path}: sha256 {sha256[:12]}..., the hub has {entry.sha256[:12]}..."
    if entry.sha256 is None and sha1 != entry.git_sha1:
        return f"{entry.path}: git sha1 {sha1[:12]}..., the hub has {entry.git_sha1[:12]}..."
    return None


def verify(root: Path, manifest: Manifest, *, hash_it: bool = True) -> list[str]:
    return [p for entry in manifest.files if (p := file_problem(root, entry, hash_it=hash_it))]


def _record(root: Path) -> dict | None:
    """The download record in ``root``; None when there is none or it is damaged (``download`` moves that aside)."""
    try:
        return read_record(root / MARKER, DOWNLOAD_RECORD)
    except DamagedRecord:
        return None


def recorded_revision(root: Path) -> str | None:
    """The hub revision a verified download recorded in ``root``, or None."""
    record = _record(root)
    return record["revision"] if record is not None else None


def local_state(root: Path) -> str:
    """``verified`` (a complete download), ``present`` (weights put there some other way), ``incomplete``
    (a download that has not finished, or whose record is damaged: run it again to continue) or ``missing``."""
    if (root / MARKER).is_file():
        record = _record(root)
        return "verified" if record is not None and record["complete"] else "incomplete"
    return "present" if (root / "config.json").is_file() else "missing"


def write_marker(root: Path, manifest: Manifest, complete: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomically({"repo_id": manifest.repo_id, "revision": manifest.revision, "complete": complete,
                           "size": manifest.size, "files": [asdict(f) for f in manifest.files]}, root / MARKER)


def batches(files: Iterable[HubFile], limit: int = BATCH_BYTES) -> list[list[HubFile]]:
    """Small files first (config and tokenizer are usable early), then groups of about ``limit`` bytes."""
    groups: list[list[HubFile]] = []
    current: list[HubFile] = []
    total = 0
    for entry in sorted(files, key=lambda f: (f.size, f.path)):
        if current and total + entry.size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(entry)
        total += entry.size
    return groups + ([current] if current else [])


Fetch = Callable[[list[str]], None]   # downloads these repository paths into the target directory


def download(manifest: Manifest, target: Path, fetch: Fetch, *, commit: Callable[[], None] = lambda: None,
             log: Callable[[str], None] = print, batch_bytes: int = BATCH_BYTES) -> dict:
    """Bring ``target`` to ``manifest``: fetch what is missing in batches (committing after each), verify all."""
    target = Path(target)
    try:
        read_record(target / MARKER, DOWNLOAD_RECORD)
    except DamagedRecord as damage:
        set_aside(target / MARKER, str(damage), "every file is checked against the hub's sizes and hashes, and what "
                                                "does not match is fetched again", log)
    if recorded_revision(target) == manifest.revision and local_state(target) == "verified" \
            and not verify(target, manifest, hash_it=False):
        log(f"{manifest.repo_id} is already complete in {target} ({human(manifest.size)}, revision "
            f"{manifest.revision[:12]}); nothing to download")
        return {"path": str(target), "size": manifest.size, "fetched": 0, "skipped": True}
    write_marker(target, manifest, complete=False)
    todo = [f for f in manifest.files if file_problem(target, f, hash_it=False)]
    for entry in todo:  # a file of the wrong size was not written by the hub client (it renames whole files
        (target / entry.path).unlink(missing_ok=True)  # into place): fetch it afresh; partial downloads resume
    have = manifest.size - sum(f.size for f in todo)
    log(f"{manifest.repo_id}@{manifest.revision[:12]}: {len(manifest.files)} files, {human(manifest.size)}; "
        f"{len(manifest.files) - len(todo)} already here ({human(have)}), {len(todo)} to fetch")
    started, fetched = time.monotonic(), 0
    for group in batches(todo, batch_bytes):
        fetch([f.path for f in group])
        fetched += sum(f.size for f in group)
        commit()
        rate = fetched / max(time.monotonic() - started, 1e-6)
        log(f"  {human(have + fetched)} of {human(manifest.size)} ({100 * (have + fetched) / max(manifest.size, 1):.0f}%)"
            f", {human(rate)}/s; committed")
    log(f"verifying {len(manifest.files)} files against the hub's sizes and hashes")
    found = [(f, p) for f in manifest.files if (p := file_problem(target, f))]  # hashes every file, once
    if found:
        bad, problems = [f for f, _ in found], [p for _, p in found]
        log(f"{len(bad)} file(s) did not match; fetching them again: " + "; ".join(problems))
        for entry in bad:
            (target / entry.path).unlink(missing_ok=True)
        fetch([f.path for f in bad])
        fetched += sum(f.size for f in bad)
        commit()
        problems = verify(target, manifest)
        if problems:
            raise DownloadError(f"{manifest.repo_id} in {target} does not match the hub after a second fetch: "
                                + "; ".join(problems) + ". Run the download again; if it persists, the hub "
                                "revision may have changed under it")
    write_marker(target, manifest, complete=True)
    commit()
    log(f"done: {manifest.repo_id} in {target}, {human(manifest.size)} verified")
    return {"path": str(target), "size": manifest.size, "fetched": fetched, "skipped": False}


# -- the hub ---------------------------------------------------------------------------------------


def accelerate_transfers() -> str:
    """Turn on Hugging Face's transfer accelerators where installed; say which ones download."""
    used = []
    if importlib.util.find_spec("hf_xet"):
        used.append("hf_xet")  # huggingface_hub uses it by itself for files stored on Xet
    if importlib.util.find_spec("hf_transfer"):  # parallel ranges for the files that are not
        os.environ["HF_HUB_ENABLE_HF_TRANSFER"] = "1"
        if "huggingface_hub.constants" in sys.modules:  # read at import: set the constant too
            sys.modules["huggingface_hub.constants"].HF_HUB_ENABLE_HF_TRANSFER = True
        used.append("hf_transfer")
    return " and ".join(used) or "plain HTTP"


def hub_manifest(repo_id: str, revision: str | None = None, *, repo_type: str = "model",
                 patterns: list[str] | None = None) -> Manifest:
    """The files of ``repo_id`` at ``revision`` (default: main) with their sizes and hashes, from the hub; with
    ``patterns`` (file names or globs, as ``snapshot_download``'s ``allow_patterns`` reads them) only those."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, revision=revision,
                                                                             files_metadata=True)
    siblings = [s for s in info.siblings or [] if not s.rfilename.startswith(".git")]
    if patterns is not None:
        siblings = list(filter_repo_objects(siblings, allow_patterns=patterns, key=lambda s: s.rfilename))
        if not siblings:
            raise DownloadError(f"no file of the hub {repo_type} {repo_id} matches {', '.join(patterns)}; give its "
                                f"files' paths in the repository (https://huggingface.co/"
                                f"{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/tree/main lists them)")
    files = tuple(HubFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0),
                          sha256=s.lfs.sha256 if s.lfs else None, git_sha1=None if s.lfs else s.blob_id)
                  for s in siblings)
    return Manifest(repo_id, info.sha, files)


def hub_fetch(repo_id: str, revision: str, target: Path, repo_type: str = "model") -> Fetch:
    from huggingface_hub import snapshot_download

    def fetch(paths: list[str]) -> None:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=str(target), allow_patterns=paths,
                          max_workers=16)

    return fetch


def download_from_hub(repo_id: str, target: Path, *, commit: Callable[[], None] = lambda: None,
                      log: Callable[[str], None] = print, repo_type: str = "model",
                      patterns: list[str] | None = None) -> dict:
    """A model (or the files of a dataset that match ``patterns``) into ``target``: `download` with the hub."""
    log(f"downloading {repo_id} to {target} with {accelerate_transfers()}")
    manifest = hub_manifest(repo_id, repo_type=repo_type, patterns=patterns)
    return download(manifest, target, hub_fetch(repo_id, manifest.revision, target, repo_type), commit=commit,
                    log=log)
