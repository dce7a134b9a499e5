"""What a service is: the command that starts it, where it listens, what it inherits.

    spec = sglang_service(model_path, dp=2)     # or retriever_service(db), or ServiceSpec(...) for anything else
    spec.url, spec.health_url, spec.command_line

``drzero.services.supervisor`` starts specs as child processes; a child gets ``child_environment``:
ours without secrets (W&B, Hugging Face, cloud keys), except those the spec names in ``pass_secrets``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Sequence

from drzero.store_location import STORE_SECRET_ENVS, is_server_address

RETRIEVER_PORT = 8000
SGLANG_PORT = 8001
# The retriever loads an embedder and opens ChromaDB; a first model load from a cold
# network volume can take many minutes for SGLang, so its budget is much larger.
RETRIEVER_STARTUP_TIMEOUT = 300.0
SGLANG_STARTUP_TIMEOUT = 1800.0


class ServiceError(RuntimeError):
    """A service could not be started, stayed unhealthy or died; the message says what to do."""


@dataclass
class ServiceSpec:
    """How to start one HTTP service and how to tell that it is ready."""

    name: str
    command: list[str]
    port: int
    host: str = "127.0.0.1"
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)  # added to os.environ (less its secrets) for the child
    pass_secrets: tuple[str, ...] = ()  # secret variables the child needs from os.environ (see child_environment)
    startup_timeout: float = RETRIEVER_STARTUP_TIMEOUT
    cwd: str | os.PathLike | None = None

    @property
    def url(self) -> str:
        # A server bound to a wildcard address is reached over loopback from here.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.url + self.health_path

    @property
    def command_line(self) -> str:
        """The command as a shell line, for dry runs and logs."""
        return shlex.join(str(part) for part in self.command)


RETRIEVER_DEVICES = ("auto", "cuda", "cpu")


def retriever_service(
    db: str | os.PathLike,
    port: int = RETRIEVER_PORT,
    host: str = "127.0.0.1",
    device: str = "cpu",
    embedder: str | None = None,
    copy_to_local: str | os.PathLike | None = None,
    collection: str = "corpus",
    *,
    startup_timeout: float = RETRIEVER_STARTUP_TIMEOUT,
) -> ServiceSpec:
    """`drzero serve-retriever` over the corpus at ``db``, run by this interpreter."""
    command = [sys.executable, "-m", "drzero.cli", "serve-retriever", "--db", str(db),
               "--collection", collection, "--host", host, "--port", str(port), "--device", device]
    if embedder:
        command += ["--embedder", embedder]
    if copy_to_local:
        command += ["--copy-to-local", str(copy_to_local)]
    # a Chroma server's token (drzero.store_location) is a secret the retriever needs; a local store needs none
    return ServiceSpec("retriever", command, port, host=host, startup_timeout=startup_timeout,
                       pass_secrets=STORE_SECRET_ENVS if is_server_address(db) else ())


def sglang_service(
    model_path: str | os.PathLike,
    port: int = SGLANG_PORT,
    dp: int = 1,
    tp: int = 1,
    mem_fraction: float = 0.5,
    tool_call_parser: str = "qwen25",
    served_model_name: str = "solver",
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = SGLANG_STARTUP_TIMEOUT,
) -> ServiceSpec:
    """An SGLang server for ``model_path`` with ``dp`` data-parallel replicas of ``tp`` GPUs each."""
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", host, "--port", str(port), "--dp-size", str(dp), "--tp-size", str(tp),
               "--mem-fraction-static", str(mem_fraction), "--tool-call-parser", tool_call_parser,
               "--served-model-name", served_model_name, *map(str, extra_args)]
    # a Hugging Face token only for weights it is allowed to download; never the W&B key
    return ServiceSpec("sglang", command, port, host=host, startup_timeout=startup_timeout,
                       pass_secrets=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))


# --- what a child inherits -----------------------------------------------------------------

# A variable is a secret when one of its _-separated words is one of these: WANDB_API_KEY,
# HF_TOKEN, MODAL_TOKEN_SECRET, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN ... (not TOKENIZERS_PARALLELISM).
_SECRET_WORDS = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|KEY|APIKEY)(_|$)")


def is_secret(variable: str) -> bool:
    return bool(_SECRET_WORDS.search(variable.upper()))


def child_environment(spec: ServiceSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a service child runs with: ours, less every secret it does not name, plus its own."""
    environ = os.environ if environ is None else environ
    kept = {k: v for k, v in environ.items() if not is_secret(k) or k in spec.pass_secrets}
    # Python children block-buffer a piped stdout; unbuffered, their lines arrive as written.
    return {"PYTHONUNBUFFERED": "1", **kept, **spec.env}
