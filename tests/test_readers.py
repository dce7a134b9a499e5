import json
import os

from drzero.corpus import readers
from drzero.corpus.readers import ReadReport, RecordFields, expand_sources, read_documents


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica, written by hand so the test needs no PDF writer."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def _read(paths):
    report = ReadReport()
    documents = list(read_documents(expand_sources(paths, report), report))
    return documents, report


def test_each_supported_format_is_read(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"title": "Lattices", "text": "Lattices underpin iO."}) + "\n"
        + json.dumps({"contents": '"Pairings"\nMultilinear maps were the first route.'}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"documents": [{"title": "LWE", "text": "Learning with errors."}]}))
    (tmp_path / "notes.txt").write_text("Plain notes about witness encryption.")
    (tmp_path / "survey.md").write_text("# A survey of iO\n\nObfuscation hides circuits.\n")
    (tmp_path / "paper.pdf").write_bytes(_minimal_pdf("Functional encryption implies obfuscation."))
    documents, report = _read([tmp_path])
    by_title = {d.title: d for d in documents}
    assert by_title["Lattices"].text == "Lattices underpin iO."
    assert by_title["Pairings"].text == "Multilinear maps were the first route."  # Search-R1 title line
    assert by_title["LWE"].text == "Learning with errors."
    assert by_title["notes"].text == "Plain notes about witness encryption."
    assert by_title["A survey of iO"].text == "Obfuscation hides circuits."
    assert "Functional encryption implies obfuscation." in by_title["paper"].text
    assert by_title["Lattices"].source.endswith("a.jsonl:1")
    assert report.files_read == 5 and report.records_read == 6 and report.skipped == []


def test_bad_files_and_records_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "good.txt").write_text("One good document.")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "broken.pdf").write_bytes(b"not a pdf at all")
    (tmp_path / "empty.txt").write_text("   ")
    (tmp_path / "mixed.jsonl").write_text('{"title": "x"}\n{oops\n' + json.dumps({"text": "ok"}) + "\n")
    documents, report = _read([tmp_path, tmp_path / "missing.txt"])
    assert sorted(d.text for d in documents) == ["One good document.", "ok"]
    reasons = dict(report.skipped)
    assert "unsupported file type '.png'" in reasons[str(tmp_path / "image.png")]
    assert "unreadable" in reasons[str(tmp_path / "broken.pdf")]
    assert "empty" in reasons[str(tmp_path / "empty.txt")]
    assert "'text'" in reasons[f"{tmp_path / 'mixed.jsonl'}:1"]
    assert f"{tmp_path / 'mixed.jsonl'}:2" in reasons
    assert "no such file" in reasons[str(tmp_path / "missing.txt")]


def _papers_file(tmp_path):
    """A corpus in the shape of a previous system's export: a "papers" wrapper, abstracts, authors as objects."""
    papers = [
        {"title": "Obfuscation from well-founded assumptions", "title_citation": "JLS21",
         "authors": [{"value": "A. Jain"}, {"value": "H. Lin"}, {"value": "A. Sahai"}],
         "abstract": "We construct indistinguishability obfuscation from four well-founded assumptions.",
         "topic": "iO constructions", "year": 2021},
        {"title": "Candidate multilinear maps", "title_citation": "GGH13",
         "authors": [{"value": "S. Garg"}, {"value": "C. Gentry"}],
         "abstract": "We describe plausible lattice-based constructions with properties like multilinear maps.",
         "topic": "multilinear maps", "year": 2013},
    ]
    path = tmp_path / "papers.json"
    path.write_text(json.dumps({"papers": papers, "exported": "2026-11-30"}))
    return path


def test_papers_shaped_json_reads_with_no_flags(tmp_path):
    documents, report = _read([_papers_file(tmp_path)])
    assert report.skipped == [] and report.records_read == 2 and report.files_read == 1
    assert report.wrappers == {str(tmp_path / "papers.json"): "papers"}
    first = documents[0]
    assert first.title == "Obfuscation from well-founded assumptions"
    assert first.text.startswith("We construct indistinguishability obfuscation")
    assert first.metadata == {"title_citation": "JLS21", "authors": "A. Jain; H. Lin; A. Sahai",
                              "topic": "iO constructions", "year": 2021}


def test_fields_are_chosen_by_flag(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"headline": "Witness encryption", "summary": "WE from iO.", "team": ["X", "Y"],
                                "title": "ignored", "topic": "WE"}) + "\n")
    report = ReadReport()
    fields = RecordFields(text_field="summary", title_field="headline", metadata_fields=("team",),
                          prepend_fields=("team", "topic"))
    [document] = read_documents([path], report, fields)
    assert document.title == "Witness encryption"
    assert document.text == "Team: X; Y\nTopic: WE\n\nWE from iO."
    assert document.metadata == {"team": "X; Y"}


def test_an_unreadable_record_names_its_keys_and_the_flag(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"headline": "H", "summary": "S"}]))
    documents, report = _read([path])
    assert documents == []
    [(where, why)] = report.skipped
    assert where == f"{path}#0"
    assert "headline, summary" in why and "--text-field" in why


def test_two_lists_of_records_are_named_not_guessed(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"papers": [{"text": "a"}], "talks": [{"text": "b"}]}))
    documents, report = _read([path])
    assert documents == [] and report.files_read == 0 and report.records_read == 0
    assert "papers, talks" in dict(report.skipped)[str(path)]


def test_a_bad_byte_costs_its_line_only(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"title": f"T{i}", "text": f"Record {i}."}).encode() for i in range(1000)]
    lines[500] = b'{"title": "bad", "text": "caf\xe9"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    documents, report = _read([path])
    assert len(documents) == 999 and report.records_read == 999 and report.files_read == 1
    [(where, why)] = report.skipped
    assert where == f"{path}:501" and "UTF-8" in why


def test_a_file_that_fails_midway_counts_nothing(tmp_path):
    path = tmp_path / "half.json"
    path.write_text('[{"text": "one"}, {"text": "two"}')   # truncated JSON: the whole file is unreadable
    documents, report = _read([path])
    assert documents == [] and report.records_read == 0 and report.files_read == 0


def test_nul_bytes_are_no_text(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\x00" * 100_000)
    documents, report = _read([tmp_path])
    assert documents == [] and "empty" in dict(report.skipped)[str(tmp_path / "zeros.txt")]


def test_a_deep_tree_and_a_symlink_loop_are_walked(tmp_path):
    deep = tmp_path / "root"
    deep.mkdir()
    current = deep
    for _ in range(1100):   # deeper than Python's recursion limit (mkdir(parents=True) itself recurses)
        current = current / "d"
        os.mkdir(current)
    (current / "bottom.txt").write_text("At the bottom.")
    (deep / "top.txt").write_text("At the top.")
    os.symlink(deep, deep / "loop")
    try:
        documents, report = _read([deep])
    finally:
        # removed bottom-up here: pytest's own tmp cleanup (shutil.rmtree) recurses and would fail on it
        (current / "bottom.txt").unlink()
        while current != deep:
            os.rmdir(current)
            current = current.parent
    assert sorted(d.text for d in documents) == ["At the bottom.", "At the top."]
    assert "not followed" in dict(report.skipped)[str(deep / "loop")]


def test_a_huge_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "HUGE_FILE_BYTES", 1000)
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    documents, report = _read([path])
    assert len(documents) == 1 and report.huge_files == [(str(path), 5000)]


def test_a_jsonl_file_that_fails_midway_keeps_what_it_gave(tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": f"T{i}", "text": f"Record {i}."}) + "\n" for i in range(3)))

    def breaks_after_two(path, report, fields):
        documents = readers._read_jsonl(path, report, fields)
        yield next(documents)
        yield next(documents)
        raise OSError("Input/output error")

    monkeypatch.setitem(readers._READERS, ".jsonl", breaks_after_two)
    documents, report = _read([path])
    assert [d.title for d in documents] == ["T0", "T1"] and report.records_read == 2 and report.files_read == 1
    assert report.skipped == [(str(path), "stopped after 2 records: OSError: Input/output error")]
    assert report.bytes_read == path.stat().st_size


def test_jsonl_documents_come_as_their_lines_are_read(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"title": f"T{i}", "text": f"Record {i}."}) + "\n" for i in range(3)]
    path.write_text("".join(lines))
    report = ReadReport()
    documents = read_documents([path], report)
    assert next(documents).title == "T0" and report.bytes_read == len(lines[0])   # the rest is not read yet
    assert len(list(documents)) == 2 and report.bytes_read == path.stat().st_size and report.files_read == 1


def _wiki18_lines(count: int) -> list[str]:
    """Lines as wiki-18.jsonl has them: ``id`` and ``contents``, the title quoted on the first line."""
    return [json.dumps({"id": str(i), "contents": f'"Article {i}"\nArticle {i} is the subject of passage {i}, '
                                                  f'one hundred words in the real corpus.'}) + "\n"
            for i in range(count)]


def test_wiki18_jsonl_and_its_gzip_read_with_no_field_mapping(tmp_path):
    import gzip

    plain, packed = tmp_path / "wiki-18.jsonl", tmp_path / "wiki-18b.jsonl.gz"
    lines = _wiki18_lines(300)
    plain.write_text("".join(lines))
    with gzip.open(packed, "wt") as handle:
        handle.write("".join(lines))
    for path in (plain, packed):
        documents, report = _read([path])
        assert len(documents) == 300 and report.files_read == 1 and report.skipped == []
        assert documents[7].title == "Article 7" and documents[7].text.startswith("Article 7 is the subject")
        assert documents[7].metadata == {"id": "7"}  # the corpus's own id stays with the passage
        assert report.bytes_read == path.stat().st_size  # progress ends at the file's own (compressed) size


def test_a_truncated_gzip_keeps_the_lines_before_the_damage(tmp_path):
    import gzip

    path = tmp_path / "wiki-18.jsonl.gz"
    path.write_bytes(gzip.compress("".join(_wiki18_lines(2000)).encode())[:-2000])
    documents, report = _read([path])
    assert 0 < len(documents) < 2000 and report.files_read == 1
    assert len(report.skipped) == 1 and report.skipped[0][1].startswith(f"stopped after {len(documents)} records")
