"""Atomic writes: a failure leaves the old content and no temporary files behind."""
import json

import pytest

from megatron_inpo.files import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_cleans(tmp_path):
    p = tmp_path / "a" / "f.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.json"]


def test_atomic_write_failure_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_directory(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as d:
            (d / "half").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as d:
        (d / "w").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as d:
        (d / "w").write_text("2")
    assert (out / "w").read_text() == "2" and [x.name for x in tmp_path.iterdir()] == ["ckpt"]
