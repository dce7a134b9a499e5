"""No secrets shipped: what the Modal upload, the image's build context and git take from a checkout that holds
keys (in `.env` and files of other secret names, and in files that look harmless), checkpoints, a Chroma store,
corpora and weights; and which secrets each Modal launch is given.

One rule serves the Modal upload and the build context (backends/secrets_rule.py); the checks below run it
through Modal's own upload code (`_Mount._add_local_dir`, the context mount of `Image.from_dockerfile`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

modal = pytest.importorskip("modal")
from modal._image import _create_context_mount  # noqa: E402
from modal.file_pattern_matcher import FilePatternMatcher  # noqa: E402
from modal.mount import _Mount  # noqa: E402

from backends import modal as mb  # noqa: E402
from backends import modal_cluster as mc  # noqa: E402
from backends import modal_image as mi  # noqa: E402
from backends import secrets_rule as sr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef" * 2 + "01234567"   # the shape of a W&B key (40 hex digits)
HF_TOKEN = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f"

# A user's checkout after a while: code, and everything that must stay on the machine.
CODE = ["drzero/corpus/store.py", "drzero/data/seed.py", "drzero/models/files.py", "config/search_tool_config.yaml",
        "backends/modal.py", "pyproject.toml", "README.md", ".env.example"]
SECRET_NAMED = [".env", ".env.local", "sub/.env", ".envrc", ".env~", "secrets.env", "config/wandb.env", ".secrets",
                "wandb_key.txt", "config/api_key.txt", "deploy/id_rsa", ".modal.toml"]
RUN_DATA = ["checkpoints/solver_iter1/global_step_50/actor/model.pt", "chromadb/chroma.sqlite3",
            "my-run/chromadb/abc/data_level0.bin", "corpus/papers/a.jsonl", "models/Qwen2.5-3B-Instruct/model.safetensors",
            "data/zero_ratio4321.parquet", ".drzero/corpus/chromadb/chroma.sqlite3", "wandb/run-1/files/config.yaml",
            "outputs/x.pth"]
PRIVATE = SECRET_NAMED + RUN_DATA


@pytest.fixture
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    for relative in CODE + PRIVATE:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"WANDB_API_KEY={KEY}\n" if relative in SECRET_NAMED else "x")
    shutil.copy(REPO / ".dockerignore", root / ".dockerignore")
    return root


def _files(mount) -> set[str]:
    return {str(remote).lstrip("/") for entry in mount._entries for _, remote in entry.get_files_to_upload()}


def _uploaded(root: Path, ignore) -> set[str]:
    """What Modal's `Image.add_local_dir(root, ..., ignore=ignore)` uploads: its own mount code walks the tree."""
    return {str(PurePosixPath(path).relative_to(mi.CODE_DIR.lstrip("/")))
            for path in _files(_Mount._add_local_dir(root, PurePosixPath(mi.CODE_DIR), ignore=ignore))}


def _build_context(root: Path, rule) -> set[str]:
    """What Modal's `Image.from_dockerfile(..., context_dir=root, ignore=rule)` sends: docker/Dockerfile's COPY
    sources less what the rule leaves out (Modal's own context mount)."""
    return _files(_create_context_mount((REPO / "docker" / "Dockerfile").read_text().splitlines(), ignore_fn=rule,
                                        context_dir=root))


def test_the_modal_upload_carries_the_code_and_nothing_private(checkout):
    uploaded = _uploaded(checkout, mi.CODE_RULE.rooted(checkout))
    assert set(CODE) - {".env.example"} <= uploaded  # the example is for compose; Modal needs none
    assert not uploaded & set(PRIVATE), sorted(uploaded & set(PRIVATE))


def test_the_old_ignore_lists_would_have_shipped_the_keys(checkout):
    """The same check with the lists this module had before: the test can tell the difference."""
    older = [".git", ".venv", ".drzero", "**/__pycache__", ".pytest_cache", "*.egg-info", "build", "dist"]
    assert {".env", "chromadb/chroma.sqlite3"} <= _uploaded(checkout, FilePatternMatcher(*older))
    last = [*mi.CODE_IGNORE, "**/.env", "**/.env.*"]  # issue 29: other secret names went up
    assert {".envrc", ".env~", "secrets.env", "config/wandb.env", ".secrets", "wandb_key.txt"} <= _uploaded(
        checkout, FilePatternMatcher(*last))


def test_the_build_context_leaves_out_secrets_and_run_data(checkout):
    """Modal's `from_dockerfile` sends what docker/Dockerfile COPYs, less the rule (which reads .dockerignore)."""
    sent = _build_context(checkout, mi.CONTEXT_RULE.rooted(checkout))
    assert {"drzero/corpus/store.py", "drzero/data/seed.py", "config/search_tool_config.yaml"} <= sent
    assert "config/wandb.env" not in sent and not sent & set(PRIVATE), sorted(sent & set(PRIVATE))
    older = FilePatternMatcher(".git", "**/.env", "**/.env.*")  # issue 29: `COPY config/` took config/wandb.env
    assert "config/wandb.env" in _build_context(checkout, older)


def test_docker_compose_builds_leave_out_the_same_secret_files(checkout):
    """`docker compose build` reads .dockerignore itself: it lists every secret name of the rule, and matched as
    docker matches it (Modal's matcher is a port of docker's), it leaves out every secret file and run data."""
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert set(sr.SECRET_FILES) <= lines, sorted(set(sr.SECRET_FILES) - lines)
    assert not any(line.startswith("!") for line in lines), "a !pattern could bring a secret file back"
    ignore = FilePatternMatcher(*(REPO / ".dockerignore").read_text().splitlines())
    sent = {str(path.relative_to(checkout)) for path in checkout.rglob("*") if path.is_file()
            if not ignore(path.relative_to(checkout))}
    assert not sent & set(PRIVATE), sorted(sent & set(PRIVATE))
    assert {"drzero/corpus/store.py", "config/search_tool_config.yaml"} <= sent


@pytest.mark.parametrize("relative, text, what", [
    ("config/local.yaml", f"model: qwen3-8b\nwandb_api_key: {KEY}\n", "a wandb_api_key value, line 2"),
    ("notes/hub.txt", f"the token is {HF_TOKEN} for now\n", "a Hugging Face token, line 1"),
    ("drzero/settings.py", f'MODAL_TOKEN_SECRET = "as-{KEY[:24]}"\n', "a MODAL_TOKEN_SECRET value, line 1"),
])
def test_a_file_that_holds_a_key_is_refused_with_its_path(checkout, relative, text, what):
    (checkout / relative).parent.mkdir(parents=True, exist_ok=True)
    (checkout / relative).write_text(text)
    with pytest.raises(sr.KeyInUpload) as refused:   # inside Modal's own upload walk
        _uploaded(checkout, mi.CODE_RULE.rooted(checkout))
    assert str(refused.value).startswith(f"{relative} looks like it holds a key ({what})")
    if relative.startswith(("config/", "drzero/")):  # what the image COPYs: refused from the build context too
        with pytest.raises(sr.KeyInUpload, match=relative):
            _build_context(checkout, mi.CONTEXT_RULE.rooted(checkout))
    assert [problem.path for problem in sr.refusals([mi.CODE_RULE.rooted(checkout)])] == [relative]


@pytest.mark.parametrize("text", ["WANDB_API_KEY=\n", "HF_TOKEN=<your HF token>\n", "token = uuid.uuid4().hex\n",
                                  "api_key: ${WANDB_API_KEY}\n", "MAX_NEW_TOKENS=123456789012345678\n",
                                  "modal secret create wandb-secret WANDB_API_KEY=<your W&B key>\n"])
def test_examples_and_code_are_not_keys(tmp_path, text):
    (tmp_path / "example.md").write_text(text)
    assert sr.key_in(tmp_path / "example.md") is None


def test_this_repository_ships_no_key():
    assert sr.refusals([mi.CODE_RULE, mi.CONTEXT_RULE]) == []
    done = subprocess.run([sys.executable, "-m", "backends.secrets_rule"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_launch_with_a_key_in_the_checkout_stops_before_anything_starts(checkout, monkeypatch, capsys):
    (checkout / "config" / "local.yaml").write_text(f"wandb_api_key: {KEY}\n")
    monkeypatch.setattr(mb, "CODE_RULE", mi.CODE_RULE.rooted(checkout))
    monkeypatch.setattr(mb.app, "run", lambda **kwargs: pytest.fail("nothing may start"))
    assert mb.cli(["smoke"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smoke: config/local.yaml looks like it holds a key")
    done = subprocess.run([sys.executable, "-m", "backends.secrets_rule", str(checkout)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "config/local.yaml looks like it holds a key" in done.stderr


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


# -- which secrets each launch is given ------------------------------------------------------------


def test_no_function_is_defined_with_a_secret():
    """Modal creates every Function of an app when it starts: a secret in any definition would be needed by every
    action (issue 29: a missing wandb-secret failed `smoke`)."""
    functions = {name: f for module in (mb, mc) for name, f in vars(module).items() if isinstance(f, modal.Function)}
    assert len(functions) > 10 and {name: f.info().secrets for name, f in functions.items() if f.info().secrets} == {}


WANDB, HF = {"wandb-secret": True}, {"huggingface-secret": False}


@pytest.mark.parametrize("argv, secrets", [
    (["challenger"], WANDB), (["solver"], WANDB), (["train"], WANDB), (["train", "--nodes", "2"], WANDB),
    (["train", "--stage-args=--logger console"], {"wandb-secret": False}),
    (["download-model", "qwen3-8b"], HF), (["upload-model", "--model", "qwen3-8b"], HF), (["ingest"], HF),
    (["gen-data"], {}), (["merge"], {}), (["evaluate"], {}), (["smoke"], {}), (["prepare-data"], {}),
    (["list-models"], {}),
])
def test_each_launch_gets_only_the_secrets_it_uses(argv, secrets):
    assert mb.plan_launch(mb.parse_request(argv)).secrets == secrets

