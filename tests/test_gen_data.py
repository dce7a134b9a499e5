"""`drzero gen-data` against a scripted stand-in proposer (and solver) server and the real retriever."""

import json
import re
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drzero.config import ConfigError
from drzero.data.gen_data import GenDataJob, NoQuestionsKept, run_gen_data, summary_lines
from drzero.data.questions import best_candidate, response_text
from drzero.stages.prepare_data import PrepareDataConfig, run_prepare_data
from drzero.prompts import SOLVER_TEMPLATE_ID, extract_source_document, solver_messages
from drzero.rewards.proposer import FormatScore, format_score, split_turns
from drzero.rewards.solver import normalize_answer
from drzero.rollout.client import Trajectory
from fake_sglang import Conversation, FakeSGLang, Faults, Reply, search_call

ITERATION = 2  # reads partition 1 (seed rows 10-19)
LONG_PADDING = " ".join(["and", "please", "consider", "every", "clause", "of", "this", "question"] * 8)  # 64 words


# -- the seed data and what the scripted proposer makes of each document ------------------------

@pytest.fixture(scope="module")
def seeds(demo_db, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "zero_ratio4321.parquet"
    # two iterations of 3 proposer rows and 10 gen-data seeds: gen-data reads rows 6-15, then 16-25
    return run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(out), challenger_rows=3, gen_rows=10,
                                              val_rows=4, partitions=2, tokenizer=str(tiny_tokenizer_dir)))


def _rows(path):
    return pq.read_table(path).to_pylist()


def _document(row) -> str:
    return extract_source_document(row["prompt"][0]["content"])


def _partition(seeds, partition):
    start, end = seeds.manifest["partitions"][partition]["rows"]
    return _rows(seeds.train_path)[start:end]


def grounded_proposal(document: str) -> tuple[str, str]:
    """(question, answer): the answer is the document's longest word, which the question does not contain."""
    title = re.match(r"\(Title: (.*?)\)", document).group(1)
    question = f"Which rare word does the study titled {title} use?"
    words = sorted({w for w in re.findall(r"[A-Za-z]{6,}", document)
                    if normalize_answer(w) not in normalize_answer(question)}, key=lambda w: (-len(w), w))
    return question, words[0]


class ScriptedProposer:
    """What a proposer says about a seed document, by the order in which its 5 samples arrive.

    Sample 0 has no <answer>; 1 is valid without <think> (format .75 at 1 hop, .5 above); 2 is the
    best (think every turn, hops-1 searches, grounded answer: format 1.0); 3 puts the answer in the
    question; 4 answers with words found nowhere (format .75 / .5). A doomed document gets only
    broken samples; a long one gets a best question of 70+ words.
    """

    def __init__(self, doomed=(), long=()):
        self.doomed, self.long = set(doomed), set(long)
        self.samples = Counter()       # first turns seen, per document
        self._lock = threading.Lock()

    def best_question(self, document: str) -> tuple[str, str]:
        question, answer = grounded_proposal(document)
        return (f"{question} {LONG_PADDING}" if document in self.long else question), answer

    def __call__(self, conversation: Conversation) -> Reply:
        prompt = next(turn.content for turn in conversation.turns if turn.role == "user")
        document = extract_source_document(prompt)
        hops = int(re.search(r"Hops required: (\d+)", prompt).group(1))
        question, answer = grounded_proposal(document)
        if conversation.assistant_turns:  # only the best sample searches, so this is its next hop
            sample = 2
        else:
            with self._lock:
                sample = self.samples[document] % 5
                self.samples[document] += 1
            if document in self.doomed:
                sample = 0 if sample % 2 == 0 else 3
        if sample == 0:
            return Reply(f"<think>Almost.</think><question>{question}</question>")
        if sample == 1:
            return Reply(f"<question>Name a word from that study?</question><answer>{answer}</answer>")
        if sample == 3:
            return Reply(f"<think>Easy.</think><question>Is {answer} the word?</question><answer>{answer}</answer>")
        if sample == 4:
            return Reply("<think>Guess.</think><question>Which word comes next?</question>"
                         "<answer>Quixotic Zebra Lantern</answer>")
        if len(conversation.tool_responses) < hops - 1:
            return Reply(search_call(f"hop {len(conversation.tool_responses) + 1} of {document[:60]}"))
        best, answer = self.best_question(document)
        return Reply(f"<think>The chain is complete.</think>\n<question>{best}</question>\n<answer>{answer}</answer>")

    def documents_seen(self) -> set[str]:
        return set(self.samples)


class ScriptedSolver:
    """Answers by the kind of question: 'leaky' ones at once without searching, 'unsolvable' ones
    wrongly after a search; any other question's first probe says 'unknown' without searching (a
    wrong answer without search must not reject it), later probes search once and answer."""

    def __init__(self, answers: dict[str, str], leaky=(), unsolvable=()):
        self.answers, self.leaky, self.unsolvable = answers, set(leaky), set(unsolvable)
        self.probes = Counter()
        self._lock = threading.Lock()

    def __call__(self, conversation: Conversation) -> Reply:
        question = conversation.question
        answer = self.answers[question]
        if question in self.leaky:
            return Reply(f"<think>I know this.</think><answer>{answer}</answer>")
        if not conversation.tool_responses:
            with self._lock:
                probe = self.probes[question]
                self.probes[question] += 1
            if probe == 0 and question not in self.unsolvable:
                return Reply("<answer>unknown</answer>")
            return Reply(search_call(question))
        return Reply(f"<answer>{'no idea' if question in self.unsolvable else answer}</answer>")


def _config(seeds, proposer_url, retriever, out, **overrides) -> GenDataJob:
    settings = {"iteration": ITERATION, "seeds": str(seeds.train_path), "out": str(out) if out else None,
                "proposer_url": proposer_url, "retriever_url": f"{retriever.url}/retrieve", "retries": 1,
                "timeout": 10.0, "api": "chat", **overrides}
    return GenDataJob(**settings)


def _cut(question: str) -> str:
    return " ".join(question.split()[:50])


# -- the main path -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(seeds, retriever, tmp_path_factory):
    documents = [_document(row) for row in _partition(seeds, ITERATION - 1)]
    proposer = ScriptedProposer(doomed=documents[0::4], long=documents[1::3])
    with FakeSGLang(proposer, model="proposer").serve() as base_url:
        out = tmp_path_factory.mktemp("gen") / "solver.parquet"
        result = run_gen_data(_config(seeds, base_url, retriever, out))
    return proposer, documents, result


def test_only_the_iterations_partition_and_the_validation_seeds_are_sampled_five_times(seeds, generated):
    proposer, documents, _ = generated
    val_documents = [_document(row) for row in _rows(seeds.val_path)]
    other_partition = {_document(row) for row in _partition(seeds, 0)}
    assert proposer.documents_seen() == set(documents) | set(val_documents)
    assert not proposer.documents_seen() & other_partition
    assert set(proposer.samples.values()) == {5}


def test_the_best_candidate_is_kept_and_seeds_without_one_are_dropped(seeds, generated):
    proposer, documents, result = generated
    seed_rows = {row["extra_info"]["seed_id"]: row for row in _partition(seeds, ITERATION - 1)}
    rows = _rows(result.train_path)
    kept_documents = [d for d in documents if d not in proposer.doomed]
    assert [_document(seed_rows[r["extra_info"]["seed_id"]]) for r in rows] == kept_documents  # seed order kept
    for index, row in enumerate(rows):
        seed = seed_rows[row["extra_info"]["seed_id"]]
        question, answer = proposer.best_question(_document(seed))
        info = row["extra_info"]
        assert info["question"] == _cut(question) and info["answer"] == answer
        assert info["proposer_format"] == 1.0  # sample 2 beat the .75/.5 ones
        assert row["data_source"] == seed["data_source"] and info["hops"] == seed["extra_info"]["hops"]
        assert row["prompt"] == solver_messages(info["question"])
        assert row["ability"] == seed["ability"] and row["agent_name"] == "tool_agent"
        assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": [answer]}}
        assert info["index"] == index and info["split"] == "train" and info["need_tools_kwargs"] is True
        assert info["tools_kwargs"] == seed["extra_info"]["tools_kwargs"] == {
            "search": {"create_kwargs": {"data_source": row["data_source"], "seed_id": info["seed_id"]}}}
        assert info["template_id"] == SOLVER_TEMPLATE_ID and info["iteration"] == ITERATION
        assert len(info["question"].split()) <= 50


def test_long_questions_are_cut_to_fifty_words(generated):
    proposer, documents, result = generated
    questions = [r["extra_info"]["question"] for r in _rows(result.train_path)]
    long_kept = [d for d in documents if d in proposer.long and d not in proposer.doomed]
    assert long_kept and sum(len(q.split()) == 50 for q in questions) == len(long_kept)
    assert result.manifest["train"]["questions_cut"] == len(long_kept)


def test_manifest_counts_add_up(seeds, generated):
    proposer, documents, result = generated
    manifest = json.loads(result.manifest_path.read_text())
    rows, val_rows = _rows(result.train_path), _rows(result.val_path)
    train = manifest["train"]
    assert train["seeds"] == 10 and train["candidates"] == 50
    assert train["kept"] == len(rows) == 10 - len(proposer.doomed) and train["dropped_no_valid"] == 3
    assert train["kept"] + train["dropped_no_valid"] + train["rejected_no_search"] + train["rejected_unsolved"] \
        + train["rejected_probes_failed"] == train["seeds"]
    assert train["hop_histogram"] == {str(h): sum(r["extra_info"]["hops"] == h for r in rows) for h in range(1, 5)}
    assert train["mean_proposer_format"] == 1.0
    # kept seeds: samples 0 and 3 fail the gate; doomed seeds: 0, 2, 4 lack an answer, 1 and 3 leak it
    assert train["invalid_candidate_reasons"] == {"missing <question> or <answer>": 7 + 3 * 3,
                                                  "the answer appears in the question": 7 + 3 * 2}
    assert sum(train["candidate_stop_reasons"].values()) == 50 and train["rollout_errors"] == 0
    assert manifest["seed_partition"] == {"partition": 1, "rows": [16, 26]}
    assert manifest["val"]["seeds"] == manifest["val"]["kept"] == len(val_rows) == 4
    assert {r["extra_info"]["split"] for r in val_rows} == {"val"}
    assert [r["extra_info"]["index"] for r in val_rows] == [0, 1, 2, 3]
    assert manifest["config"]["samples"] == 5 and manifest["solver"] is None
    assert set(manifest["timings"]) == {"load_seconds", "rollout_seconds", "total_seconds"}
    assert result.val_path.name == "solver_val.parquet" and result.manifest_path.name == "solver.manifest.json"
    summary = summary_lines(result)
    assert "7 of 10 seeds kept  (dropped_no_valid: 3)" in summary and "4 of 4 seeds kept" in summary


def test_verl_rlhf_dataset_loads_the_solver_data(generated, tiny_tokenizer_dir, tmp_path):
    from test_prepare_data import _verl_dataset

    _, _, result = generated
    dataset = _verl_dataset(result.train_path, tiny_tokenizer_dir, tmp_path, max_prompt_length=512)
    assert len(dataset) == 7  # nothing filtered as overlong
    item = dataset[0]
    assert item["agent_name"] == "tool_agent" and item["index"] == 0
    assert item["raw_prompt"][0]["content"].startswith("Answer the question below.")
    assert item["tools_kwargs"]["search"]["create_kwargs"]["data_source"] == item["data_source"]
    assert len(_verl_dataset(result.val_path, tiny_tokenizer_dir, tmp_path, max_prompt_length=512)) == 4


# -- verification with solver probes -------------------------------------------------------------

def test_verify_rejects_questions_answered_without_search_and_questions_never_answered(seeds, retriever, tmp_path):
    documents = [_document(row) for row in _partition(seeds, ITERATION - 1)]
    proposer = ScriptedProposer(doomed=documents[0::4])
    all_documents = documents + [_document(row) for row in _rows(seeds.val_path)]
    answers = dict(proposer.best_question(d) for d in all_documents)
    leaky, unsolvable, fine = documents[1::4], documents[2::4], documents[3::4]
    solver = ScriptedSolver(answers, leaky=[proposer.best_question(d)[0] for d in leaky],
                            unsolvable=[proposer.best_question(d)[0] for d in unsolvable])
    with FakeSGLang(proposer, model="proposer").serve() as proposer_url, \
            FakeSGLang(solver, model="solver").serve() as solver_url:
        result = run_gen_data(_config(seeds, proposer_url, retriever, tmp_path / "verified.parquet", verify=True,
                                      solver_url=solver_url))
    train = result.manifest["train"]
    assert (train["kept"], train["dropped_no_valid"], train["rejected_no_search"], train["rejected_unsolved"],
            train["rejected_probes_failed"]) == (len(fine), 3, len(leaky), len(unsolvable), 0)
    assert train["probes"] == 5 * (10 - 3) and train["probe_errors"] == 0
    kept = [r["extra_info"]["question"] for r in _rows(result.train_path)]
    assert kept == [proposer.best_question(d)[0] for d in fine]
    assert result.manifest["val"]["kept"] == 4  # every validation question is a 'fine' one
    assert "verification   35 probes" in summary_lines(result)


# -- smaller runs: iteration 1, --limit, both APIs, the default output path --------------------

@pytest.mark.parametrize("api", ["chat", "generate"])
def test_iteration_one_reads_partition_zero_and_limit_takes_the_first_seeds(seeds, retriever, tiny_tokenizer_dir,
                                                                          api):
    from transformers import AutoTokenizer

    proposer = ScriptedProposer()
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir) if api == "generate" else None
    with FakeSGLang(proposer, model="proposer", tokenizer=tokenizer).serve() as base_url:
        cfg = _config(seeds, base_url, retriever, None, iteration=1, limit=3, api=api,
                      tokenizer=str(tiny_tokenizer_dir))
        result = run_gen_data(cfg)
    first_seeds = [_document(row) for row in _partition(seeds, 0)[:3]]
    first_val = [_document(row) for row in _rows(seeds.val_path)[:3]]
    assert proposer.documents_seen() == set(first_seeds) | set(first_val)
    assert result.train_path == seeds.train_path.with_name("solver_iter1.parquet")
    assert result.val_path.name == "solver_iter1_val.parquet"
    assert result.manifest_path.name == "solver_iter1.manifest.json"
    assert [r["extra_info"]["iteration"] for r in _rows(result.train_path)] == [1, 1, 1]
    assert result.manifest["seed_partition"] == {"partition": 0, "rows": [6, 9]}


# -- failures ------------------------------------------------------------------------------------

def test_nothing_kept_is_a_clear_error_and_writes_nothing(seeds, retriever, tmp_path):
    everything = [_document(row) for row in _rows(seeds.train_path) + _rows(seeds.val_path)]
    out = tmp_path / "gen" / "solver.parquet"
    with FakeSGLang(ScriptedProposer(doomed=everything), model="proposer").serve() as base_url:
        with pytest.raises(NoQuestionsKept, match=r"kept no question from the 10 train seeds of iteration 2 \(10 "
                                                  r"without a valid candidate among 5 samples.*no sample passed the "
                                                  r"format gate \(missing <question> or <answer>: 30, the answer "
                                                  r"appears in the question: 20\).*Nothing was written\.$"):
            run_gen_data(_config(seeds, base_url, retriever, out))
    assert list(out.parent.iterdir()) == []


def test_a_proposer_server_that_fails_every_request_drops_every_seed_with_a_clear_error(seeds, retriever, tmp_path):
    out = tmp_path / "gen" / "solver.parquet"
    fake = FakeSGLang(ScriptedProposer(), model="proposer", faults=Faults(fail_first=10**6))
    with fake.serve() as base_url:
        with pytest.raises(NoQuestionsKept, match=r"10 without a valid candidate.*the proposer server failed every "
                                                  r"request \(inference server answered 500 \(after 2 attempts\)\): "
                                                  r"check that --proposer-url http://127\.0\.0\.1:\d+ serves "
                                                  r"--proposer-model 'proposer'"):
            run_gen_data(_config(seeds, base_url, retriever, out, limit=10))
    assert fake.generate_calls == 2 * 5 * (10 + 4)  # every sample tried twice, none crashed the run
    assert list(out.parent.iterdir()) == []


def test_an_iteration_past_the_last_partition_names_the_field(seeds, tmp_path):
    cfg = GenDataJob(iteration=3, seeds=str(seeds.train_path), out=str(tmp_path / "x.parquet"), api="chat")
    with pytest.raises(ConfigError, match=r"iteration=3 is not valid: expected an integer from 1 to 2"):
        run_gen_data(cfg)


@pytest.mark.parametrize("overrides,message", [
    ({"iteration": 0}, "iteration=0 is not valid"),
    ({"seeds": "/nowhere/seeds.parquet"}, "seeds='/nowhere/seeds.parquet' is not valid"),
    ({"samples": 0}, "samples=0 is not valid"),
    ({"max_question_words": 0}, "max_question_words=0 is not valid"),
    ({"verify": True}, "solver_url=None is not valid: expected the solver server's URL when verify is on"),
    ({"verify_probes": 0}, "verify_probes=0 is not valid"),
    ({"val_rows": 0}, "val_rows=0 is not valid"),
    ({"api": "grpc"}, "api='grpc' is not valid"),
    ({"api": "completions"}, "api='completions' is not valid"),
    ({"api": "generate", "tokenizer": None}, "tokenizer=None is not valid: expected a tokenizer name or directory"),
    ({"proposer_url": "127.0.0.1:8001"}, "proposer_url='127.0.0.1:8001' is not valid: expected an http"),
    ({"concurrency": 0}, "concurrency=0 is not valid"),
    ({"temperature": -1.0}, "temperature=-1.0 is not valid"),
    ({"limit": 0}, "limit=0 is not valid"),
])
def test_config_validation_names_the_field(seeds, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenDataJob(**{"iteration": 1, "seeds": str(seeds.train_path), "tokenizer": "tok", **overrides})


def test_a_seed_parquet_without_its_manifest_says_what_to_run(tmp_path):
    lonely = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"x": [1]}), lonely)
    with pytest.raises(ConfigError, match=r"has no manifest seeds\.manifest\.json beside it; run `drzero "
                                          r"prepare-data`"):
        run_gen_data(GenDataJob(iteration=1, seeds=str(lonely), out=str(tmp_path / "out.parquet"), api="chat"))


# -- the pieces ----------------------------------------------------------------------------------

def test_response_text_is_what_split_turns_and_the_format_score_expect():
    call = '<tool_call>{"name": "search", "arguments": {"query_list": ["Mira Okafor"]}}</tool_call>'
    server_parsed = {"type": "function", "function": {"name": "search",
                                                      "arguments": json.dumps({"query_list": ["Tessaly"]})}}
    trajectory = Trajectory(messages=[
        {"role": "user", "content": "the proposer prompt"},
        {"role": "assistant", "content": f"<think>first hop</think>{call}"},
        {"role": "tool", "content": '{"result": "Doc 1 (Title: Mira Okafor) works at the Tessaly Institute"}'},
        {"role": "assistant", "content": "<think>second hop</think>", "tool_calls": [server_parsed]},
        {"role": "tool", "content": '{"result": "Doc 1 (Title: Tessaly Institute) is in Ravenport"}'},
        {"role": "assistant", "content": "<think>done</think><question>Where is it?</question>"
                                         "<answer>Ravenport</answer>"},
    ], assistant_turns=["a", "b", "c"])
    text = response_text(trajectory)
    assert text.startswith("<think>first hop</think>") and "the proposer prompt" not in text
    assert "</tool_call>\nuser\n<tool_response>\n{\"result\": \"Doc 1 (Title: Mira Okafor)" in text
    turns, responses = split_turns(text)
    assert len(turns) == 3 and len(responses) == 2
    assert turns[1].startswith("<think>second hop</think>\n<tool_call>")
    score = format_score(text, hops=3, document="(Title: Sparse Lattice Codes) by Mira Okafor.")
    assert (score.think, score.tool, score.answer, score.score) == (1.0, 1.0, 1.0, 1.0)
    assert response_text(Trajectory(messages=[{"role": "user", "content": "p"}])) == ""


def test_best_candidate_takes_the_highest_valid_score_and_the_first_on_ties():
    scores = [FormatScore(0.0), FormatScore(0.75), FormatScore(1.0), FormatScore(1.0), FormatScore(0.5)]
    assert best_candidate(scores) == 2
    assert best_candidate([FormatScore(0.5), FormatScore(0.5)]) == 0
    assert best_candidate([FormatScore(0.0), FormatScore(0.0)]) is None
