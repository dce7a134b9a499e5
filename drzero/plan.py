"""A stage's plan: everything it will do, before it does any of it.

Every stage module (drzero.stages) builds one; the runner executes it, preflight and the memory
plan check it, `--dry-run` prints it, and `drzero evolve` sequences them. It lives below all of
them so that each can read it without importing the others.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class StagePlan:
    """Everything a stage will do, before it does any of it."""

    name: str
    command: list[str] | None = None                  # a subprocess (verl, the merger)
    run: Callable[[], object] | None = None           # or work done in this process (gen-data)
    env: dict[str, str] = field(default_factory=dict)
    services: list = field(default_factory=list)      # drzero.services.specs.ServiceSpec
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    verl_overrides: list[str] | None = None           # what preflight composes
    sglang_parser: str | None = None
    sglang_gpus: tuple[int, int] | None = None        # (dp, tp) of the reward server
    done_when_outputs_exist: bool = False             # prepare-data: skip when the data is already there
    manifest: Path | None = None                      # commit marker of a set of outputs (drzero.atomic)
    run_label: str = ""                               # what ``run`` does, for dry runs
    memory: object | None = None                      # drzero.models.memory.Placement: the memory check's inputs
    corpus: tuple[Path, str] | None = None            # (store, collection) its retriever serves: preflight opens it
    # Planned again just before it runs, when part of the plan is known only once the stage before has run
    # (a merge of "the latest step" of a checkpoint that does not exist yet).
    replan: Callable[[], "StagePlan"] | None = None

    @property
    def runs_verl(self) -> bool:
        return self.verl_overrides is not None

    def describe(self) -> str:
        lines = [f"stage {self.name}"]
        for spec in self.services:
            lines.append(f"  service {spec.name}: {spec.command_line}")
        if self.env:
            lines.append("  env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())))
        if self.command:
            lines.append(f"  run {shlex.join(self.command)}")
        elif self.run is not None:
            lines.append(f"  run (in process) {self.run_label or getattr(self.run, '__qualname__', self.run)}")
        lines += [f"  reads {p}" for p in self.inputs] + [f"  writes {p}" for p in self.outputs]
        return "\n".join(lines)
