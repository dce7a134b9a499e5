"""`drzero evolve`: stage order, state.json, and resuming after a crash in any stage."""

import json
from pathlib import Path

import pytest

from drzero import pipeline
from drzero.atomic import commit_set, parquet_writer
from drzero.pipeline import EvolveConfig, all_plans, evolve

# what prepare-data's readers need of its manifest (drzero.data.seed.SEED_MANIFEST), beside the files commit_set adds
SEED_MANIFEST = {"rows": 1, "hop_ratio": "4321", "partitions": [{"partition": 0, "rows": [0, 1]}],
                 "prompt_tokens": {"max": 100}}
STAGES = ["prepare-data", "iter1/challenger", "iter1/merge-challenger", "iter1/gen-data", "iter1/solver",
          "iter1/merge-solver"]


@pytest.fixture
def config(tmp_path):
    return EvolveConfig(iterations=1, db=str(tmp_path / "db"), data_dir=str(tmp_path / "data"),
                        checkpoints=str(tmp_path / "ckpt"), model=str(tmp_path / "model"), logger="console",
                        retriever_url="http://127.0.0.1:8000/retrieve", skip_preflight=True)


class GPUStandIn:
    """Replaces only the part that needs GPUs: running a stage. It writes the stage's outputs."""

    def __init__(self, crash_at: str | None = None):
        self.crash_at, self.ran, self.commands = crash_at, [], {}

    def __call__(self, plan):
        self.ran.append(plan.name)
        self.commands[plan.name] = plan.command
        if self.crash_at and plan.name.startswith(self.crash_at):
            self.crash_at = None
            raise RuntimeError(f"preempted during {plan.name}")
        if plan.manifest is not None:  # a set of files: committed with its manifest, as the real stages do
            commit_set({output: parquet_writer([{"written": 1}]) for output in plan.outputs}, plan.manifest,
                       SEED_MANIFEST if plan.name == "prepare-data" else {})
            return
        for output in plan.outputs:
            if output.suffix:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text("written")
            else:
                output.mkdir(parents=True, exist_ok=True)
                if not output.name.endswith("_hf"):  # a training stage: verl's checkpoint layout
                    (output / "global_step_50" / "actor").mkdir(parents=True, exist_ok=True)
                    (output / "latest_checkpointed_iteration.txt").write_text("50")


def test_stages_come_in_the_loops_order(config):
    keys = [key for key, _ in all_plans(EvolveConfig(**{**config.__dict__, "iterations": 2}))]
    assert keys == STAGES + [k.replace("iter1", "iter2") for k in STAGES[1:]]
    plans = dict(all_plans(config))
    # each stage reads what an earlier one writes
    assert plans["iter1/solver"].inputs[0] == plans["iter1/gen-data"].outputs[0]
    assert plans["iter1/gen-data"].inputs[1] == plans["iter1/merge-challenger"].outputs[0]


@pytest.mark.parametrize("crash_stage", ["prepare-data", "challenger", "merge challenger", "gen-data", "solver",
                                         "merge solver"])
def test_a_crash_in_any_stage_resumes_there(config, monkeypatch, crash_stage, capsys):
    runner = GPUStandIn(crash_at=crash_stage)
    monkeypatch.setattr(pipeline, "execute", runner)
    with pytest.raises(RuntimeError, match="preempted"):
        evolve(config)
    state = json.loads(Path(config.checkpoints, "state.json").read_text())["stages"]
    crashed = next(key for key in STAGES if state.get(key, {}).get("status") == "running")
    done_before = [key for key in STAGES if state.get(key, {}).get("status") == "done"]
    assert done_before == STAGES[:STAGES.index(crashed)]
    first_run = list(runner.ran)

    runner.ran.clear()
    assert evolve(config) == 0
    out = capsys.readouterr().out
    assert f"[resume] {crashed}" in out
    assert runner.ran[0] == first_run[-1]  # the crashed stage runs again first; nothing done reruns
    assert len(runner.ran) == len(STAGES) - len(done_before)
    state = json.loads(Path(config.checkpoints, "state.json").read_text())["stages"]
    assert all(state[key]["status"] == "done" for key in STAGES)

    runner.ran.clear()
    assert evolve(config) == 0 and runner.ran == []  # a finished run does nothing


def test_evaluation_joins_each_iteration_when_an_eval_set_is_given(config, tmp_path):
    eval_set = tmp_path / "eval_demo.parquet"
    eval_set.write_text("x")
    plans = dict(all_plans(EvolveConfig(**{**config.__dict__, "eval_data": str(eval_set)})))
    assert list(plans)[-1] == "iter1/evaluate"
    evaluate = plans["iter1/evaluate"]
    assert evaluate.inputs[0] == plans["iter1/merge-solver"].outputs[0]
    out = Path(config.checkpoints).resolve() / "eval" / "iter1"
    assert evaluate.outputs == [out / "summary.json", out / "manifest.json"]  # the manifest commits the set


def test_the_base_model_is_evaluated_first_as_iteration_0(config, tmp_path):
    """The report's baseline row (eval/iter0): the model before any training, on the same set and setup."""
    from drzero.models.registry import resolve_model

    eval_set = tmp_path / "eval_demo.parquet"
    eval_set.write_text("x")
    plans = all_plans(EvolveConfig(**{**config.__dict__, "eval_data": str(eval_set)}))
    keys = [key for key, _ in plans]
    assert keys[:2] == ["prepare-data", "iter0/evaluate"] and keys.count("iter0/evaluate") == 1
    baseline = dict(plans)["iter0/evaluate"]
    base = resolve_model(config.model).path
    assert f"--model {base} " in baseline.run_label
    out = Path(config.checkpoints).resolve() / "eval" / "iter0"
    assert baseline.outputs == [out / "summary.json", out / "manifest.json"]
    assert Path(eval_set).resolve() in baseline.inputs
    assert "iter0/evaluate" not in [key for key, _ in all_plans(config)]  # no evaluation asked, none planned


def test_benchmarks_join_each_iteration_and_bad_names_fail_before_training(config, tmp_path, monkeypatch):
    from drzero.config import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing can fetch them: the preflight must see them missing
    run = EvolveConfig(**{**config.__dict__, "eval_benchmarks": "nq,bamboogle", "eval_limit": 500,
                          "eval_benchmark_dir": str(tmp_path / "bench")})
    evaluate = dict(all_plans(run))["iter1/evaluate"]
    assert "--benchmark nq,bamboogle" in evaluate.run_label and "--limit 500" in evaluate.run_label
    assert evaluate.inputs[1:] == [tmp_path / "bench" / "nq" / "test.jsonl",
                                   tmp_path / "bench" / "bamboogle" / "test.jsonl"]
    with pytest.raises(ConfigError, match=r"benchmark='nq,squad' is not valid"):
        EvolveConfig(**{**config.__dict__, "eval_benchmarks": "nq,squad"})


def test_a_stage_whose_outputs_vanished_runs_again(config, monkeypatch):
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    evolve(config)
    solver_data = dict(all_plans(config))["iter1/gen-data"].outputs[0]
    solver_data.unlink()
    runner.ran.clear()
    evolve(config)
    assert runner.ran == ["gen-data (iteration 1)"]


def test_committed_seed_data_counts_as_prepared(config, monkeypatch):
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    plan = dict(all_plans(config))["prepare-data"]
    commit_set({output: parquet_writer([{"made by": "another run"}]) for output in plan.outputs}, plan.manifest,
               SEED_MANIFEST)
    evolve(config)
    assert "prepare-data" not in runner.ran


def test_seed_files_without_their_manifest_are_prepared_again(config, monkeypatch):
    """Files that exist prove nothing: a run killed between renames leaves exactly that."""
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    for output in dict(all_plans(config))["prepare-data"].outputs:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("half of a set")
    evolve(config)
    assert runner.ran[0] == "prepare-data"


def test_solver_data_whose_files_disagree_with_the_manifest_is_generated_again(config, monkeypatch):
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    evolve(config)
    plan = dict(all_plans(config))["iter1/gen-data"]
    plan.outputs[1].write_text("a validation file from another run")
    runner.ran.clear()
    evolve(config)
    assert runner.ran[0] == "gen-data (iteration 1)"


@pytest.mark.parametrize("key", ["iter1/challenger", "iter1/solver"])
def test_a_verl_stage_whose_checkpoint_holds_its_last_step_is_done_not_resumed(config, monkeypatch, key, capsys):
    """The crash fell between verl saving global_step_50 and state.json recording the stage:
    resuming would make verl validate, train step 51 and save global_step_51."""
    runner = GPUStandIn(crash_at=dict(all_plans(config))[key].name)
    monkeypatch.setattr(pipeline, "execute", runner)
    with pytest.raises(RuntimeError):
        evolve(config)
    checkpoint = dict(all_plans(config))[key].outputs[0]
    (checkpoint / "global_step_50" / "actor").mkdir(parents=True)
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("50")
    runner.ran.clear()
    assert evolve(config) == 0
    assert dict(all_plans(config))[key].name not in runner.ran
    assert f"[skip] {key}: its checkpoint already holds step 50, the last" in capsys.readouterr().out
    state = json.loads(Path(config.checkpoints, "state.json").read_text())["stages"]
    assert state[key]["status"] == "done"


def test_a_verl_stage_short_of_its_last_step_resumes(config, monkeypatch):
    runner = GPUStandIn(crash_at="solver")
    monkeypatch.setattr(pipeline, "execute", runner)
    with pytest.raises(RuntimeError):
        evolve(config)
    checkpoint = dict(all_plans(config))["iter1/solver"].outputs[0]
    (checkpoint / "global_step_40" / "actor").mkdir(parents=True)
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("40")
    (checkpoint / "global_step_50").mkdir()  # a save verl never finished: no tracker names it
    runner.ran.clear()
    evolve(config)
    assert runner.ran[0] == "solver (iteration 1)"


@pytest.mark.parametrize("content", ["", "{\"stages\": {\"prepare-data\": {\"sta", "[]", "not json"])
def test_an_empty_or_corrupt_state_file_is_set_aside_and_rebuilt_from_disk(config, monkeypatch, capsys, content):
    runner = GPUStandIn(crash_at="gen-data")
    monkeypatch.setattr(pipeline, "execute", runner)
    with pytest.raises(RuntimeError):
        evolve(config)
    state_path = Path(config.checkpoints, "state.json")
    state_path.write_text(content)  # a power loss, a full disk, a hand edit
    runner.ran.clear()
    assert evolve(config) == 0
    out = capsys.readouterr().out
    assert "evolve: warning:" in out and "state.json is damaged: it " in out and "Traceback" not in out
    assert [p.name.startswith("state.json.damaged-") for p in Path(config.checkpoints).glob("state.json.*")] == [True]
    # the seed set and the challenger's finished checkpoint prove themselves; the merge has no proof and reruns
    assert "[rebuilt] prepare-data" in out and "[rebuilt] iter1/challenger" in out
    assert runner.ran == ["merge challenger (iteration 1)", "gen-data (iteration 1)", "solver (iteration 1)",
                          "merge solver (iteration 1)"]
    assert all(v["status"] == "done" for v in json.loads(state_path.read_text())["stages"].values())


def test_a_dry_run_leaves_a_corrupt_state_file_where_it_is(config, capsys):
    state_path = Path(config.checkpoints, "state.json")
    state_path.parent.mkdir(parents=True)
    state_path.write_text("")
    pipeline.RunState(state_path, warn=print, move_aside=False)
    assert state_path.read_text() == "" and "a real run moves it aside" in capsys.readouterr().out


def test_state_is_written_atomically_and_durably(config, monkeypatch, tmp_path):
    import os
    import stat

    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    state = pipeline.RunState(tmp_path / "s" / "state.json")
    state.mark("a", "running")
    assert synced == [False, True]  # the file, then the directory that holds the rename
    state.mark("a", "done", [tmp_path])
    assert json.loads((tmp_path / "s" / "state.json").read_text())["stages"]["a"]["status"] == "done"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["state.json"]


def test_evolve_checks_every_remaining_stage_before_starting_any(config, monkeypatch, capsys):
    """A mistake that would only bite the solver stops the run before the challenger spends GPU hours."""
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    checked = EvolveConfig(**{**config.__dict__, "skip_preflight": False})
    assert evolve(checked) == 1
    assert runner.ran == []
    out = capsys.readouterr().out
    assert "preflight found" in out and "nothing was started" in out
    assert "[FAIL] model path" in out  # the tmp model directory does not exist


def test_each_stage_is_planned_when_it_runs(config, monkeypatch):
    """A merge planned at start would not know the step its training stage is about to write."""
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    evolve(EvolveConfig(**{**config.__dict__, "iterations": 2}))
    merge = runner.commands["merge solver (iteration 1)"]
    assert merge[merge.index("--local_dir") + 1].endswith("solver_iter1/global_step_50/actor")
    challenger = runner.commands["challenger (iteration 2)"]
    assert any(arg.endswith("challenger_iter1/global_step_50") for arg in challenger)


# -- issue 29, item 8: a state.json entry of the wrong shape -----------------------------------------

WRONG_SHAPES = {"a string": "done", "null": None, "outputs a number": {"outputs": 5}, "a list": ["done"],
                "done with outputs a number": {"status": "done", "outputs": 5}, "another status": {"status": "ok"}}


def _crashed_at_gen_data(config, monkeypatch) -> tuple[GPUStandIn, Path]:
    runner = GPUStandIn(crash_at="gen-data")
    monkeypatch.setattr(pipeline, "execute", runner)
    with pytest.raises(RuntimeError):
        evolve(config)
    runner.ran.clear()
    return runner, Path(config.checkpoints, "state.json")


def _damage_entry(state_path: Path, key: str, value) -> None:
    recorded = json.loads(state_path.read_text())
    recorded["stages"][key] = value
    state_path.write_text(json.dumps(recorded))


@pytest.mark.parametrize("shape", sorted(WRONG_SHAPES))
def test_a_wrong_shaped_entry_is_set_aside_in_one_sentence_and_the_state_rebuilt(config, monkeypatch, capsys, shape):
    runner, state_path = _crashed_at_gen_data(config, monkeypatch)
    _damage_entry(state_path, "iter1/challenger", WRONG_SHAPES[shape])
    capsys.readouterr()
    assert evolve(config) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("evolve: warning:")]
    assert len(warnings) == 1 and 'is damaged: stages["iter1/challenger"]' in warnings[0], out
    assert "rebuilt from the manifests and checkpoints on disk" in warnings[0]
    aside = [p.name for p in state_path.parent.glob("state.json.*")]
    assert len(aside) == 1 and aside[0].startswith("state.json.damaged-") and aside[0] in warnings[0]
    # the seed set and the challenger's last checkpoint prove themselves; the merge has none and runs again
    assert "[rebuilt] prepare-data" in out and "[rebuilt] iter1/challenger" in out
    assert runner.ran == ["merge challenger (iteration 1)", "gen-data (iteration 1)", "solver (iteration 1)",
                          "merge solver (iteration 1)"]
    assert all(v["status"] == "done" for v in json.loads(state_path.read_text())["stages"].values())


@pytest.mark.parametrize("shape", sorted(WRONG_SHAPES))
def test_a_dry_run_names_a_wrong_shaped_entry_and_changes_nothing(config, monkeypatch, capsys, shape):
    _, state_path = _crashed_at_gen_data(config, monkeypatch)
    _damage_entry(state_path, "iter1/challenger", WRONG_SHAPES[shape])
    damaged = state_path.read_text()
    monkeypatch.setattr(pipeline, "run_checks", lambda plan, **kwargs: [])  # verl's composition is not the point
    monkeypatch.setattr(pipeline, "resolved_config", lambda plan: "{}")
    capsys.readouterr()
    assert evolve(EvolveConfig(**{**config.__dict__, "dry_run": True})) == 0
    out = capsys.readouterr().out
    assert 'is damaged: stages["iter1/challenger"]' in out and "a real run moves it aside" in out
    assert state_path.read_text() == damaged and not list(state_path.parent.glob("state.json.*"))


def test_done_without_naming_its_outputs_is_no_proof_and_the_challenger_runs(config, monkeypatch, capsys):
    """{"status": "done", "outputs": []} once skipped the challenger although it had no checkpoint."""
    runner = GPUStandIn()
    monkeypatch.setattr(pipeline, "execute", runner)
    plans = dict(all_plans(config))
    runner(plans["prepare-data"])
    state_path = Path(config.checkpoints, "state.json")
    state_path.parent.mkdir(parents=True)
    state_path.write_text(json.dumps({"version": 1, "stages": {"iter1/challenger": {"status": "done", "outputs": []},
                                                               "iter1/solver": {"status": "done"}}}))
    runner.ran.clear()
    assert evolve(config) == 0
    out = capsys.readouterr().out
    assert runner.ran[0] == "challenger (iteration 1)" and "solver (iteration 1)" in runner.ran
    checkpoint = plans["iter1/challenger"].outputs[0]
    assert f"[run] iter1/challenger (state.json records it as done but does not name {checkpoint}" in out
    assert "Traceback" not in out
