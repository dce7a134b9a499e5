"""Typed stage configs and the one place that turns them into command-line options.

Every `drzero` command takes one dataclass config. Each field carries its help text in
``option(...)``; ``add_config_arguments`` turns the fields into argparse options so that
``drzero <cmd> --help`` documents every setting, and ``config_from_args`` builds the
dataclass back, whose ``__post_init__`` validates it. A validation failure is a
``ConfigError`` whose message names the field, the value and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value a user gave is wrong; the message names the field and what was expected."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices: typing.Sequence[Any] | None = None,
    metavar: str | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field that documents itself on the command line."""
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field of the dataclass ``cls`` to ``parser``: the command's own options first, then one
    section per option group it takes (drzero.config's ``*Options``), titled by the group."""
    hints = typing.get_type_hints(cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        group = _declaring_group(cls, f.name)
        target = parser if group is None else sections.setdefault(group, parser.add_argument_group(group))
        meta = f.metadata
        tp, _ = _unwrap_optional(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta["help"]
        if has_default and default is not None and default is not False and default != []:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]

        if typing.get_origin(tp) is list:
            item_type = typing.get_args(tp)[0]
            kwargs.update(type=item_type, nargs="*" if has_default else "+")
        elif tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction if default else "store_true")
        else:
            kwargs["type"] = tp

        if meta["positional"]:
            kwargs.pop("dest")
            kwargs["default"] = default
            target.add_argument(f.name, **kwargs)
        else:
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            kwargs["default"] = default
            if not has_default:
                kwargs["required"] = True
            target.add_argument(flag, **kwargs)


def _declaring_group(cls: type, name: str) -> str | None:
    """The title of the option group that declares field ``name`` last in ``cls``'s bases; None for the command's
    own options."""
    declaring = next(klass for klass in cls.__mro__ if name in klass.__dict__.get("__annotations__", {}))
    # a group that extends the declaring one (RunOptions over CorpusOptions) keeps the field in its own section
    return next((klass.__dict__["title"] for klass in cls.__mro__
                 if "title" in klass.__dict__ and issubclass(klass, declaring)), None)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build (and so validate) the config ``cls`` from parsed arguments."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**values)


def require(condition: bool, field: str, value: Any, expected: str) -> None:
    """Raise a ConfigError naming ``field``, its ``value`` and what was ``expected`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{field}={value!r} is not valid: expected {expected}.")


def env_default(variable: str, fallback: str) -> str:
    """An option's default that a deployment sets in the environment (compose, Modal: the volumes' paths)."""
    return os.environ.get(variable, fallback)


# -- option groups, declared once; a command's config inherits the groups it takes ------------------------------

class Options:
    """The root of every option group: each group's ``__post_init__`` validates its own fields, then its bases'."""

    def __post_init__(self) -> None:
        pass


DEFAULT_COLLECTION = "corpus"
ROLLOUT_APIS = ("generate", "chat")  # SGLang's /generate with verl's rendering, or the server's own chat template
RETRIEVER_URL_ENV = "DRZERO_RETRIEVER_URL"  # compose and Modal point the search tool at the retriever with this
DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000/retrieve"


@dataclass(kw_only=True)
class CorpusOptions(Options):
    """The corpus store and its collection, for every command that reads or writes the corpus."""

    title: ClassVar[str] = "corpus"

    db: str = option(metavar="DIR|URL", help=(
        "directory of the ChromaDB persistent store (`drzero ingest` builds it), or a Chroma server's address such "
        "as http://127.0.0.1:8000 (token from $DRZERO_CHROMA_TOKEN)"))
    collection: str = option(DEFAULT_COLLECTION, help="the corpus collection inside --db (`drzero ingest/adopt "
                                                      "--collection`)")


@dataclass(kw_only=True)
class RunOptions(CorpusOptions):
    """Where a run keeps its corpus, data and checkpoints: the volumes' paths by default (drzero.layout)."""

    title: ClassVar[str] = "corpus, data and checkpoints"

    db: str = option(env_default("DRZERO_DB", "/corpus/chromadb"), metavar="DIR|URL", help=(
        "corpus store: a directory, or a Chroma server's http(s)://host:port ($DRZERO_DB)"))
    data_dir: str = option(env_default("DRZERO_DATA_DIR", "/corpus/data"), metavar="DIR",
                           help="seed and solver parquet files ($DRZERO_DATA_DIR)")
    checkpoints: str = option(env_default("DRZERO_CHECKPOINTS", "/checkpoints"), metavar="DIR",
                              help="checkpoints, merged models and state.json ($DRZERO_CHECKPOINTS)")


@dataclass(kw_only=True)
class ClusterOptions(Options):
    """Nodes, GPUs and an existing Ray cluster, for every stage that trains or serves on GPUs."""

    title: ClassVar[str] = "nodes and GPUs"

    gpus: int = option(8, help="GPUs per node")
    nnodes: int = option(1, help="nodes of --gpus GPUs each (on a Ray cluster: its GPU nodes)")
    ray_address: str | None = option(None, metavar="HOST:PORT", help=(
        "run on this existing Ray cluster ($RAY_ADDRESS): --nnodes and --gpus come from its nodes, the services "
        "start on this node at its cluster address, and the preflight checks every node (README: More than one node)"))
    services_host: str | None = option(None, metavar="IP", help=(
        "with --ray-address: the address other nodes reach this node's retriever and SGLang at (default: this "
        "node's address in the Ray cluster)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        require(self.nnodes >= 1, "nnodes", self.nnodes, "an integer >= 1")


@dataclass(kw_only=True)
class RolloutOptions(Options):
    """How an agent rollout talks to its inference server and the retriever (evaluate)."""

    title: ClassVar[str] = "rollout"

    retriever_url: str = option(env_default(RETRIEVER_URL_ENV, DEFAULT_RETRIEVER_URL), metavar="URL",
                                help=f"the retriever's /retrieve endpoint (${RETRIEVER_URL_ENV})")
    max_turns: int = option(5, help="assistant turns per rollout (Dr. Zero: 5, i.e. <= 4 searches and an answer)")
    max_response_tokens: int | None = option(None, help=(
        "response budget of one rollout, tool tokens included (default: data.max_response_length of "
        "config/search_multiturn_grpo.yaml, as the model trained)"))
    api: str = option("generate", choices=ROLLOUT_APIS, help=(
        "'generate': token ids through SGLang's /generate, rendered and budgeted exactly as verl does (needs a "
        "tokenizer); 'chat': the server applies its own chat template (does not match training)"))
    tokenizer: str | None = option(None, metavar="PATH", help="the served model's tokenizer (name or directory)")
    thinking: bool = option(False, help=(
        "render with Qwen3 thinking on, for a model trained with --thinking (off: enable_thinking=false for every "
        "template that has the switch)"))
    concurrency: int = option(64, help="generate requests in flight at once, per server")
    timeout: float = option(300.0, help="seconds one generate request may take before it is retried")
    retries: int = option(4, help="extra attempts of a generate request after a 5xx, timeout or connection error")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.retriever_url.startswith(("http://", "https://")), "retriever_url", self.retriever_url,
                "an http:// or https:// URL")
        require(self.max_turns >= 1, "max_turns", self.max_turns, "an integer >= 1")
        require(self.max_response_tokens is None or self.max_response_tokens >= 1, "max_response_tokens",
                self.max_response_tokens, "an integer >= 1")
        require(self.api in ROLLOUT_APIS, "api", self.api, " or ".join(repr(a) for a in ROLLOUT_APIS))
        require(self.concurrency >= 1, "concurrency", self.concurrency, "an integer >= 1")
        require(self.timeout > 0, "timeout", self.timeout, "a number of seconds > 0")
        require(self.retries >= 0, "retries", self.retries, "an integer >= 0")


@dataclass(kw_only=True)
class SGLangOptions(Options):
    """The SGLang server a stage starts beside it: the challenger's reward server, gen-data's proposer server."""

    title: ClassVar[str] = "SGLang server (the stage starts one on :8001 unless --sglang-url names one)"
    sglang_url: str | None = option(None, metavar="URL", help=(
        "an SGLang server already serving the stage's model; default: start one on :8001"))
    sglang_dp: int | None = option(None, help="data parallel size of the started server (default: the model's "
                                              "recipe, else the stage's: 4)")
    sglang_tp: int | None = option(None, help="tensor parallel size of the started server (default: the model's "
                                              "recipe, else the stage's: 2)")
    sglang_mem: float | None = option(None, help="--mem-fraction-static of the started server (default: the "
                                                 "model's recipe, else the stage's: 0.5 beside the challenger's "
                                                 "trainer, 0.8 for gen-data)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sglang_dp", "sglang_tp"):
            require(getattr(self, name) is None or getattr(self, name) >= 1, name, getattr(self, name),
                    "an integer >= 1")
        require(self.sglang_mem is None or 0 < self.sglang_mem < 1, "sglang_mem", self.sglang_mem,
                "a fraction between 0 and 1")
