"""`drzero gen-data` killed with SIGKILL part way resumes from its shards instead of starting over."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from drzero.atomic import verify_set
from drzero.data.gen_data import GenDataJob, run_gen_data, shards_dir, summary_lines
from drzero.stages.prepare_data import PrepareDataConfig, run_prepare_data
from drzero.prompts import extract_source_document
from fake_sglang import FakeSGLang, Faults
from test_gen_data import ScriptedProposer

SEEDS = 40


@pytest.fixture(scope="module")
def seeds(demo_db, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "zero_ratio4321.parquet"
    # one iteration: 4 proposer rows, then the SEEDS rows gen-data samples
    return run_prepare_data(PrepareDataConfig(db=str(demo_db), out=str(out), challenger_rows=4, gen_rows=SEEDS,
                                              val_rows=4, partitions=1, tokenizer=str(tiny_tokenizer_dir)))


def _settings(seeds, proposer_url, retriever, out) -> dict:
    return {"iteration": 1, "seeds": str(seeds.train_path), "out": str(out), "proposer_url": proposer_url,
            "retriever_url": f"{retriever.url}/retrieve", "retries": 1, "timeout": 10.0, "shard_seeds": 4,
            "concurrency": 2, "api": "chat"}  # the scripted proposer speaks chat; resuming is the same for both APIs


def test_a_killed_gen_data_resumes_with_the_seeds_it_had_not_finished(seeds, retriever, tmp_path):
    out = tmp_path / "solver_iter1.parquet"
    shards = shards_dir(out)
    first = FakeSGLang(ScriptedProposer(), model="proposer", faults=Faults(latency_s=0.03))
    with first.serve() as url:
        settings = _settings(seeds, url, retriever, out)
        run = textwrap.dedent(f"""
            from drzero.data.gen_data import GenDataJob, run_gen_data
            run_gen_data(GenDataJob(**{settings!r}))
        """)
        process = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        try:
            deadline = time.monotonic() + 120
            while len(list(shards.glob("shard-*.jsonl"))) < 3 and time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()[1][-3000:]
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=10) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
        calls_before_kill = first.generate_calls
    assert not out.exists() and verify_set(out.with_name("solver_iter1.manifest.json")) is not None

    finished = [json.loads(line) for shard in sorted(shards.glob("shard-*.jsonl"))
                for line in shard.read_text().splitlines()]
    finished_items = {entry["item"] for entry in finished}
    finished_train = {int(item.split("/")[1]) for item in finished_items if item.startswith("train/")}
    assert len(finished) >= 12 and len(finished) < SEEDS + 4  # three shards of four, and work left to do

    second_proposer = ScriptedProposer()
    second = FakeSGLang(second_proposer, model="proposer")
    with second.serve() as url:
        result = run_gen_data(GenDataJob(**{**_settings(seeds, url, retriever, out)}))
    # nothing a shard holds is asked again; everything else is, exactly once
    start, end = result.manifest["seed_partition"]["rows"]  # the gen-data region, after the proposer's rows
    assert end - start == SEEDS
    rows = {"train": pq.read_table(seeds.train_path).slice(start, end - start).to_pylist(),
            "val": pq.read_table(seeds.val_path).to_pylist()}
    documents = [extract_source_document(row["prompt"][0]["content"]) for row in rows["train"]]
    assert not {documents[i] for i in finished_train} & second_proposer.documents_seen()
    unfinished = [row for split, split_rows in rows.items() for i, row in enumerate(split_rows)
                  if f"{split}/{i}" not in finished_items]
    # the scripted proposer answers in one turn, except its best sample, which takes one turn per hop
    assert second.generate_calls == sum(4 + row["extra_info"]["hops"] for row in unfinished)
    resumed = result.manifest["resumed_seeds"]
    assert resumed["train"] + resumed["val"] == len(finished)
    assert result.manifest["train"]["seeds"] == SEEDS  # the outputs cover every seed, resumed or not
    assert calls_before_kill > 0
    assert not shards.exists()  # committed: the shards are gone
    assert verify_set(result.manifest_path) is None
    summary = summary_lines(result)
    assert "generate requests" in summary and f"({len(finished)} seeds resumed" in summary


def test_shards_from_other_settings_are_discarded(seeds, retriever, tmp_path):
    out = tmp_path / "solver_iter1.parquet"
    shards = shards_dir(out)
    shards.mkdir()
    (shards / "key.json").write_text(json.dumps({"samples": 99}))
    (shards / "shard-000000.jsonl").write_text(json.dumps({"item": "train/0", "record": {"verdict": "kept"}}) + "\n")
    proposer = ScriptedProposer()
    with FakeSGLang(proposer, model="proposer").serve() as url:
        result = run_gen_data(GenDataJob(**_settings(seeds, url, retriever, out), limit=3))
    assert result.manifest["resumed_seeds"] == {"train": 0, "val": 0}
    assert len(proposer.documents_seen()) == 3 + 3  # three seeds and three validation seeds, all sampled
    assert not shards.exists()


def test_server_failures_are_not_kept_for_the_resumed_run(seeds, retriever, tmp_path):
    """A seed whose every sample failed on the server is a server problem, not a verdict: not journaled."""
    from drzero.data.gen_data import NoQuestionsKept

    out = tmp_path / "solver_iter1.parquet"
    with FakeSGLang(ScriptedProposer(), model="proposer", faults=Faults(fail_first=10_000)).serve() as url:
        with pytest.raises(NoQuestionsKept):
            run_gen_data(GenDataJob(**_settings(seeds, url, retriever, out), limit=2))
    assert not [line for shard in shards_dir(out).glob("shard-*.jsonl") for line in shard.read_text().splitlines()]


@pytest.mark.parametrize("change", [{"thinking": True}, {"tokenizer": "/models/another-tokenizer"}])
def test_shards_rendered_with_other_prompts_are_not_reused(change, tmp_path):
    """--thinking and the tokenizer change every prompt's rendering: seeds finished under others are redone."""
    import dataclasses

    from drzero.data.gen_data import journal_key

    (tmp_path / "seeds.parquet").write_bytes(b"")  # the config asks for an existing file; nothing reads it here
    base = GenDataJob(iteration=1, seeds=str(tmp_path / "seeds.parquet"), out=str(tmp_path / "out.parquet"),
                         proposer_url="http://127.0.0.1:1", retriever_url="http://127.0.0.1:2/retrieve", api="chat")
    manifest = {"files": {"seeds.parquet": "abc"}}
    assert journal_key(base, manifest, 0, 40, 4) == journal_key(dataclasses.replace(base), manifest, 0, 40, 4)
    assert journal_key(base, manifest, 0, 40, 4) != journal_key(dataclasses.replace(base, **change), manifest, 0, 40, 4)


@pytest.mark.parametrize("damage", ["truncated line", "wrong shape", "damaged key"])
def test_a_damaged_shard_is_set_aside_and_its_seeds_generated_again(damage, seeds, retriever, tmp_path, monkeypatch,
                                                                     caplog):
    """A shard line cut short (a disk fault, a hand edit) once crashed the resumed run with a JSONDecodeError."""
    from drzero.data import gen_data

    out = tmp_path / "solver_iter1.parquet"
    shards = shards_dir(out)
    real_commit = gen_data.commit_set

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gen_data, "commit_set", disk_full)  # every seed finished and journaled, nothing committed
    with FakeSGLang(ScriptedProposer(), model="proposer").serve() as url:
        with pytest.raises(OSError, match="No space left"):
            run_gen_data(GenDataJob(**_settings(seeds, url, retriever, out), limit=3))
    first, second = sorted(shards.glob("shard-*.jsonl"))  # 3 train + 3 validation seeds, 4 per shard
    if damage == "truncated line":
        first.write_text(first.read_text()[:-40])
    elif damage == "wrong shape":
        lines = first.read_text().splitlines()
        entry = json.loads(lines[0])
        entry["record"]["verdict"] = "maybe"
        first.write_text("\n".join([json.dumps(entry)] + lines[1:]) + "\n")
    else:
        (shards / "key.json").write_text('{"samples": ')

    monkeypatch.setattr(gen_data, "commit_set", real_commit)
    proposer = ScriptedProposer()
    with FakeSGLang(proposer, model="proposer").serve() as url:
        result = run_gen_data(GenDataJob(**_settings(seeds, url, retriever, out), limit=3))
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1, warnings
    if damage == "damaged key":  # shards of unknown settings: the journal goes aside whole, every seed again
        assert warnings[0].startswith(f'{shards} is damaged: its key.json is damaged (it is not JSON')
        assert warnings[0].endswith("and every item is done again")
        assert sum(result.manifest["resumed_seeds"].values()) == 0 and len(proposer.documents_seen()) == 6
    else:
        expected = "it is not JSON" if damage == "truncated line" else 'record["verdict"] is "maybe", not "kept" or'
        assert warnings[0].startswith(f"{first} is damaged: line ") and expected in warnings[0]
        assert warnings[0].endswith("and the items it held are done again")
        assert sum(result.manifest["resumed_seeds"].values()) == 2  # the second shard's; the first's four again
        assert len(proposer.documents_seen()) == 4
    assert result.manifest["train"]["seeds"] == 3 and verify_set(result.manifest_path) is None
    assert not shards.exists()  # committed: the journal goes, a shard set aside in it with it
