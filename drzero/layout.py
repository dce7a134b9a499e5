"""Where every stage reads and writes: one place for the volume layout (docs/design.md).

    /corpus/chromadb/                 the corpus collection            (--db, $DRZERO_DB; or a Chroma server's URL)
    /corpus/data/                     seed parquet, solver data        (--data-dir, $DRZERO_DATA_DIR)
    /corpus/models/<name>/            cached weights                   ($DRZERO_MODELS_DIR)
    /checkpoints/challenger_iter{k}/  verl FSDP checkpoints            (--checkpoints, $DRZERO_CHECKPOINTS)
    /checkpoints/challenger_iter{k}_hf/, solver_iter{k}/, solver_iter{k}_hf/, state.json
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from drzero.store_location import resolved_db

SEED_STEM = "zero_ratio4321"


def config_dir() -> Path:
    """The repo's ``config/`` (verl Hydra configs), or ``$DRZERO_CONFIG_DIR`` in an installed image."""
    override = os.environ.get("DRZERO_CONFIG_DIR")
    return Path(override).resolve() if override else Path(__file__).resolve().parents[1] / "config"


@dataclass(frozen=True)
class Layout:
    db: Path | str  # a local store's directory, or a Chroma server's address (drzero.store_location)
    data_dir: Path
    checkpoints: Path
    seed_stem: str = SEED_STEM

    @classmethod
    def of(cls, db: str, data_dir: str, checkpoints: str, seed_stem: str = SEED_STEM) -> "Layout":
        return cls(resolved_db(db), Path(data_dir).resolve(), Path(checkpoints).resolve(), seed_stem)

    @property
    def seeds(self) -> Path:
        return self.data_dir / f"{self.seed_stem}.parquet"

    @property
    def seeds_val(self) -> Path:
        return self.data_dir / f"{self.seed_stem}_val.parquet"

    @property
    def seeds_manifest(self) -> Path:
        return self.data_dir / f"{self.seed_stem}.manifest.json"

    def solver_data(self, iteration: int) -> Path:
        return self.data_dir / f"solver_iter{iteration}.parquet"

    def solver_val(self, iteration: int) -> Path:
        return self.data_dir / f"solver_iter{iteration}_val.parquet"

    def solver_manifest(self, iteration: int) -> Path:
        return self.data_dir / f"solver_iter{iteration}.manifest.json"

    def checkpoint(self, stage: str, iteration: int) -> Path:
        return self.checkpoints / f"{stage}_iter{iteration}"

    def merged(self, stage: str, iteration: int) -> Path:
        return self.checkpoints / f"{stage}_iter{iteration}_hf"

    @property
    def state(self) -> Path:
        return self.checkpoints / "state.json"


def latest_step(checkpoint_dir: Path) -> int | None:
    """The newest ``global_step_N`` verl saved in ``checkpoint_dir`` (its tracker file, else the folders)."""
    tracker = checkpoint_dir / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text.isdigit():
            return int(text)
    steps = [int(m.group(1)) for p in checkpoint_dir.glob("global_step_*")
             if (m := re.fullmatch(r"global_step_(\d+)", p.name))]
    return max(steps) if steps else None


def checkpointed_step(checkpoint_dir: Path) -> int | None:
    """The step of verl's last *complete* checkpoint in ``checkpoint_dir``, or None.

    verl 0.7.1 writes ``latest_checkpointed_iteration.txt`` only after every part of
    ``global_step_N`` is saved (``RayPPOTrainer._save_checkpoint``), so unlike a bare folder the
    tracker proves the save finished.
    """
    tracker = checkpoint_dir / "latest_checkpointed_iteration.txt"
    try:
        text = tracker.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or not (checkpoint_dir / f"global_step_{text}").is_dir():
        return None
    return int(text)
