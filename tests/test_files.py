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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    """Atomic outputs get the modes open()/mkdir() would give them, not mkstemp's 0600 / mkdtemp's 0700."""
    import os
    import stat

    old = os.umask(umask)
    try:
        f = atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "w").write_text("1")
            atomic_write_json(d / "j.json", {})
        plain = tmp_path / "plain"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(f) == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "d" / "j.json") == 0o666 & ~umask
    assert mode(tmp_path / "d") == mode(tmp_path / "plain_dir") == 0o777 & ~umask


def test_umask_read_without_proc(monkeypatch):
    """Where /proc does not say it, the umask is read by setting and restoring it."""
    import builtins
    import os

    from megatron_inpo import files

    real_open = builtins.open

    def no_proc(p, *a, **k):
        if str(p).startswith("/proc/"):
            raise FileNotFoundError(p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    old = os.umask(0o027)
    try:
        assert files.file_mode() == 0o640 and files.dir_mode() == 0o750
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)


def test_write_error_names_the_file(tmp_path, monkeypatch):
    """A full disk fails in write()/fsync(), whose OSError names no file: the atomic writer adds the output's."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "out.txt", "x")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out.txt")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
