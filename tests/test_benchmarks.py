"""`drzero evaluate --benchmark`: the papers' seven QA sets in FlashRAG's format, scored as the field scores, with
the setup written beside the numbers. Files are written here in FlashRAG's real layout and record shape."""

import csv
import json
import re

import pytest

from drzero.atomic import describe_file
from drzero.cli import main
from drzero.config import ConfigError
from drzero.data import benchmarks
from drzero.data.benchmarks import (BENCHMARKS, HUB_URL, locate_benchmarks, read_benchmark_file, resolve_benchmarks,
                                    sample)
from drzero.data.published import published_results
from drzero.data.qa import QaItem
from drzero.rewards.qa_scores import cover_em, em, f1
from drzero.stages.evaluate import EvaluateConfig, run_evaluate, summary_lines
from drzero.stages.evaluate_setup import checkpoint_hash, prompt_template_hash
from fake_sglang import FakeSGLang, SearchThenAnswer

# -- scoring: hand-checked against SQuAD's rule (lower case, ASCII punctuation and a/an/the out, spaces collapsed) --


@pytest.mark.parametrize("prediction,golds,expected", [
    ("Wilhelm Conrad Röntgen", ["Wilhelm Conrad R\u00f6ntgen"], (1, 1, 1)),  # unicode kept, compared as is
    ("RÖNTGEN", ["röntgen"], (1, 1, 1)),                               # str.lower() folds non-ASCII case too
    ("Rontgen", ["Röntgen"], (0, 0, 0)),                               # no accent folding (SQuAD, FlashRAG)
    ("“Hamlet”", ["Hamlet"], (0, 0, 0)),                               # typographic quotes: not ASCII punctuation
    ("1,000", ["1000"], (1, 1, 1)),                                    # the comma is punctuation
    ("May 18, 2018", ["May 18 2018"], (1, 1, 1)),
    ("2018", ["May 18, 2018"], (0, 0.5, 0)),                           # P=1 R=1/3
    ("A Tale of Two Cities", ["tale of two cities"], (1, 1, 1)),       # the article goes, "of" stays
    ("Olivia", ["Olivia", "MFSK"], (1, 1, 1)),                         # FlashRAG's nq test_2: any golden answer
    ("The Beatles and the Rolling Stones", ["The Beatles", "Rolling Stones"], (0, 2 / 3, 1)),  # best F1: 2/4 x 2/2
    ("twenty-one", ["twentyone"], (1, 1, 1)),                          # the hyphen goes without a space
    ("21", ["twenty-one"], (0, 0, 0)),                                 # numbers are not spelled out
])
def test_scores_match_hand_computed_values(prediction, golds, expected):
    assert (em(prediction, golds), f1(prediction, golds), cover_em(prediction, golds)) == pytest.approx(expected)


# -- FlashRAG files ------------------------------------------------------------------------------------

def flashrag_record(split: str, number: int, question: str, answers: list[str]) -> dict:
    """A record as FlashRAG_datasets stores it (metadata varies by set; it is carried, never read)."""
    return {"id": f"{split}_{number}", "question": question, "golden_answers": answers,
            "metadata": {"type": "bridge", "supporting_facts": {"title": ["A"], "sent_id": [0]}}}


def write_set(directory, name: str, rows: list[tuple[str, list[str]]]):
    benchmark = BENCHMARKS[name]
    path = directory / name / f"{benchmark.split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(flashrag_record(benchmark.split, i, q, a), ensure_ascii=False) + "\n"
                            for i, (q, a) in enumerate(rows)), encoding="utf-8")
    return path


def test_names_and_splits_are_the_papers():
    assert [(b.name, b.split, b.rows) for b in BENCHMARKS.values()] == [
        ("nq", "test", 3610), ("triviaqa", "test", 11313), ("popqa", "test", 14267), ("hotpotqa", "dev", 7405),
        ("2wikimultihopqa", "dev", 12576), ("musique", "dev", 2417), ("bamboogle", "test", 125)]
    assert [b.name for b in resolve_benchmarks("all")] == list(BENCHMARKS)
    assert [b.name for b in resolve_benchmarks(" Bamboogle, NQ,2wiki ")] == ["nq", "2wikimultihopqa", "bamboogle"]
    with pytest.raises(ConfigError, match=re.escape("benchmark='nq,squad' is not valid: expected 'all' or "
                                                    "comma-separated names from nq, triviaqa, popqa, hotpotqa, "
                                                    "2wikimultihopqa, musique, bamboogle.")):
        resolve_benchmarks("nq,squad")


def test_reads_flashrag_records_and_names_bad_lines(tmp_path):
    path = write_set(tmp_path, "hotpotqa", [("Which band?", ["The Beatles"]), ("Who?", ["Ann", "Anne"])])
    items = read_benchmark_file(BENCHMARKS["hotpotqa"], path)
    assert items == [QaItem(0, "Which band?", ("The Beatles",), "hotpotqa", "unknown"),
                     QaItem(1, "Who?", ("Ann", "Anne"), "hotpotqa", "unknown")]
    assert [item.id for item in items] == ["dev_0", "dev_1"]
    good = path.read_text()
    for text, message in [
        (good + '{"id": "dev_2", "question": "Broken?", "golden_\n', r"dev\.jsonl line 3 is not JSON"),
        (good + '\n{"id": "dev_2", "question": "Unanswered?", "golden_answers": []}\n',
         r"dev\.jsonl line 4 \('Unanswered\?'\) has no golden_answers, so it cannot be scored; use FlashRAG's "
         r"hotpotqa/dev\.jsonl"),
        ('{"id": "dev_0", "golden_answers": ["x"]}\n', r"line 1 has no question"),
        ("", r"holds no questions"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_benchmark_file(BENCHMARKS["hotpotqa"], path)


def test_a_missing_set_offline_says_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_set(tmp_path, "nq", [("q?", ["a"])])
    with pytest.raises(ConfigError) as refused:
        locate_benchmarks(resolve_benchmarks("nq,hotpotqa,bamboogle"), tmp_path)
    message = str(refused.value)
    assert message.count(".") >= 1 and "\n" not in message
    assert (f"benchmark files missing and the hub is off here (HF_HUB_OFFLINE): put FlashRAG's hotpotqa/dev.jsonl, "
            f"bamboogle/test.jsonl from {HUB_URL} at {tmp_path / 'hotpotqa' / 'dev.jsonl'}, "
            f"{tmp_path / 'bamboogle' / 'test.jsonl'}") in message


def test_a_missing_set_online_is_fetched_from_flashrags_hub_repository(tmp_path, monkeypatch):
    import huggingface_hub

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    asked = []

    def download(repo_id, filename, *, repo_type, local_dir):
        asked.append((repo_id, filename, repo_type, local_dir))
        write_set(tmp_path / "bench", "musique", [("q?", ["a"])])
        return str(tmp_path / "bench" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    found = locate_benchmarks(resolve_benchmarks("musique"), tmp_path / "bench")
    assert asked == [("RUC-NLPIR/FlashRAG_datasets", "musique/dev.jsonl", "dataset", str(tmp_path / "bench"))]
    assert found == {"musique": tmp_path / "bench" / "musique" / "dev.jsonl"}
    with pytest.raises(ConfigError, match=r"downloads are off \(--no-download\)"):
        locate_benchmarks(resolve_benchmarks("nq"), tmp_path / "bench", download=False)


def test_the_limit_subset_is_fixed_by_the_seed_and_the_ids():
    items = [QaItem(i, f"q{i}", ("a",), "nq", "unknown", id=f"test_{i}") for i in range(50)]
    first = sample(items, 10, seed=0)
    assert first == sample(list(reversed(items)), 10, seed=0) == sample(items, 10, seed=0)  # order-free, repeatable
    assert [i.index for i in first] == sorted(i.index for i in first) and len(first) == 10
    assert sample(items, 10, seed=1) != first
    grown = items + [QaItem(50, "q50", ("a",), "nq", "unknown", id="test_50")]
    assert len({i.id for i in sample(grown, 10, seed=0)} & {i.id for i in first}) >= 9  # one new record moves one
    assert sample(items, 100, seed=0) == items


def test_the_published_numbers_parse_and_say_where_they_come_from():
    results = {r.key: r for r in published_results()}
    assert set(results) == {"search-r1-3b-base", "search-r1-3b-instruct", "search-r1-7b-base",
                            "search-r1-7b-instruct", "dr-zero-3b", "dr-zero-7b"}
    for result in results.values():
        assert set(result.em) == set(BENCHMARKS) | {"avg"} and result.table and result.paper
        if result.has_numbers:  # the papers' Avg. is the unweighted mean of the seven (to their rounding)
            assert result.em["avg"] == pytest.approx(sum(result.em[n] for n in BENCHMARKS) / 7, abs=0.0006)
    assert results["search-r1-7b-instruct"].em["nq"] == 0.429 and results["search-r1-3b-base"].em["avg"] == 0.312
    assert {r.status for r in results.values() if r.key.startswith("search-r1")} == {"from reference notes"}
    for key in ("dr-zero-3b", "dr-zero-7b"):
        assert results[key].status == "not checked" and not results[key].has_numbers


# -- end to end: the real agent loop, the real retriever, a fake SGLang ----------------------------------------

# set -> [(question, golden answers, what the fake model answers)]
SETS = {
    "nq": [("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"], "Wilhelm Conrad Röntgen"),
           ("which mode is used for short wave broadcast service", ["Olivia", "MFSK"], "AM radio")],
    "triviaqa": [("Which tower is in Paris?", ["Eiffel Tower"], "The Eiffel Tower!"),
                 ("Who wrote Hamlet?", ["Shakespeare"], "Marlowe")],
    "popqa": [("What is Ann's occupation?", ["painter", "artist"], "artist"), ("Where was Bo born?", ["Oslo"], "Rome")],
    "hotpotqa": [("Which band had Lennon and the Rolling Stones?", ["The Beatles"], "the beatles"),
                 ("Who is older?", ["Ann"], "Bob")],
    "2wikimultihopqa": [("When did the director die?", ["May 18, 2018"], "May 18 2018"),
                        ("Who was born first?", ["Cy"], "Di")],
    "musique": [("How many?", ["1,000"], "1000"), ("Which county?", ["Kent"], "Essex")],
    "bamboogle": [("Who delivered the speech?", ["Gandhi"], "Gandhi"), ("When?", ["1869"], "1869")],
}


@pytest.fixture
def benchmark_dir(tmp_path):
    directory = tmp_path / "benchmarks"
    for name, rows in SETS.items():
        write_set(directory, name, [(q, golds) for q, golds, _ in rows])
    return directory


@pytest.fixture
def solver_model(tmp_path):
    model = tmp_path / "solver_iter1_hf"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * (5 * 4096))  # 5 MiB: the sampled hash
    return model


def evaluate(retriever, fake, benchmark_dir, out, **overrides):
    with fake.serve() as base_url:
        return run_evaluate(EvaluateConfig(**{
            "model": base_url, "benchmark": "all", "benchmark_dir": str(benchmark_dir), "out": str(out),
            "retriever_url": f"{retriever.url}/retrieve", "api": "chat", "retries": 1, "timeout": 10.0,
            **overrides}))


def test_seven_sets_scored_per_set_with_the_papers_average_and_the_setup(retriever, benchmark_dir, solver_model,
                                                                         tmp_path):
    answers = {q: [said] for rows in SETS.values() for q, _, said in rows}
    fake = FakeSGLang(SearchThenAnswer(answers), model_path=str(solver_model))
    result = evaluate(retriever, fake, benchmark_dir, tmp_path / "eval")

    benchmarks = result.summary["benchmarks"]
    assert {n: g["em"] for n, g in benchmarks["sets"].items()} == {
        "nq": 0.5, "triviaqa": 0.5, "popqa": 0.5, "hotpotqa": 0.5, "2wikimultihopqa": 0.5, "musique": 0.5,
        "bamboogle": 1.0}
    assert benchmarks["all_seven"] and benchmarks["average"]["em"] == pytest.approx(4 / 7)
    assert benchmarks["average"]["f1"] == pytest.approx(4 / 7)  # every wrong answer here shares no token
    assert {(g["split"], g["questions"], g["answered"], g["mean_searches"], g["mean_turns"])
            for g in benchmarks["sets"].values()} == {("test", 2, 1.0, 1.0, 2.0), ("dev", 2, 1.0, 1.0, 2.0)}
    assert result.summary["data"] is None and result.summary["counts"]["questions"] == 14
    text = summary_lines(result)
    assert re.search(r"Avg\.\s+0\.571\s+0\.571\s+1\.000\s+1\.00\s+2\.00", text) and "Bamboogle (test)" in text

    with open(tmp_path / "eval" / "per_question.csv", newline="", encoding="utf-8") as stream:
        table = list(csv.DictReader(stream))
    assert [(r["data_source"], r["id"]) for r in table[:3]] == [("nq", "test_0"), ("nq", "test_1"),
                                                               ("triviaqa", "test_0")]
    assert table[0]["prediction"] == "Wilhelm Conrad Röntgen" and table[0]["em"] == "1"

    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest == result.manifest and set(manifest["files"]) == {"summary.json", "per_question.csv"}
    assert manifest["files"]["summary.json"]["sha256"] == describe_file(tmp_path / "eval" / "summary.json")["sha256"]
    setup = manifest["setup"]
    assert setup["model"] == {"model": fake_url(manifest), "served_model_name": "solver", "path": str(solver_model),
                              "tokenizer": None, "checkpoint_sha256": checkpoint_hash(solver_model)}
    assert re.fullmatch(r"[0-9a-f]{64}", setup["model"]["checkpoint_sha256"])
    health = retriever_health(retriever)
    assert setup["corpus"] == {"retriever_url": f"{retriever.url}/retrieve", "collection": "corpus",
                               "passages": health["passages"], "fingerprint": health["fingerprint"],
                               "embedder": "sentence-transformers/all-MiniLM-L6-v2", "dimension": 384,
                               "precision": health["precision"], "index": health["index"]}
    assert re.fullmatch(r"[0-9a-f]{16}", setup["corpus"]["fingerprint"])
    assert setup["retrieval"] == {"topk": 3}
    assert setup["agent"]["max_turns"] == 5 and setup["agent"]["max_response_tokens"] >= 2560
    assert setup["agent"]["thinking"] is False and setup["agent"]["api"] == "chat"
    assert setup["agent"]["prompt_template_sha256"] == prompt_template_hash(None)
    assert setup["decoding"] == {"temperature": 0.0, "top_p": 1.0, "chat_template_kwargs": {"enable_thinking": False}}
    assert "SQuAD normalization" in setup["scoring"] and setup["drzero_version"]
    sources = {s["name"]: s for s in setup["questions"]}
    assert sources["hotpotqa"] == {"name": "hotpotqa", "split": "dev", "file": str(benchmark_dir / "hotpotqa" /
                                                                                     "dev.jsonl"),
                                   "rows": 2, "questions": 2, "subset": None,
                                   "sha256": describe_file(benchmark_dir / "hotpotqa" / "dev.jsonl")["sha256"]}


def fake_url(manifest) -> str:
    return manifest["setup"]["model"]["model"]  # the fake's loopback URL, whatever port it had


def retriever_health(retriever) -> dict:
    import httpx

    return httpx.get(f"{retriever.url}/health", trust_env=False).json()


def test_the_limit_asks_the_same_subset_every_run_and_records_it(retriever, tmp_path):
    directory = tmp_path / "benchmarks"
    write_set(directory, "bamboogle", [(f"Question number {i}?", [f"answer {i}"]) for i in range(12)])
    fake = FakeSGLang(SearchThenAnswer({}, default=["answer 3"]))
    runs = [evaluate(retriever, fake, directory, tmp_path / f"run{n}", benchmark="bamboogle", limit=4, seed=7)
            for n in (1, 2)]
    asked = [[r.id for r in run.records] for run in runs]
    assert asked[0] == asked[1] and len(asked[0]) == 4
    subsets = [json.loads(run.manifest_path.read_text())["setup"]["questions"][0]["subset"] for run in runs]
    assert subsets[0] == subsets[1] and subsets[0]["seed"] == 7 and subsets[0]["size"] == 4
    other = evaluate(retriever, fake, directory, tmp_path / "run3", benchmark="bamboogle", limit=4, seed=8)
    assert [r.id for r in other.records] != asked[0]


def test_data_and_benchmarks_together_average_only_the_benchmarks(retriever, benchmark_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "Our own question?", "golden_answers": ["ours"]}) + "\n")
    answers = {"Our own question?": ["ours"], **{q: [said] for q, _, said in SETS["bamboogle"]}}
    result = evaluate(retriever, FakeSGLang(SearchThenAnswer(answers)), benchmark_dir, tmp_path / "both",
                      data=str(data), benchmark="bamboogle")
    assert set(result.summary["by_data_source"]) == {"mine", "bamboogle"}
    assert list(result.summary["benchmarks"]["sets"]) == ["bamboogle"] and not result.summary["benchmarks"]["all_seven"]
    names = [s["name"] for s in json.loads(result.manifest_path.read_text())["setup"]["questions"]]
    assert names == ["data:mine", "bamboogle"]


# -- the command line: each bad input is one sentence and exit 2 --------------------------------------------------

def _refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--model", "http://127.0.0.1:9", "--api", "chat", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_benchmark_input_exits_2_with_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "expected 'all' or comma-separated names from nq, triviaqa" in _refusal(["--benchmark", "nq,squad"], capsys)
    assert f"put FlashRAG's musique/dev.jsonl from {HUB_URL} at {tmp_path / 'musique' / 'dev.jsonl'}" in _refusal(
        ["--benchmark", "musique", "--benchmark-dir", str(tmp_path)], capsys)
    path = write_set(tmp_path, "nq", [("q?", ["a"])])
    path.write_text(path.read_text() + "{not json\n")
    assert "nq/test.jsonl line 2 is not JSON" in _refusal(["--benchmark", "nq", "--benchmark-dir", str(tmp_path)],
                                                          capsys)
    write_set(tmp_path, "popqa", [("q?", [])])
    assert "popqa/test.jsonl line 1 ('q?') has no golden_answers" in _refusal(
        ["--benchmark", "popqa", "--benchmark-dir", str(tmp_path)], capsys)
    assert "data=None is not valid: expected a QA file, or --benchmark" in _refusal([], capsys)


def test_help_lists_each_sets_split(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for benchmark in BENCHMARKS.values():
        assert re.search(rf"{re.escape(benchmark.name)}\s+{benchmark.split}\s+{benchmark.rows:,}", out)
    assert "--benchmark NAME[,NAME...]|all" in out and "--no-download" in out


def test_hub_offline_reads_the_variables_huggingface_hub_reads(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not benchmarks.hub_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert benchmarks.hub_offline()


def test_with_a_store_and_no_retriever_it_serves_the_store_itself(demo_db, benchmark_dir, tmp_path):
    """What `python -m backends.modal evaluate --stage-args='--benchmark all'` relies on: $DRZERO_DB, no retriever."""
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/retrieve"
    answers = {q: [said] for q, _, said in SETS["bamboogle"]}
    with FakeSGLang(SearchThenAnswer(answers)).serve() as base_url:
        result = run_evaluate(EvaluateConfig(model=base_url, benchmark="bamboogle", benchmark_dir=str(benchmark_dir),
                                             out=str(tmp_path / "served"), retriever_url=url, db=str(demo_db),
                                             retriever_device="cpu", api="chat", retries=1, timeout=10.0))
    assert result.summary["benchmarks"]["sets"]["bamboogle"]["em"] == 1.0
    assert result.summary["counts"]["search_failures"] == 0
    corpus = result.manifest["setup"]["corpus"]
    assert corpus["retriever_url"] == url and corpus["collection"] == "corpus" and corpus["passages"] > 100


def test_over_the_generate_api_the_tokenizer_comes_from_the_server(retriever, benchmark_dir, tiny_tokenizer_dir,
                                                                  tmp_path):
    """No --tokenizer: the URL's SGLang names its own (/get_model_info), so `--model URL --benchmark all` works as
    typed; the manifest records it and hashes its chat template into the prompt template hash."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    answers = {q: [said] for q, _, said in SETS["musique"]}
    fake = FakeSGLang(SearchThenAnswer(answers), tokenizer=tokenizer, model_path=str(tiny_tokenizer_dir))
    result = evaluate(retriever, fake, benchmark_dir, tmp_path / "generate", benchmark="musique", api="generate")
    assert result.summary["benchmarks"]["sets"]["musique"]["em"] == 0.5
    agent = result.manifest["setup"]["agent"]
    assert result.manifest["setup"]["model"]["tokenizer"] == str(tiny_tokenizer_dir) and agent["api"] == "generate"
    assert agent["prompt_template_sha256"] == prompt_template_hash(tokenizer.chat_template) != prompt_template_hash(None)
