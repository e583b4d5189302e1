"""`convert --verify` (issue 20): real text through the model's own chat template, a tolerance from the logit
scale on the same weights (a bf16 checkpoint of an fp32 model verifies), and a failed verify leaves no output."""
import json

import pytest

from tests.helpers.model import hf_model, tiny_config
from tests.helpers.rollout import make_tokenizer

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory):
    """A tiny fp32 Llama whose tokenizer (character-level, a chat template) fits its vocabulary."""
    d = tmp_path_factory.mktemp("hf_chat")
    hf_model(tiny_config("gqa_tied")).save_pretrained(d)
    tok = make_tokenizer(d)
    assert len(tok) <= tiny_config("gqa_tied")["vocab_size"] and tok.chat_template
    return d


def _convert(capsys, *argv):
    from megatron_inpo.cli.convert import main

    rc = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_bf16_import_of_an_fp32_model_verifies_on_chat_text(hf_chat, tmp_path, capsys):
    # the checkpoint holds bf16 weights, the source fp32 ones: compared as they are, the rounding alone differs
    rc, s, err = _convert(capsys, "hf-to-mcore", "--hf-dir", str(hf_chat), "--mcore-dir", str(tmp_path / "mc"),
                          "--dtype", "bf16", "--verify")
    assert rc == 0, err
    assert s["verify_weights_dtype"] == "bfloat16" and s["verify_texts"] == 3
    assert s["verify_max_abs_err"] <= s["verify_tolerance"] == pytest.approx(2 ** -13 * s["verify_logit_scale"],
                                                                               rel=1e-2)
    rc, s, err = _convert(capsys, "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--hf-dir",
                          str(tmp_path / "hf"), "--dtype", "fp32", "--verify")
    assert rc == 0, err
    assert s["verify_weights_dtype"] == "bfloat16" and s["verify_texts"] == 3


def test_failed_verify_removes_the_output(hf_chat, tmp_path, capsys, monkeypatch):
    import megatron_inpo.engine.model as model_mod

    build = model_mod.build_model

    def off_by_one(*a, **kw):  # a converter bug stand-in: Megatron's logits all one higher
        built = build(*a, **kw)
        built.model.register_forward_hook(lambda mod, inp, out: out + 1.0)
        return built

    rc, _, err = _convert(capsys, "hf-to-mcore", "--hf-dir", str(hf_chat), "--mcore-dir", str(tmp_path / "mc"))
    assert rc == 0, err
    monkeypatch.setattr(model_mod, "build_model", off_by_one)
    out = tmp_path / "hf"
    rc, _, err = _convert(capsys, "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--hf-dir", str(out),
                          "--verify")
    assert rc == 2 and err.count("\n") == 1 and "--verify failed" in err and "removed the output" in err
    assert not out.exists() and not list(tmp_path.glob(".hf*"))
    rc, _, err = _convert(capsys, "hf-to-mcore", "--hf-dir", str(hf_chat), "--mcore-dir", str(tmp_path / "mc2"),
                          "--verify")
    assert rc == 2 and "--verify failed" in err and not (tmp_path / "mc2").exists()
