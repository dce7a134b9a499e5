"""# One secrets rule for what leaves this machine: the Modal code upload and the image's build context

    python -m backends.secrets_rule [DIR]      # before `docker compose build`: exit 1 naming each file that holds a key

Two things are never shipped. Files whose names say they hold secrets (`SECRET_FILES`: `.env` and its
variants, `*.env`, `.envrc`, `.secrets`, `*_key.txt`, private keys ...) are left out wherever the
checkout is sent: the Modal upload (backends/modal_image.py's `add_local_dir`), the image's build
context on Modal (its `from_dockerfile`), and `docker compose build` (`.dockerignore` carries the same
patterns; tests/test_secrets.py holds it to this list). A file that is shipped but looks like it holds
a key (a `WANDB_API_KEY=...` or `token: ...` line with a real value, an `hf_...` token, a Modal token,
a private key block) is refused with its path named, before anything is uploaded.

`SecretsRule` is a Modal `FilePatternMatcher` (dockerignore syntax, matched from the checkout's root),
so Modal's own upload code applies it file by file; `refusals` runs the same rule over the checkout
first, so that a launch stops with one sentence instead of an error from inside Modal's upload.
"""

from __future__ import annotations

import os
import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

from modal import FilePatternMatcher

# Names that hold secrets, whatever the directory: never uploaded, never in a build context.
# `.env.example` is among them (`.env.*`): it holds no keys, but nothing on Modal needs it.
SECRET_FILES = (
    "**/.env", "**/.env.*", "**/.env~", "**/.envrc", "**/*.env", "**/*.env~",
    "**/.secrets", "**/secrets.yaml", "**/secrets.yml", "**/secrets.json", "**/secrets.toml",
    "**/*_key.txt", "**/*_token.txt", "**/*.pem", "**/*.key", "**/id_rsa*", "**/id_ed25519*", "**/id_ecdsa*",
    "**/.netrc", "**/.git-credentials", "**/.modal.toml", "**/.npmrc", "**/.pypirc",
)

# What a key looks like inside a file that is shipped. An assignment counts only with a value that looks
# like a key: a blank, `<your key>`, `${VAR}` or `...` is an example, not a key (README, .env.example).
_ASSIGNMENT = re.compile(
    r"^[ \t]*(?:export[ \t]+)?[\"']?(?P<name>[A-Za-z0-9_]*?(?:API_?KEY|TOKEN|SECRET|SECRET_KEY|ACCESS_KEY"
    r"|ACCESS_KEY_ID|PASSWORD|TOKEN_ID|TOKEN_SECRET))[\"']?[ \t]*[=:][ \t]*[\"']?(?P<value>[^\s\"'#,]+)",
    re.IGNORECASE | re.MULTILINE)
_TOKENS = (
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("a Modal token", re.compile(r"\ba[ks]-[A-Za-z0-9]{20,}\b")),
    ("an AWS access key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
)
READ_AT_MOST = 1 << 20   # bytes of a file that are searched: keys sit in small text files
REPO_ROOT = Path(__file__).resolve().parents[1]


class KeyInUpload(ValueError):
    """A file that would be shipped holds what looks like a key."""

    def __init__(self, path: str, what: str, line: int):
        self.path, self.what, self.line = path, what, line
        super().__init__(f"{path} looks like it holds a key ({what}, line {line}), and it would be shipped with "
                         f"the code: move the key into a Modal secret or an .env file (neither is ever uploaded), "
                         f"or the file out of the checkout")


def _real_value(value: str) -> bool:
    """A value that looks like a key (16 or more characters of a key's alphabet, letters and digits both), not
    like an example (`<your key>`, `...`), a reference (`${VAR}`) or code (`uuid.uuid4().hex`)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_+/=-]{16,}", value) and re.search(r"[A-Za-z]", value)
                and re.search(r"\d", value))


def key_in(path: Path) -> tuple[str, int] | None:
    """What kind of key ``path`` holds and on which line, or None (binary files are not searched)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(READ_AT_MOST)
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    text = data.decode("utf-8", errors="replace")
    found = [(match.start(), f"a {match['name']} value") for match in _ASSIGNMENT.finditer(text)
             if _real_value(match["value"])]
    found += [(match.start(), what) for what, pattern in _TOKENS for match in pattern.finditer(text)]
    if not found:
        return None
    start, what = min(found)
    return what, text.count("\n", 0, start) + 1


class SecretsRule(FilePatternMatcher):
    """Modal's matcher for ``patterns`` (plus the lines of ``patterns_file``, read when first used), always with
    `SECRET_FILES` last, so that no `!pattern` brings a secret back; a file it lets through is read and refused
    (`KeyInUpload`) if it holds a key. Paths are relative to ``root``, as Modal passes them."""

    def __init__(self, root: Path, *patterns: str, patterns_file: Path | None = None):
        super().__init__(*patterns)
        self.root = Path(root)
        self.patterns_file = patterns_file

    @cached_property
    def patterns(self):
        lines = self.patterns_file.read_text("utf8").splitlines() if self.patterns_file else []
        return self._parse_patterns([*(self._pattern_strings or ()), *lines, *SECRET_FILES])

    def rooted(self, root: Path) -> "SecretsRule":
        """The same rule over another checkout (its own patterns file, if the rule reads one)."""
        patterns_file = Path(root) / self.patterns_file.relative_to(self.root) if self.patterns_file else None
        return SecretsRule(root, *(self._pattern_strings or ()), patterns_file=patterns_file)

    def __repr__(self) -> str:
        given = [*(self._pattern_strings or ()), *([f"<{self.patterns_file.name}>"] if self.patterns_file else [])]
        return f"SecretsRule({str(self.root)!r}, {', '.join(map(repr, given))}, *SECRET_FILES)"

    def ignores(self, path: Path) -> bool:
        """Whether the patterns leave ``path`` out (no file is read)."""
        return super().__call__(path)

    def __call__(self, path: Path) -> bool:
        if self.ignores(path):
            return True
        full = Path(path) if Path(path).is_absolute() else self.root / path
        if full.is_file() and (found := key_in(full)):
            raise KeyInUpload(str(path), *found)
        return False

    def candidates(self) -> Iterator[Path]:
        """The files under ``root`` the patterns let through, walked as Modal walks them: ignored directories
        are pruned unless a `!pattern` could bring a file back from one."""
        prune = self.can_prune_directories()
        for top, dirs, files in os.walk(self.root):
            relative = Path(top).relative_to(self.root)
            if prune:
                dirs[:] = [d for d in dirs if not self.ignores(relative / d)]
            yield from (relative / name for name in files if not self.ignores(relative / name))


def refusals(rules: Sequence[SecretsRule]) -> list[KeyInUpload]:
    """Every file that one of ``rules`` would ship and refuses, each named once."""
    found: dict[str, KeyInUpload] = {}
    for rule in rules:
        for path in rule.candidates():
            try:
                rule(path)
            except KeyInUpload as error:
                found.setdefault(error.path, error)
    return list(found.values())


def check(rules: Sequence[SecretsRule]) -> None:
    """Raise the first refusal of ``rules`` (`KeyInUpload`, its path named): before a launch uploads anything."""
    problems = refusals(rules)
    if problems:
        raise problems[0]


def docker_context_rule(root: Path = REPO_ROOT) -> SecretsRule:
    """What `docker compose build` and Modal's `from_dockerfile` send: the context less `.dockerignore`."""
    return SecretsRule(root, patterns_file=root / ".dockerignore")


def main(argv: Sequence[str] | None = None) -> int:
    """Before `docker compose build` (docker cannot run this check itself): exit 1 naming each file of the build
    context that holds a key. The Modal launches run it on their own."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0]) if args else REPO_ROOT
    problems = refusals([docker_context_rule(root)])
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"no file of the build context {root} holds a key")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
