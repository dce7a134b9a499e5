"""Known failures in a run's log, each with the one-line fix: the lines a person would otherwise grep for.

    python -m backends.modal logs              # the latest run's log, known failures highlighted
    python -m backends.modal logs --errors     # only those, with a few lines of context

Pure functions over log lines (with or without the `[challenger] ` service prefixes the Modal
Functions add), so the same doctor reads a Modal log, a `docker compose logs` dump or a saved file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

PREFIX = re.compile(r"^\s*(?:\S+Z\s+)?\[(?P<service>[\w.-]+)\]\s")  # `[solver] ...`, optionally after a timestamp


@dataclass(frozen=True)
class Failure:
    """A known failure: what it is, how to recognise its line, and the fix (``{name}`` fills from the match)."""

    name: str
    pattern: re.Pattern
    fix: str


def _failure(name: str, pattern: str, fix: str) -> Failure:
    return Failure(name, re.compile(pattern), fix)


KNOWN_FAILURES: tuple[Failure, ...] = (
    # verl's config check: a micro batch size neither given nor derived
    _failure("micro batch size", r"Please set at least one of '(?P<key>[\w.]+)' or '(?P<per_gpu>[\w.]+)'",
             "set it after `--`: {per_gpu}=4 (or drop a config that unsets it); `drzero preflight STAGE` "
             "catches this before a GPU starts"),
    _failure("micro batch size", r"You have set both '(?P<key>[\w.]+)' AND '(?P<per_gpu>[\w.]+)'",
             "remove {key}=...; only {per_gpu} is supported"),
    # Hydra: `key=v` for a key the config lacks, `+key=v` for one it has
    _failure("hydra: key not in config", r"Could not override '(?P<key>[\w.]+)'",
             "{key} is not in verl's config: write +{key}=VALUE to add it (or check its spelling)"),
    _failure("hydra: key not in config", r"Key '(?P<key>[\w.]+)' is not in struct",
             "{key} is not in verl's config: add it with a leading + (+full.path.{key}=VALUE) or fix the name"),
    _failure("hydra: key already in config", r"Could not append to config\. An item is already at '(?P<key>[\w.]+)'",
             "{key} is already in verl's config: drop the leading + (write {key}=VALUE, or ++{key}=VALUE)"),
    # a data file that is not where the stage's config points
    _failure("missing data file",
             r"(?:FileNotFoundError|No such file or directory|Unable to find|does not exist)\W.*?"
             r"(?P<path>/?[\w./-]*?(?P<kind>val|test|train)?[\w.-]*\.parquet)",
             "{path} is not there: run the stage that writes it (`gen-data --iteration K` writes "
             "solver_iterK[_val].parquet; `prepare-data` the seeds) or point data.val_files= at a file that exists"),
    # SGLang's modules moved between releases: verl 0.7.1 and drzero's servers are written for 0.5.9
    _failure("sglang version drift",
             r"(?:ImportError: cannot import name '(?P<name>\w+)' from '(?P<module>sglang[\w.]*)'"
             r"|ModuleNotFoundError: No module named '(?P<missing>sglang[\w.]*)')",
             "the SGLang in the image is not 0.5.9, which verl 0.7.1 and drzero are pinned to: rebuild from "
             "docker/Dockerfile and do not pip install sglang over it (`drzero smoke` checks the import)"),
    _failure("CUDA out of memory",
             r"(?:torch\.OutOfMemoryError|torch\.cuda\.OutOfMemoryError|CUDA out of memory|CUDA error: out of memory"
             r"|RuntimeError: Not enough memory)",
             "run `drzero memory --model MODEL --gpu GPU --gpus N` to see which phase does not fit and the smallest "
             "change that does (offload, --rollout-tp, --sglang-mem); the model's recipe applies with --gpu"),
    _failure("NCCL error",
             r"(?:NCCL error|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|ncclRemoteError"
             r"|Watchdog caught collective operation timeout|ProcessGroupNCCL.*(?:timeout|Timeout|error))",
             "a collective failed: rerun with NCCL_DEBUG=INFO to see which rank; a hung rank is often another "
             "error above it, and a retry resumes from the last checkpoint"),
    _failure("stopped (SIGTERM / preemption)",
             r"(?:SIGTERM|[Ss]ignal 15\b|received signal 15|[Pp]reempt|Runner interrupted|exited with 143\b)",
             "the container was stopped: Modal retries a preempted stage by itself; after `stop`, "
             "`python -m backends.modal resume` continues from state.json and the last verl checkpoint"),
    _failure("W&B key missing", r"(?:wandb\.errors\.UsageError|api_key not configured|No API key configured)",
             "create the Modal secret: modal secret create wandb-secret WANDB_API_KEY=..., or pass "
             "--logger console"),
    _failure("refused options", r"refused its options or config \(exit 2\)",
             "the message just above names the option and what it expects; fix it and launch again"),
)


@dataclass(frozen=True)
class Finding:
    index: int          # 0-based line number in what was read
    line: str
    failure: Failure
    fix: str


def diagnose_line(line: str, index: int = 0) -> Finding | None:
    """The first known failure ``line`` shows, with its fix filled in, or None."""
    for failure in KNOWN_FAILURES:
        match = failure.pattern.search(line)
        if match:
            values = {k: v for k, v in match.groupdict().items() if v is not None}
            try:
                fix = failure.fix.format(**values)
            except KeyError:
                fix = failure.fix
            return Finding(index, line, failure, fix)
    return None


def diagnose(lines: Iterable[str]) -> list[Finding]:
    return [f for i, line in enumerate(lines) if (f := diagnose_line(line, i))]


def service(line: str) -> str | None:
    """The `[service]` prefix of a line, if it has one."""
    match = PREFIX.match(line)
    return match.group("service") if match else None


def annotate(lines: Iterable[str]) -> Iterator[str]:
    """Every line as it is, and after each known failure a `>>> name: fix` line (for a live stream)."""
    for index, line in enumerate(lines):
        line = line.rstrip("\n")
        yield line
        finding = diagnose_line(line, index)
        if finding:
            yield f">>> {finding.failure.name}: {finding.fix}"


def excerpts(lines: Iterable[str], context: int = 3) -> str:
    """Only the known failures, each with ``context`` lines before it and its fix; repeats of one fix once."""
    lines = [line.rstrip("\n") for line in lines]
    blocks, seen = [], set()
    for finding in diagnose(lines):
        if finding.fix in seen:
            continue
        seen.add(finding.fix)
        start = max(finding.index - context, 0)
        shown = [f"  {n + 1:>6}  {lines[n]}" for n in range(start, finding.index + 1)]
        blocks.append("\n".join([f"== {finding.failure.name} (line {finding.index + 1})", *shown,
                                 f"  fix: {finding.fix}"]))
    if not blocks:
        return "no known failure in these lines; the last lines before a traceback's end usually name the cause"
    return "\n\n".join(blocks)
