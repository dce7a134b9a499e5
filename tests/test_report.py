"""`drzero report` over a run directory built here: state.json, manifests, two evaluated iterations, one not."""

import argparse
import json
import struct
import time

import pytest

from drzero.config import ConfigError, add_config_arguments, config_from_args
from drzero.stages.evaluate import EvaluateConfig
from drzero.stages.evaluate_results import QuestionResult, build_summary
from drzero.tools.report import ReportConfig, flat_metrics, run_report, summary_lines
from drzero.tools.report_run import load_run

STAGES = ("challenger", "merge-challenger", "gen-data", "solver", "merge-solver")
SEED_HOPS = {"1": 800, "2": 600, "3": 400, "4": 200}
# iteration -> gen-data train counts (seeds, kept, dropped_no_valid, rejected_no_search, rejected_unsolved,
# rejected_probes_failed), kept hop histogram, mean proposer format
GEN = {1: ((400, 300, 60, 20, 15, 5), {"1": 130, "2": 90, "3": 50, "4": 30}, 0.912),
       2: ((400, 340, 40, 10, 8, 2), {"1": 120, "2": 100, "3": 70, "4": 50}, 0.954)}
# iteration -> questions answered right of 4, per hop 1..4
EVAL_RIGHT = {1: (3, 2, 1, 0), 2: (4, 3, 2, 1)}
VERDICTS = ("kept", "dropped_no_valid", "rejected_no_search", "rejected_unsolved", "rejected_probes_failed")


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _eval_summary(tmp_path, right_per_hop) -> dict:
    """A summary.json exactly as `drzero evaluate` builds it."""
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q?", "golden_answers": ["a"]}\n')
    records = [QuestionResult(index=4 * (hops - 1) + i, question=f"q{hops}{i}", golden_answers=["a"],
                              prediction="a" if i < right else "b", em=float(i < right), f1=float(i < right),
                              cover_em=float(i < right), hops=str(hops), data_source=f"search_zero_{hops}", turns=2,
                              searches=1, stop_reason="answer", error=None)
               for hops, right in enumerate(right_per_hop, 1) for i in range(4)]
    return build_summary(EvaluateConfig(model="http://127.0.0.1:8001", data=str(data), tokenizer="tok"), records,
                         16, {})


@pytest.fixture
def run_dir(tmp_path):
    checkpoints, data = tmp_path / "checkpoints", tmp_path / "data"
    stages = {"prepare-data": {"status": "done", "outputs": [], "updated": "2026-01-01T00:00:00Z"}}
    for iteration in (1, 2):
        stages.update({f"iter{iteration}/{name}": {"status": "done", "outputs": [], "updated": f"2026-01-0{iteration + 1}"}
                       for name in STAGES})
    stages["iter3/challenger"] = {"status": "running", "outputs": [], "updated": "2026-01-04T00:00:00Z"}
    _write(checkpoints / "state.json", {"version": 1, "stages": stages})
    _write(data / "zero_ratio4321.manifest.json", {"rows": 2000, "hop_ratio": "4321", "hop_histogram": SEED_HOPS})
    for iteration, (counts, histogram, fmt) in GEN.items():
        _write(data / f"solver_iter{iteration}.manifest.json", {
            "iteration": iteration, "train": {"seeds": counts[0], **dict(zip(VERDICTS, counts[1:])),
                                              "hop_histogram": histogram, "mean_proposer_format": fmt,
                                              "invalid_candidate_reasons": {"the answer appears in the question": 7,
                                                                            "missing <question> or <answer>": 9}}})
    for iteration, right in EVAL_RIGHT.items():
        _write(checkpoints / "eval" / f"iter{iteration}" / "summary.json", _eval_summary(tmp_path, right))
    return checkpoints, data


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def _tables(markdown: str) -> dict[str, list[dict]]:
    """Markdown tables keyed by their first two header cells, each a list of {header: cell}."""
    tables, rows, header = {}, None, []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if rows is None:
            header, rows = cells, tables.setdefault(" ".join(cells[:2]), [])
        elif not set(line) <= set("|-"):
            rows.append(dict(zip(header, cells)))
    return tables


def test_report_draws_and_tabulates_what_the_run_wrote(run_dir, tmp_path):
    checkpoints, data = run_dir
    result = run_report(ReportConfig(checkpoints=str(checkpoints), data_dir=str(data)))
    assert result.png_path == checkpoints / "report" / "report.png"
    assert _png_size(result.png_path) == (1200, 900)
    assert result.missing == ["iteration 3: not evaluated", "iteration 3: no gen-data manifest"]

    markdown = result.markdown_path.read_text()
    tables = _tables(markdown)
    evaluation = {row["iteration"]: row for row in tables["iteration questions"]}
    assert set(evaluation) == {"1", "2", "3"}
    for iteration, right in EVAL_RIGHT.items():
        row = evaluation[str(iteration)]
        assert row["questions"] == "16" and row["EM"] == f"{sum(right) / 16:.3f}" == row["F1"] == row["cover-EM"]
        assert [row[f"EM {h}-hop"] for h in "1234"] == [f"{r / 4:.3f}" for r in right]
        assert (row["answered"], row["rollout errors"]) == ("1.000", "0")
    assert evaluation["3"]["questions"] == "not evaluated"

    generated = {row["iteration"]: row for row in tables["iteration seeds"]}
    for iteration, (counts, histogram, fmt) in GEN.items():
        row = generated[str(iteration)]
        assert [row["seeds"], *[row[v] for v in VERDICTS]] == [str(c) for c in counts]
        assert row["kept share"] == f"{100 * counts[1] / counts[0]:.1f}%" and row["mean format"] == f"{fmt:.3f}"
        assert [row[f"kept {h}-hop"] for h in "1234"] == [str(histogram[h]) for h in "1234"]
    assert generated["3"]["seeds"] == "no gen-data manifest"
    assert ("Iteration 2, candidates that failed the format gate: missing <question> or <answer>: 9, the answer "
            "appears in the question: 7") in markdown
    assert "2000 rows, hop mix 1-hop 40% · 2-hop 30% · 3-hop 20% · 4-hop 10%" in markdown

    stages = {row["stage"]: row["status"] for row in tables["stage status"]}
    assert stages["prepare-data"] == "done" and stages["iter2/merge-solver"] == "done"
    assert stages["iter3/challenger"] == "running" and stages["iter3/solver"] == "not started"
    text = summary_lines(result)
    assert "1, 2, 3 (2 evaluated)" in text and "latest EM      2: 0.625" in text and "W&B            off" in text


def test_the_same_numbers_go_to_wandb(run_dir):
    checkpoints, data = run_dir
    run = load_run(checkpoints, data)
    first, second, third = (flat_metrics(v) for v in run.iterations)
    assert first["eval/em"] == 0.375 and first["eval/em_hop1"] == 0.75 and first["gen/kept_share"] == 0.75
    assert second["gen/rejected_unsolved"] == 8 and second["gen/kept_hop4"] == 50
    assert third == {}


def test_an_empty_run_and_unreadable_files_are_reported_not_raised(tmp_path):
    checkpoints = tmp_path / "fresh"
    (checkpoints / "eval" / "iter1").mkdir(parents=True)
    (checkpoints / "eval" / "iter1" / "summary.json").write_text("{not json")
    result = run_report(ReportConfig(checkpoints=str(checkpoints), data_dir=str(tmp_path / "no-data"),
                                     out=str(tmp_path / "report")))
    assert _png_size(result.png_path) == (1200, 900)
    markdown = result.markdown_path.read_text()
    assert "No `state.json`" in markdown and "no seed manifest" in markdown
    assert "summary.json is damaged: it is not JSON" in markdown
    assert result.missing == ["state.json", "iteration 1: not evaluated", "iteration 1: no gen-data manifest",
                              "seed manifest"]


def test_wandb_offline_logs_the_numbers_and_the_picture(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    (tmp_path / "wb").mkdir()
    for variable, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wb", "WANDB_CONFIG_DIR": tmp_path / "wbc",
                            "WANDB_CACHE_DIR": tmp_path / "wbk", "WANDB_DATA_DIR": tmp_path / "wbd",
                            "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(variable, str(value))
    checkpoints, data = run_dir
    result = run_report(ReportConfig(checkpoints=str(checkpoints), data_dir=str(data), wandb=True))
    (log,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    assert str(tmp_path / "wb") in result.wandb
    keys = (b"eval/em_hop1", b"gen/kept_share", b"report")
    deadline = time.monotonic() + 15  # wandb's writer process may still be flushing the log when finish() returns
    while [key for key in keys if key not in log.read_bytes()] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [key for key in keys if key not in log.read_bytes()] == []
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/files/media/images/report_*.png"))


def test_wandb_without_a_key_is_skipped_with_the_reason(run_dir, tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    checkpoints, data = run_dir
    result = run_report(ReportConfig(checkpoints=str(checkpoints), data_dir=str(data), wandb=True))
    assert result.wandb.startswith("skipped: no W&B key; set WANDB_API_KEY")


def test_config_and_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoints='/nowhere' is not valid: expected an existing directory"):
        ReportConfig(checkpoints="/nowhere")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ReportConfig)
    assert all(action.help for action in parser._actions)
    cfg = config_from_args(ReportConfig, parser.parse_args(["--checkpoints", str(tmp_path), "--wandb",
                                                            "--iterations", "3"]))
    assert (cfg.wandb, cfg.iterations, cfg.output_dir()) == (True, 3, tmp_path / "report")


def test_benchmark_evaluations_get_a_table_by_data_source(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q?", "golden_answers": ["a"]}\n')
    records = [QuestionResult(index=i, question=f"q{i}", golden_answers=["a"], prediction="a", em=float(right),
                              f1=float(right), cover_em=float(right), hops="unknown", data_source=source, turns=2,
                              searches=1, stop_reason="answer", error=None)
               for i, (source, right) in enumerate([("nq", 1), ("nq", 0), ("bamboogle", 1), ("bamboogle", 1)])]
    summary = build_summary(EvaluateConfig(model="http://127.0.0.1:8001", data=str(data), tokenizer="tok"), records,
                            4, {})
    _write(tmp_path / "run" / "eval" / "iter0" / "summary.json", summary)
    result = run_report(ReportConfig(checkpoints=str(tmp_path / "run"), data_dir=str(tmp_path)))
    (row,) = _tables(result.markdown_path.read_text())["iteration bamboogle"]
    assert row == {"iteration": "0 (base)", "bamboogle": "1.000", "nq": "0.500", "macro average": "0.750"}
    assert [v.iteration for v in result.run.iterations] == [0, 1]


def test_a_wrong_shaped_state_entry_or_manifest_is_listed_as_damaged_not_raised(tmp_path):
    """Issue 29: a state.json entry of the wrong shape once raised AttributeError in the report as in evolve."""
    checkpoints, data = tmp_path / "ckpt", tmp_path / "data"
    _write(checkpoints / "state.json", {"version": 1, "stages": {"iter1/challenger": "done"}})
    _write(data / "solver_iter1.manifest.json", {"train": "kept them all"})
    _write(data / "zero_ratio4321.manifest.json", {"rows": "many"})
    result = run_report(ReportConfig(checkpoints=str(checkpoints), data_dir=str(data), out=str(tmp_path / "report")))
    markdown = result.markdown_path.read_text()
    assert 'state.json is damaged: stages["iter1/challenger"] is a string ("done"), not an object' in markdown
    assert 'solver_iter1.manifest.json is damaged: train is a string ("kept them all"), not an object' in markdown
    assert 'zero_ratio4321.manifest.json is damaged: rows is a string ("many"), not an integer' in markdown


# -- benchmarks: the published numbers beside ours, and two runs' setups compared -------------------------------

BENCH_RIGHT = {1: {"nq": 2, "triviaqa": 3, "popqa": 2, "hotpotqa": 1, "2wikimultihopqa": 1, "musique": 0,
                   "bamboogle": 1},
               2: {"nq": 3, "triviaqa": 3, "popqa": 2, "hotpotqa": 2, "2wikimultihopqa": 1, "musique": 1,
                   "bamboogle": 2}}  # of 4 questions per set


def _benchmark_evaluation(tmp_path, right: dict, topk: int = 3, checkpoint: str = "a" * 64) -> tuple[dict, dict]:
    """(summary.json, manifest.json) exactly as `drzero evaluate --benchmark all` builds them."""
    from dataclasses import asdict

    from drzero.rollout.client import GenerationSettings
    from drzero.stages.evaluate_setup import corpus_setup, evaluation_setup, model_setup

    records = [QuestionResult(index=i, question=f"{name}{i}", golden_answers=["a"], prediction="a" if i < n else "b",
                              em=float(i < n), f1=float(i < n), cover_em=float(i < n), hops="unknown",
                              data_source=name, turns=3, searches=2, stop_reason="answer", error=None)
               for name, n in right.items() for i in range(4)]
    cfg = EvaluateConfig(model="http://127.0.0.1:8001", benchmark="all", benchmark_dir=str(tmp_path), tokenizer="tok")
    summary = build_summary(cfg, records, 28, {})
    model = model_setup("/checkpoints/solver_iter1_hf", "solver", "/checkpoints/solver_iter1_hf", None)
    model["checkpoint_sha256"] = checkpoint
    setup = evaluation_setup(
        model=model, corpus=corpus_setup("http://127.0.0.1:8000/retrieve", {
            "collection": "wiki18", "passages": 21015324, "fingerprint": "0123456789abcdef",
            "embedder": "intfloat/e5-base-v2"}),
        topk=topk, generation=asdict(GenerationSettings(base_url="x", model="solver", temperature=0.0)),
        thinking=False, chat_template="{{ messages }}",
        questions=[{"name": name, "split": "test", "file": f"/data/{name}.jsonl", "rows": 4, "sha256": "f" * 64,
                    "questions": 4, "subset": None} for name in right])
    return summary, {"setup": setup, "files": {}}


@pytest.fixture
def benchmark_runs(tmp_path):
    """This run (iterations 1 and 2 on the seven sets) and another one: top-k 5 and another checkpoint."""
    runs = {}
    for name, topk, checkpoint in (("ours", 3, "a" * 64), ("theirs", 5, "b" * 64)):
        checkpoints = tmp_path / name
        for iteration, right in BENCH_RIGHT.items():
            summary, manifest = _benchmark_evaluation(tmp_path, right, topk, checkpoint)
            _write(checkpoints / "eval" / f"iter{iteration}" / "summary.json", summary)
            _write(checkpoints / "eval" / f"iter{iteration}" / "manifest.json", manifest)
        runs[name] = checkpoints
    return runs["ours"], runs["theirs"]


def test_benchmark_tables_put_the_published_numbers_beside_each_iteration(benchmark_runs, tmp_path):
    from drzero.data.published import published_results

    ours, _ = benchmark_runs
    result = run_report(ReportConfig(checkpoints=str(ours), data_dir=str(tmp_path / "none")))
    markdown = result.markdown_path.read_text()
    tables = [t for key, t in _tables(markdown).items() if key.startswith("set split")]
    assert markdown.count("| set | split | questions | EM | F1 |") == 2  # one table per iteration
    rows = {row["set"]: row for row in _tables(markdown)["set split"]}  # the last table: iteration 2
    assert tables and rows["NQ"]["EM"] == "0.750" and rows["MuSiQue"]["EM"] == "0.250"
    assert (rows["NQ"]["answered"], rows["NQ"]["searches"], rows["NQ"]["turns"]) == ("1.000", "2.00", "3.00")
    assert rows["**Avg.**"]["EM"] == f"{sum(BENCH_RIGHT[2].values()) / 28:.3f}"
    published = {p.label: p for p in published_results()}
    assert rows["NQ"]["Search-R1 3B base EM"] == "0.421" and rows["Bamboogle"]["Search-R1 7B instruct EM"] == "0.400"
    assert rows["**Avg.**"]["Search-R1 7B base EM"] == "0.350"
    assert rows["NQ"]["Dr. Zero 3B EM"] == "n/c" and rows["**Avg.**"]["Dr. Zero 7B EM"] == "n/c"
    assert published["Dr. Zero 7B"].citation() in markdown and "n/c = not checked" in markdown
    assert "Iteration 1:" in markdown and "Iteration 2:" in markdown
    assert _png_size(result.png_path) == (1200, 1350)  # the benchmark row below the four panels
    assert "benchmarks     2: EM 0.500 averaged over 7 set(s)" in summary_lines(result)
    second = flat_metrics(result.run.iterations[1])
    assert second["eval/bench_em_nq"] == 0.75 and second["eval/bench_em_average"] == pytest.approx(0.5)


def test_compare_shows_where_the_setups_differ_before_the_scores(benchmark_runs, tmp_path):
    ours, theirs = benchmark_runs
    result = run_report(ReportConfig(checkpoints=str(ours), data_dir=str(tmp_path / "none"), compare=str(theirs)))
    markdown = result.markdown_path.read_text()
    section = markdown.split("## Compared with")[1]
    assert section.index("Iteration 1: setup") < section.index("Iteration 1: EM") < section.index("Iteration 2: setup")
    setup = {row["setting"]: row for row in _tables(section)["setting this run"]}  # the last: iteration 2
    assert set(setup) == {"`model.checkpoint_sha256`", "`retrieval.topk`"}
    assert (setup["`retrieval.topk`"]["this run"], setup["`retrieval.topk`"]["the other, iteration 2"]) == ("3", "5")
    assert setup["`retrieval.topk`"][""] == "scores not comparable" and setup["`model.checkpoint_sha256`"][""] == ""
    assert "1 of these change what the scores measure" in section
    scores = {row["set"]: row for row in _tables(section)["set this run"]}
    assert scores["nq"]["difference"] == "+0.000" and scores["overall"]["this run"] == "0.500"  # iteration 2: 14 of 28
    assert ("compared with  " + str(theirs) + ": iteration 1: 2 setting(s) differ, 1 of them change what is measured"
            in summary_lines(result))
    # one evaluation's directory compares with this run's latest iteration; an identical setup says so
    single = run_report(ReportConfig(checkpoints=str(ours), data_dir=str(tmp_path / "none"),
                                     compare=str(ours / "eval" / "iter2"), out=str(tmp_path / "single")))
    assert "The setups agree in every recorded setting." in single.markdown_path.read_text()
    with pytest.raises(ConfigError, match=r"compare='/nowhere' is not valid: expected an existing directory"):
        ReportConfig(checkpoints=str(ours), compare="/nowhere")


def test_an_evaluation_without_a_manifest_is_compared_with_a_warning(benchmark_runs, tmp_path):
    ours, theirs = benchmark_runs
    (theirs / "eval" / "iter1" / "manifest.json").unlink()
    markdown = run_report(ReportConfig(checkpoints=str(ours), data_dir=str(tmp_path / "none"),
                                       compare=str(theirs))).markdown_path.read_text()
    assert "The setup of the other, iteration 1 is unknown (no manifest.json)" in markdown


def test_an_unreadable_published_file_is_listed_not_raised(benchmark_runs, tmp_path, monkeypatch):
    from drzero.data import published

    damaged = tmp_path / "published.json"
    damaged.write_text('{"sets": [], "results": [{"key": "x"}]}')
    monkeypatch.setattr(published, "PUBLISHED_FILE", damaged)
    ours, _ = benchmark_runs
    result = run_report(ReportConfig(checkpoints=str(ours), data_dir=str(tmp_path / "none")))
    markdown = result.markdown_path.read_text()
    assert "the published numbers are unreadable" in markdown and "| set | split | questions | EM |" in markdown
    assert "Search-R1 3B base EM" not in markdown
