"""The numbers papers publish on the seven QA sets, for `drzero report` to put beside a run's.

    for result in published_results():
        result.label, result.em["nq"], result.em["avg"], result.status, result.citation()

The figures live in ``published.json`` beside this module, each row with its paper, table, page and how far it
was checked (``status``): ``"checked"`` (read from the paper with its table and page), ``"from reference
notes"`` (copied from drzero's reference notes, not re-read from the PDF) or ``"not checked"`` (every value
null: nothing could be read with its table and page). A value is EM as a fraction; ``avg`` is the paper's own
"Avg." column, the unweighted mean of the seven.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from drzero.data.benchmarks import BENCHMARKS
from drzero.records import DamagedRecord, Each, OneOf, Optional, read_record

PUBLISHED_FILE = Path(__file__).with_name("published.json")
STATUSES = ("checked", "from reference notes", "not checked")
AVG = "avg"
SHAPE = {"sets": [str], "results": [{
    "key": str, "label": str, "method": str, "model": str, "paper": str, "table": str, "page": Optional((int, str)),
    "status": OneOf(*STATUSES), "source": str, "em": Each((float, None))}]}


@dataclass(frozen=True)
class PublishedResult:
    key: str
    label: str            # the report's column title
    method: str
    model: str
    paper: str
    table: str
    page: int | str | None
    status: str
    source: str
    em: dict              # set name (and "avg") -> EM as a fraction, or None when not known

    def citation(self) -> str:
        page = f", p. {self.page}" if self.page is not None else ", page not recorded"
        return f"{self.paper}, {self.table}{page} ({self.status}; {self.source})"

    @property
    def has_numbers(self) -> bool:
        return any(value is not None for value in self.em.values())


def published_results(path: Path | None = None) -> list[PublishedResult]:
    """Every row of the published-numbers file (``published.json`` beside this module unless ``path``); a
    ``DamagedRecord`` (what is wrong) for a file that is missing or of another shape."""
    path = path or PUBLISHED_FILE
    data = read_record(path, SHAPE)
    if data is None:
        raise DamagedRecord(f"{path} is missing")
    expected = set(BENCHMARKS) | {AVG}
    for row in data["results"]:
        if set(row["em"]) != expected:
            raise DamagedRecord(f"{path}: {row['key']} gives EM for {', '.join(sorted(row['em']))}; expected exactly "
                                f"{', '.join(sorted(expected))} (null where unknown)")
        if row["status"] == "not checked" and any(v is not None for v in row["em"].values()):
            raise DamagedRecord(f"{path}: {row['key']} is 'not checked' but gives numbers; null them or check them")
    names = [f.name for f in fields(PublishedResult)]  # a newer file's extra keys are left out
    return [PublishedResult(**{name: row.get(name) for name in names}) for row in data["results"]]
