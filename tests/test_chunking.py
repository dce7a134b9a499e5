from drzero.corpus.chunking import passage_id, split_document, split_sentences, split_text
from drzero.corpus.documents import Document


def _sentences(n: int, words: int = 12) -> str:
    return " ".join(f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + " end." for i in range(n))


def test_sentences_split_on_terminal_punctuation_not_abbreviations():
    text = "Obfuscation hides programs, e.g. circuits. It was proposed in 2001! Is it practical? Not yet.\n\nNew para"
    assert split_sentences(text) == ["Obfuscation hides programs, e.g. circuits.", "It was proposed in 2001!",
                                     "Is it practical?", "Not yet.", "New para"]


def test_passages_respect_max_words_and_end_on_sentence_boundaries():
    text = _sentences(60)  # 720 words
    chunks = split_text(text, max_words=200, overlap_words=30)
    assert len(chunks) >= 4
    for chunk in chunks:
        assert len(chunk.split()) <= 200
        assert chunk.endswith("end.")
        assert chunk.startswith("Sentence ")
    # every sentence of the input is in some passage
    for i in range(60):
        assert any(f"Sentence {i} " in chunk for chunk in chunks)


def test_consecutive_passages_overlap_by_whole_sentences_within_budget():
    chunks = split_text(_sentences(40), max_words=120, overlap_words=30)
    for first, second in zip(chunks, chunks[1:]):
        first_sentences = split_sentences(first)
        second_sentences = split_sentences(second)
        shared = [s for s in second_sentences if s in first_sentences]
        assert shared, "consecutive passages should share trailing sentences"
        assert sum(len(s.split()) for s in shared) <= 30
        assert second_sentences[:len(shared)] == first_sentences[-len(shared):]


def test_zero_overlap_partitions_the_sentences():
    chunks = split_text(_sentences(30), max_words=100, overlap_words=0)
    assert " ".join(chunks) == _sentences(30)


def test_a_sentence_longer_than_the_limit_is_cut_into_windows():
    long_sentence = " ".join(f"word{i}" for i in range(450)) + "."
    chunks = split_text(long_sentence, max_words=200, overlap_words=0)
    assert [len(c.split()) for c in chunks] == [200, 200, 50]


def test_passages_carry_title_and_stable_content_hash_ids():
    doc = Document(title="iO survey", text=_sentences(30), source="a.txt")
    first = split_document(doc)
    again = split_document(Document(title="iO survey", text=_sentences(30), source="elsewhere.txt"))
    assert [p.id for p in first] == [p.id for p in again]  # same content, same id, wherever it came from
    assert len({p.id for p in first}) == len(first)
    assert first[0].contents.startswith("iO survey\n")
    assert first[0].id == passage_id(first[0].contents)
    assert [p.chunk for p in first] == list(range(len(first)))
    assert first[1].metadata == {"title": "iO survey", "source": "a.txt", "chunk": 1}


def test_text_without_spaces_or_sentence_ends_is_cut_at_max_chars():
    chunks = split_text("x" * 1_000_010, max_words=200)
    assert max(len(c) for c in chunks) == 200 * 12 and sum(len(c) for c in chunks) == 1_000_010
    one_line = " ".join(["word"] * 5000)   # spaces but no sentence ends: words and chars both bound it
    assert all(len(c.split()) <= 200 and len(c) <= 2400 for c in split_text(one_line))


def test_record_metadata_travels_with_each_passage():
    doc = Document(title="T", text=_sentences(30), source="p.json#0", metadata={"authors": "A; B", "year": 2021})
    passages = split_document(doc)
    assert len(passages) > 1
    assert all(p.metadata == {"authors": "A; B", "year": 2021, "title": "T", "source": "p.json#0",
                              "chunk": p.chunk} for p in passages)
