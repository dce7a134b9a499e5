"""`--collection` reaches every stage: the retriever a stage starts serves it, and preflight opens it first."""

from __future__ import annotations

import pytest

from drzero.verl.preflight import run_checks
from drzero.stages.challenger import ChallengerConfig, plan_challenger
from drzero.stages.solver import SolverConfig, plan_solver


def _corpus_check(plan):
    return next(c for c in run_checks(plan, allow_download=True) if c.name == "corpus")


@pytest.mark.parametrize("plan, config", [(plan_challenger, ChallengerConfig), (plan_solver, SolverConfig)])
def test_a_stage_serves_and_preflights_the_collection_it_is_given(demo_db, tmp_path, plan, config):
    settings = dict(db=str(demo_db), data_dir=str(tmp_path / "data"), checkpoints=str(tmp_path / "ckpt"),
                    logger="console", model="qwen3-8b")
    missing = plan(config(**settings, collection="papers"))
    assert "--collection papers" in missing.services[0].command_line
    check = _corpus_check(missing)
    assert not check.ok and "collection 'papers' not found" in check.message and "corpus" in check.message

    present = plan(config(**settings))  # the default collection, which the demo store holds
    assert "--collection corpus" in present.services[0].command_line
    check = _corpus_check(present)
    assert check.ok and "passages" in check.message, check.message


def test_a_retriever_given_by_url_is_not_opened(tmp_path):
    plan = plan_solver(SolverConfig(db=str(tmp_path / "nowhere"), data_dir=str(tmp_path), checkpoints=str(tmp_path),
                                    logger="console", retriever_url="http://127.0.0.1:9/retrieve"))
    assert plan.corpus is None and not [c for c in run_checks(plan, allow_download=True) if c.name == "corpus"]


def test_evolve_takes_collection_and_hands_it_to_every_stage(tmp_path):
    from drzero.pipeline import EvolveConfig, iteration_plans

    cfg = EvolveConfig(db=str(tmp_path / "db"), data_dir=str(tmp_path / "data"),
                       checkpoints=str(tmp_path / "ckpt"), logger="console", collection="papers")
    plans = iteration_plans(cfg, 1)
    started = [spec.command_line for plan in plans.values() for spec in plan.services if spec.name == "retriever"]
    assert started and all("--collection papers" in line for line in started)
