"""What every benchmark script does before it imports drzero: the checkout first on sys.path, the
environment the measurement wants, and an argument parser that shows the script's docstring as written.

    import _env  # found first: `python benchmarks/X.py` puts benchmarks/ on sys.path itself

    ROOT = _env.setup("benchmarks", **_env.OFFLINE, TOKENIZERS_PARALLELISM="false")
    from drzero... import ...  # noqa: E402
    ...
    parser = _env.parser(__doc__)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A benchmark measures what is on this machine: no model hub, no telemetry.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}


def defaults(**environ: str) -> None:
    """Set each variable unless the caller's environment already has it."""
    for key, value in environ.items():
        os.environ.setdefault(key, value)


def setup(*folders: str, **environ: str) -> Path:
    """The checkout, then ROOT/folder for each of ``folders``, first on sys.path (the checkout's drzero,
    not an installed one); ``environ`` as defaults. Returns the checkout."""
    sys.path[:0] = [str(ROOT), *(str(ROOT / folder) for folder in folders)]
    defaults(**environ)
    return ROOT


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
