"""The result of a check, and the report that lists them: shared by preflight, the cluster probe and smoke."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    message: str = ""
    skipped: bool = False

    def line(self) -> str:
        mark = "skip" if self.skipped else ("ok" if self.ok else "FAIL")
        return f"  [{mark:>4}] {self.name}" + (f": {self.message}" if self.message else "")


def report(plan, checks: list[Check]) -> str:
    """A plan's checks, headed by how many failed (``plan``: a drzero.plan.StagePlan)."""
    failed = [c for c in checks if not c.ok]
    head = f"preflight {plan.name}: " + (f"{len(failed)} problem(s)" if failed else "all checks passed")
    return "\n".join([head] + [c.line() for c in checks])
