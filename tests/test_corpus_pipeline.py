"""The ingest pipeline's machinery: bounded channels, stages that stop together, batches of passages to embed."""

import threading
import time

import pytest

from drzero.corpus.chunking import passage_id
from drzero.corpus.documents import Document
from drzero.corpus.passage_batches import LOOKUP, SORT_WINDOW, PassageBatches
from drzero.corpus.pipeline import Channel, Pipeline, Stopped
from drzero.corpus.readers import ReadReport, RecordFields


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-")]


def _count_forever(out: Channel) -> None:
    n = 0
    while True:
        out.put(n)
        n += 1


def _wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_channel_holds_at_most_its_size():
    channel = Channel(2)
    putter = threading.Thread(target=lambda: [channel.put(i) for i in range(5)] and channel.close())
    putter.start()
    time.sleep(0.2)
    assert putter.is_alive() and len(channel._items) == 2   # the third put waits for room
    assert list(channel) == [0, 1, 2, 3, 4]
    putter.join(5)


def test_a_failing_stage_stops_the_others_and_is_raised_once(capsys):
    written = []
    failure = OSError("disk full")

    def write(batches: Channel) -> None:
        for item in batches:
            if item == 3:
                raise failure
            written.append(item)

    with pytest.raises(OSError) as raised:
        with Pipeline("test") as pipe:
            numbers = pipe.channel(2)
            pipe.start("read", _count_forever, numbers)   # never ends by itself
            encoded = pipe.channel(2)
            pipe.start("write", write, encoded)
            for n in numbers:                             # ends with Stopped once the writer failed
                encoded.put(n)
    assert raised.value is failure and raised.value.__suppress_context__
    assert written == [0, 1, 2]
    assert _pipeline_threads() == []
    assert "Exception in thread" not in capsys.readouterr().err   # raised here, once; not also printed by a thread


def test_when_the_caller_fails_what_it_handed_on_is_finished_and_its_feeders_stop():
    written = []

    def slow_write(batches: Channel) -> None:
        for item in batches:
            time.sleep(0.05)
            written.append(item)

    with pytest.raises(KeyboardInterrupt):
        with Pipeline("test") as pipe:
            numbers = pipe.channel(2)
            pipe.start("read", _count_forever, numbers)
            encoded = pipe.channel(4)
            pipe.start("write", slow_write, encoded)
            try:
                for n in numbers:
                    if n == 3:
                        raise KeyboardInterrupt   # Ctrl-C while encoding
                    encoded.put(n)
            finally:
                encoded.close()
    assert written == [0, 1, 2]
    assert _pipeline_threads() == []


def test_leaving_early_stops_the_stages_feeding_the_caller():
    with Pipeline("test") as pipe:
        numbers = pipe.channel(2)
        pipe.start("read", _count_forever, numbers)
        first = next(iter(numbers))
    assert first == 0 and _pipeline_threads() == []


def test_a_failing_reader_ends_the_callers_loop_with_its_error():
    def read(out: Channel) -> None:
        out.put(1)
        raise ValueError("bad source")

    seen = []
    with pytest.raises(ValueError, match="bad source"):
        with Pipeline("test") as pipe:
            numbers = pipe.channel(1)
            pipe.start("read", read, numbers, closes=numbers)
            for n in numbers:
                seen.append(n)
                time.sleep(0.1)
    assert _pipeline_threads() == [] and seen in ([], [1])


def test_stopped_is_raised_to_a_stage_that_puts_after_a_cancel():
    channel = Channel(1)
    channel.cancel()
    with pytest.raises(Stopped):
        channel.put(1)
    with pytest.raises(Stopped):
        next(iter(channel))


# -- the batches of passages to embed -------------------------------------------------------------

class _Store:
    """What PassageBatches asks of a store: which of these ids it holds."""

    def __init__(self, held: set[str]):
        self.held = held

    def existing_ids(self, ids: list[str]) -> set[str]:
        return self.held & set(ids)


def _documents(count: int) -> list[Document]:
    # one passage each, of lengths that vary with i
    return [Document(title=f"T{i}", text=" ".join(["word"] * (5 + (i * 37) % 50)) + f" number {i}.", source=f"s{i}")
            for i in range(count)]


def _batches(documents, batch_size, store=None, channel_size=10_000):
    source = PassageBatches([], documents, ReadReport(), fields=RecordFields(), max_words=200, overlap_words=30,
                            batch_size=batch_size, store=store, store_lock=threading.Lock())
    out = Channel(channel_size)
    source.produce(out)
    out.close()
    return source, list(out)


def test_batches_are_full_sorted_by_length_and_skip_duplicates_and_stored_passages():
    documents = _documents(300)
    documents += documents[:10]                                   # ten duplicates
    stored = {passage_id(f"{d.title}\n{d.text}") for d in documents[100:120]}
    source, batches = _batches(documents, batch_size=7, store=_Store(stored))
    assert (source.passages, source.duplicates, source.already_present) == (300, 10, 20)
    assert source.todo == source.estimated_todo() == 280 and source.fraction_read() == 1.0
    assert [len(b) for b in batches] == [7] * 40                  # 280 = 40 full batches
    ids = [p.id for batch in batches for p in batch]
    assert len(ids) == len(set(ids)) == 280 and not stored & set(ids)
    window = SORT_WINDOW                                          # batches sorted together
    for start in range(0, len(batches) - window + 1, window):
        lengths = [len(p.contents) for batch in batches[start:start + window] for p in batch]
        assert lengths == sorted(lengths, reverse=True)


def test_the_last_batch_holds_the_rest():
    _, batches = _batches(_documents(23), batch_size=5)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]


def test_reading_runs_only_a_bounded_way_ahead_of_the_encoder():
    documents = _documents(20_000)
    source = PassageBatches([], documents, ReadReport(), fields=RecordFields(), max_words=200, overlap_words=30,
                            batch_size=4, store=None, store_lock=threading.Lock())
    out = Channel(2)                                              # nobody takes from it
    reader = threading.Thread(target=lambda: pytest.raises(Stopped, source.produce, out))
    reader.start()
    _wait_until(lambda: len(out._items) == 2)
    time.sleep(0.2)
    ahead = source.passages
    out.cancel()
    reader.join(10)
    assert not reader.is_alive()
    # two batches queued, one waiting to be put, the rest of its sorted window and a lookup's worth of candidates
    assert ahead <= (2 + SORT_WINDOW) * 4 + LOOKUP < len(documents)
    assert 0 < source.estimated_todo() and source.fraction_read() < 1


# -- the encoder in a process of its own (what ingest uses on a GPU), run here on the CPU -----------

def test_the_encoder_process_encodes_as_the_embedder_does(minilm):
    import numpy as np

    from drzero.corpus.encoder_process import EncoderProcess

    texts = ["Lattice obfuscation\nA scheme built from LWE.", "Pairings\nBilinear maps on elliptic curves."]
    with EncoderProcess(minilm.spec, device="cpu") as encoder:
        assert (encoder.dimension, encoder.max_tokens) == (minilm.dimension, minilm.max_tokens)
        assert np.allclose(encoder.encode_passages(texts), minilm.encode_passages(texts), atol=1e-5)
        assert encoder.token_counter()(texts) == minilm.token_counts(texts)
        process = encoder._process
    assert process.wait(60) == 0   # told to exit, it exits on its own


def test_the_encoder_process_raises_the_childs_own_error(tmp_path, monkeypatch):
    from drzero.corpus.embedder import EmbedderNotFound, spec_for
    from drzero.corpus.encoder_process import EncoderProcess

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("DRZERO_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(EmbedderNotFound, match="intfloat/e5-large-v2"):
        EncoderProcess(spec_for("e5-large-v2"), device="cpu")


# The parent starts an encoder process, prints its pid, and is killed -9: the child must not outlive it.
PARENT_OF_AN_ENCODER = """
import os, signal
from drzero.corpus.embedder import TEST_EMBEDDER, spec_for
from drzero.corpus.encoder_process import EncoderProcess
encoder = EncoderProcess(spec_for(TEST_EMBEDDER), device="cpu")
print(encoder._process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_encoder_process_dies_with_its_parent_and_its_death_is_one_sentence(minilm):
    import os
    import signal
    import subprocess
    import sys

    from drzero.corpus.encoder_process import EncoderProcess, EncoderStopped

    parent = subprocess.run([sys.executable, "-c", PARENT_OF_AN_ENCODER], capture_output=True, text=True,
                            timeout=300)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{child}/stat").read().split()[2] == "Z"   # exited, not yet reaped by init
    _wait_until(gone, 30)

    with EncoderProcess(minilm.spec, device="cpu") as encoder:
        os.kill(encoder._process.pid, signal.SIGKILL)   # what the kernel's out-of-memory killer does
        with pytest.raises(EncoderStopped) as stopped:
            encoder.encode_passages(["Pairings\nBilinear maps."])
    message = str(stopped.value)
    assert "stopped with exit code -9" in message and "\n" not in message
