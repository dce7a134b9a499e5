#!/usr/bin/env python3
"""Regenerate docker/base-packages.txt: the Python packages lmsysorg/sglang:v0.5.9 carries.

    python3 docker/base_set.py > docker/base-packages.txt      # needs PyPI; a few minutes

No Docker engine runs where the tests run, so the GPU image's base is reconstructed from what built
it: sglang's own Dockerfile (tag v0.5.9, CUDA 12.9.1) installs ``sgl-kernel==0.3.21``, then
``pip install -e "python[all]"`` from the v0.5.9 checkout, then force-installs a newer NCCL and
cuDNN over torch's pins with ``--no-deps``. This script resolves the same request - the sglang
0.5.9 wheel's metadata with its ``all`` extra, for CPython 3.12 on manylinux x86_64, against PyPI as
it was on the day sglang 0.5.9 was released - and then applies those overrides. The result is the
package set tests/test_image_rehearsal.py installs (``--no-deps``) into a Python 3.12 venv before
it runs docker/Dockerfile's RUN steps in it.

Known differences from the real image, none of which the rehearsal relies on: torch is PyPI's
2.9.1 (CUDA 12.8 build) where the image has 2.9.1+cu129 from PyTorch's index (the same
Requires-Dist lines for cuDNN and NCCL); the developer tools sglang's Dockerfile adds (pytest,
black, nixl, mooncake, ...) are left out; the apt packages' Python modules are listed under DEBIAN
below with Ubuntu 24.04's versions, which this machine cannot confirm.

Standard library only; runs on Python >= 3.11.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SGLANG = "0.5.9"
# sglang 0.5.9's wheel is dated 2026-02-23; resolving against PyPI as of the next day gives the
# versions its image got (numpy 2.4.2, pyarrow 23.0.1, ...), not today's.
UPLOADED_PRIOR_TO = "2026-02-24T00:00:00Z"
REQUEST = (
    f"sglang[all]=={SGLANG}",    # `pip install -e "python[${BUILD_TYPE}]"`, BUILD_TYPE=all
    "sgl-kernel==0.3.21",       # ARG SGL_KERNEL_VERSION, installed first for CUDA 12.9.1
    "pip", "setuptools", "wheel", "html5lib", "six",  # `pip install --upgrade pip setuptools wheel html5lib six`
)
# sglang's Dockerfile, "Patching packages for CUDA 12/13 compatibility" (CUDA 12 branch):
#   pip install nvidia-nccl-cu12==2.28.3 --force-reinstall --no-deps
#   pip install nvidia-cudnn-cu12==9.16.0.29 --force-reinstall --no-deps
# torch 2.9.1 itself requires nvidia-nccl-cu12==2.27.5 and nvidia-cudnn-cu12==9.10.2.21; sglang
# 0.5.9 refuses to start torch 2.9.1 with cuDNN < 9.15 (its Conv3d regression check).
OVERRIDES = {"nvidia-nccl-cu12": "2.28.3", "nvidia-cudnn-cu12": "9.16.0.29"}
# Distributions that apt installs into /usr/lib/python3/dist-packages of the base (Ubuntu 24.04's
# versions): sglang's Dockerfile apt-installs software-properties-common (for add-apt-repository),
# which pulls python3-launchpadlib -> python3-lazr.restfulclient -> python3-oauthlib, and Debian's
# python3-oauthlib depends on python3-blinker, python3-cryptography and python3-jwt; PyYAML is
# python3-yaml (sglang[diffusion] pins PyYAML==6.0.1, the same version, so pip kept it). pip cannot
# uninstall these ("RECORD file not found ... installed by debian"), so nothing the image adds may
# ask for another version of them. The rehearsal installs them without a RECORD, as Debian does.
DEBIAN = {"PyYAML": "6.0.1", "oauthlib": "3.2.2", "blinker": "1.7.0", "cryptography": "41.0.7", "PyJWT": "2.7.0"}
# CPython 3.12, x86_64 Linux with glibc 2.39 (Ubuntu 24.04): pip does not expand --platform
# itself, so every manylinux tag the image's pip would accept is listed.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pip_with_upload_dates(python: str, scratch: Path) -> str:
    """``python`` if its pip knows --uploaded-prior-to (pip >= 26), else a scratch venv's new pip."""
    version = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()
    if len(version) > 1 and int(version[1].split(".")[0]) >= 26:
        return python
    venv = scratch / "pip26"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "pip>=26"], check=True)
    return str(venv / "bin" / "python")


def resolve(python: str, index_url: str) -> dict[str, str]:
    """name -> version of everything ``pip install REQUEST`` installs into an empty 3.12 environment."""
    with tempfile.TemporaryDirectory() as scratch:
        python = pip_with_upload_dates(python, Path(scratch))
        report = Path(scratch) / "report.json"
        command = [python, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
                   "--index-url", index_url, "--report", str(report), "--uploaded-prior-to", UPLOADED_PRIOR_TO,
                   "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                   "--abi", "none", "--only-binary=:all:", *[f"--platform={p}" for p in PLATFORMS], *REQUEST]
        cert = Path("/etc/ssl/certs/ca-certificates.crt")
        if cert.is_file():  # --isolated ignores PIP_CERT and pip.conf
            command[5:5] = ["--cert", str(cert)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"pip could not resolve {' '.join(REQUEST)}:\n{result.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}


def render(resolved: dict[str, str]) -> str:
    lines = [
        "# The Python packages of lmsysorg/sglang:v0.5.9 (docker/Dockerfile's base), reconstructed.",
        "# GENERATED by `python3 docker/base_set.py > docker/base-packages.txt`; do not edit by hand.",
        f"# Source: the sglang {SGLANG} wheel's metadata (extra `all`) + sgl-kernel 0.3.21, resolved for",
        f"# CPython 3.12 manylinux x86_64 against PyPI before {UPLOADED_PRIOR_TO}, then sglang's",
        "# Dockerfile overrides (# override) and the apt-installed modules (# debian).",
    ]
    by_name = {canonical(name): (name, version) for name, version in resolved.items()}
    for name, version in OVERRIDES.items():
        by_name[canonical(name)] = (name, f"{version}  # override")
    for name, version in DEBIAN.items():
        by_name[canonical(name)] = (name, f"{version}  # debian")
    lines += [f"{name}=={version}" for _, (name, version) in sorted(by_name.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose pip resolves (a scratch venv with pip >= 26 if it is older)")
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    args = parser.parse_args(argv)
    sys.stdout.write(render(resolve(args.python, args.index_url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
