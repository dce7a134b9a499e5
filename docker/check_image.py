#!/usr/bin/env python3
"""Build-time helper and check for the drzero images (docker/Dockerfile, docker/retriever.Dockerfile).

    python3 docker/check_image.py pins --gpu            # name==version of what the base image ships (constraints)
    python3 docker/check_image.py pins --names torch    # the same for a chosen set of distributions
    python3 docker/check_image.py requirements --extras retrieval,train [--also NAME ...]
    python3 docker/check_image.py relax-torch nvidia-cudnn-cu12 nvidia-nccl-cu12
    python3 docker/check_image.py check --profile gpu --sglang-tag v0.5.9
    python3 docker/check_image.py check --profile cpu | retriever

``pins`` reads installed distributions through importlib.metadata rather than ``pip freeze``:
the SGLang base image installs sglang from a source checkout, which ``pip freeze`` prints as an
``-e`` line that a constraints file cannot hold.

``requirements`` prints the dependencies of pyproject.toml's extras (one per line) so that the
images install exactly what the package declares, with the package itself installed ``--no-deps``.

``relax-torch`` deletes torch's installed requirements on the CUDA libraries the base image
replaced with newer builds (see relax_requirements), so that pip can install under the base's pins.

``check`` imports the stack, prints the versions and exits 1 on a mismatch: Python, torch, verl,
flash-attn, sglang, numpy < 2 (verl 0.7.1), drzero and its config directory, and - for the GPU
image - every SGLang symbol verl 0.7.1 imports (the API drift that broke earlier Dr. Zero images).
Expected versions default to the project pins and can be overridden by the environment
(EXPECT_PYTHON, EXPECT_TORCH, EXPECT_VERL, EXPECT_FLASH_ATTN, EXPECT_SGLANG).

``relax-torch`` deletes torch's installed requirements on the CUDA libraries the base image replaced
with newer builds (see relax_requirements), so that pip can install under the base's pins.

Standard library only until ``check`` imports the stack; runs on Python >= 3.11.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import importlib
import importlib.metadata as metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXPECTED = {
    "python": "3.12",
    "torch": "2.9.1",
    "verl": "0.7.1",
    "flash_attn": "2.8.3",
}

# Distributions the GPU base image owns: pinned to the installed versions so that no later pip
# install can move them (a moved torch or CUDA wheel breaks sglang, sgl-kernel and flash-attn).
GPU_PINNED = ("torch", "torchvision", "torchaudio", "triton", "sglang", "sgl-kernel", "sglang-kernel",
              "flashinfer-python", "flashinfer-cubin", "flashinfer-jit-cache", "transformers", "tokenizers",
              "xgrammar", "cuda-python", "cuda-bindings")
GPU_PINNED_PREFIXES = ("nvidia-",)

# Every sglang name verl 0.7.1's SGLang rollout (verl/workers/rollout/sglang_rollout/*.py) uses:
# its module-level and function-level (lazy) `from sglang... import` lines and the attributes it
# reads from or assigns to sglang modules it imports. tests/test_containers.py re-derives this
# table from the installed verl, so it cannot drift. Every name must exist at the top level of its
# module; a missing one is the API drift that broke earlier Dr. Zero images (sglang moved
# ReleaseMemoryOccupationReqInput to io_struct in 0.5.2, get_ip became get_local_ip_auto, ...).
SGLANG_SYMBOLS = {
    "sglang": ["__version__"],
    "sglang.srt.entrypoints.EngineBase": ["EngineBase"],
    # verl replaces _set_envs_and_config (a silent no-op if sglang stopped defining it) and passes
    # the three *_process/manager functions to _launch_subprocesses on sglang >= 0.5.7
    "sglang.srt.entrypoints.engine": ["_set_envs_and_config", "init_tokenizer_manager", "run_detokenizer_process",
                                      "run_scheduler_process"],
    "sglang.srt.entrypoints.http_server": ["ServerArgs", "_GlobalState", "_launch_subprocesses", "app",
                                           "launch_server", "set_global_state"],
    "sglang.srt.layers.moe.routed_experts_capturer": ["extract_routed_experts_from_meta_info"],
    "sglang.srt.managers.io_struct": ["ContinueGenerationReqInput", "GenerateReqInput", "PauseGenerationReqInput",
                                      "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput",
                                      "UpdateWeightsFromTensorReqInput"],
    "sglang.srt.managers.tokenizer_manager": ["ServerStatus"],
    "sglang.srt.server_args": ["ServerArgs"],
    "sglang.srt.utils": ["assert_pkg_version", "is_cuda", "kill_process_tree", "set_prometheus_multiproc_dir",
                         "set_ulimit"],
    "sglang.srt.utils.common": ["add_prometheus_middleware"],
    "sglang.srt.weight_sync.utils": ["update_weights"],
}
# verl 0.7.1 passes these to _launch_subprocesses on sglang >= 0.5.7.
LAUNCH_KWARGS_SINCE_057 = ("init_tokenizer_manager_func", "run_scheduler_process_func",
                           "run_detokenizer_process_func")
VERL_SGLANG_MODULES = ("verl.workers.rollout.sglang_rollout.sglang_rollout",
                       "verl.workers.rollout.sglang_rollout.async_sglang_server",
                       "verl.workers.rollout.sglang_rollout.http_server_engine")
TOOL_CALL_PARSER = "qwen25"  # what drzero.models.registry gives every Qwen model
CONFIG_FILES = ("search_multiturn_grpo.yaml", "search_tool_config.yaml")


# --- pins --------------------------------------------------------------------------------------------

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Canonical distribution name -> version, for everything importable by this interpreter."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return found


def pins(names: list[str], prefixes: tuple[str, ...] = ()) -> list[str]:
    wanted = {_canonical(n) for n in names}
    return sorted(f"{name}=={version}" for name, version in installed().items()
                  if name in wanted or name.startswith(prefixes))


# --- requirements ------------------------------------------------------------------------------------

def requirements(pyproject: Path, extras: list[str], also: list[str]) -> list[str]:
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += optional[extra]
    everything = [r for group in optional.values() for r in group]
    for name in also:  # a single requirement from any extra, with the pin pyproject gives it
        match = [r for r in everything if _canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) == _canonical(name)]
        if not match:
            raise SystemExit(f"{name} is not a requirement of any extra in {pyproject}")
        lines.append(match[0])
    seen, unique = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    return unique


# --- relax-torch -------------------------------------------------------------------------------------

def relax_requirements(owner: str, names: list[str]) -> int:
    """Delete ``owner``'s installed Requires-Dist lines on ``names`` (what verl's own sglang image does).

    sglang's base image force-installs newer NCCL and cuDNN wheels over torch's exact pins
    (torch 2.9.1 pins nvidia-cudnn-cu12==9.10.2.21 and nvidia-nccl-cu12==2.27.5; the base carries
    9.16.0.29 and 2.28.3). pip checks an installed distribution's requirements whenever it
    resolves anything that depends on it, so every later ``pip install`` under the base's pins
    fails with ResolutionImpossible until torch stops asking for the old versions. Only the
    metadata changes; the libraries stay the base's. The METADATA file is found through
    importlib.metadata (no site-packages path) and replaced, not edited in place.
    """
    try:
        dist = metadata.distribution(owner)
    except metadata.PackageNotFoundError:
        print(f"relax-torch: {owner} is not installed for {sys.executable}", file=sys.stderr)
        return 1
    files = [f for f in dist.files or () if f.name == "METADATA" and f.parent.name.endswith(".dist-info")]
    if len(files) != 1:
        print(f"relax-torch: cannot find {owner}'s METADATA through its RECORD ({dist.files and len(files)} found)",
              file=sys.stderr)
        return 1
    path = Path(files[0].locate())
    wanted = {_canonical(name) for name in names}
    kept, dropped = [], []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = line.split(":", 1)[1].strip()
            name = _canonical(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0])
            if name in wanted:
                dropped.append((name, requirement))
                continue
        kept.append(line)
    if missing := sorted(wanted - {name for name, _ in dropped}):
        print(f"relax-torch: {owner} {dist.version} has no requirement on {', '.join(missing)}; "
              f"it requires {', '.join(sorted(_canonical(r.split()[0]) for r in dist.requires or []))}. "
              f"Update the names in docker/Dockerfile.", file=sys.stderr)
        return 1
    replacement = path.with_name(path.name + ".relaxed")
    replacement.write_text("".join(kept), encoding="utf-8")
    os.replace(replacement, path)  # a new file: hard-linked copies of this tree keep the original
    have = installed()
    for name, requirement in dropped:
        print(f"{owner} {dist.version}: dropped requirement {requirement!r} (installed: {name} {have.get(name)})")
    return 0


# --- check -------------------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def ok(self, what: str, detail: str) -> None:
        print(f"  ok    {what:<28} {detail}")

    def warn(self, what: str, detail: str) -> None:
        print(f"  warn  {what:<28} {detail}")

    def fail(self, what: str, detail: str) -> None:
        print(f"  FAIL  {what:<28} {detail}")
        self.failures.append(f"{what}: {detail}")

    def expect(self, what: str, actual: str | None, expected: str) -> None:
        """``actual`` must equal ``expected`` or extend it by a local/patch suffix (2.9.1+cu129 for 2.9.1)."""
        if actual is not None and re.fullmatch(re.escape(expected) + r"([+.].*)?", actual):
            self.ok(what, actual)
        else:
            self.fail(what, f"{actual} (expected {expected})")


def top_level_names(source: str, star_imports: list[tuple[int, str]] | None = None) -> set[str]:
    """Names a module defines or imports at its top level, including inside top-level if/try blocks.

    ``from M import *`` lines are appended to ``star_imports`` as (level, module) for the caller.
    """
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            names.add(leaf.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        if star_imports is not None and isinstance(node, ast.ImportFrom):
                            star_imports.append((node.level, node.module or ""))
                    else:
                        names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.With):
                visit(node.body)
    visit(ast.parse(source).body)
    return names


def module_source(module: str) -> tuple[str, bool] | None:
    """(source, is_package) of ``module``, located on disk without importing anything of it.

    Only the top-level package is looked up (find_spec of a top-level name imports nothing), so a
    parent package that cannot be imported without a GPU does not hide its submodules' sources.
    """
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        if not spec.origin or not spec.origin.endswith(".py"):
            return None
        return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None
    for location in spec.submodule_search_locations or ():
        base = Path(location).joinpath(*rest.split("."))
        for candidate, is_package in ((base / "__init__.py", True), (base.with_suffix(".py"), False)):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8"), is_package
    return None


def static_names(module: str, depth: int = 0) -> set[str] | None:
    """Top-level names of ``module`` read from source, following ``from M import *`` (public names)."""
    found = module_source(module)
    if found is None:
        return None
    source, is_package = found
    stars: list[tuple[int, str]] = []
    names = top_level_names(source, stars)
    for level, target in stars if depth < 5 else []:
        if level:  # relative: resolve against this module's package
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(level - 1):
                package = package.rpartition(".")[0]
            target = f"{package}.{target}" if target else package
        names |= {n for n in static_names(target, depth + 1) or () if not n.startswith("_")}
    return names


def check_symbols(report: Report, table: dict[str, list[str]], *, static: bool = False) -> None:
    """Each symbol exists in its module: imported and looked up when the module imports here, read
    from the source when it cannot be imported for want of a GPU (or ``static``). A module that
    fails to import for any other reason fails the check."""
    for module, symbols in table.items():
        how, present = "static", None
        if not static:
            try:
                loaded = importlib.import_module(module)
                how, present = "import", {s for s in symbols if hasattr(loaded, s)}
            except Exception as error:  # noqa: BLE001
                if not _environment_error(error):
                    report.fail("sglang module", f"import {module}: {type(error).__name__}: {error}")
                    continue
        if present is None:
            names = static_names(module)
            if names is None:
                report.fail("sglang module", f"{module} not found")
                continue
            present = set(symbols) & names
        missing = sorted(set(symbols) - present)
        if missing:
            report.fail("sglang symbols", f"{module} lacks {', '.join(missing)} (verl 0.7.1 imports them)")
        else:
            report.ok("sglang symbols", f"{module}: {len(symbols)} present ({how})")


def launch_subprocesses_params() -> set[str] | None:
    """Parameter names of sglang's ``_launch_subprocesses`` (http_server or engine), from source."""
    for module in ("sglang.srt.entrypoints.http_server", "sglang.srt.entrypoints.engine"):
        found = module_source(module)
        if found is None:
            continue
        for node in ast.parse(found[0]).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "_launch_subprocesses":
                arguments = node.args
                return {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    return None


def _environment_error(error: BaseException) -> bool:
    """An import that failed for want of a GPU or driver on the build machine, not for API drift."""
    text = str(error)
    if isinstance(error, ImportError) and ("cannot import name" in text or "No module named" in text):
        return False
    return bool(re.search(r"libcuda|shared object|CUDA|cuda|driver|NVIDIA|GPU", text))


def import_modules(report: Report, modules: tuple[str, ...], what: str) -> dict[str, object]:
    loaded = {}
    for name in modules:
        try:
            loaded[name] = importlib.import_module(name)
            report.ok(what, f"import {name}")
        except Exception as error:  # noqa: BLE001 - every failure is reported, then judged
            if _environment_error(error):
                report.warn(what, f"import {name}: {type(error).__name__}: {error} (no GPU at build time; "
                                  f"the static symbol check covers the API, `drzero preflight` re-checks on a GPU)")
            else:
                report.fail(what, f"import {name}: {type(error).__name__}: {error}")
    return loaded


def _ensure_cuda_driver_stub() -> None:
    """Re-exec with the CUDA toolkit's libcuda stub on the library path when no driver is present.

    Build machines have no NVIDIA driver; some extensions (sgl-kernel) link libcuda.so.1 and fail
    to load without it. The stub satisfies the loader (cuInit then reports no device), so imports
    test what they should: the Python API. Nothing is written to the image.
    """
    if os.environ.get("DRZERO_CHECK_STUBBED"):
        return
    try:
        ctypes.CDLL("libcuda.so.1")
        return
    except OSError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    stub = Path(cuda_home) / "lib64" / "stubs" / "libcuda.so"
    if not stub.is_file():
        return
    directory = tempfile.mkdtemp(prefix="cuda-stub-")
    os.symlink(stub, Path(directory) / "libcuda.so.1")
    env = dict(os.environ, DRZERO_CHECK_STUBBED=directory,
               LD_LIBRARY_PATH=os.pathsep.join(p for p in (directory, os.environ.get("LD_LIBRARY_PATH")) if p))
    print(f"no NVIDIA driver here: loading the CUDA stub {stub} for the import checks", flush=True)
    result = subprocess.run([sys.executable, *sys.argv], env=env)
    shutil.rmtree(directory, ignore_errors=True)
    sys.exit(result.returncode)


def sglang_version_from_tag(tag: str) -> str:
    """v0.5.9 -> 0.5.9, v0.5.6.post2 -> 0.5.6.post2, v0.5.9-cu129-amd64 -> 0.5.9."""
    match = re.fullmatch(r"v?(\d+\.\d+\.\d+(?:\.post\d+|rc\d+)?)(?:-.*)?", tag)
    if not match:
        raise SystemExit(f"cannot read an sglang version from the tag {tag!r}")
    return match.group(1)


def check(profile: str, sglang_tag: str | None) -> int:
    expected = {key: os.environ.get(f"EXPECT_{key.upper()}", value) for key, value in EXPECTED.items()}
    if profile == "gpu":
        _ensure_cuda_driver_stub()
    report = Report()
    print(f"drzero image check ({profile})")

    report.expect("python", f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
                  expected["python"])
    python_on_path = shutil.which("python")
    if python_on_path:
        report.ok("python on PATH", python_on_path)
    else:
        report.fail("python on PATH", "missing (Modal and drzero's services need `python`)")

    if profile in ("gpu", "cpu"):
        try:
            import torch

            report.expect("torch", torch.__version__, expected["torch"])
            cuda = torch.version.cuda
            if profile == "gpu":
                if cuda and cuda.startswith("12."):
                    report.ok("torch CUDA", cuda)
                else:
                    report.fail("torch CUDA", f"{cuda} (the flash-attn wheel is built for CUDA 12)")
                abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
                (report.ok if abi else report.fail)("torch cxx11 ABI", f"{abi} (the flash-attn wheel needs True)")
            elif cuda:
                report.fail("torch CUDA", f"{cuda}: the CPU image must carry the CPU build of torch")
            else:
                report.ok("torch CUDA", "none (CPU build)")
        except Exception as error:  # noqa: BLE001
            report.fail("torch", f"{type(error).__name__}: {error}")

        try:
            import numpy

            major = int(numpy.__version__.split(".")[0])
            (report.ok if major < 2 else report.fail)("numpy", f"{numpy.__version__} (verl 0.7.1 needs < 2)")
        except Exception as error:  # noqa: BLE001
            report.fail("numpy", f"{type(error).__name__}: {error}")

        try:
            report.expect("verl", metadata.version("verl"), expected["verl"])
            import verl  # noqa: F401
            import verl.trainer.main_ppo  # noqa: F401
            from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop  # noqa: F401

            report.ok("verl imports", "main_ppo, ToolAgentLoop")
        except Exception as error:  # noqa: BLE001
            report.fail("verl", f"{type(error).__name__}: {error}")
        try:
            import cachetools  # noqa: F401 - verl 0.7.1 imports it without declaring it

            report.ok("cachetools", metadata.version("cachetools"))
        except Exception as error:  # noqa: BLE001
            report.fail("cachetools", f"{type(error).__name__}: {error}")

    if profile == "gpu":
        if sglang_tag:
            expected["sglang"] = os.environ.get("EXPECT_SGLANG", sglang_version_from_tag(sglang_tag))
        try:
            sglang_version = metadata.version("sglang")
            if "sglang" in expected:
                report.expect("sglang", sglang_version, expected["sglang"])
            else:
                report.ok("sglang", sglang_version)
        except metadata.PackageNotFoundError:
            report.fail("sglang", "not installed")
        # verl 0.7.1 asserts the distribution *named* sgl-kernel (renamed sglang-kernel in sglang 0.5.12)
        if kernel := installed().get("sgl-kernel"):
            report.ok("sgl-kernel", kernel)
        else:
            renamed = installed().get("sglang-kernel")
            report.fail("sgl-kernel", "not installed" + (f" (sglang-kernel {renamed} is: the sglang >= 0.5.12 name, "
                                                         f"which verl 0.7.1's assert_pkg_version does not accept)"
                                                         if renamed else ""))
        check_symbols(report, SGLANG_SYMBOLS)
        if "sglang" in expected and tuple(map(int, expected["sglang"].split(".")[:3])) >= (0, 5, 7):
            params = launch_subprocesses_params()
            if params is None:
                report.warn("_launch_subprocesses", "definition not found in http_server or engine; not checked")
            elif missing := [kw for kw in LAUNCH_KWARGS_SINCE_057 if kw not in params]:
                report.fail("_launch_subprocesses", f"lacks keyword(s) {missing} that verl 0.7.1 passes on >= 0.5.7")
            else:
                report.ok("_launch_subprocesses", "takes the >= 0.5.7 keywords verl passes")
        loaded = import_modules(report, VERL_SGLANG_MODULES, "verl sglang rollout")
        if loaded:
            try:
                from sglang.srt.function_call.function_call_parser import FunctionCallParser

                parsers = getattr(FunctionCallParser, "ToolCallParserEnum", None)
                if parsers is None:
                    report.warn("tool-call parser", "FunctionCallParser.ToolCallParserEnum not found; not checked")
                elif TOOL_CALL_PARSER in parsers:
                    report.ok("tool-call parser", f"{TOOL_CALL_PARSER} known to SGLang")
                else:
                    report.fail("tool-call parser", f"{TOOL_CALL_PARSER} unknown; SGLang has {sorted(parsers)}")
            except Exception as error:  # noqa: BLE001
                report.warn("tool-call parser", f"{type(error).__name__}: {error}")
        # No leniency here: the flash-attn wheel is a prebuilt binary for one torch/CUDA/ABI, and
        # an import that fails on the build machine (with the driver stub loaded) fails on a GPU too.
        try:
            report.expect("flash-attn", metadata.version("flash-attn"), expected["flash_attn"])
            import flash_attn

            report.ok("flash_attn import", flash_attn.__version__)
        except Exception as error:  # noqa: BLE001
            report.fail("flash-attn", f"{type(error).__name__}: {error}")

    if profile in ("retriever", "cpu", "gpu"):
        for module in ("chromadb", "sentence_transformers", "fastapi", "uvicorn"):
            try:
                importlib.import_module(module)
                report.ok(module, metadata.version(module.replace("_", "-")))
            except Exception as error:  # noqa: BLE001
                report.fail(module, f"{type(error).__name__}: {error}")

    try:
        import drzero
        import drzero.cli  # noqa: F401
        from drzero.layout import config_dir

        report.ok("drzero", getattr(drzero, "__version__", "?"))
        if shutil.which("drzero"):
            report.ok("drzero on PATH", shutil.which("drzero"))
        else:
            report.fail("drzero on PATH", "the console script is missing")
        directory = config_dir()
        missing = [f for f in CONFIG_FILES if not (directory / f).is_file()]
        if missing or not os.environ.get("DRZERO_CONFIG_DIR"):
            report.fail("config dir", f"{directory} (DRZERO_CONFIG_DIR={os.environ.get('DRZERO_CONFIG_DIR')!r}; "
                                      f"missing {missing})")
        else:
            report.ok("config dir", str(directory))
        if profile in ("cpu", "gpu"):
            from drzero.rollout.search_tool import SearchTool  # noqa: F401 - what the tool config names

            report.ok("search tool", "drzero.rollout.search_tool.SearchTool")
    except Exception as error:  # noqa: BLE001
        report.fail("drzero", f"{type(error).__name__}: {error}")

    if profile == "gpu":
        result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        print(f"  info  pip check: {len(lines) if result.returncode else 0} issue(s)")
        for line in lines[:40] if result.returncode else []:
            print(f"          {line}")

    if report.failures:
        print(f"image check failed ({len(report.failures)}):", file=sys.stderr)
        for failure in report.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("image check passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pins", help="name==version lines for installed distributions (a constraints file)")
    p.add_argument("--gpu", action="store_true", help="the set the SGLang base image owns (torch, CUDA, sglang, ...)")
    p.add_argument("--names", nargs="*", default=[], help="distributions to pin")
    r = sub.add_parser("requirements", help="the dependencies of pyproject.toml extras, one per line")
    r.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    r.add_argument("--extras", default="", help="comma-separated extras")
    r.add_argument("--also", nargs="*", default=[], help="single requirements taken from any extra, with their pin")
    x = sub.add_parser("relax-torch", help="drop torch's installed requirements on the named distributions")
    x.add_argument("names", nargs="+", help="distributions the base replaced under torch (nvidia-cudnn-cu12 ...)")
    c = sub.add_parser("check", help="import the stack, print versions, fail on a mismatch")
    c.add_argument("--profile", choices=["gpu", "cpu", "retriever"], required=True)
    c.add_argument("--sglang-tag", help="the base image tag; the installed sglang must match it")
    args = parser.parse_args(argv)

    if args.action == "pins":
        lines = pins(list(args.names) + (list(GPU_PINNED) if args.gpu else []),
                     GPU_PINNED_PREFIXES if args.gpu else ())
        if not lines:
            print("no matching distributions installed", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0
    if args.action == "requirements":
        print("\n".join(requirements(args.pyproject, [e for e in args.extras.split(",") if e], args.also)))
        return 0
    if args.action == "relax-torch":
        return relax_requirements("torch", args.names)
    return check(args.profile, args.sglang_tag)


if __name__ == "__main__":
    sys.exit(main())
