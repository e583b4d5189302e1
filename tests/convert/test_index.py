"""A safetensors index may only name shard files inside the model directory (no torch.distributed needed)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_inpo.convert import ConvertError
from megatron_inpo.convert.safetensors_io import INDEX_FILE, SafetensorsSource


def _model(d, weight_map):
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "s2.safetensors"))
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_index_inside_the_directory_reads(tmp_path):
    src = SafetensorsSource(_model(tmp_path / "m", {"a": "s1.safetensors", "b": "./s2.safetensors"}))
    assert torch.equal(src.read("a"), torch.ones(2)) and torch.equal(src.read("b"), torch.zeros(3))


@pytest.mark.parametrize("entry,why", [("/etc/passwd", "is an absolute path"),
                                       ("../outside/s1.safetensors", "leaves the model directory"),
                                       ("sub/../../x.safetensors", "leaves the model directory"),
                                       (7, "is not a file name"), ("", "is not a file name")])
def test_index_entry_outside_the_directory_refused(tmp_path, entry, why):
    (tmp_path / "outside").mkdir()
    save_file({"b": torch.zeros(3)}, str(tmp_path / "outside" / "s1.safetensors"))
    d = _model(tmp_path / "m", {"a": "s1.safetensors", "b": entry})
    with pytest.raises(ConvertError, match=why) as e:
        SafetensorsSource(d)
    assert f"weight_map entry 'b': file {entry!r}" in str(e.value) and INDEX_FILE in str(e.value)


@pytest.mark.parametrize("text,match", [('["a"]', "no 'weight_map' mapping"), ('{"weight_map": []}', "no 'weight_map'"),
                                        ("{", "invalid index"), (b"\xff\xfe", "invalid index")])
def test_malformed_index(tmp_path, text, match):
    d = _model(tmp_path / "m", {})
    (d / INDEX_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConvertError, match=match):
        SafetensorsSource(d)


def test_header_that_is_not_a_mapping(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    header = b'["x"]'
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ConvertError, match="header is a JSON list"):
        SafetensorsSource(d)
    header = b'{"w": [1, 2]}'
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ConvertError, match="entry 'w' \\(not an object\\)"):
        SafetensorsSource(d)


def test_convert_cli_names_the_entry(tmp_path, capsys):
    from megatron_inpo.cli.convert import main

    d = _model(tmp_path / "m", {"a": "s1.safetensors", "b": "/etc/passwd"})
    from tests.helpers.model import tiny_config

    (d / "config.json").write_text(json.dumps(tiny_config("gqa_tied")))
    # 2: every command's exit code for bad input (tests/convert/test_roundtrip.py)
    assert main(["hf-to-mcore", "--hf-dir", str(d), "--mcore-dir", str(tmp_path / "mc"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'/etc/passwd' is an absolute path" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
