"""drzero.records: the one check of every file drzero reads back, and the one way a damaged one is set aside."""

from __future__ import annotations

import pytest

from drzero.records import DamagedRecord, Each, OneOf, Optional, parse_record, problem, read_record, set_aside

STATE = {"stages": Each({"status": OneOf("running", "done"), "outputs": Optional([str])})}


@pytest.mark.parametrize("text,expected", [
    ("", "it is empty"),
    ('{"rows": 22', "it is not JSON (Expecting ',' delimiter: line 1 column 12 (char 11))"),
    ('"x"', 'it is a string ("x"), not an object'),
    ('{"stages": []}', 'stages is a list ([]), not an object'),
    ('{"stages": {"iter1/challenger": "done"}}', 'stages["iter1/challenger"] is a string ("done"), not an object'),
    ('{"stages": {"iter1/challenger": null}}', 'stages["iter1/challenger"] is null, not an object'),
    ('{"stages": {"a": {"outputs": 5}}}', 'stages["a"] has no "status"'),
    ('{"stages": {"a": {"status": "done", "outputs": 5}}}', 'stages["a"]["outputs"] is an integer (5), not a list'),
    ('{"stages": {"a": {"status": "done", "outputs": ["/x", 3]}}}',
     'stages["a"]["outputs"][1] is an integer (3), not a string'),
    ('{"stages": {"a": {"status": "finished"}}}', 'stages["a"]["status"] is "finished", not "running" or "done"'),
])
def test_each_damage_is_named_by_where_it_is_in_the_file(text, expected):
    with pytest.raises(DamagedRecord) as damage:
        parse_record(text, STATE)
    assert str(damage.value) == expected


def test_sound_records_read_whatever_else_they_hold():
    assert parse_record('{"stages": {"a": {"status": "done"}}, "version": 2, "new": 1}', STATE)["version"] == 2
    assert problem({"rows": [0, 5]}, {"rows": [int, int]}) is None
    assert problem({"rows": [0]}, {"rows": [int, int]}) == "rows has 1 items, not 2"
    assert problem({"max": True}, {"max": int}) == "max is true, not an integer"  # JSON's true is not a count
    assert problem({"min": 3}, {"min": float}) is None and problem({"q": None}, {"q": (str, None)}) is None


def test_a_damaged_file_is_moved_aside_in_one_sentence_and_a_dry_run_moves_nothing(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"stages": {"x": "done"}}')
    said = []
    with pytest.raises(DamagedRecord) as damage:
        read_record(path, STATE)
    assert set_aside(path, str(damage.value), "it is rebuilt", said.append, move=False) is None
    assert path.is_file() and said[-1].endswith("a real run moves it aside and it is rebuilt")
    aside = set_aside(path, str(damage.value), "it is rebuilt", said.append)
    assert not path.exists() and aside.read_text() == '{"stages": {"x": "done"}}'
    assert said[-1] == (f'{path} is damaged: stages["x"] is a string ("done"), not an object; moved it to '
                        f"{aside.name} and it is rebuilt")
    assert said[-1].count(". ") == 0 and aside.name.startswith("state.json.damaged-")
    path.write_text("")
    assert set_aside(path, "it is empty", "it is rebuilt", said.append) != aside  # two in one second: both kept
    assert read_record(tmp_path / "none.json", STATE) is None
