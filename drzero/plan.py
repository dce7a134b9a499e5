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

from drzero.atomic import manifest_damage, verify_set


@dataclass(frozen=True)
class FileSet:
    """Files committed together, their manifest last (drzero.atomic.commit_set): they count as written only when
    the manifest has the shape its readers need (``shape``, drzero.records) and agrees with every file."""

    manifest: Path
    files: tuple[Path, ...]
    shape: dict = field(default_factory=dict)  # what the set's readers read of its manifest, beyond the files
    writer: str = ""                           # the command that writes it: what to run again

    def problem(self) -> str | None:
        """Why the files are not the committed set, in a few words; None when they are."""
        return verify_set(self.manifest, self.shape)

    def damage(self) -> str | None:
        """What is wrong with the manifest itself; None when it is missing or sound."""
        return manifest_damage(self.manifest, self.shape)

    def refusal(self) -> str | None:
        """One sentence for a reader of the set when the files are not the committed set; None when they are."""
        problem = self.problem()
        if problem is None:
            return None
        cause = "" if self.damage() else f": a `{self.writer}` was interrupted, or the files were changed by hand"
        return (f"{', '.join(p.name for p in self.files)} in {self.manifest.parent} are not a committed set "
                f"({problem}{cause}); run `{self.writer}` again (`drzero evolve` does it by itself)")


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
    writes_set: FileSet | None = None                 # its outputs, committed as a set (prepare-data, gen-data)
    reads_sets: tuple[FileSet, ...] = ()              # inputs that are such sets: checked before it starts
    run_label: str = ""                               # what ``run`` does, for dry runs
    memory: object | None = None                      # drzero.models.memory.Placement: the memory check's inputs
    corpus: tuple[Path | str, str] | None = None      # (store, collection) its retriever serves: preflight opens it
    # Planned again just before it runs, when part of the plan is known only once the stage before has run
    # (a merge of "the latest step" of a checkpoint that does not exist yet).
    replan: Callable[[], "StagePlan"] | None = None

    @property
    def manifest(self) -> Path | None:
        """The commit marker of its outputs, when they are a set."""
        return self.writes_set.manifest if self.writes_set is not None else None

    def input_set_problems(self, planned: set[Path] = frozenset()) -> list[str]:
        """One sentence per input set that is not committed (and that no earlier stage, ``planned``, rewrites)."""
        return [refusal for fileset in self.reads_sets
                if not set(fileset.files) <= set(planned) and (refusal := fileset.refusal()) is not None]

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
