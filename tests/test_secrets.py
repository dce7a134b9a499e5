"""No secrets shipped: what the Modal upload, the docker build context and git take from a checkout that
holds a `.env`, checkpoints, a Chroma store, corpora and weights; and which Modal Functions get which keys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

modal = pytest.importorskip("modal")
from modal.file_pattern_matcher import FilePatternMatcher, _ignore_fn  # noqa: E402
from modal.mount import _Mount  # noqa: E402

from backends import modal as mb  # noqa: E402
from backends import modal_image as mi  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A user's checkout after a while: code, and everything that must stay on the machine.
CODE = ["drzero/corpus/store.py", "drzero/data/seed.py", "drzero/models/files.py", "config/search_tool_config.yaml",
        "backends/modal.py", "pyproject.toml", "README.md", ".env.example"]
PRIVATE = [".env", ".env.local", "sub/.env", "checkpoints/solver_iter1/global_step_50/actor/model.pt",
           "chromadb/chroma.sqlite3", "my-run/chromadb/abc/data_level0.bin", "corpus/papers/a.jsonl",
           "models/Qwen2.5-3B-Instruct/model.safetensors", "data/zero_ratio4321.parquet",
           ".drzero/corpus/chromadb/chroma.sqlite3", "wandb/run-1/files/config.yaml", "outputs/x.pth"]


@pytest.fixture
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    for relative in CODE + PRIVATE:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("WANDB_API_KEY=secret\n" if ".env" in relative else "x")
    return root


def _uploaded(root: Path, ignore) -> set[str]:
    """What Modal's `Image.add_local_dir(root, ..., ignore=ignore)` uploads: its own mount code walks the tree."""
    mount = _Mount._add_local_dir(root, PurePosixPath(mi.CODE_DIR), ignore=_ignore_fn(ignore))
    return {str(remote.relative_to(mi.CODE_DIR)) for entry in mount._entries for _, remote in
            entry.get_files_to_upload()}


def test_the_modal_upload_carries_the_code_and_nothing_private(checkout):
    uploaded = _uploaded(checkout, mi.CODE_IGNORE)
    assert set(CODE) - {".env.example"} <= uploaded  # the example is for compose; Modal needs none
    assert not uploaded & set(PRIVATE), sorted(uploaded & set(PRIVATE))


def test_the_old_ignore_list_would_have_shipped_the_keys(checkout):
    """The same check with the list this module had before: the test can tell the difference."""
    old = [".git", ".venv", ".drzero", "**/__pycache__", ".pytest_cache", "*.egg-info", "build", "dist"]
    assert {".env", "chromadb/chroma.sqlite3", "checkpoints/solver_iter1/global_step_50/actor/model.pt"} <= \
        _uploaded(checkout, old)


def test_the_docker_build_context_leaves_out_secrets_and_run_data(checkout):
    """`docker compose build` sends the context minus .dockerignore (Modal reads it with the same matcher)."""
    shutil.copy(REPO / ".dockerignore", checkout / ".dockerignore")
    ignore = FilePatternMatcher(*(REPO / ".dockerignore").read_text().splitlines())
    sent = _uploaded(checkout, ignore)
    assert not sent & set(PRIVATE), sorted(sent & set(PRIVATE))
    assert {"drzero/corpus/store.py", "drzero/data/seed.py", "config/search_tool_config.yaml"} <= sent


def test_git_ignores_the_env_file_and_run_data(checkout):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    checked = subprocess.run(["git", "check-ignore", "--no-index", *PRIVATE, *CODE], cwd=checkout,
                             capture_output=True, text=True)
    ignored = set(checked.stdout.split())
    assert {".env", ".env.local", "sub/.env", "checkpoints/solver_iter1/global_step_50/actor/model.pt",
            "chromadb/chroma.sqlite3", ".drzero/corpus/chromadb/chroma.sqlite3"} <= ignored
    assert not ignored & set(CODE)  # .env.example stays tracked


WANDB = "modal.Secret.from_name('wandb-secret')"
HUGGING_FACE = "modal.Secret.from_name('huggingface-secret')"


@pytest.mark.parametrize("name, secrets", [
    ("challenger", [WANDB]), ("solver", [WANDB]), ("train", [WANDB]), ("preflight", [WANDB]),
    ("download_model", [HUGGING_FACE]), ("ingest", [HUGGING_FACE]),
    ("gen_data", []), ("merge", []), ("evaluate", []), ("smoke", []), ("prepare_data", []), ("list_models", []),
])
def test_each_function_gets_only_the_secrets_it_uses(name, secrets):
    assert getattr(mb, name).info().secrets == secrets
