"""`drzero make-eval-set` and `drzero evaluate` against the stand-in SGLang server and the real retriever."""

import argparse
import csv
import importlib.util
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port
from drzero.config import ConfigError, add_config_arguments, config_from_args
from drzero.corpus.demo import build_demo_world
from drzero.data.qa import QaItem, read_qa_file
from drzero.tools.eval_set import MakeEvalSetConfig, run_make_eval_set
from drzero.tools.eval_set import summary_lines as eval_set_summary
from drzero.rewards.qa_scores import cover_em, em, f1
from drzero.stages.evaluate import EvaluateConfig, run_evaluate, summary_lines
from drzero.prompts import solver_messages
from drzero.rewards.solver import normalize_answer
from drzero.services.specs import ServiceError
from fake_sglang import FakeSGLang, SearchThenAnswer

PER_HOP = 3
SEARCH_R1_PROMPT = ("Answer the given question. You must conduct reasoning inside <think> and </think> first every "
                    "time you get new information. ... For example, <answer> Beijing </answer>. Question: {}\n")


# -- metrics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction,golds,expected", [
    ("Paris", ["paris"], (1, 1, 1)),                                  # case
    ("The Eiffel Tower!", ["eiffel tower"], (1, 1, 1)),               # article and punctuation
    ("an apple", ["Apple"], (1, 1, 1)),
    ("u.s.a", ["USA"], (1, 1, 1)),                                    # punctuation inside a word
    ("Lyon", ["Paris", "lyon"], (1, 1, 1)),                           # any of several golds
    ("Paris, France", ["Paris"], (0, 2 / 3, 1)),                      # P=1/2 R=1
    ("New York City", ["new york", "NYC"], (0, 0.8, 1)),              # best gold: P=2/3 R=1
    ("in 1987 probably", ["1987"], (0, 0.5, 1)),
    ("11987", ["1987"], (0, 0, 0)),                                   # cover-EM needs whole words
    ("", ["Paris"], (0, 0, 0)),                                       # empty prediction
    (None, ["Paris"], (0, 0, 0)),                                     # no <answer> at all
    ("Paris", [], (0, 0, 0)),                                         # no gold answer
    ("the", ["a"], (1, 1, 1)),                                        # both normalize to nothing (SQuAD)
])
def test_metrics(prediction, golds, expected):
    assert (em(prediction, golds), f1(prediction, golds), cover_em(prediction, golds)) == pytest.approx(expected)


# -- reading QA files ----------------------------------------------------------------------------

def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("row,expected", [
    ({"id": "test_0", "question": "who wrote x?", "golden_answers": ["A", "B"], "data_source": "nq",
      "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format("who wrote x?")}],
      "reward_model": {"style": "rule", "ground_truth": {"target": ["A", "B"]}}},
     ("who wrote x?", ("A", "B"), "nq", "unknown")),                       # Search-R1 test.parquet
    ({"data_source": "hotpotqa", "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format("where is y?")}],
      "reward_model": {"style": "rule", "ground_truth": {"target": ["Z"]}}},
     ("where is y?", ("Z",), "hotpotqa", "unknown")),                      # verl row: question in the prompt
    ({"data_source": "search_zero_2", "prompt": solver_messages("Which city?"),
      "reward_model": {"style": "rule", "ground_truth": {"target": ["Ravenport"]}},
      "extra_info": {"hops": 2, "index": 0}},
     ("Which city?", ("Ravenport",), "search_zero_2", "2")),                # our gen-data rows
    ({"question": "q?", "golden_answers": [1987], "data_source": "search_zero_3"},
     ("q?", ("1987",), "search_zero_3", "3")),                             # hops from data_source; number answer
    ({"question": "q?", "answer": "x", "hops": 4}, ("q?", ("x",), "qa", "4")),  # hops column; source = file stem
])
def test_read_qa_file_accepts_search_r1_verl_and_our_rows(tmp_path, row, expected):
    items, total = read_qa_file(_parquet(tmp_path / "qa.parquet", [row]))
    assert total == 1 and items == [QaItem(0, *expected)]


@pytest.mark.parametrize("name,content,message", [
    ("cols.parquet", [{"a": 1, "b": "x"}], r"row 0 has no question \(columns: a, b\); expected a 'question' column"),
    ("seeds.parquet", [{"prompt": solver_messages("q?"), "reward_model": {"ground_truth": {"target": None}}}],
     r"row 0 \('q\?'\) has no gold answer; expected 'golden_answers' or reward_model\.ground_truth\.target"),
    ("empty.jsonl", "", r"holds no rows"),
    ("broken.jsonl", '{"question": "q?"\n', r"is not JSON lines or a JSON list \(line 1"),
    ("late.jsonl", '{"question": "a?", "golden_answers": ["x"]}\n\n{"question": "q?"\n',
     r"is not JSON lines or a JSON list \(line 3"),                       # the file's line, blank lines counted
    ("noise.parquet", b"not parquet", r"is not a readable parquet file"),
])
def test_bad_data_is_one_clear_config_error_and_writes_nothing(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, list):
        _parquet(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    cfg = EvaluateConfig(model="http://127.0.0.1:9", data=str(path), out=str(tmp_path / "out"), api="chat")
    with pytest.raises(ConfigError, match=message):
        run_evaluate(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"data": "/nowhere/qa.parquet"}, "data='/nowhere/qa.parquet' is not valid: expected an existing parquet"),
    ({"data": "SUFFIX.csv"}, "expected a file ending in .parquet, .jsonl, .json"),
    ({"api": "completions"}, "api='completions' is not valid"),
    ({"retriever_url": "127.0.0.1:8000"}, "retriever_url='127.0.0.1:8000' is not valid"),
    ({"limit": 0}, "limit=0 is not valid"),
    ({"concurrency": 0}, "concurrency=0 is not valid"),
    ({"mem_fraction": 1.5}, "mem_fraction=1.5 is not valid"),
])
def test_config_validation_names_the_field(tmp_path, overrides, message):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q?", "golden_answers": ["a"]}\n')
    (tmp_path / "SUFFIX.csv").write_text("x")
    if overrides.get("data") == "SUFFIX.csv":
        overrides = {"data": str(tmp_path / "SUFFIX.csv")}
    with pytest.raises(ConfigError, match=re.escape(message)):
        EvaluateConfig(**{"model": "http://127.0.0.1:8001", "data": str(data), "tokenizer": "tok", **overrides})


# -- make-eval-set -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_set(demo_db, tmp_path_factory):
    return run_make_eval_set(MakeEvalSetConfig(demo_db=str(demo_db), per_hop=PER_HOP,
                                               out=str(tmp_path_factory.mktemp("data"))))


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_make_eval_set_asks_the_ingested_world_in_our_verl_row_format(eval_set, demo_db):
    facts = json.loads((demo_db / "demo_world.json").read_text())
    world = build_demo_world(seed=facts["seed"], papers=len(facts["papers"]))
    expected = [q for hops in (1, 2, 3, 4) for q in world.questions(hops, PER_HOP, seed=0)]
    rows = _rows(eval_set.path)
    assert eval_set.path.name == "eval_demo.parquet" and eval_set.rows == len(rows) == 4 * PER_HOP
    assert eval_set.per_hop == {"1": 3, "2": 3, "3": 3, "4": 3}
    for index, (row, question) in enumerate(zip(rows, expected)):
        info = row["extra_info"]
        assert row["question"] == info["question"] == question.question
        assert row["golden_answers"] == [question.answer] == row["reward_model"]["ground_truth"]["target"]
        assert row["data_source"] == f"search_zero_{question.hops}" and info["hops"] == question.hops
        assert row["prompt"] == solver_messages(question.question)
        assert row["agent_name"] == "tool_agent" and row["reward_model"]["style"] == "rule"
        assert (info["index"], info["split"], info["need_tools_kwargs"]) == (index, "test", True)
        assert info["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": row["data_source"],
                                                                     "seed_id": question.seed_source}}}
        assert (info["relation"], info["seed_source"], info["answer"]) == (question.relation, question.seed_source,
                                                                           question.answer)
    assert "12 questions" in eval_set_summary(eval_set)


def test_verl_rlhf_dataset_loads_the_eval_set_as_validation_data(eval_set, tiny_tokenizer_dir, tmp_path):
    from test_prepare_data import _verl_dataset

    dataset = _verl_dataset(eval_set.path, tiny_tokenizer_dir, tmp_path, max_prompt_length=512)
    assert len(dataset) == 4 * PER_HOP  # nothing filtered as overlong
    item = dataset[PER_HOP]
    assert item["agent_name"] == "tool_agent" and item["data_source"] == "search_zero_2"
    assert item["raw_prompt"][0]["content"].startswith("Answer the question below.")
    assert item["tools_kwargs"]["search"]["create_kwargs"]["data_source"] == "search_zero_2"


def test_make_eval_set_builds_a_fresh_world_and_takes_a_parquet_path(tmp_path):
    result = run_make_eval_set(MakeEvalSetConfig(papers=60, world_seed=3, hops=[2], per_hop=4, seed=1,
                                                 out=str(tmp_path / "mine.parquet")))
    expected = build_demo_world(seed=3, papers=60).questions(2, 4, seed=1)
    assert result.path == tmp_path / "mine.parquet"
    assert [r["question"] for r in _rows(result.path)] == [q.question for q in expected]
    with pytest.raises(ConfigError, match=r"demo_db='.*' is not valid: expected a directory holding demo_world\.json"):
        MakeEvalSetConfig(demo_db=str(tmp_path), out=str(tmp_path))


# -- evaluate end to end -------------------------------------------------------------------------

def _scripted_prediction(answer: str, hops: int) -> str:
    """Right for 1 and 2 hops (2 only after normalization), covered but not exact for 3, wrong for 4."""
    return {1: answer, 2: f"The {answer.lower()}!", 3: f"{answer} or so", 4: "Nobody knows"}[hops]


def _evaluate(base_url, retriever, data, out, **overrides):
    settings = {"model": base_url, "data": str(data), "out": str(out), "retriever_url": f"{retriever.url}/retrieve",
                "retries": 1, "timeout": 10.0, "api": "chat", **overrides}
    return run_evaluate(EvaluateConfig(**settings))


def test_evaluate_scores_the_scripted_answers_exactly(eval_set, retriever, tmp_path):
    rows = _rows(eval_set.path)
    predictions = {r["question"]: _scripted_prediction(r["golden_answers"][0], r["extra_info"]["hops"]) for r in rows}
    fake = FakeSGLang(SearchThenAnswer({q: [p] for q, p in predictions.items()}))
    with fake.serve() as base_url:
        result = _evaluate(base_url, retriever, eval_set.path, tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert {h: g["em"] for h, g in summary["by_hops"].items()} == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0}
    assert {h: g["cover_em"] for h, g in summary["by_hops"].items()} == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}
    three_hop_f1 = [n / (n + 1) for n in (len(normalize_answer(r["golden_answers"][0]).split())
                                          for r in rows if r["extra_info"]["hops"] == 3)]
    assert summary["by_hops"]["3"]["f1"] == pytest.approx(sum(three_hop_f1) / PER_HOP)
    overall = summary["overall"]
    assert (overall["questions"], overall["em"], overall["cover_em"]) == (12, 0.5, 0.75)
    assert overall["f1"] == pytest.approx((6 + sum(three_hop_f1)) / 12)
    assert (overall["answered"], overall["mean_turns"], overall["mean_searches"],
            overall["rollout_errors"]) == (1.0, 2.0, 1.0, 0)
    assert set(summary["by_data_source"]) == {f"search_zero_{h}" for h in range(1, 5)}
    assert summary["counts"] == {"rows_in_file": 12, "questions": 12, "answered": 12, "rollout_errors": 0,
                                 "search_failures": 0, "stop_reasons": {"answer": 12}}
    assert summary["config"]["model"] == base_url and set(summary["timings"]) == {
        "load_seconds", "startup_seconds", "rollout_seconds", "total_seconds"}
    # greedy, our solver prompt, one request per turn
    assert {r["temperature"] for r in fake.requests} == {0.0} and fake.generate_calls == 24
    with open(tmp_path / "eval" / "per_question.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [int(r["index"]) for r in table] == list(range(12))
    for line, row in zip(table, rows):
        hops = row["extra_info"]["hops"]
        assert line["question"] == row["question"] and json.loads(line["golden_answers"]) == row["golden_answers"]
        assert line["prediction"] == predictions[row["question"]]
        assert (line["em"], line["cover_em"], line["hops"], line["data_source"]) == (
            "1" if hops <= 2 else "0", "1" if hops <= 3 else "0", str(hops), row["data_source"])
        assert (line["turns"], line["searches"], line["stop_reason"], line["error"]) == ("2", "1", "answer", "")
    text = summary_lines(result)
    assert "EM 0.500" in text and "1 hop(s): EM 1.000" in text and "0 rollout errors" in text


def test_search_r1_jsonl_over_the_generate_api(eval_set, retriever, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    rows = _rows(eval_set.path)[:4]
    data = tmp_path / "bamboogle_test.jsonl"
    records = [{"id": f"test_{i}", "question": r["question"], "golden_answers": ["alias", r["golden_answers"][0]],
                **({"data_source": "musique" if i < 2 else "bamboogle"} if i < 3 else {})}
               for i, r in enumerate(rows)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = {r["question"]: [r["golden_answers"][0] if i % 2 == 0 else "wrong"] for i, r in enumerate(rows)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fake = FakeSGLang(SearchThenAnswer(answers), tokenizer=tokenizer)
    with fake.serve() as base_url:
        result = _evaluate(base_url, retriever, data, tmp_path / "out", api="generate",
                           tokenizer=str(tiny_tokenizer_dir))
    summary = result.summary
    assert {s: (g["questions"], g["em"]) for s, g in summary["by_data_source"].items()} == {
        "musique": (2, 0.5), "bamboogle": (1, 1.0), "bamboogle_test": (1, 0.0)}
    assert summary["macro_average"]["em"] == pytest.approx(0.5) and summary["overall"]["em"] == 0.5
    assert list(summary["by_hops"]) == ["unknown"]
    assert "musique: EM 0.500" in summary_lines(result) and "macro average  EM 0.500" in summary_lines(result)
    assert all("<|im_start|>" in tokenizer.decode(r["input_ids"]) for r in fake.requests)


def test_server_failures_are_counted_not_raised_and_limit_takes_the_first_rows(eval_set, retriever, tmp_path):
    rows = _rows(eval_set.path)
    failing = {rows[1]["question"], rows[3]["question"]}
    answer = SearchThenAnswer({r["question"]: r["golden_answers"] for r in rows})

    def flaky(conversation):
        if conversation.question in failing:
            raise RuntimeError("scripted crash")  # the fake answers 500
        return answer(conversation)

    with FakeSGLang(flaky).serve() as base_url:
        result = _evaluate(base_url, retriever, eval_set.path, tmp_path / "flaky", limit=6)
    summary = result.summary
    assert summary["counts"]["questions"] == 6 and summary["counts"]["rows_in_file"] == 12
    assert summary["counts"]["rollout_errors"] == 2 and summary["counts"]["stop_reasons"] == {"answer": 4, "error": 2}
    assert {h: (g["questions"], g["em"], g["rollout_errors"]) for h, g in summary["by_hops"].items()} == {
        "1": (3, pytest.approx(2 / 3), 1), "2": (3, pytest.approx(2 / 3), 1)}
    failed = [r for r in result.records if r.stop_reason == "error"]
    assert [r.index for r in failed] == [1, 3] and all(r.em == 0 and r.prediction is None for r in failed)
    assert summary["first_error"] == "inference server answered 500 (after 2 attempts)"
    assert "2 rollout errors" in summary_lines(result) and "first error" in summary_lines(result)


def test_servers_that_are_not_there_fail_before_any_rollout(eval_set, retriever, tmp_path):
    with FakeSGLang(SearchThenAnswer({})).serve() as base_url:
        with pytest.raises(ConfigError, match=r"served_model_name='policy' is not valid: expected a model the "
                                              r"server at http://127\.0\.0\.1:\d+ serves: solver"):
            _evaluate(base_url, retriever, eval_set.path, tmp_path / "a", served_model_name="policy")
        with pytest.raises(ServiceError, match=r"the retriever at http://127\.0\.0\.1:9/retrieve did not answer"):
            run_evaluate(EvaluateConfig(model=base_url, data=str(eval_set.path), out=str(tmp_path / "b"),
                                        retriever_url="http://127.0.0.1:9/retrieve", api="chat"))
    with pytest.raises(ServiceError, match=r"http://127\.0\.0\.1:9/health was not healthy"):
        _evaluate("http://127.0.0.1:9", retriever, eval_set.path, tmp_path / "c", wait=0.5)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="would start a real SGLang server")
def test_a_model_path_starts_sglang_and_reports_when_it_cannot(eval_set, retriever, tmp_path, capsys):
    model = tmp_path / "solver_iter1_hf"
    model.mkdir()
    port = free_port()
    with pytest.raises(ServiceError, match=r"(?s)sglang exited with code 1 before it was healthy.*No module named"):
        _evaluate(str(model), retriever, eval_set.path, tmp_path / "d", port=port, dp=2, wait=60)
    started = capsys.readouterr().err
    assert f"sglang.launch_server --model-path {model} --host 127.0.0.1 --port {port} --dp-size 2" in started
    assert "--tool-call-parser qwen25 --served-model-name solver" in started


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("config_class,argv,expected", [
    (EvaluateConfig, ["--model", "http://h:8001", "--data", "{data}", "--limit", "3", "--api", "generate",
                      "--tokenizer", "tok", "--dp", "2"], {"limit": 3, "api": "generate", "dp": 2, "out": None}),
    (MakeEvalSetConfig, ["--per-hop", "7", "--hops", "1", "3", "--out", "{tmp}"], {"per_hop": 7, "hops": [1, 3]}),
])
def test_configs_become_documented_command_line_options(tmp_path, config_class, argv, expected):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q?", "golden_answers": ["a"]}\n')
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_class)
    assert all(action.help for action in parser._actions)
    cfg = config_from_args(config_class, parser.parse_args([a.format(data=data, tmp=tmp_path) for a in argv]))
    assert {k: getattr(cfg, k) for k in expected} == expected
