"""`drzero` runs with only the extras a place installs: the CPU retriever image has the retrieval extra, not train.

docker/retriever.Dockerfile installs drzero with `retrieval` only, and compose runs `drzero serve-retriever`,
`ingest`, `search`, `prepare-data` and `tiny-model` in it. The CLI imports every stage's module to list its
options, so a training library imported at the top of any of them would break those containers. Here the
training extra (verl, hydra, omegaconf, pyarrow, pandas, datasets, wandb, ray) and the backends' modal are made
unimportable in a fresh interpreter, and every command must still answer --help.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_IN_THE_CPU_IMAGE = ("verl", "hydra", "omegaconf", "pyarrow", "pandas", "datasets", "wandb", "ray", "modal",
                        "matplotlib", "sglang")


def test_every_command_answers_help_without_the_training_extra():
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {NOT_IN_THE_CPU_IMAGE!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not in the CPU image)")
                return None

        sys.meta_path.insert(0, Absent())
        from drzero.cli import commands, main

        for command in list(commands()) + ["preflight"]:
            try:
                main([command, "--help"])
            except SystemExit as done:
                assert done.code == 0, command
        print("ok", len(commands()))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok ")
