"""`drzero prepare-data` on the demo corpus, checked with verl 0.7.1's own RLHFDataset."""

import json
import subprocess
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import drzero_command
from drzero.config import ConfigError
from drzero.data.budget import TokenBudgetError
from drzero.stages.prepare_data import PrepareDataConfig, run_prepare_data
from drzero.data.seed import document_order
from drzero.prompts import PROPOSER_TEMPLATE_ID, extract_source_document


@pytest.fixture(scope="session")
def prepared(demo_db, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "zero_ratio4321.parquet"
    cfg = PrepareDataConfig(db=str(demo_db), out=str(out), rows=300, val_rows=20, partitions=3,
                            tokenizer=str(tiny_tokenizer_dir))
    return cfg, run_prepare_data(cfg)


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_rows_follow_the_seed_parquet_contract(prepared):
    cfg, result = prepared
    rows = _rows(result.train_path)
    assert len(rows) == 300
    for index, row in enumerate(rows):
        hops = row["extra_info"]["hops"]
        assert row["data_source"] == f"search_zero_{hops}"
        assert row["agent_name"] == "tool_agent"
        assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": None}}
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        assert f"exactly {hops} hop(s)" in row["prompt"][0]["content"]
        info = row["extra_info"]
        assert info["index"] == index and info["split"] == "train" and info["need_tools_kwargs"] is True
        assert info["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": row["data_source"],
                                                                       "seed_id": info["seed_id"]}}}
        assert info["template_id"] == PROPOSER_TEMPLATE_ID
        # the proposer's region first (29 rows per iteration, read from the top), then gen-data's (71 each)
        assert info["partition"] == (index // 29 if index < 87 else (index - 87) // 71)
        assert extract_source_document(row["prompt"][0]["content"]).startswith(f"(Title: {info['seed_title']})")


def test_documents_are_used_once_before_any_repeat_and_val_is_held_out(prepared):
    _, result = prepared
    train_ids = [r["extra_info"]["seed_id"] for r in _rows(result.train_path)]
    val_ids = [r["extra_info"]["seed_id"] for r in _rows(result.val_path)]
    # 200 demo passages, 20 held out: rows 0-179 use each of the other 180 once, rows 180-299 start over
    assert len(set(train_ids[:180])) == 180
    assert len(set(train_ids[180:])) == 120 and set(train_ids[180:]) <= set(train_ids[:180])
    assert not set(train_ids) & set(val_ids)
    assert {r["extra_info"]["split"] for r in _rows(result.val_path)} == {"val"}


def test_document_order_cycles_through_every_document_before_repeating():
    rng = np.random.default_rng(0)
    train, val = document_order(10, needed=25, held_out=3, rng=rng)
    assert len(set(val)) == 3 and not set(val) & set(train)
    pool = set(range(10)) - set(val)
    assert set(train[:7]) == pool and set(train[7:14]) == pool and set(train[14:21]) == pool
    assert max(Counter(train).values()) - min(Counter(train).values()) <= 1


def test_manifest_reports_what_was_written(prepared):
    cfg, result = prepared
    manifest = json.loads(result.manifest_path.read_text())
    rows = _rows(result.train_path)
    assert manifest["rows"] == 300 and manifest["val_rows"] == 20
    assert manifest["hop_histogram"] == {str(h): sum(r["extra_info"]["hops"] == h for r in rows) for h in range(1, 5)}
    assert manifest["template_id"] == PROPOSER_TEMPLATE_ID and manifest["seed"] == 42
    assert manifest["collection"]["size"] == 200 and manifest["tokenizer"] == cfg.tokenizer
    # 300 rows for 3 iterations, split 12,800 : 32,000 between the proposer and gen-data
    assert [c["rows"] for c in manifest["challenger_rows"]] == [[0, 29], [29, 58], [58, 87]]
    assert [p["rows"] for p in manifest["partitions"]] == [[87, 158], [158, 229], [229, 300]]
    assert manifest["search_results"]["chars_per_token"]["min"] > 1
    assert manifest["prompt_tokens"]["max"] <= 1536 and manifest["prompt_tokens"]["exact_check"]["mismatches"] == 0
    assert result.val_path.name == "zero_ratio4321_val.parquet"


def test_same_seed_same_data_other_seed_other_data(prepared, demo_db, tiny_tokenizer_dir, tmp_path):
    cfg, result = prepared
    again = run_prepare_data(PrepareDataConfig(**{**cfg.__dict__, "out": str(tmp_path / "a.parquet")}))
    other = run_prepare_data(PrepareDataConfig(**{**cfg.__dict__, "out": str(tmp_path / "b.parquet"), "seed": 7}))
    assert _rows(again.train_path) == _rows(result.train_path)
    assert _rows(other.train_path) != _rows(result.train_path)


@pytest.mark.parametrize("ratio,allowed", [("0001", {4}), ("55", {1, 2}), ("10", {1})])
def test_any_digit_ratio(demo_db, tiny_tokenizer_dir, tmp_path, ratio, allowed):
    result = run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(tmp_path / "x.parquet"), rows=200,
                                                val_rows=10, hop_ratio=ratio, tokenizer=str(tiny_tokenizer_dir)))
    hops = {r["extra_info"]["hops"] for r in _rows(result.train_path)}
    assert hops == allowed


def test_documents_are_cut_to_the_token_budget(demo_db, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    result = run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(tmp_path / "x.parquet"), rows=50,
                                                val_rows=5, max_doc_tokens=16, tokenizer=str(tiny_tokenizer_dir)))
    documents = [extract_source_document(r["prompt"][0]["content"]) for r in _rows(result.train_path)]
    assert all(len(tokenizer(d, add_special_tokens=False)["input_ids"]) <= 16 for d in documents)
    assert result.manifest["documents_truncated"] > 0


def test_an_overlong_prompt_fails_and_writes_nothing(demo_db, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "data" / "x.parquet"
    with pytest.raises(TokenBudgetError, match="exceed max_prompt_length=600.*lower --max-doc-tokens"):
        run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(out), rows=50, val_rows=5,
                                           max_prompt_length=600, tokenizer=str(tiny_tokenizer_dir)))
    assert list(out.parent.iterdir()) == []


def test_a_crash_while_writing_leaves_no_file_under_the_final_name(demo_db, tiny_tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    import pyarrow.parquet

    def dies_halfway(table, where, **kwargs):
        open(where, "wb").write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.parquet, "write_table", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(tmp_path / "x.parquet"), rows=20, val_rows=2,
                                           tokenizer=str(tiny_tokenizer_dir)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--hop-ratio", "43a1"], "hop_ratio='43a1' is not valid"),
    (["--hop-ratio", "0000"], "hop_ratio='0000' is not valid"),
    (["--rows", "0"], "rows=0 is not valid"),
    (["--val-rows", "0"], "val_rows=0 is not valid"),
    (["--tokenizer", "/nowhere/tokenizer"], "tokenizer='/nowhere/tokenizer' is not valid"),
])
def test_bad_arguments_exit_2_with_one_sentence_and_write_nothing(demo_db, tmp_path, args, message):
    result = subprocess.run(drzero_command("prepare-data", "--db", str(demo_db), "--out",
                                           str(tmp_path / "x.parquet"), *args),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_or_empty_collection_and_unwritable_output(tmp_path, tiny_tokenizer_dir):
    from drzero.corpus.embedder import spec_for
    from drzero.corpus.store import CorpusStore, StoreError

    with pytest.raises(StoreError, match="no corpus at"):
        run_prepare_data(PrepareDataConfig(db=str(tmp_path / "none"), out=str(tmp_path / "o" / "x.parquet"),
                                           tokenizer=str(tiny_tokenizer_dir)))
    CorpusStore.create(tmp_path / "empty", spec_for("minilm"), 384)
    with pytest.raises(StoreError, match="is empty"):
        run_prepare_data(PrepareDataConfig(db=str(tmp_path / "empty"), out=str(tmp_path / "o" / "x.parquet"),
                                           tokenizer=str(tiny_tokenizer_dir)))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to directory"):
        run_prepare_data(PrepareDataConfig(db=str(tmp_path / "empty"), out=str(blocker / "x.parquet"),
                                           tokenizer=str(tiny_tokenizer_dir)))


def test_a_model_name_without_local_files_says_where_to_put_them(demo_db, tmp_path, monkeypatch):
    from drzero.models.files import ModelNotFound

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound, match="no tokenizer found for 'Qwen/Qwen2.5-3B-Instruct'.*--tokenizer DIR"):
        run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(tmp_path / "x.parquet"), rows=10, val_rows=1))


def test_every_iteration_sees_seeds_no_earlier_iteration_saw():
    """Default layout (Dr. Zero's 50 steps x 256 prompts per proposer iteration, 5 partitions): the proposer's
    rows of iteration k, read from the top, and gen-data's partition k never overlap each other or any earlier
    iteration's rows."""
    cfg = PrepareDataConfig(db=".", tokenizer="Qwen/Qwen2.5-3B-Instruct")
    challenger, gen = cfg.regions()
    assert cfg.total_rows == 5 * (12800 + 32000)
    assert challenger[0] == [0, 50 * 256] and all(b - a == 12800 for a, b in challenger)
    assert all(b - a == 32000 for a, b in gen)
    seen: set[int] = set()
    for (c0, c1), (g0, g1) in zip(challenger, gen):
        rows = set(range(c0, c1)) | set(range(g0, g1))
        assert len(rows) == (c1 - c0) + (g1 - g0) and not rows & seen
        seen |= rows


# -- verl 0.7.1 reads what we wrote ------------------------------------------------------------

def _verl_dataset(path, tokenizer_dir, tmp_path, max_prompt_length):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from drzero.prompts import SEARCH_TOOL_SCHEMA

    tool_config = tmp_path / "tools.yaml"
    # verl's own BaseTool carries the schema; the dataset needs only the schema to render tools.
    tool_config.write_text(json.dumps({"tools": [{"class_name": "verl.tools.base_tool.BaseTool",
                                                  "config": {"type": "native"},
                                                  "tool_schema": SEARCH_TOOL_SCHEMA}]}))
    config = OmegaConf.create({
        "prompt_key": "prompt", "max_prompt_length": max_prompt_length, "filter_overlong_prompts": True,
        "return_raw_chat": True, "truncation": "error", "tool_config_path": str(tool_config),
        "cache_dir": str(tmp_path / "verl-cache"), "filter_overlong_prompts_workers": 1,
    })
    return RLHFDataset(str(path), AutoTokenizer.from_pretrained(tokenizer_dir), config)


def test_verl_rlhf_dataset_loads_rows_with_tools_and_agent_name(prepared, tiny_tokenizer_dir, tmp_path):
    cfg, result = prepared
    dataset = _verl_dataset(result.train_path, tiny_tokenizer_dir, tmp_path, cfg.max_prompt_length)
    assert dataset.tool_schemas and dataset.tool_schemas[0]["function"]["name"] == "search"
    assert len(dataset) == 300  # nothing filtered: every prompt fits
    item = dataset[7]
    assert item["agent_name"] == "tool_agent"
    assert item["tools_kwargs"]["search"]["create_kwargs"]["data_source"] == item["data_source"]
    assert item["index"] == 7
    assert item["raw_prompt"][0]["content"].startswith("You write quiz questions")
    val = _verl_dataset(result.val_path, tiny_tokenizer_dir, tmp_path, cfg.max_prompt_length)
    assert len(val) == 20


def test_our_prompt_lengths_are_verls(prepared, tiny_tokenizer_dir, tmp_path):
    """At a budget one below our longest prompt, verl's own filter drops exactly the longest ones."""
    _, result = prepared
    from drzero.data.budget import PromptBudget
    from transformers import AutoTokenizer

    budget = PromptBudget(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    lengths = np.array([budget.rendered_length(r["prompt"]) for r in _rows(result.train_path)])
    longest = int(lengths.max())
    assert longest == result.manifest["prompt_tokens"]["max"]
    dataset = _verl_dataset(result.train_path, tiny_tokenizer_dir, tmp_path, longest - 1)
    assert len(dataset) == int((lengths <= longest - 1).sum()) < 300
