"""Prompt files: records, optional fields, and errors that name the line."""
import json

import pytest

from megatron_inpo.data.preferences import DataError
from megatron_inpo.data.prompts import read_prompts


def test_read(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": 1, "prompt": "hi", "answer": "42"}) + "\n\n"
                 + json.dumps({"id": "b", "prompt": "", "prompt_ids": [1, 2]}) + "\n")
    a, b = read_prompts(f)
    assert (a.id, a.prompt, a.prompt_ids, a.extra) == ("1", "hi", None, {"answer": "42"})
    assert (b.id, b.prompt_ids) == ("b", [1, 2])
    assert len(read_prompts(f, limit=1)) == 1


@pytest.mark.parametrize("line,msg", [
    ("{bad", r":2: invalid JSON"),
    ('"text"', r":2: expected a JSON object"),
    ('{"prompt": "x"}', r":2: missing field 'id'"),
    ('{"id": "z"}', r":2: missing field 'prompt'"),
    ('{"id": null, "prompt": "x"}', r":2: field 'id' must be"),
    ('{"id": "z", "prompt": 3}', r":2: field 'prompt' must be a string"),
    ('{"id": "z", "prompt": ""}', r":2: field 'prompt' is empty"),
    ('{"id": "z", "prompt": "x", "prompt_ids": [1, -1]}', r":2: field 'prompt_ids'"),
    ('{"id": "a", "prompt": "again"}', r":2: duplicate prompt id 'a' \(first on line 1\)"),
])
def test_errors_name_the_line(tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "a", "prompt": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match="bad.jsonl" + msg):
        read_prompts(f)


def test_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_prompts(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "e.jsonl")
