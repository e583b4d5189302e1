"""Preference JSONL: valid files load; malformed lines are reported with file and line."""
import json

import pytest

from megatron_inpo.data.preferences import DataError, PreferencePair, read_preferences


def pair(**kw):
    base = dict(prompt_id="p1", prompt="hi", prompt_ids=[1, 2], chosen="a", rejected="b",
                chosen_ids=[3], rejected_ids=[4, 5])
    base.update(kw)
    return base


def test_read_and_round_trip(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(pair()) + "\n\n" + PreferencePair(**pair(prompt_id="p2")).to_json() + "\n")
    got = read_preferences(f)
    assert [p.prompt_id for p in got] == ["p1", "p2"] and not got[0].has_logps
    with pytest.raises(DataError, match=r"p.jsonl:1: log-prob columns missing"):
        read_preferences(f, require_logps=True)


@pytest.mark.parametrize("line,msg", [
    ("{not json", r":2: invalid JSON"),
    (json.dumps({"prompt_id": "x"}), r":2: missing field\(s\)"),
    (json.dumps(pair(colour="red")), r":2: unknown field\(s\) \['colour'\]"),
    (json.dumps(pair(chosen_ids=[])), r":2: field 'chosen_ids' is empty"),
    (json.dumps(pair(prompt_ids=[1, -2])), r":2: field 'prompt_ids' must be a list of non-negative ints"),
    ("[1, 2]", r":2: expected a JSON object"),
])
def test_errors_name_the_line(tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(pair()) + "\n" + line + "\n")
    with pytest.raises(DataError, match=msg):
        read_preferences(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_preferences(tmp_path / "nope.jsonl")
