#!/usr/bin/env python3
"""Rehearse docker/Dockerfile's build without a Docker engine, and regenerate its lock.

    python3 docker/rehearse_build.py run                       # the GPU image's RUN steps, in order
    python3 docker/rehearse_build.py run --skip-step relax-torch   # the same with one step left out
    python3 docker/rehearse_build.py lock                      # rewrite docker/gpu-lock.txt

The base image's Python environment is rebuilt as a Python 3.12 venv from docker/base-packages.txt
(``pip install --no-deps`` of exactly those versions; several GB the first time, then cached under
~/.cache/drzero-image-rehearsal, keyed by the hash of that file, with pip's own cache kept too).
Each run works on a hard-linked copy of that venv and executes the Dockerfile's own instructions -
ARG, ENV, SHELL, WORKDIR, COPY and RUN, read from the file, so the rehearsal cannot drift from it -
with these substitutions, and no others:

- ``python3``/``python`` are the venv's (its bin/ leads PATH), and /usr/local/lib/python3.12/
  dist-packages is the venv's site-packages;
- absolute paths the image writes (/opt/drzero, /corpus, /checkpoints, /tmp) live under the run's
  own root directory;
- CUDA_HOME points at a directory whose lib64/stubs/libcuda.so is a generated driver stub (every
  ``cu*`` entry point returns CUDA_ERROR_NO_DEVICE), as the CUDA toolkit's stub is on a build machine;
- FLASH_ATTN_WHEEL_URL is a stand-in wheel with the release asset's file name and version, because
  GitHub (where the flash-attention release lives) is unreachable from the machines that run this;
- PIP_NO_CACHE_DIR is not applied, so reruns reuse pip's cache.

What it cannot tell: whether the real flash-attn binary loads against the base's torch, whether
the apt side of the base matches (only the Debian-installed Python modules listed in
docker/base-packages.txt are modelled), and what Modal's builder does with the file.

Standard library only; runs on Python >= 3.11.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BASE_PACKAGES = ROOT / "docker" / "base-packages.txt"
LOCK = ROOT / "docker" / "gpu-lock.txt"
POLICY = ROOT / "docker" / "constraints-gpu.txt"
IMAGE_SITE_PACKAGES = "/usr/local/lib/python3.12/dist-packages"
IMAGE_PATHS = ("/opt/drzero", "/corpus", "/checkpoints", "/tmp")  # what the image's RUN steps write
CUDA_ERROR_NO_DEVICE = 100  # cuda.h: what the toolkit's libcuda stub answers to every call


class RehearsalUnavailable(RuntimeError):
    """Something the rehearsal needs (Python 3.12, a C compiler) is not on this machine."""


# --- the Dockerfile -----------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    title: str = ""  # the first line of the comment block right above it ("1. The base force-installs ...")


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments kept as step titles."""
    found, current, comments, pending = [], "", [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue
        if not current and not stripped:
            comments = []
            continue
        if current and stripped.startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            text = current.strip()
            keyword, _, args = text.partition(" ")
            titles = [c for c in comments if c and not c.startswith(("hadolint", "syntax=", "DL"))]
            title = titles[0] if titles else ""
            if keyword.upper() == "RUN":  # a step's comment may sit above the COPY lines it needs
                title, pending = title or pending, ""
            elif title:
                pending = title
            found.append(Instruction(keyword.upper(), args.strip(), title))
            current, comments = "", []
    return found


def step_name(instruction: Instruction) -> str:
    """``relax-torch`` for `RUN python3 docker/check_image.py relax-torch ...`; else the title's words."""
    match = re.search(r"check_image\.py (\S+)", instruction.args)
    if match:
        return match.group(1)
    return re.split(r"[:;]", re.sub(r"^\d+\.\s*", "", instruction.title))[0] or instruction.args[:60]


def dockerfile_arg(name: str, path: Path = DOCKERFILE) -> str:
    """The default of ``ARG name=...``."""
    for instruction in instructions(path):
        if instruction.keyword == "ARG" and instruction.args.partition("=")[0] == name:
            return instruction.args.partition("=")[2]
    raise KeyError(f"{path.name} has no ARG {name}")


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


# --- the reconstructed base ---------------------------------------------------------------------------

def find_python312() -> str:
    """python3.12 on PATH, else the newest pyenv 3.12.x (these machines have one; CI's are alike)."""
    candidates = [shutil.which("python3.12")]
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates += sorted((str(p) for p in Path(pyenv_root).glob("versions/3.12.*/bin/python3.12")), reverse=True)
    for candidate in filter(None, candidates):
        result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                                capture_output=True, text=True)
        if result.stdout.strip() == "True":
            return candidate
    raise RehearsalUnavailable("no Python 3.12 interpreter: put python3.12 on PATH or install one with "
                               "`pyenv install 3.12` (the GPU image runs Python 3.12)")


def base_set(path: Path = BASE_PACKAGES) -> dict[str, tuple[str, str]]:
    """name -> (version, kind) from docker/base-packages.txt; kind is '', 'override' or 'debian'."""
    packages = {}
    for line in path.read_text().splitlines():
        requirement, _, comment = line.partition("#")
        if requirement.strip():
            name, _, version = requirement.strip().partition("==")
            packages[name] = (version, comment.strip())
    return packages


def cache_root() -> Path:
    return Path(os.environ.get("DRZERO_IMAGE_REHEARSAL_CACHE", Path.home() / ".cache" / "drzero-image-rehearsal"))


def run_logged(command: list[str], **kwargs) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def ensure_base_venv(python: str) -> Path:
    """The cached venv holding exactly docker/base-packages.txt (built once per version of that file)."""
    key = hashlib.sha256(BASE_PACKAGES.read_bytes()).hexdigest()[:16]
    home = cache_root() / f"base-{key}"
    venv = home / "venv"
    if (home / "complete").is_file():
        return venv
    for stale in cache_root().glob("base-*"):  # an older base set: several GB nobody will use again
        shutil.rmtree(stale, ignore_errors=True)
    home.mkdir(parents=True)
    started = time.monotonic()
    run_logged([python, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet"]
    packages = base_set()
    run_logged(pip + [f"pip=={packages['pip'][0]}"])
    ordinary = [f"{n}=={v}" for n, (v, kind) in packages.items() if kind != "debian"]
    requirements = home / "base-requirements.txt"
    requirements.write_text("\n".join(ordinary) + "\n")
    run_logged(pip + ["-r", str(requirements)])
    debian = [f"{n}=={v}" for n, (v, kind) in packages.items() if kind == "debian"]
    if debian:
        run_logged(pip + debian)
        site = site_packages(venv)
        for name in (n for n, (_, kind) in packages.items() if kind == "debian"):
            for info in site.glob("*.dist-info"):
                if info.name.split("-")[0].lower().replace("_", "-") == name.lower().replace("_", "-"):
                    (info / "RECORD").unlink()  # what makes pip answer "installed by debian"
                    (info / "INSTALLER").write_text("debian\n")
    (home / "complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


# --- stand-ins ----------------------------------------------------------------------------------------

def flash_attn_stand_in(url: str, directory: Path) -> Path:
    """A wheel with the release asset's file name and version whose package only carries __version__."""
    filename = url.rsplit("/", 1)[1]
    name, version = filename.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'"""Stand-in for the flash-attn {version} release wheel (GitHub is unreachable '
                               f'here)."""\n__version__ = "{version.split("+")[0]}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: drzero-rehearsal\nRoot-Is-Purelib: false\n"
                         f"Tag: {'-'.join(filename[:-4].split('-')[2:])}\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / filename
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def cuda_driver_stub(venv: Path, cuda_home: Path) -> None:
    """lib64/stubs/libcuda.so exporting every cu* symbol the venv's extensions import from libcuda."""
    symbols: set[str] = set()
    for library in venv.rglob("*.so*"):
        if not library.is_file():
            continue
        dynamic = subprocess.run(["readelf", "-dW", str(library)], capture_output=True, text=True).stdout
        if "[libcuda.so.1]" not in dynamic:
            continue
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True)
        symbols |= {line.split()[-1].split("@")[0] for line in undefined.stdout.splitlines()
                    if line.split() and line.split()[-1].startswith("cu")}
    stubs = cuda_home / "lib64" / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    source = stubs / "libcuda_stub.c"
    source.write_text("".join(f"int {s}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for s in sorted(symbols))
                      or "int cuInit(void) { return 100; }\n")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RehearsalUnavailable("no C compiler (cc) to build the CUDA driver stub")
    run_logged([compiler, "-shared", "-fPIC", "-o", str(stubs / "libcuda.so"), str(source),
                "-Wl,-soname,libcuda.so.1"], stdout=subprocess.DEVNULL)


# --- a run --------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    title: str
    command: str
    returncode: int
    output: str


@dataclass
class Rehearsal:
    root: Path
    venv: Path
    steps: list[StepResult] = field(default_factory=list)

    def failed(self) -> StepResult | None:
        return next((step for step in self.steps if step.returncode), None)


def prepare(run_dir: Path) -> tuple[Path, Path]:
    """A fresh run directory: a hard-linked copy of the base venv and an empty image root."""
    base = ensure_base_venv(find_python312())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    venv = run_dir / "venv"
    # Hard links: seconds instead of copying GBs. pip and relax-torch replace files rather than
    # write into them, so the cached base is never changed through a link.
    subprocess.run(["cp", "-al", str(base), str(venv)], check=True)
    for script in (venv / "bin").iterdir():  # the venv's own activate scripts name its old path
        if script.name.startswith("activate") and script.is_file():
            text = script.read_text().replace(str(base), str(venv))
            script.unlink()
            script.write_text(text)
    root = run_dir / "root"
    for path in IMAGE_PATHS:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return venv, root


def rehearse(run_dir: Path, skip: tuple[str, ...] = (), stop_after: str | None = None,
             pip_options: dict[str, str] | None = None, replace_files: dict[str, Path] | None = None,
             dockerfile: Path = DOCKERFILE) -> Rehearsal:
    """Run the Dockerfile's instructions in a fresh copy of the base venv; stop at the first failure.

    ``skip`` names steps to leave out (see step_name), ``stop_after`` ends the run after the step whose
    command contains it, ``pip_options`` adds options to `pip install` in the steps whose command
    contains a key (not through PIP_* variables: pip's build-isolation subprocesses would inherit
    them), and ``replace_files`` maps a COPY source to another file.
    """
    venv, root = prepare(run_dir)
    rehearsal = Rehearsal(run_dir, venv)
    cuda_home = run_dir / "cuda"
    cuda_driver_stub(venv, cuda_home)
    mapping = {IMAGE_SITE_PACKAGES: str(site_packages(venv)),
               **{path: str(root / path.lstrip("/")) for path in IMAGE_PATHS}}

    def mapped(text: str) -> str:
        for image_path in sorted(mapping, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/.-]){re.escape(image_path)}(?=/|\s|$|\"|')", mapping[image_path], text)
        return text

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", CUDA_HOME=str(cuda_home),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    args: dict[str, str] = {}
    shell = ["/bin/sh", "-c"]
    cwd = root
    for instruction in instructions(dockerfile):
        keyword, text = instruction.keyword, instruction.args
        if keyword == "ARG":
            name, _, default = text.partition("=")
            if default or name not in args:
                args[name] = default
        elif keyword == "ENV":
            for pair in shlex.split(text):
                name, _, value = pair.partition("=")
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = mapped(expand(value, {**env, **args}))
        elif keyword == "SHELL":
            shell = json.loads(text)
        elif keyword == "WORKDIR":
            cwd = Path(mapped(text)) if text.startswith("/") else cwd / text
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = shlex.split(text)
            target = Path(mapped(destination)) if destination.startswith("/") else cwd / destination
            for source in sources:
                origin = (replace_files or {}).get(source, ROOT / source)
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True)
                elif destination.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / Path(source).name)
                else:
                    shutil.copy2(origin, target)
        elif keyword == "RUN":
            name = step_name(instruction)
            if name in skip:
                print(f"== skipped: {name}", flush=True)
                continue
            run_env = {**env, **args,
                       "FLASH_ATTN_WHEEL_URL": str(flash_attn_stand_in(args.get("FLASH_ATTN_WHEEL_URL", ""), run_dir))
                       if args.get("FLASH_ATTN_WHEEL_URL") else ""}
            command = mapped(text)
            for marker, options in (pip_options or {}).items():
                if marker in text:
                    command = command.replace(" -m pip install ", f" -m pip install {options} ", 1)
            print(f"== step {len(rehearsal.steps)}: {name}\n{command}", flush=True)
            started = time.monotonic()
            result = subprocess.run(shell + [command], cwd=cwd, env=run_env, capture_output=True, text=True)
            output = result.stdout + result.stderr
            (run_dir / f"step-{len(rehearsal.steps)}.log").write_text(f"$ {command}\n{output}")
            print(output[-6000:], f"-> exit {result.returncode} in {time.monotonic() - started:.0f} s", sep="\n",
                  flush=True)
            rehearsal.steps.append(StepResult(name, instruction.title, command, result.returncode, output))
            if result.returncode or (stop_after and stop_after in text):
                break
        elif keyword not in ("FROM", "LABEL", "CMD", "ENTRYPOINT", "EXPOSE", "HEALTHCHECK", "USER", "STOPSIGNAL"):
            raise ValueError(f"{dockerfile.name}: the rehearsal does not know how to run {keyword} {text!r}")
    return rehearsal


def installed(venv: Path) -> dict[str, str]:
    """canonical name -> version of every distribution in the venv (read by its own interpreter)."""
    script = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', "
              "d.metadata['Name']).lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                                     check=True).stdout)


# --- the lock -----------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def policy_names() -> set[str]:
    """Distributions docker/constraints-gpu.txt deliberately moves away from the base (numpy<2 ...)."""
    names = set()
    for line in POLICY.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            names.add(canonical(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]))
    return names


def write_lock(run_dir: Path) -> str:
    """Resolve the Dockerfile's install step against the base set; every base package but the policy
    ones is held at its version, so the lock never asks to replace what the base (or Debian) owns."""
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run_dir / "base-frozen.txt"
    moved = policy_names()
    frozen.write_text("".join(f"{n}=={v}\n" for n, (v, _) in base_set().items() if canonical(n) not in moved))
    report = run_dir / "lock-report.json"
    rehearsal = rehearse(run_dir / "run", replace_files={"docker/gpu-lock.txt": frozen},
                         pip_options={"gpu-lock.txt": f"--dry-run --report {shlex.quote(str(report))}"},
                         stop_after="gpu-lock.txt")
    install = next((s for s in rehearsal.steps if "gpu-lock.txt" in s.command), None)
    if install is None or install.returncode:
        raise SystemExit(f"the install step did not resolve:\n{(install or rehearsal.steps[-1]).output[-4000:]}")
    items = json.loads(report.read_text())["install"]
    lines = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in items)
    return ("# What docker/Dockerfile's install step adds to lmsysorg/sglang:v0.5.9 (CPython 3.12, manylinux\n"
            "# x86_64): resolved against docker/base-packages.txt with every base package held at its version\n"
            "# except those docker/constraints-gpu.txt moves. The build installs under this file (pip -c).\n"
            "# GENERATED by `python3 docker/rehearse_build.py lock`; rerun it after changing pyproject.toml's\n"
            "# retrieval/train extras, docker/constraints-gpu.txt or docker/base-packages.txt.\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="rehearse the build; exit 1 at the first failing step")
    r.add_argument("--skip-step", action="append", default=[], help="a step to leave out, e.g. relax-torch")
    sub.add_parser("lock", help="regenerate docker/gpu-lock.txt")
    args = parser.parse_args(argv)
    run_dir = cache_root() / "runs" / args.action
    if args.action == "lock":
        LOCK.write_text(write_lock(run_dir))
        print(f"wrote {LOCK}")
        return 0
    rehearsal = rehearse(run_dir, skip=tuple(args.skip_step))
    failed = rehearsal.failed()
    if failed:
        print(f"rehearsal FAILED at step {rehearsal.steps.index(failed)} ({failed.name}): exit {failed.returncode}")
        return 1
    print(f"rehearsal passed: {len(rehearsal.steps)} RUN steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
