"""Checkpoint integrity (per-file sha256 in megatron_inpo.json) and loading without trusting (no pickle runs code):
engine/trust.py, used by engine/checkpoint.py `load_checkpoint` and the mcore->hf converter."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.engine import PORTS, PY, REPO, convert_to_mcore, make_pairs, tiny_hf_model, write_pairs

from megatron_inpo.engine import compat, trust


class _Evil:
    """Unpickling this runs `touch marker` (what a hostile checkpoint would do with a real command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    tiny_hf_model().save_pretrained(root / "hf")
    convert_to_mcore(root / "hf", root / "ckpt")
    write_pairs(root / "pairs.jsonl", make_pairs(4))
    return root


def _copy(made: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(made / "ckpt", dst)
    return dst


def _rerecord(ckpt: Path) -> None:
    """What a hostile author does: recompute the digest record for the files as they now are."""
    meta = json.loads((ckpt / "megatron_inpo.json").read_text())
    meta["files"] = trust.file_digests(ckpt)
    (ckpt / "megatron_inpo.json").write_text(json.dumps(meta))


def _evil_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _rerecord(ckpt)


def _evil_common(ckpt: Path, marker: Path) -> None:
    torch.save({"data": _Evil(marker)}, ckpt / "common.pt")
    _rerecord(ckpt)


def _flip(ckpt: Path, name: str = "__0_0.distcp") -> None:
    p = ckpt / name
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _convert(ckpt: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    from megatron_inpo.cli.convert import main

    rc = main(["mcore-to-hf", "--mcore-dir", str(ckpt), "--hf-dir", str(out), "--no-progress", *extra])
    return rc, capsys.readouterr().err


def test_save_records_digests_and_a_normal_checkpoint_checks_out(made):
    meta = json.loads((made / "ckpt" / "megatron_inpo.json").read_text())
    # the common state: common.pt on megatron-core 0.16.1, a byte entry of __0_0.distcp on 0.19 (engine/compat.py)
    common = {"common.pt"} if compat.common_state_entry({}) is None else set()
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "metadata.json"} | common
    assert meta["files"] == trust.file_digests(made / "ckpt")
    assert trust.verify_digests(made / "ckpt", meta) is True
    md = trust.check_loadable(made / "ckpt")
    assert md.state_dict_metadata


def test_the_allow_list_is_what_real_checkpoints_use(made):
    """Every global of a real `.metadata` is allowed (the restricted reader gives the same Metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(made / "ckpt" / ".metadata", "rb") as f:
        Recording(f).load()
    dtypes = {g for g in seen if g.startswith("torch.") and isinstance(getattr(torch, g[6:], None), torch.dtype)}
    assert seen - dtypes <= trust.METADATA_GLOBALS
    ref = FileSystemReader(str(made / "ckpt")).read_metadata()
    assert trust.load_metadata(made / "ckpt").state_dict_metadata.keys() == ref.state_dict_metadata.keys()


def test_flipped_byte_missing_and_extra_files_are_named_by_convert(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    _flip(ckpt)
    rc, err = _convert(ckpt, tmp_path / "hf", capsys)
    assert rc == 2 and "__0_0.distcp: sha256 differs" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()

    ckpt2 = _copy(made, tmp_path, "ckpt2")
    (ckpt2 / ".metadata").unlink()
    rc, err = _convert(ckpt2, tmp_path / "hf", capsys)
    assert rc == 2 and ".metadata: missing checkpoint file" in err, err

    ckpt3 = _copy(made, tmp_path, "ckpt3")
    (ckpt3 / "__9_9.distcp").write_bytes(b"x")
    rc, err = _convert(ckpt3, tmp_path / "hf", capsys)
    assert rc == 2 and "__9_9.distcp: file not in the checkpoint's digest record" in err, err


def test_no_verify_skips_digests_and_old_checkpoints_warn(made, tmp_path, capsys, caplog, monkeypatch):
    old = _copy(made, tmp_path)
    meta = json.loads((old / "megatron_inpo.json").read_text())
    del meta["files"]
    (old / "megatron_inpo.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        rc, err = _convert(old, tmp_path / "hf_old", capsys)
    assert rc == 0, err
    assert "no file digests" in caplog.text

    extra = _copy(made, tmp_path, "extra")
    (extra / "notes.txt").write_text("hi")
    monkeypatch.setenv(trust.NO_VERIFY_ENV, "1")
    rc, err = _convert(extra, tmp_path / "hf_extra", capsys)
    assert rc == 0, err
    monkeypatch.delenv(trust.NO_VERIFY_ENV)
    from megatron_inpo.convert import ConvertError
    from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

    with pytest.raises(ConvertError, match="notes.txt"):
        convert_mcore_to_hf(extra, tmp_path / "hf_extra2", progress=False)
    convert_mcore_to_hf(extra, tmp_path / "hf_extra3", progress=False, verify_digests=False)


@pytest.mark.parametrize("what", ["metadata", "common", "metadata_unrecorded"])
def test_pickled_payload_is_refused_by_convert(made, tmp_path, capsys, what):
    ckpt = _copy(made, tmp_path)
    marker = tmp_path / "PWNED"
    if what == "common":
        _evil_common(ckpt, marker)
        name = "common.pt"
    else:
        _evil_metadata(ckpt, marker)
        name = ".metadata"
        if what == "metadata_unrecorded":  # no digest record at all (an "old" checkpoint): still refused
            meta = json.loads((ckpt / "megatron_inpo.json").read_text())
            del meta["files"]
            (ckpt / "megatron_inpo.json").write_text(json.dumps(meta))
    rc, err = _convert(ckpt, tmp_path / "hf", capsys)
    assert rc == 2, err
    assert f"{name}: refused: references posix.system (not a checkpoint class); this checkpoint may run code" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_storage_entries_outside_the_directory_are_refused(made, tmp_path):
    import dataclasses

    ckpt = _copy(made, tmp_path)
    md = trust.load_metadata(ckpt)
    idx = next(iter(md.storage_data))
    md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], relative_path="../../etc/passwd")
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(trust.TrustError, match="not a file of the checkpoint directory"):
        trust.check_loadable(ckpt)


def test_evil_byte_entry_is_refused(made, tmp_path):
    """A byte entry (RNG / TE extra state, read by dist_checkpointing with torch.load(weights_only=False)) holding a
    payload: refused, whatever the digest record says."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ckpt = _copy(made, tmp_path)
    md = trust.load_metadata(ckpt)
    fqn = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = md.storage_data[MetadataIndex(fqn)]
    buf = io.BytesIO()
    torch.save(_Evil(tmp_path / "PWNED"), buf)
    path = ckpt / info.relative_path
    with open(path, "ab") as f:
        offset = f.tell()
        f.write(buf.getvalue())
    import dataclasses

    md.storage_data[MetadataIndex(fqn)] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _rerecord(ckpt)
    with pytest.raises(trust.TrustError, match=r"__0_0.distcp \(byte entry .*\): refused: references posix.system"):
        trust.check_loadable(ckpt)
    assert not (tmp_path / "PWNED").exists()


_LOAD = """
import sys, json
from megatron_inpo.engine import parallel, checkpoint as C
from megatron_inpo.engine.model import build_model
parallel.initialize(1, 1, seed=0)
out = {}
for d in sys.argv[1:]:
    meta = json.load(open(d + "/megatron_inpo.json"))
    built = build_model(meta["hf_config"], precision="fp32", layer_spec="local",
                        padded_vocab_size=int(meta["padded_vocab_size"]))
    try:
        C.load_checkpoint(d, [built.model], load_rng=False)
        out[d] = "ok"
    except C.CheckpointError as e:
        out[d] = "CheckpointError: " + str(e)
print("RESULT " + json.dumps(out))
"""


def test_load_checkpoint_refuses_and_names_the_file(made, tmp_path):
    good = _copy(made, tmp_path, "good")
    flipped = _copy(made, tmp_path, "flipped")
    _flip(flipped)
    evil_md = _copy(made, tmp_path, "evil_md")
    _evil_metadata(evil_md, tmp_path / "PWNED_md")
    evil_common = _copy(made, tmp_path, "evil_common")
    _evil_common(evil_common, tmp_path / "PWNED_common")
    env = {**os.environ, "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore"}
    dirs = [str(d) for d in (good, flipped, evil_md, evil_common)]
    proc = subprocess.run([PY, "-c", _LOAD, *dirs], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res[str(good)] == "ok"
    assert "__0_0.distcp: sha256 differs" in res[str(flipped)]
    assert ".metadata: refused: references posix.system" in res[str(evil_md)]
    assert "common.pt: refused: references posix.system" in res[str(evil_common)]
    assert not (tmp_path / "PWNED_md").exists() and not (tmp_path / "PWNED_common").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([PY, "-m", "megatron_inpo", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_train_and_logprobs_refuse_a_pickled_payload(made, tmp_path):
    evil_md = _copy(made, tmp_path, "evil_md")
    _evil_metadata(evil_md, tmp_path / "PWNED_md")
    proc = _cli("train", "--data", str(made / "pairs.jsonl"), "--init-checkpoint", str(evil_md), "--output-dir",
                str(tmp_path / "out"), "--train.global-batch-size", "2", "--train.micro-batch-size", "1",
                "--train.train-iters", "1", "--progress", "false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ".metadata: refused: references posix.system" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "PWNED_md").exists()
    assert not (tmp_path / "out").exists()  # refused: not even its train_config.yaml is written

    evil_common = _copy(made, tmp_path, "evil_common")
    _evil_common(evil_common, tmp_path / "PWNED_common")
    proc = _cli("logprobs", "--data", str(made / "pairs.jsonl"), "--output", str(tmp_path / "pairs.logp.jsonl"),
                "--ref-checkpoint", str(evil_common))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "common.pt: refused: references posix.system" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "PWNED_common").exists()


_FLAG_AT_LOAD = """
import json, os, sys
from megatron_inpo.engine import parallel, checkpoint as C
from megatron_inpo.engine.model import build_model
parallel.initialize(1, 1, seed=0)
d = sys.argv[1]
meta = json.load(open(d + "/megatron_inpo.json"))
built = build_model(meta["hf_config"], precision="fp32", layer_spec="local",
                    padded_vocab_size=int(meta["padded_vocab_size"]))
seen = []
cls = type(built.model)
original = cls.load_state_dict
def recording(self, *a, **k):  # where TE >= 2.18 reads the flag: set_extra_state, inside load_state_dict
    seen.append(os.environ.get(C.NVTE_PICKLE_FLAG))
    return original(self, *a, **k)
cls.load_state_dict = recording
os.environ[C.NVTE_PICKLE_FLAG] = "as-before"
after = []
for verify in (None, False):
    C.load_checkpoint(d, [built.model], load_rng=False, verify_digests=verify)
    after.append(os.environ.get(C.NVTE_PICKLE_FLAG))
print("RESULT " + json.dumps({"seen": seen, "after": after}))
"""


def test_te_pickle_flag_is_set_while_load_state_dict_runs_for_verified_checkpoints_only(made):
    """TE >= 2.18 unpickles the FP8 extra state in `set_extra_state`, during `model.load_state_dict`, and refuses
    unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 then. The flag is recorded at that moment: "1" for a checkpoint
    whose digests verified, absent for one loaded unverified (even though the environment had it), and the
    environment's own value is back after each load. (Before the fix the flag was restored before load_state_dict:
    an FP8 delayed-recipe resume failed on GPUs.)"""
    env = {**os.environ, "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([PY, "-c", _FLAG_AT_LOAD, str(made / "ckpt")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res == {"seen": ["1", None], "after": ["as-before", "as-before"]}, res
