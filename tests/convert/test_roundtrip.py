"""HF -> Megatron dist-checkpoint -> HF is bit-exact; bad inputs give clear errors (single process)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.model import hf_model, tiny_config

pytestmark = pytest.mark.megatron


def _hf_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name in ("gqa_untied_rope", "gqa_tied", "mha_tied_rope"):
        d = root / name
        hf_model(tiny_config(name)).save_pretrained(d, max_shard_size="100KB")  # sharded with an index
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        dirs[name] = d
    return dirs


@pytest.mark.parametrize("name,tp,pp", [("gqa_untied_rope", 1, 1), ("gqa_untied_rope", 2, 2),
                                        ("gqa_tied", 2, 1), ("mha_tied_rope", 1, 2)])
def test_round_trip_bit_exact(hf_dirs, tmp_path, name, tp, pp):
    from megatron_inpo.cli.convert import main

    src = hf_dirs[name]
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert main(["hf-to-mcore", "--hf-dir", str(src), "--mcore-dir", str(mc), "--tp", str(tp), "--pp", str(pp),
                 "--no-progress"]) == 0
    meta = json.loads((mc / "megatron_inpo.json").read_text())
    assert (meta["tp"], meta["pp"], meta["format_version"]) == (tp, pp, 1)
    assert meta["padded_vocab_size"] % (128 * tp) == 0 and meta["padded_vocab_size"] > meta["hf_config"]["vocab_size"]
    assert (mc / "tokenizer" / "tokenizer_config.json").exists()
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--hf-dir", str(back), "--dtype", "keep",
                 "--max-shard-size", "150KB", "--no-progress"]) == 0
    a, b = _hf_tensors(src), _hf_tensors(back)
    a.pop("lm_head.weight", None) if tiny_config(name)["tie_word_embeddings"] else None
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    assert json.loads((back / "config.json").read_text())["vocab_size"] == tiny_config(name)["vocab_size"]
    assert (back / "generation_config.json").exists() and (back / "tokenizer_config.json").exists()


def test_export_bf16_loads_in_transformers_and_verify(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

    src = hf_dirs["gqa_untied_rope"]
    s = convert_hf_to_mcore(src, tmp_path / "mc", tp=2, progress=False, verify=True)
    assert s["verify_max_abs_err"] < 1e-4
    s = convert_mcore_to_hf(tmp_path / "mc", tmp_path / "bf", progress=False, verify=True)  # bf16 default
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "bf")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = _hf_tensors(src)
    got = _hf_tensors(tmp_path / "bf")
    assert torch.equal(got["lm_head.weight"], ref["lm_head.weight"].to(torch.bfloat16))


def _expect_error(capsys, argv, *needles):
    from megatron_inpo.cli.convert import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_clear_errors(hf_dirs, tmp_path, capsys):
    import shutil

    src = hf_dirs["gqa_untied_rope"]
    out = str(tmp_path / "o")
    base = ["hf-to-mcore", "--mcore-dir", out, "--no-progress", "--hf-dir"]
    # TP not dividing the query groups (2 groups)
    _expect_error(capsys, base + [str(src), "--tp", "4"], "tensor parallel size 4", "num_key_value_heads=2")
    # unsupported architecture
    bad = tmp_path / "arch"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, base + [str(bad)], "MixtralForCausalLM", "unsupported")
    # shape mismatch between config.json and the weights
    bad = tmp_path / "shape"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, base + [str(bad)], "mlp.gate_proj.weight", "does not match config.json")
    # missing shard
    bad = tmp_path / "missing"
    shutil.copytree(src, bad)
    shard = sorted(p for p in bad.iterdir() if p.suffix == ".safetensors")[1]
    shard.unlink()
    _expect_error(capsys, base + [str(bad)], "missing safetensors shard", shard.name)
    # corrupted (truncated) safetensors file
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    shard = sorted(p for p in bad.iterdir() if p.suffix == ".safetensors")[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    _expect_error(capsys, base + [str(bad)], "corrupted safetensors", shard.name)
    assert not os.path.exists(out)  # nothing half-written
    # export from a non-checkpoint
    _expect_error(capsys, ["mcore-to-hf", "--mcore-dir", str(src), "--hf-dir", out], "not a megatron-inpo checkpoint")


def test_sharded_keys_match_megatron_model(hf_dirs, tmp_path):
    """The converter's checkpoint has exactly the keys and global shapes of a real GPTModel's sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_inpo.engine import compat, parallel
    from megatron_inpo.engine.model import build_model

    for name in ("gqa_untied_rope", "gqa_tied"):
        convert_hf_to_mcore(hf_dirs[name], tmp_path / name, progress=False)
        md = FileSystemReader(str(tmp_path / name)).read_metadata().state_dict_metadata
        parallel.initialize(1, 1)
        sd = build_model(tiny_config(name)).model.sharded_state_dict()
        want = {}
        for v in sd.values():
            if isinstance(v, ShardedTensor):
                want[v.key] = tuple(v.global_shape)
            elif isinstance(v, ShardedObject):
                want[v.unique_key] = None
            else:  # the swiglu factory of linear_fc1
                want[v.key] = (2,) + tuple(v.data.shape)
        common = compat.common_state_entry({})  # 0.19 keeps the common state as a byte entry too
        if common is not None:
            want[common.unique_key] = None
        got = {k: (tuple(m.size) if hasattr(m, "size") else None) for k, m in md.items()}
        assert got == want
        parallel.destroy()


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(hf_dirs, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError (not an OSError): the export names the file in one line,
    exit 2, and the half-written output is gone (issue 21: it was a traceback, rc 1)."""
    import safetensors.torch
    from safetensors import SafetensorError

    from megatron_inpo.cli.convert import main

    mc = tmp_path / "mc"
    assert main(["hf-to-mcore", "--hf-dir", str(hf_dirs["gqa_tied"]), "--mcore-dir", str(mc), "--no-progress"]) == 0
    capsys.readouterr()

    def full(*a, **k):  # the message safetensors' Rust writer gives for ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--hf-dir", str(out), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no space left on device" in err[0].lower() and ".shard0.safetensors" in err[0], err
    assert not out.exists() and not list(tmp_path.glob("hf*"))
